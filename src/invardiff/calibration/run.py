"""``calibrate``: two full-compute passes over a stock diffusers pipeline, then the InvarDiff plan."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import api
from .._version import __version__
from ..engine.install import unwrap
from ..expert_plans import ExpertPlans, expert_steps
from ..families import PipelineSpec, get_family, resolve_family
from ..families.calibration_spec import FamilyCalibration, InvarDiffThresholds
from ..plan import CachePlan, ModelFacts
from .rates import CalibrationRates
from .recording import CalibrationPart, recording_parts
from .thresholds import FAMILY_CALIBRATION, preset


MIN_STEPS = 3  # rate j compares steps j-1, j, j+1


def calibrate(
    pipe,
    *,
    num_inference_steps: int,
    thresholds: InvarDiffThresholds | str,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    seeds: list[int] | None = None,
    seed: int = 42,
    cases: list[tuple] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    offload: str | None = None,
    pipeline_kwargs: dict | None = None,
    family_options: FamilyCalibration | None = None,
    epsilon: float = 1e-8,
    progress: Callable[[str, int, int], None] | None = None,
    runner: Callable | None = None,
) -> tuple[CachePlan, CalibrationRates] | tuple[ExpertPlans, dict[str, CalibrationRates]]:
    """Calibrate an InvarDiff plan on ``pipe`` (FluxPipeline with ``prompts``, DiTPipeline with ``class_labels``).

    The calibration runs: by default one per prompt or class, run ``i`` with seed ``seed + i``, so every run has
    its own noise (as the official code draws a fresh noise per run; a repeated class is then a new run, not a
    duplicate); with ``seeds``, every input with every seed; with ``cases``, exactly the given (input, noise)
    pairs, the noise a seed or the latents themselves (a tensor: the pipeline's ``latents`` argument for one
    sample, e.g. ``(C, H, W)`` for DiT, packed ``(N, C)`` for Flux; every case a seed, or every case latents). The
    provenance records every run's input and seed (latents: their shape, dtype and SHA-256). Runs are batched
    ``batch_size`` at a time and measured per sample. Pass 1 measures the change rates with full compute; the
    provisional plan they give drives pass 2, which re-measures them with frozen references inside provisional
    reuse runs (the resampling correction, SPEC.md A.3); the final plan comes from the corrected rates. Cost:
    two full-compute sampling runs per calibration run.

    A pipeline that switches transformers along the schedule (Wan2.2's ``transformer`` and ``transformer_2``) is
    calibrated expert by expert in the same two passes: each expert's rates are recorded over the steps it runs
    (counted from 0) and its plan is built from them alone, with the warm-up and the quantiles taken over its own
    steps. The plans come back as one :class:`~invardiff.expert_plans.ExpertPlans`, which ``invardiff.enable``
    takes as it is; the rates as ``{expert: CalibrationRates}``. Each expert needs at least 3 steps.

    Args:
        thresholds: an :class:`InvarDiffThresholds` or a preset name of the pipeline's family (``"fast"``...).
            Higher levels reuse more: faster, further from full compute.
        pipeline_kwargs: extra arguments of every pipeline call (resolution, guidance_scale...). DiT calibrates
            without classifier-free guidance by default (``guidance_scale=1``), as the official code does.
        family_options: deviations from the family's official behaviour (default: the official behaviour).
        batch_size: calibration runs per pipeline call; ``None``: the largest whose estimated calibration memory
            (reference features, scalars, the float32 working buffer) fits ``memory_budget``, see
            :func:`invardiff.calibration.batching.auto_batch_size`.
        memory_budget: bytes for the calibration's features when ``batch_size`` is ``None`` (default: half the
            free device memory on CUDA, 8 GiB otherwise). The model's own activations are not part of it.
        offload: ``"cpu"`` keeps the reference features in host memory (see :class:`RateRecorder`).
        runner: records a pass elsewhere: ``runner(name, setup, batches, provisional)`` returns what
            :func:`record_batches` returns for those batches (``invardiff.scale.calibrate`` shards them over Ray
            workers; the plan is byte-identical). ``None``: every run in this process on ``pipe``.

    Returns:
        The plan, and the rates artifact from which plans can be rebuilt without the model (for a pipeline with
        experts: the :class:`ExpertPlans` and each expert's rates).
    """
    transformer = pipe.transformer
    family = resolve_family(transformer)
    if isinstance(thresholds, str):
        thresholds = preset(family.name, thresholds)
    options = family_options or FAMILY_CALIBRATION[family.name]
    if num_inference_steps < MIN_STEPS:
        raise ValueError(
            f"Calibration needs num_inference_steps >= {MIN_STEPS} (a change rate compares three consecutive steps), "
            f"got {num_inference_steps}."
        )
    parts = calibration_parts(pipe, family, num_inference_steps)
    samples, seed_rule = _samples(family.name, prompts, class_labels, seeds, seed, cases)
    check_inputs(pipe, family.name, [item for item, _ in samples])
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **family_calibration_kwargs(family.name),
        **(pipeline_kwargs or {}),
    }
    check_call_size(pipe, family.name, call_kwargs)

    if batch_size is None:
        from .batching import auto_batch_size

        batch_size = auto_batch_size(pipe, family.name, len(samples), call_kwargs, memory_budget, offload)

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    setup = PassSetup(family.name, parts, call_kwargs, epsilon, offload, options.record_branches)

    def run_pass(name: str, provisional=None) -> dict:
        if runner is not None:
            return runner(name, setup, batches, provisional)
        report = None if progress is None else (lambda index: progress(name, index + 1, len(batches)))
        return record_batches(pipe, setup, batches, provisional, report)

    first = run_pass("pass 1 (full compute)")
    frozen = {part.name: _frozen(part, first[part.name], thresholds, options) for part in parts}
    corrected = run_pass("pass 2 (resampling correction)", frozen)
    provenance = _provenance(pipe, samples, seed_rule, call_kwargs)
    rates = {
        part.name: CalibrationRates(
            part.facts,
            part.num_steps,
            thresholds,
            options,
            *first[part.name],
            *corrected[part.name],
            scheduler=type(pipe.scheduler).__name__,
            epsilon=epsilon,
            provenance=part.provenance(provenance),
        )
        for part in parts
    }
    if parts[0].name is None:
        return rates[None].build_plan(), rates[None]
    plans = {name: part_rates.build_plan() for name, part_rates in rates.items()}
    boundary = getattr(pipe.config, "boundary_ratio", None)
    return ExpertPlans(plans, num_inference_steps, boundary, type(pipe).__name__), rates


def calibration_parts(pipe, family, num_inference_steps: int) -> tuple[CalibrationPart, ...]:
    """The transformers a ``num_inference_steps`` calibration of ``pipe`` records: its experts with the steps each
    runs (each needs :data:`MIN_STEPS`), or its one transformer over every step."""
    split = expert_steps(pipe, num_inference_steps, api.pipeline_experts(pipe))
    if not split:
        facts = ModelFacts.for_family(family.name, family.num_layers(pipe.transformer))
        return (CalibrationPart(None, facts, (0, num_inference_steps)),)
    parts = []
    for name, steps in split.items():
        transformer = unwrap(getattr(pipe, name))
        facts = ModelFacts.for_family(family.name, family.num_layers(transformer))
        part = CalibrationPart(name, facts, (steps.start, steps.stop))
        if part.num_steps < MIN_STEPS:
            raise ValueError(
                f"Expert {name!r} runs {part.num_steps} of the {num_inference_steps} steps (boundary_ratio "
                f"{pipe.config.boundary_ratio}); calibrating it needs at least {MIN_STEPS} (a change rate compares "
                f"three consecutive steps). Calibrate with more steps."
            )
        parts.append(part)
    return tuple(parts)


def _frozen(part: CalibrationPart, first: tuple, thresholds: InvarDiffThresholds, options: FamilyCalibration) -> dict:
    """The streams pass 2 freezes: the provisional plan of ``part``'s pass-1 rates (:class:`RateRecorder`)."""
    step, modules = first
    stub = CalibrationRates(part.facts, part.num_steps, thresholds, options, step, modules, step, modules)
    provisional_step, provisional_modules = stub.provisional()
    # Streams absent from `frozen` never freeze: FLUX does not correct its step stream.
    frozen = {"step": provisional_step} if options.correct_step else {}
    for kind, bits in provisional_modules.items():
        frozen.update({(kind, layer): bits[:, layer] for layer in range(bits.shape[1])})
    return frozen


@dataclass(frozen=True)
class PassSetup:
    """What recording a calibration pass needs besides the pipeline and the runs (picklable, for remote workers)."""

    family: str
    parts: tuple[CalibrationPart, ...]
    call_kwargs: dict
    epsilon: float
    offload: str | None
    branches: tuple | None = None  # the CFG branches recorded (None: all)


def record_batches(pipe, setup: PassSetup, batches: list[list[tuple]], provisional=None, progress=None) -> dict:
    """Per-run rates of one pipeline call per batch of (input, seed) runs, under ``provisional`` (``{part name:
    frozen streams}``, see :class:`RateRecorder`): ``{part name: (step (N, T), {kind: (N, T, L)})}``, runs in batch
    order, ``T`` the part's steps. A run's rates depend only on its batch, so recording the batches on several
    workers and concatenating them in order gives the same arrays."""
    options = (setup.epsilon, setup.offload, setup.branches)
    with recording_parts(pipe, setup.parts, provisional or {}, *options) as recorders:
        for index, batch in enumerate(batches):
            call_pipeline(pipe, setup.family, batch, setup.call_kwargs)
            if progress is not None:
                progress(index)
    return {name: recorder.rates() for name, recorder in recorders.items()}


def _samples(family: str, prompts, class_labels, seeds, seed: int, cases) -> tuple[list[tuple], str]:
    """The (input, seed) pair of every calibration run, and the rule that made them (for the provenance)."""
    if cases is not None:
        if prompts is not None or class_labels is not None or seeds is not None:
            raise ValueError("Give calibration runs either as cases=[(input, seed), ...] or as inputs and seeds.")
        samples = check_cases(cases)
        _check_input_kind(family, [item for item, _ in samples])
        return samples, "cases (explicit latents)" if torch.is_tensor(samples[0][1]) else "cases"
    given = {"prompts": prompts, "class_labels": class_labels}
    wanted = _pipeline(family).inputs.calibrate_arg
    inputs = given.pop(wanted)
    if not inputs or any(given.values()):
        raise ValueError(f"Calibrating a {family} pipeline needs {wanted} (and not the other kind of input).")
    if seeds is None:
        return [(item, seed + index) for index, item in enumerate(inputs)], f"per run: seed {seed} + run index"
    if not seeds:
        raise ValueError("Calibration needs at least one seed.")
    return [(item, s) for s in seeds for item in inputs], "every input with every seed"


def check_cases(cases) -> list[tuple]:
    """``cases`` as a list of (input, noise) tuples, the noise a seed (int) or latents (a tensor), all of one kind;
    a ValueError says what was expected otherwise."""
    samples = [tuple(case) for case in cases] if isinstance(cases, (list, tuple)) else []
    if not samples or any(len(case) != 2 for case in samples):
        raise ValueError(f"cases must be a non-empty list of (input, seed or latents) pairs, got {cases!r:.80}.")
    kinds = {"latents" if torch.is_tensor(noise) else type(noise).__name__ for _, noise in samples}
    if not (kinds == {"int"} or kinds == {"latents"}):
        raise ValueError(
            f"Every case's noise must be a seed (int), or every case's latents (a tensor); got {sorted(kinds)}."
        )
    return samples


def noise_record(noise):
    """How the provenance records a run's noise: its seed, or its latents' shape, dtype and SHA-256."""
    if not torch.is_tensor(noise):
        return noise
    flat = noise.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"latents_sha256": digest, "shape": list(noise.shape), "dtype": str(noise.dtype).removeprefix("torch.")}


def _check_input_kind(family: str, items: list) -> None:
    wanted = _pipeline(family).inputs.calibrate_arg
    is_prompt = [isinstance(item, str) for item in items]
    if (wanted == "prompts" and not all(is_prompt)) or (wanted != "prompts" and any(is_prompt)):
        kind = "prompts (strings)" if wanted == "prompts" else "class ids (integers)"
        raise ValueError(f"A {family} pipeline calibrates on {kind}; the cases hold {items!r}.")


def check_inputs(pipe, family: str, items: list) -> None:
    """Refuse class ids the model was not trained on: an index error deep in the model, or silent noise (an
    untrained embedding row, or DiT's null class one past the last)."""
    if _pipeline(family).input_kind != "class":
        return
    labels = getattr(pipe, "labels", None)  # DiTPipeline's names of the classes it was given (id2label)
    if labels:
        num_classes, source = len(set(labels.values())), "its id2label"
    else:
        num_classes, source = pipe.transformer.config.num_embeds_ada_norm, "its transformer's num_embeds_ada_norm"
    bad = [item for item in items if not isinstance(item, int) or not 0 <= item < num_classes]
    if bad:
        raise ValueError(
            f"Class ids {bad} are out of range: this model has {num_classes} classes (0 to {num_classes - 1}, from "
            f"{source})."
        )


SIZE_ARGUMENTS = ("height", "width", "num_frames")


def check_call_size(pipe, family: str, call_kwargs: dict) -> None:
    """Refuse a size (``height``, ``width``, ``num_frames``) the pipeline cannot sample as given, naming the nearest
    valid ones: a size off the patch grid broke mid-run (a broadcast error) or was rounded by the pipeline."""
    given = {name: call_kwargs[name] for name in SIZE_ARGUMENTS if call_kwargs.get(name) is not None}
    if not given:
        return
    rules_of = _pipeline(family).size_rules
    rules = rules_of(pipe) if rules_of is not None else {}
    for name, value in given.items():
        if name not in rules:
            raise ValueError(
                f"{type(pipe).__name__} takes no {name} (the {family} family's size is fixed by its transformer); "
                f"leave it out."
            )
        rules[name].check(name, value, type(pipe).__name__)


def family_calibration_kwargs(family: str) -> dict:
    """The pipeline arguments ``family``'s official calibration fixes (DiT: ``guidance_scale=1``)."""
    return dict(_pipeline(family).calibration_kwargs)


def sampling_defaults(pipe, family: str) -> dict:
    """Default arguments of the calls a budgeted calibration records and samples: the family's calibration
    arguments, but the guidance scale the pipeline samples with by default (the search records the calls its plan
    will run, both CFG halves where the pipeline batches them), not the official threshold calibration's (DiT: 1)."""
    from ..models.sources import pipeline_default

    kwargs = {k: v for k, v in family_calibration_kwargs(family).items() if k != "guidance_scale"}
    guidance = pipeline_default(pipe, "guidance_scale")
    return kwargs if guidance is None else {"guidance_scale": guidance, **kwargs}


def call_pipeline(pipe, family: str, batch: list[tuple], call_kwargs: dict):
    """One pipeline call on ``batch`` ((input, noise) pairs: each seed its own generator, or the latents stacked
    into the call's ``latents``); the pipeline's output."""
    spec = _pipeline(family)
    inputs = {spec.inputs.pipeline_arg: [item for item, _ in batch]}
    noises = [noise for _, noise in batch]
    if not torch.is_tensor(noises[0]):
        return pipe(
            **inputs, generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in noises], **call_kwargs
        )
    latents = torch.stack(noises)
    if "latents" in inspect.signature(type(pipe).__call__).parameters:
        return pipe(**inputs, latents=latents, **call_kwargs)
    if spec.with_latents is None:
        raise ValueError(f"{type(pipe).__name__} takes no latents argument; calibrate it with seeds instead.")
    with spec.with_latents(pipe, latents):
        return pipe(**inputs, **call_kwargs)


def output_tensor(result) -> torch.Tensor:
    """A pipeline call's output as a tensor: a video pipeline's ``.frames`` ((B, F, C, H, W)), else ``.images``."""
    output = result.frames if hasattr(result, "frames") else result.images
    return output if torch.is_tensor(output) else torch.as_tensor(np.asarray(output))


def _pipeline(family: str) -> PipelineSpec:
    spec = get_family(family).pipeline
    if spec is None:
        raise ValueError(f"Model family {family!r} describes no pipeline (FamilySpec.pipeline) to calibrate on.")
    return spec


def _provenance(pipe, samples, seed_rule: str, call_kwargs) -> dict:
    versions = {"invardiff": __version__, "torch": torch.__version__}
    for package in ("diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "pipeline": type(pipe).__name__,
        "inputs": list(dict.fromkeys(item for item, _ in samples)),
        "seeds": list(dict.fromkeys(seed for _, seed in samples if not torch.is_tensor(seed))),
        "seed_rule": seed_rule,
        "runs": [[item, noise_record(noise)] for item, noise in samples],
        "num_runs": len(samples),
        "pipeline_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "versions": versions,
    }
