"""The whole workflow on a bundled trained model: calibrate, build a plan, generate with and without it,
measure the speedup (one process, alternating) and the fidelity against full compute."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import api
from .bench.timing import Variant, measure_rounds, whole_run
from .calibration import calibrate
from .families import INPUT_KINDS
from .flops import profile_flops
from .metrics import fidelity
from .model_configs import ModelConfig
from .models import registry
from .stats import ideal_speedup


# Calibration inputs are kept apart from the evaluation inputs (the model's examples).
CALIBRATION = {
    "flux-shapes": [
        "a green square on the left, white background",
        "a red triangle on the bottom, black background",
        "a blue circle on the right, white background",
        "a yellow square on the top, black background",
    ],
    "dit-digits": [1, 2, 4, 6, 7, 9],
}


def run_demo(
    name: str,
    preset_name: str,
    seeds: list[int],
    rounds: int = 3,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns the report and the images (``full``, ``cached``: (N, C, H, W) in [0, 1], examples x seeds)."""
    entry = registry.get(name)
    pipe = registry.load(name, device)
    note = progress or (lambda message: None)
    note("calibrating")
    inputs = {INPUT_KINDS[entry.inputs].calibrate_arg: CALIBRATION[name]}
    plan, rates = calibrate(
        pipe, num_inference_steps=entry.num_inference_steps, thresholds=preset_name, seeds=[0], **inputs
    )
    cases = [(item, seed) for seed in seeds for item in entry.examples]

    outputs, summaries = {}, {}

    def generate(variant: str) -> Callable[[int], float]:
        # The images of the last timed run are the ones evaluated (the runs are deterministic).
        return whole_run(lambda: outputs.__setitem__(variant, _generate(pipe, entry, cases)), device)

    def detach() -> None:
        try:
            summaries["cached"] = api.summary(pipe)
        finally:
            api.disable(pipe)

    times = measure_rounds(
        [
            Variant("full", generate("full")),
            Variant("cached", generate("cached"), start=lambda: api.enable(pipe, plan), finish=detach),
        ],
        rounds,
        on_round=lambda index: note("warm-up" if index == 0 else f"round {index}/{rounds}"),
    )
    full, cached, summary = outputs["full"], outputs["cached"], summaries["cached"]
    flops = profile_flops(_model_config(name, pipe))
    report = {
        "model": name,
        "preset": preset_name,
        "num_inference_steps": entry.num_inference_steps,
        "cases": [{"input": item, "seed": seed} for item, seed in cases],
        "measured_speedup": times.median_ratio("full", "cached"),
        "ideal_speedup": ideal_speedup(plan, flops),
        "seconds": {"full": times.median_seconds("full"), "cached": times.median_seconds("cached")},
        **fidelity(cached, full),
        "steps_step_cached": int(plan.step_cache.sum()),
        "peak_cache_bytes": summary.peak_cache_bytes,
        "plan_provenance": plan.provenance,
        "rounds": rounds,
    }
    return report, {"full": full, "cached": cached, "plan": plan, "rates": rates}


def _generate(pipe, entry, cases) -> torch.Tensor:
    images = []
    for item, seed in cases:
        output = pipe(**entry.call_kwargs(item, seed)).images
        images.append(torch.as_tensor(np.asarray(output)) if not torch.is_tensor(output) else output)
    batch = torch.cat(images)
    if batch.shape[-1] in (1, 3) and batch.shape[1] not in (1, 3):  # numpy layout (B, H, W, C)
        batch = batch.permute(0, 3, 1, 2)
    return batch.float().clamp(0, 1)


def _model_config(name: str, pipe) -> ModelConfig:
    entry = registry.get(name)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    return ModelConfig.from_transformer_config(name, entry.family, config, **entry.call_shape)


def write_report(report: dict, images: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    images["plan"].save(out / "plan.json")
    images["rates"].save(out / "plan.rates.npz")
    grid = out / "grid.png"
    _save_grid(images["full"], images["cached"], grid)
    lines = [
        f"# invardiff demo: {report['model']} ({report['preset']} preset, {report['num_inference_steps']} steps)",
        "",
        "| measured speedup | ideal speedup | PSNR (mean / worst) | SSIM (mean / worst) | LPIPS (mean / worst) |",
        "|---|---|---|---|---|",
        f"| {report['measured_speedup']:.2f}x | {report['ideal_speedup']:.2f}x | {report['psnr']:.2f} / "
        f"{report['worst']['psnr']:.2f} dB | {report['ssim']:.4f} / {report['worst']['ssim']:.4f} | "
        f"{report['lpips']:.4f} / {report['worst']['lpips']:.4f} |",
        "",
        f"Full compute {report['seconds']['full']:.2f} s, with the plan {report['seconds']['cached']:.2f} s "
        f"(medians of {report['rounds']} alternating rounds); {report['steps_step_cached']} of "
        f"{report['num_inference_steps']} steps step-cached. Grid: top row full compute, bottom row with the plan.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "report.json", "markdown": out / "report.md", "grid": grid}


def _save_grid(full: torch.Tensor, cached: torch.Tensor, path: Path, scale: int = 4) -> None:
    from PIL import Image

    rows = [torch.cat(list(batch), dim=-1) for batch in (full, cached)]  # (C, H, N*W)
    grid = torch.cat(rows, dim=-2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
