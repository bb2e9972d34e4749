"""Speed-quality sweep: operating points of several caches against full compute, on one pipeline, in one process.

The pipeline is loaded once; every point attaches to it for its own runs and detaches after each (full compute
runs with nothing attached). Per point: one warm-up run of the point (the FLOP-counted one; the baseline is warm
from the start of the sweep), then ``rounds`` rounds of full compute and the point, alternating (order flipped
every round; ``timing.measure_rounds``); the measured speedup is the median of the per-round ratios. The ideal
speedup is measured, not modelled: the FLOPs of one run under ``torch.utils.flop_counter`` (matmuls and attention)
against full compute's, which counts what any cache, ours or a peer's, actually skipped. Which work ran is counted
the same way for every method too (attention computations, ``block_calls.py``), next to a method's own record of
its steps. Fidelity: PSNR / SSIM / LPIPS of every image against full compute's, on the images' device (a video
model's: per frame, with clip PSNR and the temporal error, ``metrics.video``).

A point whose own method fails (attaching it, or a run with it attached) is recorded as "cannot run", with the
reason; any other failure (full compute, the metrics, detaching) is an error and stops the sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..flops import flop_counter
from ..metrics import output_fidelity
from .block_calls import AttentionCallCounter
from .timing import Variant, measure_rounds, whole_run


logger = logging.getLogger(__name__)


@dataclass
class OperatingPoint:
    """One cache setting. ``attach(pipe)`` enables it on ``pipe`` and returns a function that disables it, leaving
    ``pipe`` as it found it (full compute runs on the same pipeline between the point's runs).

    ``settings`` is recorded as is; ``executed(pipe)`` (optional, called while attached) reports the method's own
    record of what it computed in the last run (per-step decisions); the sweep adds the fraction of attention
    computations for every point. ``plan``: the :class:`~invardiff.plan.CachePlan` a plan point runs (``invardiff
    bench`` saves it beside the results), else ``None``.
    """

    method: str
    label: str
    attach: Callable
    settings: dict = field(default_factory=dict)
    executed: Callable | None = None
    plan: object | None = None


@dataclass
class SweepInputs:
    """What one sweep generates: ``generate(pipe) -> (N, C, H, W)`` images in [0, 1]; ``load_pipeline()`` builds
    the pipeline (called once per sweep) on ``device``."""

    model: str
    load_pipeline: Callable[[], object]
    generate: Callable[[object], torch.Tensor]
    cases: list
    device: torch.device


class PointCannotRun(Exception):
    """The point's own method failed: attaching it, or a run with it attached. ``__cause__`` is the failure."""


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    with flop_counter() as counter:
        result = fn()
    return counter.get_total_flops(), result


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
    pipe = inputs.load_pipeline()
    flops, images = count_flops(lambda: inputs.generate(pipe))  # also full compute's warm-up
    full = {"images": images, "flops": flops}
    results = []
    for point in points:
        if done and point.label in done:
            results.append(done[point.label])
            continue
        result = run_point(inputs, pipe, full, point, rounds)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def run_point(inputs: SweepInputs, pipe, full: dict, point: OperatingPoint, rounds: int) -> dict:
    """Measure one operating point on ``pipe`` against full compute; ``full`` holds its images and FLOPs."""
    try:
        return _measure(inputs, pipe, full, point, rounds)
    except PointCannotRun as failure:
        error = failure.__cause__
        logger.warning("%s cannot run on %s: %r", point.label, inputs.model, error)
        return {"method": point.method, "label": point.label, "settings": point.settings, "error": repr(error)}


def _measure(inputs: SweepInputs, pipe, full: dict, point: OperatingPoint, rounds: int) -> dict:
    images: dict[str, torch.Tensor] = {}
    executed: dict = {}
    attached: list[Callable[[], None]] = []

    def attach() -> None:
        attached.append(_own(lambda: point.attach(pipe)))

    def detach() -> None:
        try:
            if point.executed is not None:  # the method's record of the run that just ended
                executed.update(_own(lambda: point.executed(pipe)))
        finally:
            attached.pop()()  # a failure here leaves the shared pipeline in doubt: an error, not "cannot run"

    def generate(name: str, own: bool) -> None:
        run = lambda: inputs.generate(pipe)  # noqa: E731
        images[name] = _own(run) if own else run()

    # The warm-up run of the point is its counted run (FLOPs and attention computations), so the counting hooks
    # stay out of the timed rounds; full compute is already warm (run_sweep ran it).
    attach()
    try:
        with AttentionCallCounter(pipe.transformer) as counter:
            flops, _ = count_flops(lambda: generate("point", own=True))
    finally:
        detach()
    times = measure_rounds(
        [
            Variant("full", whole_run(lambda: generate("full", own=False), inputs.device)),
            Variant("point", whole_run(lambda: generate("point", own=True), inputs.device), attach, detach),
        ],
        rounds,
        warmup_rounds=0,
    )
    executed["attention"] = {"computed_fraction": counter.fraction}
    ideal = full["flops"] / flops
    return {
        "method": point.method,
        "label": point.label,
        "settings": point.settings,
        **times.speedup("full", "point", ideal, label=f"{point.label} on {inputs.model}"),
        "ideal_speedup": ideal,
        "seconds": {"full": times.median_seconds("full"), "point": times.median_seconds("point")},
        **output_fidelity(images["point"], full["images"]),  # video models: per-frame, clip and temporal
        "executed": executed,
        "rounds": rounds,
    }


def _own(fn: Callable[[], object]):
    """Run ``fn``, a step of the point's own method: its failure means the point cannot run."""
    try:
        return fn()
    except Exception as error:
        raise PointCannotRun(repr(error)) from error
