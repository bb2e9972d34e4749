"""The sweep's memory-bounded plans (method ``invardiff-memory``): plans held to a bound on peak cache memory.

The bound is FLUX.1-dev's target scaled to the model: 1.5 GB (10^9 bytes) on FLUX.1-dev at 1024x1024 in bf16 is
23% of what keeping every unit output and H of one step takes there; each bundled model gets the same fraction of
its own (at its sampling call's shapes and dtype). Points: the fast preset's plan (a family without one: its first
preset) fitted to the bound (:func:`invardiff.memory_fit.fit_memory`), the same with the cache stored one size
narrower (bf16 for a float32 model, fp8 e4m3 for a bf16 or fp16 one), and the budgeted, verified search at 2.5x
under the bound. Every plan is calibrated on the target's calibration runs only (the held-out rule, ``targets.py``).
"""

from __future__ import annotations

import functools

from ..cache_footprint import CacheFootprint, measure_footprint
from ..model_configs import MODEL_CONFIGS
from .points import plan_point


FLUX1_DEV_BOUND = 1_500_000_000  # bytes: the bound for FLUX.1-dev 1024x1024 bf16
SEARCH_SPEEDUP = 2.5
FIT_SECONDS = 10.0
NARROWER = {"float32": "bfloat16", "bfloat16": "float8_e4m3fn", "float16": "float8_e4m3fn"}


def every_output_bytes(footprint: CacheFootprint) -> int:
    """What keeping every unit output and H of one step takes (the engine's ``all_outputs_bytes``)."""
    return int(footprint.unit_bytes().sum()) + footprint.hidden_bytes()


@functools.cache
def bound_fraction() -> float:
    """The issue's FLUX.1-dev bound as a fraction of FLUX.1-dev's every-output bytes (meta device, ~2 s)."""
    return FLUX1_DEV_BOUND / every_output_bytes(measure_footprint(MODEL_CONFIGS["flux1-dev"]))


def scaled_bound(footprint: CacheFootprint) -> int:
    """:data:`FLUX1_DEV_BOUND` scaled to the footprint's model: the same fraction of its every-output bytes."""
    return int(bound_fraction() * every_output_bytes(footprint))


def memory_points(target, preset: str, preset_plan) -> list:
    """The ``invardiff-memory`` operating points of ``target`` (a :class:`~.targets.SweepTarget`), from its
    calibrated ``preset_plan`` (the preset named ``preset``: ``fast`` where the family has one)."""
    from ..calibration.budget import calibrate_budget
    from ..calibration.search import SearchConfig
    from ..flops import profile_flops
    from ..memory_fit import fit_memory

    config = target.entry.model_config()
    footprint, flops = measure_footprint(config), profile_flops(config)
    bound = scaled_bound(footprint)
    settings = {"max_cache_bytes": bound, "model_config": config.name}
    points = []
    for dtype in (None, NARROWER[config.dtype]):
        plan = fit_memory(preset_plan, footprint, flops, bound, dtype, FIT_SECONDS)
        label = f"invardiff-memory {preset} fit" + (f" {dtype}" if dtype else "")
        points.append(plan_point(label, plan, {**settings, "cache_dtype": dtype}, method="invardiff-memory"))
    results, _ = calibrate_budget(
        target.load(),
        num_inference_steps=target.entry.num_inference_steps,
        cases=target.calibration_runs(),
        speedups=[SEARCH_SPEEDUP],
        search=SearchConfig(SEARCH_SPEEDUP),
        pipeline_kwargs=target.sampling_settings(),
        max_cache_bytes=bound,
        verify=True,  # chosen as the unbounded invardiff-search's plans are, so the two compare like with like
    )
    for result in results:
        label = f"invardiff-memory search {SEARCH_SPEEDUP:g}x"
        points.append(
            plan_point(label, result.plan, {**settings, **result.plan.provenance["search"]}, "invardiff-memory")
        )
    return points
