"""What a sweep runs on (a bundled model, or your own pipeline or transformer), and the held-out rule: every
method, ours and the peers', calibrates on :meth:`SweepTarget.calibration_runs` only, and
:func:`check_held_out` refuses an evaluation (input, seed) among them."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..families import INPUT_KINDS
from ..models.registry import BundledModel
from ..models.sources import ModelSource


# Calibration inputs are kept apart from the evaluation inputs (the model's examples).
CALIBRATION = {
    "flux-shapes": [
        "a green square on the left, white background",
        "a red triangle on the bottom, black background",
        "a blue circle on the right, white background",
        "a yellow square on the top, black background",
    ],
    "dit-digits": [1, 2, 4, 6, 7, 9],
    "wan-motion": [
        "a green circle moving up fast",
        "a red square moving down slow",
        "a blue circle moving left slow",
        "a yellow square moving right fast",
    ],
}


CALIBRATION_SEED = 1000  # the first calibration seed when the calibration inputs are the evaluated ones


@dataclass(frozen=True)
class SweepTarget:
    """``entry`` says how to sample (steps, guidance, inputs, the evaluation examples); ``load`` returns the
    target's pipeline, loaded on the first call and shared by every later one (calibrations, the peers' calibration
    and the sweep run on it, each leaving it as it found it: one copy of the weights, however large);
    ``calibration`` are the inputs calibrations run on, ``calibration_cases`` explicit (input, seed) runs instead;
    ``source`` loads a fresh copy (the demo's second pipeline)."""

    entry: BundledModel
    load: Callable[[], object]
    calibration: tuple
    calibration_cases: tuple | None = None
    source: ModelSource | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def family(self) -> str:
        return self.entry.family

    def calibration_runs(self) -> list[tuple]:
        """The (input, seed) runs every method calibrates on: the explicit cases, else one run per calibration input,
        each with its own noise (seeds ``base, base + 1, ...``; ``base`` 0 when the calibration inputs are not the
        evaluated ones, else :data:`CALIBRATION_SEED`)."""
        if self.calibration_cases:
            return [tuple(case) for case in self.calibration_cases]
        base = CALIBRATION_SEED if set(self.calibration) & set(self.entry.examples) else 0
        return [(item, base + index) for index, item in enumerate(self.calibration)]

    def sampling_settings(self) -> dict:
        """The pipeline arguments the target samples with: the model's settings (a video model's clip size) and its
        guidance scale (``None``: the pipeline's own default, left out)."""
        guidance = self.entry.guidance_scale
        return {**self.entry.pipeline_kwargs, **({} if guidance is None else {"guidance_scale": guidance})}

    def sampling_kwargs(self, pipe) -> dict:
        """Every argument of the target's sampling calls but the inputs: its step count, the family's sampling
        defaults (``calibration.run.sampling_defaults``) and :meth:`sampling_settings`; what a search on the target
        records, profiles and samples with."""
        from ..calibration.run import sampling_defaults

        steps = {"num_inference_steps": self.entry.num_inference_steps}
        return {**steps, **sampling_defaults(pipe, self.family), **self.sampling_settings()}

    def calibration_kwargs(self) -> dict:
        """Pipeline arguments of a threshold calibration: the sampling settings (a video model's clip size), at the
        sampling guidance scale unless the family's official calibration fixes one (DiT calibrates without
        classifier-free guidance)."""
        from ..families import get_family

        fixed = "guidance_scale" in get_family(self.family).pipeline.calibration_kwargs
        return {**self.entry.pipeline_kwargs, **({} if fixed else {"guidance_scale": self.entry.guidance_scale})}


def check_held_out(target: SweepTarget, evaluation: list[tuple]) -> None:
    """Refuse evaluation (input, seed) pairs that the target's calibration runs on: an evaluated sample must never
    have been seen by any calibration."""
    seen = set(map(tuple, target.calibration_runs()))
    leaked = [case for case in map(tuple, evaluation) if case in seen]
    if leaked:
        raise ValueError(
            f"Evaluation inputs {leaked[:4]} are also calibration runs of {target.name}: choose evaluation seeds or "
            "calibration cases (--calibration-cases) that do not overlap."
        )


def bundled_target(name: str, device: str = "cpu", num_inference_steps: int | None = None) -> SweepTarget:
    return source_target(ModelSource(model=name), num_inference_steps=num_inference_steps, device=device)


def source_target(
    source: ModelSource,
    inputs: list | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    device: str = "cpu",
    calibration_cases: list[tuple] | None = None,
) -> SweepTarget:
    """The target of ``source``: a bundled model evaluates its examples and calibrates on its own calibration
    inputs (:data:`CALIBRATION`); your own pipeline evaluates ``inputs`` (prompts or class ids) at
    ``num_inference_steps`` and ``guidance_scale`` (``None``: the pipeline's own default) and calibrates on
    ``calibration_cases`` ((input, seed) pairs) or, by default, on the same inputs with seeds from
    :data:`CALIBRATION_SEED` (never the evaluation's).

    A bundled model may be given ``num_inference_steps`` (a few-step sweep: ``invardiff bench --model NAME --steps
    8``): every run, full compute (the reference), the calibrations and the peers', then samples at that count."""

    @functools.cache
    def load():
        return source.load(device)

    if source.model is not None:
        if inputs or guidance_scale is not None or calibration_cases:
            raise ValueError("A bundled model is evaluated on its own examples and settings (all but the step count).")
        entry = source.bundled
        if num_inference_steps is not None:
            entry = dataclasses.replace(entry, num_inference_steps=num_inference_steps)
        return SweepTarget(entry, load, tuple(CALIBRATION[source.model]), None, source)
    entry = source.sampling(load(), num_inference_steps, guidance_scale, inputs or ())
    kind = entry.inputs
    if not inputs or (kind == "prompt") != all(isinstance(item, str) for item in inputs):
        raise ValueError(f"{source.name} is a {entry.family} model: give it {INPUT_KINDS[kind].cli_flag}.")
    cases = tuple(map(tuple, calibration_cases)) if calibration_cases else None
    return SweepTarget(entry, load, tuple(inputs), cases, source)
