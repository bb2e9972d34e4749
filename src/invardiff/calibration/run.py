"""``calibrate``: two full-compute passes over a stock diffusers pipeline, then the InvarDiff plan."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import torch

from .. import api
from .._version import __version__
from ..families import resolve_family
from ..plan import CachePlan, ModelFacts
from .rates import CalibrationRates
from .recorder import RateRecorder
from .thresholds import FAMILY_CALIBRATION, FamilyCalibration, InvarDiffThresholds, preset


def calibrate(
    pipe,
    *,
    num_inference_steps: int,
    thresholds: InvarDiffThresholds | str,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    seeds: list[int] = (42,),
    batch_size: int = 8,
    pipeline_kwargs: dict | None = None,
    family_options: FamilyCalibration | None = None,
    epsilon: float = 1e-8,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[CachePlan, CalibrationRates]:
    """Calibrate an InvarDiff plan on ``pipe`` (FluxPipeline with ``prompts``, DiTPipeline with ``class_labels``).

    Every (prompt or class, seed) pair is one calibration run with its own noise; runs are batched
    ``batch_size`` at a time and measured per sample. Pass 1 measures the change rates with full compute; the
    provisional plan they give drives pass 2, which re-measures them with frozen references inside provisional
    reuse runs (the resampling correction, SPEC.md A.3); the final plan comes from the corrected rates. Cost:
    two full-compute sampling runs per calibration run.

    Args:
        thresholds: an :class:`InvarDiffThresholds` or a preset name of the pipeline's family (``"fast"``...).
            Higher levels reuse more: faster, further from full compute.
        pipeline_kwargs: extra arguments of every pipeline call (resolution, guidance_scale...). DiT calibrates
            without classifier-free guidance by default (``guidance_scale=1``), as the official code does.
        family_options: deviations from the family's official behaviour (default: the official behaviour).

    Returns:
        The plan, and the rates artifact from which plans can be rebuilt without the model.
    """
    transformer = pipe.transformer
    family = resolve_family(transformer)
    if isinstance(thresholds, str):
        thresholds = preset(family.name, thresholds)
    options = family_options or FAMILY_CALIBRATION[family.name]
    samples = _samples(family.name, prompts, class_labels, seeds)
    facts = ModelFacts.for_family(family.name, family.num_layers(transformer))
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **_default_kwargs(family.name),
        **(pipeline_kwargs or {}),
    }

    def run_pass(name: str, provisional=None) -> RateRecorder:
        api.enable(pipe, CachePlan.reuse_nothing(facts, num_inference_steps))
        engine = api._engine_or_raise(transformer)
        recorder = RateRecorder(engine.units, family, num_inference_steps, provisional, epsilon)
        engine.observer = recorder
        try:
            batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
            for index, batch in enumerate(batches):
                _call(pipe, family.name, batch, call_kwargs)
                if progress is not None:
                    progress(name, index + 1, len(batches))
        finally:
            api.disable(pipe)
        return recorder

    first_step, first_modules = run_pass("pass 1 (full compute)").rates()
    stub = CalibrationRates(
        facts, num_inference_steps, thresholds, options, first_step, first_modules, first_step, first_modules
    )
    provisional_step, provisional_modules = stub.provisional()
    # Streams absent from `frozen` never freeze: FLUX does not correct its step stream.
    frozen = {"step": provisional_step} if options.correct_step else {}
    for kind, bits in provisional_modules.items():
        frozen.update({(kind, layer): bits[:, layer] for layer in range(bits.shape[1])})
    corrected_step, corrected_modules = run_pass("pass 2 (resampling correction)", frozen).rates()
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
        provenance=_provenance(pipe, samples, seeds, call_kwargs),
    )
    return rates.build_plan(), rates


def _samples(family: str, prompts, class_labels, seeds) -> list[tuple]:
    inputs = prompts if family == "flux" else class_labels
    other = class_labels if family == "flux" else prompts
    if not inputs or other:
        wanted = "prompts" if family == "flux" else "class_labels"
        raise ValueError(f"Calibrating a {family} pipeline needs {wanted} (and not the other kind of input).")
    if not seeds:
        raise ValueError("Calibration needs at least one seed.")
    return [(item, seed) for seed in seeds for item in inputs]


def _default_kwargs(family: str) -> dict:
    return {"output_type": "latent"} if family == "flux" else {"guidance_scale": 1.0, "output_type": "np"}


def _call(pipe, family: str, batch: list[tuple], call_kwargs: dict) -> None:
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in batch]
    inputs = [item for item, _ in batch]
    if family == "flux":
        pipe(prompt=inputs, generator=generators, **call_kwargs)
    else:
        pipe(class_labels=inputs, generator=generators, **call_kwargs)


def _provenance(pipe, samples, seeds, call_kwargs) -> dict:
    versions = {"invardiff": __version__, "torch": torch.__version__}
    for package in ("diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "pipeline": type(pipe).__name__,
        "inputs": [item for item, seed in samples if seed == seeds[0]],
        "seeds": list(seeds),
        "num_runs": len(samples),
        "pipeline_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "versions": versions,
    }
