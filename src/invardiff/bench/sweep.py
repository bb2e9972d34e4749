"""Speed-quality sweep: operating points of several caches against full compute, on one pipeline, in one process.

Each point runs on its own copy of the pipeline (a cache's hooks never reach the baseline). Per point: one warm-up
run of the point (the FLOP-counted one; the baseline is warm from the start of the sweep), then ``rounds`` rounds
alternating full compute and the point (order flipped every round); the measured speedup is the median of the
per-round ratios. The ideal speedup is measured, not modelled: the FLOPs of one run under
``torch.utils.flop_counter`` (matmuls and attention) against full compute's, which counts what any cache, ours or a
peer's, actually skipped. Which work ran is counted the same way for every method too (attention computations,
``block_calls.py``), next to a method's own record of its steps. Fidelity: PSNR / SSIM / LPIPS of every image
against full compute's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..metrics import fidelity
from .block_calls import AttentionCallCounter
from .timing import median, timed


@dataclass
class OperatingPoint:
    """One cache setting. ``attach(pipe)`` enables it on ``pipe`` and returns a function that disables it.

    ``settings`` is recorded as is; ``fresh_pipeline`` asks for a new pipeline (caches that patch the model for
    good); ``executed(pipe)`` (optional) reports the method's own record of what it computed in the last run
    (per-step decisions); the sweep adds the fraction of attention computations for every point.
    """

    method: str
    label: str
    attach: Callable
    settings: dict = field(default_factory=dict)
    fresh_pipeline: bool = False
    executed: Callable | None = None


@dataclass
class SweepInputs:
    """What one sweep generates: ``generate(pipe) -> (N, C, H, W)`` images in [0, 1], and how to get pipelines."""

    model: str
    load_pipeline: Callable[[], object]
    generate: Callable[[object], torch.Tensor]
    cases: list
    device: torch.device


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def run_point(inputs: SweepInputs, baseline, full: dict, point: OperatingPoint, rounds: int) -> dict:
    """Measure one operating point against the baseline pipeline; ``full`` holds the baseline's images and FLOPs."""
    pipe = inputs.load_pipeline() if point.fresh_pipeline else full["pipeline"]
    try:
        detach = point.attach(pipe)
    except Exception as error:  # a peer that cannot run on this model: the table says so, and why
        return {"method": point.method, "label": point.label, "settings": point.settings, "error": repr(error)}
    try:
        return _measure(inputs, baseline, full, point, pipe, detach, rounds)
    except Exception as error:  # e.g. a peer whose config does not fit the model, found only when it runs
        return {"method": point.method, "label": point.label, "settings": point.settings, "error": repr(error)}


def _measure(inputs: SweepInputs, baseline, full: dict, point: OperatingPoint, pipe, detach, rounds: int) -> dict:
    try:
        images: dict[str, torch.Tensor] = {}

        def run(variant: str) -> float:
            target = baseline if variant == "full" else pipe
            seconds, images[variant] = timed(lambda: inputs.generate(target), inputs.device)
            return seconds

        # The warm-up run of the point is its counted run (FLOPs and attention computations), so the counting
        # hooks stay out of the timed rounds; the baseline is already warm (run_sweep ran it).
        with AttentionCallCounter(pipe.transformer) as counter:
            flops, _ = count_flops(lambda: inputs.generate(pipe))
        times = {"full": [], "point": []}
        for index in range(rounds):
            for variant in ("full", "point") if index % 2 == 0 else ("point", "full"):
                times[variant].append(run(variant))
        executed = point.executed(pipe) if point.executed is not None else {}
        executed["attention"] = {"computed_fraction": counter.fraction}
    finally:
        detach()
    return {
        "method": point.method,
        "label": point.label,
        "settings": point.settings,
        "measured_speedup": median([f / c for f, c in zip(times["full"], times["point"], strict=True)]),
        "ideal_speedup": full["flops"] / flops,
        "seconds": {"full": median(times["full"]), "point": median(times["point"])},
        **fidelity(images["point"], full["images"]),
        "executed": executed,
        "rounds": rounds,
    }


def run_sweep(
    inputs: SweepInputs,
    points: list[OperatingPoint],
    rounds: int = 3,
    on_result: Callable[[dict], None] | None = None,
    done: dict[str, dict] | None = None,
) -> list[dict]:
    """Run every point; ``on_result`` sees each result as soon as it is measured (progress, JSON lines).

    ``done`` maps labels to results of an interrupted sweep (its JSON lines): those points are not run again.
    """
    baseline = inputs.load_pipeline()
    flops, images = count_flops(lambda: inputs.generate(baseline))
    full = {"images": images, "flops": flops, "pipeline": inputs.load_pipeline()}
    results = []
    for point in points:
        if done and point.label in done:
            results.append(done[point.label])
            continue
        result = run_point(inputs, baseline, full, point, rounds)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
