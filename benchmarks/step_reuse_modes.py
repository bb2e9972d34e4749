"""State vs residual step reuse (PlanConfig.step_reuse) on the InvarDiff grid of `invardiff bench`.

Both modes execute the same plan at the same cost (residual adds one patch embedding per reused step), so only
fidelity and the FLOP-counted ideal speedup are reported. Usage: python benchmarks/step_reuse_modes.py MODEL
Writes benchmarks/results/step-reuse-MODEL.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import invardiff
from invardiff.bench.bundled import (
    GRID_MODULE_LEVELS,
    GRID_STEP_LEVELS,
    calibrate_thresholds,
    grid_point,
    sweep_inputs,
)
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.files import write_text
from invardiff.metrics import lpips, psnr


def main(name: str) -> None:
    target = bundled_target(name)
    inputs = sweep_inputs(target, [0])
    pipe = target.load()
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    rows = []
    grid = [grid_point(target.family, step, level) for step in GRID_STEP_LEVELS for level in GRID_MODULE_LEVELS]
    for label, thresholds in grid:
        plan = calibrate_thresholds(target, thresholds)
        for mode in ("state", "residual"):
            invardiff.enable(pipe, invardiff.PlanConfig(plan, step_reuse=mode))
            flops, images = count_flops(lambda: inputs.generate(pipe))
            invardiff.disable(pipe)
            rows.append(
                {
                    "point": label,
                    "step_reuse": mode,
                    "ideal_speedup": full_flops / flops,
                    "psnr": float(psnr(images, reference).mean()),
                    "lpips": float(lpips(images, reference).mean()),
                }
            )
    out = Path(__file__).parent / "results"
    write_text(out / f"step-reuse-{name}.json", json.dumps(rows, indent=1) + "\n")
    lines = [
        f"# {name}: state vs residual step reuse on the InvarDiff grid (4 images, vs full compute)",
        "",
        "| point | ideal speedup | PSNR state / residual | LPIPS state / residual |",
        "|---|---|---|---|",
    ]
    for state, residual in zip(rows[::2], rows[1::2], strict=True):
        lines.append(
            f"| {state['point']} | {state['ideal_speedup']:.2f}x | {state['psnr']:.2f} / {residual['psnr']:.2f} "
            f"| {state['lpips']:.4f} / {residual['lpips']:.4f} |"
        )
    write_text(out / f"step-reuse-{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "flux-shapes")
