"""What a sweep runs on: a bundled model, or any diffusers Flux / DiT pipeline directory a user points it at."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..demo import CALIBRATION
from ..families import INPUT_KINDS, resolve_family
from ..models import registry
from ..models.registry import BundledModel


@dataclass(frozen=True)
class SweepTarget:
    """``entry`` says how to sample (steps, guidance, inputs, the evaluation examples); ``load`` returns the
    target's pipeline, loaded on the first call and shared by every later one (calibrations, the peers' calibration
    and the sweep run on it, each leaving it as it found it: one copy of the weights, however large);
    ``calibration`` are the inputs calibrations run on (kept apart from the evaluation examples)."""

    entry: BundledModel
    load: Callable[[], object]
    calibration: tuple
    calibration_cases: tuple | None = None  # explicit (input, seed) calibration runs instead

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def family(self) -> str:
        return self.entry.family

    def calibration_kwargs(self) -> dict:
        if self.calibration_cases:
            return {"cases": list(self.calibration_cases)}
        return {INPUT_KINDS[self.entry.inputs].calibrate_arg: list(self.calibration)}


def bundled_target(name: str, device: str = "cpu") -> SweepTarget:
    load = functools.cache(lambda: registry.load(name, device))
    return SweepTarget(registry.get(name), load, tuple(CALIBRATION[name]))


def pipeline_target(
    path: str,
    inputs: list,
    num_inference_steps: int,
    guidance_scale: float | None,
    device: str = "cpu",
    calibration: list | None = None,
    calibration_cases: list[tuple] | None = None,
) -> SweepTarget:
    """A saved diffusers pipeline (``save_pretrained`` layout, loaded with ``local_files_only``; invardiff's own
    pipeline classes and identity VAE included). ``inputs`` are prompts (Flux) or class ids (DiT); calibration runs
    on ``calibration_cases`` ((input, seed) pairs), on ``calibration`` or, by default, on the same inputs (with other
    seeds than the evaluation's). ``guidance_scale`` ``None``: the pipeline's own default (FluxPipeline 3.5,
    DiTPipeline 4.0)."""
    from ..models.loading import load_saved_pipeline

    @functools.cache
    def load():
        pipe = load_saved_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    family = resolve_family(load().transformer)
    if family.pipeline is None:
        raise ValueError(f"{path} is a {family.name} pipeline, whose family describes no pipeline calls.")
    kind = family.pipeline.input_kind
    if (kind == "prompt") != all(isinstance(item, str) for item in inputs):
        raise ValueError(f"{path} is a {family.name} pipeline: give it {INPUT_KINDS[kind].cli_flag}.")
    if guidance_scale is None:
        guidance_scale = inspect.signature(type(load()).__call__).parameters["guidance_scale"].default
    name = Path(path).name
    entry = BundledModel(
        name, family.name, "user pipeline", str(path), num_inference_steps, guidance_scale, kind, tuple(inputs)
    )
    cases = tuple(map(tuple, calibration_cases)) if calibration_cases else None
    return SweepTarget(entry, load, tuple(calibration or inputs), cases)
