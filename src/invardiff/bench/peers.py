"""Peer caches as operating points, each through its own public API (../shared/PEERS.md, ENVIRONMENT.md 5).

* diffusers (>= 0.36) hooks via ``transformer.enable_cache``: FirstBlockCache, MagCache (ratios from its own
  ``calibrate=True`` mode on our calibration inputs) and TaylorSeer. They need ``CacheMixin`` and pipelines that
  set ``cache_context``; DiTPipeline has neither, so on DiT they fail and the table says why.
* cache-dit (optional ``cache-dit``): DBCache at its default (F8B0) and as F1B0 (= FBCache). It patches the model's
  forward for good, so each point gets a fresh pipeline.

What was computed is counted by the sweep itself, the same way for every method (``block_calls.py``).
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable

import torch

from .sweep import OperatingPoint
from .targets import SweepTarget


# Thresholds chosen so that every point skips work on the bundled models: in the 2026-11-22 sweep FBCache 0.05
# computed every block (1.00x ideal) and DBCache F1B0 0.08 91% of them, while F1B0 stopped at 1.9x ideal on
# flux-shapes, hence 0.8 at the fast end.
FBCACHE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24, 0.5)
TAYLORSEER_INTERVALS = (2, 3, 5)
DBCACHE_F1B0_THRESHOLDS = (0.12, 0.2, 0.3, 0.5, 0.8)


def _point(method: str, label: str, enable, disable, settings: dict, fresh: bool = False) -> OperatingPoint:
    def attach(pipe):
        enable(pipe)
        return lambda: disable(pipe)

    return OperatingPoint(method, label, attach, settings, fresh_pipeline=fresh)


def _diffusers_point(method: str, label: str, make_config, settings: dict) -> OperatingPoint:
    def enable(pipe):
        if not hasattr(pipe.transformer, "enable_cache"):
            raise TypeError(
                f"{type(pipe.transformer).__name__} has no diffusers CacheMixin (enable_cache), and "
                f"{type(pipe).__name__} does not set cache_context: diffusers' cache hooks cannot run on it."
            )
        pipe.transformer.enable_cache(make_config())

    return _point(method, label, enable, lambda pipe: pipe.transformer.disable_cache(), settings)


def mag_ratios_printed_by(run: Callable[[], object]) -> list[float]:
    """MagCache's calibration mode reports its ratios only by printing them at the end of a run: capture, parse."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run()
    line = next(ln for ln in printed.getvalue().splitlines() if ln.startswith("[") and not ln.startswith("[MagCache"))
    return ast.literal_eval(line)


def calibrate_mag_ratios(target: SweepTarget) -> list[float]:
    """MagCache's own calibration mode on the target's calibration inputs; the ratios are averaged over inputs."""
    from diffusers.hooks import MagCacheConfig

    entry = target.entry
    pipe = target.load()
    if not hasattr(pipe.transformer, "enable_cache"):
        return []
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=entry.num_inference_steps))
    runs = [mag_ratios_printed_by(lambda item=item: pipe(**entry.call_kwargs(item, 0))) for item in target.calibration]
    pipe.transformer.disable_cache()
    return torch.tensor(runs).mean(0).tolist()


def _cache_dit_point(label: str, settings: dict) -> OperatingPoint:
    def enable(pipe):
        import cache_dit

        target = pipe
        if type(pipe).__name__ not in ("FluxPipeline", "DiTPipeline") and hasattr(
            pipe.transformer, "single_transformer_blocks"
        ):
            # A FluxPipeline subclass (flux-shapes): cache-dit wants an explicit BlockAdapter, built here exactly
            # as its own Flux adapter does (both block lists, ForwardPattern.Pattern_1).
            target = cache_dit.BlockAdapter(
                pipe=pipe,
                transformer=pipe.transformer,
                blocks=[pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks],
                forward_pattern=[cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_1],
                check_forward_pattern=True,
            )
        cache_dit.enable_cache(target, cache_config=cache_dit.DBCacheConfig(**settings))

    def disable(pipe):
        import cache_dit

        cache_dit.disable_cache(pipe)

    return _point("cache-dit", label, enable, disable, settings, fresh=True)


def peer_points(target: SweepTarget) -> list[OperatingPoint]:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    steps = target.entry.num_inference_steps
    points = [
        _diffusers_point(
            "diffusers-fbcache", f"FBCache thr={t:g}", lambda t=t: FirstBlockCacheConfig(threshold=t), {"threshold": t}
        )
        for t in FBCACHE_THRESHOLDS
    ]
    ratios = calibrate_mag_ratios(target)
    for t in MAGCACHE_THRESHOLDS:
        points.append(
            _diffusers_point(
                "diffusers-magcache",
                f"MagCache thr={t:g}",
                lambda t=t: MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=ratios or None),
                {"threshold": t, "max_skip_steps": 3, "retention_ratio": 0.2, "calibrated_ratios": len(ratios)},
            )
        )
    for interval in TAYLORSEER_INTERVALS:
        points.append(
            _diffusers_point(
                "diffusers-taylorseer",
                f"TaylorSeer interval={interval}",
                # float32 factors: the default bfloat16 is slow on CPU and would handicap the peer.
                lambda i=interval: TaylorSeerCacheConfig(cache_interval=i, taylor_factors_dtype=torch.float32),
                {"cache_interval": interval, "disable_cache_before_step": 3, "max_order": 1},
            )
        )
    points.append(_cache_dit_point("DBCache default (F8B0 thr=0.08)", {}))
    points += [
        _cache_dit_point(
            f"DBCache F1B0 thr={t:g}", {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": t}
        )
        for t in DBCACHE_F1B0_THRESHOLDS
    ]
    return points
