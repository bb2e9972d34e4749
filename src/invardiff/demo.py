"""The whole workflow on a bundled trained model: calibrate, build a plan, generate with and without it,
measure the speedup (one process, full compute and the plan taking turns input by input) and the fidelity against
full compute."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import api
from .bench.targets import bundled_target, check_held_out
from .bench.timing import Variant, measure_rounds, timed
from .calibration import calibrate
from .calibration.run import output_tensor
from .families import INPUT_KINDS
from .files import atomic_path, write_text
from .flops import profile_flops
from .metrics import output_fidelity
from .stats import ideal_speedup
from .video_files import save_frame_strip, save_side_by_side_gif, to_pil


def run_demo(
    target,
    preset_name: str,
    seeds: list[int],
    rounds: int = 3,
    device: str = "cpu",
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The demo on ``target`` (a :class:`~invardiff.bench.targets.SweepTarget`: a bundled model by name, or your
    own model): calibrate on its calibration runs, evaluate its examples with every seed (never a calibration run).
    Returns the report and the images (``full``, ``cached``: (N, C, H, W) in [0, 1], examples x seeds; a video
    model's clips are (N, F, C, H, W), and its report has the metrics of :func:`~invardiff.metrics.video_fidelity`).

    ``progress(phase, done)`` is called when a phase starts, with its name and the number of phases done (of
    ``rounds + 3``: calibration, warm-up, the rounds, metrics)."""
    if isinstance(target, str):
        target = bundled_target(target, device)
    entry, name = target.entry, target.name
    cases = [(item, seed) for seed in seeds for item in entry.examples]
    check_held_out(target, cases)
    pipe = target.load()
    # The cached variant runs its own copy, so that full compute and the plan take turns input by input (lockstep):
    # a drift of the machine's speed within a round then hits both alike.
    cached_pipe = target.source.load(device)
    note = progress or (lambda phase, done: None)
    note("calibration pass 1 (full compute)", 0)
    plan, rates = calibrate(  # one run per calibration input, each with its own noise
        pipe,
        num_inference_steps=entry.num_inference_steps,
        thresholds=preset_name,
        cases=target.calibration_runs(),
        pipeline_kwargs=target.calibration_kwargs() or None,  # as the sweep calibrates
        progress=lambda phase, done, total: note(f"calibration {phase}: batch {done}/{total} done", 0),
    )

    outputs = {"full": [None] * len(cases), "cached": [None] * len(cases)}
    summaries = {}

    def generate(variant: str, target) -> Callable[[int], float]:
        # The images of the last timed round are the ones evaluated (the runs are deterministic).
        def step(index: int) -> float:
            seconds, images = timed(lambda: generate_cases(target, entry, cases[index : index + 1]), device)
            outputs[variant][index] = images
            return seconds

        return step

    def detach() -> None:
        try:
            summaries["cached"] = api.summary(cached_pipe)
        finally:
            api.disable(cached_pipe)

    times = measure_rounds(
        [
            Variant("full", generate("full", pipe)),
            Variant(
                "cached", generate("cached", cached_pipe), start=lambda: api.enable(cached_pipe, plan), finish=detach
            ),
        ],
        rounds,
        steps=len(cases),
        schedule="lockstep",
        on_start=lambda index: note("warm-up" if index == 0 else f"round {index}/{rounds}", index + 1),
    )
    note("metrics", rounds + 2)
    full, cached, summary = torch.cat(outputs["full"]), torch.cat(outputs["cached"]), summaries["cached"]
    flops = profile_flops(entry.model_config() if target.source.model else _call_config(pipe, entry))
    ideal = ideal_speedup(plan, flops)
    report = {
        "model": name,
        "preset": preset_name,
        "num_inference_steps": entry.num_inference_steps,
        "cases": [{"input": item, "seed": seed} for item, seed in cases],
        **times.speedup("full", "cached", ideal, label=f"demo {name}"),  # with its per-round spread and warnings
        "ideal_speedup": ideal,
        "seconds": {"full": times.median_seconds("full"), "cached": times.median_seconds("cached")},
        "round_seconds": {name: list(times.seconds[name]) for name in ("full", "cached")},
        **output_fidelity(cached, full),
        "steps_step_cached": int(plan.step_cache.sum()),
        "peak_cache_bytes": summary.peak_cache_bytes,
        "plan_provenance": plan.provenance,
        "rounds": rounds,
    }
    return report, {"full": full, "cached": cached, "plan": plan, "rates": rates}


def _call_config(pipe, entry):
    # your own model's FLOP profile at the shapes of its sampling calls
    from .calibration.batching import pipeline_call_config

    kwargs = entry.call_kwargs(entry.examples[0], 0)
    return pipeline_call_config(pipe, entry.family, kwargs)


def generate_cases(pipe, entry, cases, batch: int = 1) -> torch.Tensor:
    """The images of ``cases`` ((input, seed) pairs), ``batch`` of them per pipeline call, each from its own
    seeded generator: (N, C, H, W) in [0, 1]."""
    images = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        kwargs = entry.call_kwargs(*chunk[0])
        if len(chunk) > 1:
            kwargs[INPUT_KINDS[entry.inputs].pipeline_arg] = [item for item, _ in chunk]
            kwargs["generator"] = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
        images.append(output_tensor(pipe(**kwargs)))  # video pipelines: (B, F, C, H, W)
    batch_images = torch.cat(images)
    if batch_images.shape[-1] in (1, 3) and batch_images.shape[1] not in (1, 3):  # numpy layout (B, H, W, C)
        batch_images = batch_images.permute(0, 3, 1, 2)
    return batch_images.float().clamp(0, 1)


def write_report(report: dict, images: dict, out: Path) -> dict[str, Path]:
    """Write the demo's outputs into ``out``: ``report.json``, ``report.md``, the labelled ``grid.png`` (a video
    model: ``clips.gif``, full compute and the plan side by side, and the frame strip ``frames.png``), and the
    calibrated ``plan.json`` with its ``plan.rates.npz`` (for ``invardiff generate --plan``, ``build-plan``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    images["plan"].save(out / "plan.json")
    images["rates"].save(out / "plan.rates.npz")
    if images["full"].ndim == 5:
        pictures = _save_clips(images["full"], images["cached"], report, out)
        layout = "clips.gif: top row full compute, bottom row with the plan; frames.png: every frame of each clip"
    else:
        pictures = {"grid": out / "grid.png"}
        save_labelled_grid(images["full"], images["cached"], report, pictures["grid"])
        layout = "Grid: top row full compute, bottom row with the plan"
    write_text(out / "report.md", report_markdown(report, layout))
    return {"json": out / "report.json", "markdown": out / "report.md", **pictures}


def report_markdown(report: dict, layout: str) -> str:
    """The demo's ``report.md``. The headline speedup is the median of the per-round speedups (each round: full
    compute's time over the plan's, the two taking turns input by input); every time quoted stands beside the ratio
    it makes, so that no figure in the text disagrees with the headline."""
    full, cached = report["round_seconds"]["full"], report["round_seconds"]["cached"]
    rounds = "; ".join(
        f"round {i}: {f:.1f} s / {c:.1f} s = {f / c:.2f}x"
        for i, (f, c) in enumerate(zip(full, cached, strict=True), start=1)
    )
    lines = [
        f"# invardiff demo: {report['model']} ({report['preset']} preset, {report['num_inference_steps']} steps)",
        "",
        "| measured speedup (median of rounds) | ideal speedup | PSNR (mean / worst) | SSIM (mean / worst) | "
        "LPIPS (mean / worst) |",
        "|---|---|---|---|---|",
        f"| {report['measured_speedup']:.2f}x | {report['ideal_speedup']:.2f}x | {report['psnr']:.2f} / "
        f"{report['worst']['psnr']:.2f} dB | {report['ssim']:.4f} / {report['worst']['ssim']:.4f} | "
        f"{report['lpips']:.4f} / {report['worst']['lpips']:.4f} |",
        "",
        f"Measured speedup {report['measured_speedup']:.2f}x: the median of the {report['rounds']} rounds' speedups, "
        f"each a round's full-compute time over its time with the plan ({rounds}; spread {report['spread']:.0%} of "
        f"the median). All rounds together: full compute {sum(full):.1f} s, with the plan {sum(cached):.1f} s, a "
        f"total-time ratio of {sum(full) / sum(cached):.2f}x (a round slowed by other load moves it, not the median). "
        f"{report['steps_step_cached']} of {report['num_inference_steps']} steps step-cached. {layout}.",
        *(f"\n**Timing warning**: {warning}" for warning in report["timing_warnings"]),
    ]
    return "\n".join(lines) + "\n"


def _save_clips(full: torch.Tensor, cached: torch.Tensor, report: dict, out: Path) -> dict[str, Path]:
    title = (
        f"{report['model']}: measured {report['measured_speedup']:.2f}x (ideal {report['ideal_speedup']:.2f}x), "
        f"PSNR {report['psnr']:.1f} dB (worst frame {report['worst']['psnr']:.1f})"
    )
    rows = [("full compute", full), ("with the plan", cached)]
    paths = {"gif": out / "clips.gif", "frames": out / "frames.png"}
    save_side_by_side_gif(rows, paths["gif"], title)
    save_frame_strip(rows, paths["frames"], title)
    return paths


def save_labelled_grid(full: torch.Tensor, cached: torch.Tensor, report: dict, path: Path, tile: int = 128) -> None:
    """A PNG: a title with the speedups and PSNR, each column's input (prompt or class) and seed above it, the row
    labels "full compute" and "with the plan" on the left, and each cached image's PSNR under it."""
    from PIL import Image, ImageDraw, ImageFont

    count, height = full.shape[0], full.shape[-2]
    scale = max(1, tile // height)
    tile = height * scale
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=11)
    captions = [_caption(case) for case in report["cases"]]
    caption_lines = max(len(_wrap(text, small, tile - 6)) for text in captions)
    left, title_height, caption_height, psnr_height, gap = 150, 48, 14 * caption_lines + 8, 18, 6
    warned = " (timing warning: see report.md)" if report["timing_warnings"] else ""
    titles = [
        f"{report['model']}, {report['preset']} preset, {report['num_inference_steps']} steps: measured speedup "
        f"{report['measured_speedup']:.2f}x (ideal {report['ideal_speedup']:.2f}x){warned}",
        f"PSNR against full compute: mean {report['psnr']:.1f} dB, worst {report['worst']['psnr']:.1f} dB; "
        f"LPIPS mean {report['lpips']:.3f}",
    ]
    width = max(left + count * (tile + gap), 16 + int(max(font.getlength(title) for title in titles)))
    height = title_height + caption_height + 2 * (tile + psnr_height) + gap + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, title in enumerate(titles):
        draw.text((8, 6 + 20 * index), title, fill="black", font=font)
    top = title_height + caption_height
    rows = [(full, "full compute", None), (cached, "with the plan", report["per_image"]["psnr"])]
    for row, (batch, label, psnrs) in enumerate(rows):
        y = top + row * (tile + psnr_height + gap)
        draw.text((8, y + tile // 2 - 10), label, fill="black", font=font)
        for column, image in enumerate(batch):
            x = left + column * (tile + gap)
            canvas.paste(to_pil(image, scale), (x, y))
            if psnrs is not None:
                draw.text((x + 2, y + tile + 2), f"PSNR {psnrs[column]:.1f} dB", fill="black", font=small)
    for column, text in enumerate(captions):
        x = left + column * (tile + gap)
        for line_index, line in enumerate(_wrap(text, small, tile - 6)):
            draw.text((x + 2, title_height + 14 * line_index), line, fill="black", font=small)
    with atomic_path(path) as temporary:
        canvas.save(temporary)


def _caption(case: dict) -> str:
    item = case["input"]
    return f"{item}, seed {case['seed']}" if isinstance(item, str) else f"class {item}, seed {case['seed']}"


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]
