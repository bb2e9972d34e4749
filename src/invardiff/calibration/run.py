"""``calibrate``: two full-compute passes over a stock diffusers pipeline, then the InvarDiff plan."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .. import api
from .._version import __version__
from ..engine.install import enumerate_units
from ..families import PipelineSpec, get_family, resolve_family
from ..plan import CachePlan, ModelFacts
from .rates import CalibrationRates
from .record_policy import RecordConfig
from .recorder import RateRecorder
from .thresholds import FAMILY_CALIBRATION, FamilyCalibration, InvarDiffThresholds, preset


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
) -> tuple[CachePlan, CalibrationRates]:
    """Calibrate an InvarDiff plan on ``pipe`` (FluxPipeline with ``prompts``, DiTPipeline with ``class_labels``).

    The calibration runs: by default one per prompt or class, run ``i`` with seed ``seed + i``, so every run has
    its own noise (as the official code draws a fresh noise per run; a repeated class is then a new run, not a
    duplicate); with ``seeds``, every input with every seed; with ``cases``, exactly the given (input, seed) pairs.
    The provenance records every run's input and seed. Runs are batched ``batch_size`` at a time and measured per
    sample. Pass 1 measures the change rates with full compute; the
    provisional plan they give drives pass 2, which re-measures them with frozen references inside provisional
    reuse runs (the resampling correction, SPEC.md A.3); the final plan comes from the corrected rates. Cost:
    two full-compute sampling runs per calibration run.

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
        The plan, and the rates artifact from which plans can be rebuilt without the model.
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
    samples, seed_rule = _samples(family.name, prompts, class_labels, seeds, seed, cases)
    check_inputs(pipe, family.name, [item for item, _ in samples])
    facts = ModelFacts.for_family(family.name, family.num_layers(transformer))
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **_default_kwargs(family.name),
        **(pipeline_kwargs or {}),
    }
    check_call_size(pipe, family.name, call_kwargs)

    if batch_size is None:
        from .batching import auto_batch_size

        batch_size = auto_batch_size(pipe, family.name, len(samples), call_kwargs, memory_budget, offload)

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    setup = PassSetup(family.name, facts, num_inference_steps, call_kwargs, epsilon, offload, options.record_branches)

    def run_pass(name: str, provisional=None) -> tuple:
        if runner is not None:
            return runner(name, setup, batches, provisional)
        report = None if progress is None else (lambda index: progress(name, index + 1, len(batches)))
        return record_batches(pipe, setup, batches, provisional, report)

    first_step, first_modules = run_pass("pass 1 (full compute)")
    stub = CalibrationRates(
        facts, num_inference_steps, thresholds, options, first_step, first_modules, first_step, first_modules
    )
    provisional_step, provisional_modules = stub.provisional()
    # Streams absent from `frozen` never freeze: FLUX does not correct its step stream.
    frozen = {"step": provisional_step} if options.correct_step else {}
    for kind, bits in provisional_modules.items():
        frozen.update({(kind, layer): bits[:, layer] for layer in range(bits.shape[1])})
    corrected_step, corrected_modules = run_pass("pass 2 (resampling correction)", frozen)
    rates = CalibrationRates(
        facts,
        num_inference_steps,
        thresholds,
        options,
        first_step,
        first_modules,
        corrected_step,
        corrected_modules,
        scheduler=type(pipe.scheduler).__name__,
        epsilon=epsilon,
        provenance=_provenance(pipe, samples, seed_rule, call_kwargs),
    )
    return rates.build_plan(), rates


@dataclass(frozen=True)
class PassSetup:
    """What recording a calibration pass needs besides the pipeline and the runs (picklable, for remote workers)."""

    family: str
    facts: ModelFacts
    num_steps: int
    call_kwargs: dict
    epsilon: float
    offload: str | None
    branches: tuple | None = None  # the CFG branches recorded (None: all)


def record_batches(pipe, setup: PassSetup, batches: list[list[tuple]], provisional=None, progress=None) -> tuple:
    """Per-run rates (step ``(N, T)``, per kind ``(N, T, L)``, runs in batch order) of one pipeline call per batch
    of (input, seed) runs, under ``provisional`` (see :class:`RateRecorder`). A run's rates depend only on its
    batch, so recording the batches on several workers and concatenating them in order gives the same arrays."""
    options = (setup.epsilon, setup.offload, setup.branches)
    with recording(pipe, setup.facts, setup.num_steps, provisional, *options) as recorder:
        for index, batch in enumerate(batches):
            _call(pipe, setup.family, batch, setup.call_kwargs)
            if progress is not None:
                progress(index)
    return recorder.rates()


@contextmanager
def recording(target, facts: ModelFacts, num_steps: int, provisional=None, epsilon=1e-8, offload=None, branches=None):
    """Full compute on ``target`` (a pipeline or transformer) with a :class:`RateRecorder` observing every step of
    the CFG ``branches`` (``None``: all); on exit the engine is removed and the recorder's reference features are
    freed (its rates stay)."""
    transformer = getattr(target, "transformer", target)
    family = resolve_family(transformer)
    units = enumerate_units(transformer, family)
    recorder = RateRecorder(units, family, num_steps, provisional, epsilon, offload, branches)
    api.enable(target, RecordConfig(CachePlan.reuse_nothing(facts, num_steps), recorder))
    try:
        yield recorder
        recorder.finish()  # the last step's rates to the host (and their NaN check)
    finally:
        api.disable(target)
        recorder.release()


def _samples(family: str, prompts, class_labels, seeds, seed: int, cases) -> tuple[list[tuple], str]:
    """The (input, seed) pair of every calibration run, and the rule that made them (for the provenance)."""
    if cases is not None:
        if prompts is not None or class_labels is not None or seeds is not None:
            raise ValueError("Give calibration runs either as cases=[(input, seed), ...] or as inputs and seeds.")
        samples = [tuple(case) for case in cases]
        if not samples or any(len(case) != 2 for case in samples):
            raise ValueError(f"cases must be a non-empty list of (input, seed) pairs, got {cases!r}.")
        _check_input_kind(family, [item for item, _ in samples])
        return samples, "cases"
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


def _default_kwargs(family: str) -> dict:
    return dict(_pipeline(family).calibration_kwargs)


def _call(pipe, family: str, batch: list[tuple], call_kwargs: dict):
    """One pipeline call on ``batch`` ((input, seed) pairs, each seed its own generator); the pipeline's output."""
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in batch]
    inputs = [item for item, _ in batch]
    return pipe(**{_pipeline(family).inputs.pipeline_arg: inputs}, generator=generators, **call_kwargs)


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
        "seeds": list(dict.fromkeys(seed for _, seed in samples)),
        "seed_rule": seed_rule,
        "runs": [[item, seed] for item, seed in samples],
        "num_runs": len(samples),
        "pipeline_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "versions": versions,
    }
