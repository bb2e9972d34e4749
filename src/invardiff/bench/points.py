"""Operating points of the sweep: invardiff's own policies (InvarDiff plans, DiCache, plan+probe) and the peers
(``peers.py``) on the target's pipeline."""

from __future__ import annotations

import re
from pathlib import Path

from .. import api
from ..dicache import DiCacheConfig, PlanProbeConfig
from ..families import get_family
from ..plan import CachePlan
from . import peers
from .sweep import OperatingPoint
from .targets import SweepTarget


def _executed(pipe) -> dict:
    """Per branch: how many steps ran the deep layers, and the step-by-step record."""
    summary = api.summary(pipe)
    return {
        name: {
            "steps_computed": int((branch.step_status == 0).sum()),
            "steps": "".join("C" if s == 0 else "R" for s in branch.step_status),
        }
        for name, branch in summary.branches.items()
    }


def _point(method: str, label: str, config, settings: dict, plan: CachePlan | None = None) -> OperatingPoint:
    def attach(pipe):
        api.enable(pipe, config)
        return lambda: api.disable(pipe)

    return OperatingPoint(method, label, attach, settings, executed=_executed, plan=plan)


def plan_point(label: str, plan: CachePlan, settings: dict, method: str | None = None) -> OperatingPoint:
    method = method or ("invardiff-capped" if "max_step_run" in settings else "invardiff")
    return _point(method, label, plan, settings, plan)


def save_point_plan(plan: CachePlan, directory: Path, label: str) -> Path:
    """Write a sweep point's plan as ``directory/LABEL.json`` (the label with every run of characters other than
    letters, digits, ``.``, ``+``, ``=`` and ``-`` made one ``-``), atomically, and return the path."""
    path = directory / (re.sub(r"[^A-Za-z0-9.+=-]+", "-", label).strip("-") + ".json")
    directory.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


def dicache_point(family: str, threshold: float | None = None, **overrides) -> OperatingPoint:
    preset = get_family(family).dicache_preset
    config = DiCacheConfig.preset(preset, **({"threshold": threshold} if threshold is not None else {}), **overrides)
    official = threshold is None and not (set(overrides) - {"per_sample"})
    label = f"dicache δ={config.threshold:g}" + (" (official)" if official else "")
    label += "".join(f" {key}={value:g}" for key, value in overrides.items() if key != "per_sample")
    label += " batch-global" if not config.per_sample else ""
    settings = {"preset": preset, "threshold": config.threshold, **overrides}
    return _point("dicache" if config.per_sample else "dicache-batch-global", label, config, settings)


def plan_probe_point(plan_label: str, plan: CachePlan, threshold: float, per_sample: bool = True) -> OperatingPoint:
    config = PlanProbeConfig(plan, threshold=threshold, per_sample=per_sample)
    method = "plan+probe" if per_sample else "plan+probe-batch-global"
    label = f"{plan_label} + probe δ={threshold:g}" + ("" if per_sample else " batch-global")
    return _point(method, label, config, {"plan": plan_label, "threshold": threshold, "per_sample": per_sample})


def peer_points(target: SweepTarget) -> list[OperatingPoint]:
    """Every peer at the pipeline settings (at a few steps, :data:`~invardiff.bench.peers.FEW_STEPS` or fewer:
    the few-step settings); MagCache's ratios from its calibration mode on the target's calibration runs at the
    target's step count (the held-out rule, targets.py)."""
    entry, pipe = target.entry, target.load()
    steps = entry.num_inference_steps
    runs = [lambda case=case: pipe(**entry.call_kwargs(*case)) for case in target.calibration_runs()]
    ratios = peers.calibrate_mag_ratios(pipe.transformer, steps, runs)
    kind = peers.FEW_STEP if steps <= peers.FEW_STEPS else peers.PIPELINE
    return [_peer_point(peer) for peer in peers.peers(kind, steps, ratios)]


def _peer_point(peer: peers.Peer) -> OperatingPoint:
    return OperatingPoint(peer.method, peer.label, lambda pipe: peer.attach(pipe.transformer, pipe), peer.settings)
