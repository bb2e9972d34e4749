"""The speed-quality sweep on a bundled trained model: which operating points, calibrated how."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..calibration import calibrate
from ..calibration.thresholds import PRESETS, InvarDiffThresholds
from ..demo import CALIBRATION, _generate
from ..models import registry
from .points import dicache_point, plan_point, plan_probe_point
from .sweep import OperatingPoint, SweepInputs


METHODS = ("invardiff", "invardiff-grid", "dicache", "plan+probe", "peers")
# DiCache thresholds besides the official 0.4 (SPEC.md B.5), chosen to span slow to fast on the bundled models.
DICACHE_THRESHOLDS = {"flux": (0.1, 0.2, 0.8, 1.5), "dit": (0.1, 0.2, 0.8, 1.5)}
PLAN_PROBE_THRESHOLDS = (0.1, 0.3)
# InvarDiff grid in the spirit of the paper's 35-point figure (SPEC.md A.8): step quantile x module bundles.
GRID_STEP_LEVELS = (0.5, 0.65, 0.8)
GRID_MODULE_LEVELS = (0.0, 0.4, 0.68)


def sweep_inputs(name: str, seeds: list[int], device: str = "cpu") -> SweepInputs:
    entry = registry.get(name)
    cases = [(item, seed) for seed in seeds for item in entry.examples]
    return SweepInputs(
        model=name,
        load_pipeline=lambda: registry.load(name, device),
        generate=lambda pipe: _generate(pipe, entry, cases),
        cases=[{"input": item, "seed": seed} for item, seed in cases],
        device=torch.device(device),
    )


def _calibrate(name: str, thresholds, device: str):
    entry = registry.get(name)
    pipe = registry.load(name, device)
    inputs = {"prompts": CALIBRATION[name]} if entry.inputs == "prompt" else {"class_labels": CALIBRATION[name]}
    plan, _ = calibrate(
        pipe, num_inference_steps=entry.num_inference_steps, thresholds=thresholds, seeds=[0], **inputs
    )
    return plan


def _grid(family: str) -> list[tuple[str, InvarDiffThresholds]]:
    base = next(iter(PRESETS[family].values()))
    grid = []
    for step in GRID_STEP_LEVELS:
        for level in GRID_MODULE_LEVELS:
            thresholds = InvarDiffThresholds(base.nonskip_rate, step, dict.fromkeys(base.modules, level))
            grid.append((f"grid step={step:g} modules={level:g}", thresholds))
    return grid


def bundled_points(
    name: str,
    methods: tuple[str, ...],
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    peer_points: Callable[[str], list[OperatingPoint]] | None = None,
) -> list[OperatingPoint]:
    """The operating points of ``methods`` on bundled model ``name`` (plans are calibrated here)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {METHODS}.")
    family = registry.get(name).family
    note = progress or (lambda message: None)
    points, plans = [], {}
    if {"invardiff", "plan+probe"} & set(methods):
        for preset in PRESETS[family]:
            note(f"calibrating {preset}")
            plans[preset] = _calibrate(name, preset, device)
    if "invardiff" in methods:
        points += [plan_point(f"invardiff {p}", plan, {"preset": p}) for p, plan in plans.items()]
    if "invardiff-grid" in methods:
        for label, thresholds in _grid(family):
            note(f"calibrating {label}")
            points.append(plan_point(f"invardiff {label}", _calibrate(name, thresholds, device), thresholds.to_dict()))
    if "dicache" in methods:
        points.append(dicache_point(family))
        points += [dicache_point(family, threshold) for threshold in DICACHE_THRESHOLDS[family]]
    if "plan+probe" in methods:
        points += [plan_probe_point("fast", plans["fast"], delta) for delta in PLAN_PROBE_THRESHOLDS]
    if "peers" in methods:
        if peer_points is None:
            raise ValueError("peers requested but no peer point builder given")
        points += peer_points(name)
    return points
