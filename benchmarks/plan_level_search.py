"""Search of InvarDiff warm-up and per-kind module levels around 2x on flux-shapes: 48 calibrated plans, fidelity
against full compute and FLOP-counted speedup (no timing). Usage: python benchmarks/plan_level_search.py"""

from __future__ import annotations

import itertools

import invardiff
from invardiff.bench.bundled import calibrate_thresholds, sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration.thresholds import PRESETS
from invardiff.families.calibration_spec import InvarDiffThresholds
from invardiff.metrics import lpips, psnr


def _levels(kinds, attn: float, ff: float, single: float) -> dict[str, float]:
    def level(kind: str) -> float:
        if kind.startswith("single"):
            return single
        return ff if kind.endswith("ff") else attn

    return {kind: level(kind) for kind in kinds}


def main() -> None:
    target = bundled_target("flux-shapes")
    inputs = sweep_inputs(target, [0])
    pipe = target.load()
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    kinds = PRESETS["flux"]["fast"].modules
    grid = itertools.product((0.1, 0.2), (0.55, 0.6, 0.65), (0.4, 0.68), (0.0, 0.68), (0.4, 0.68))
    for nonskip, step, attn, ff, single in grid:
        plan = calibrate_thresholds(target, InvarDiffThresholds(nonskip, step, _levels(kinds, attn, ff, single)))
        with invardiff.enabled(pipe, plan):
            flops, images = count_flops(lambda: inputs.generate(pipe))
        print(
            f"nonskip {nonskip:.2f} step {step:.2f} attn {attn:.2f} ff {ff:.2f} single {single:.2f}: "
            f"ideal {full_flops / flops:.2f}x, PSNR {float(psnr(images, reference).mean()):.2f} dB, "
            f"LPIPS {float(lpips(images, reference).mean()):.4f}"
        )


if __name__ == "__main__":
    main()
