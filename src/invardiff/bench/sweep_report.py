"""Outputs of a speed-quality sweep: JSON lines, a markdown table, Pareto plots, and equal-speed interpolation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import append_json_line, atomic_path
from .report import timing_warnings


def append_jsonl(result: dict, path: Path) -> None:
    append_json_line(path, result)


def markdown_table(model: str, results: list[dict], meta: dict) -> str:
    """The sweep's points as a markdown table. Each point carries the run that measured it (``run``: date, torch,
    device, threads, rounds, command; :func:`run_record`), so a file resumed across runs says which point came from
    which (a ``run`` column); points from before runs were recorded fall back to ``meta`` (this report's facts)."""
    runs = _distinct_runs(results)
    several = len(runs) > 1
    lines = [f"# Speed-quality sweep: {model}", "", _header(runs, meta), ""]
    lines += [
        "| method | point | measured speedup | round spread | ideal speedup | PSNR dB | SSIM | LPIPS | computed |"
        + (" run |" if several else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if several else ""),
    ]
    for r in results:
        run = f" {_run_number(runs, r)} |" if several else ""
        if "error" in r:
            lines.append(f"| {r['method']} | {r['label']} | cannot run: {r['error']} | | | | | | |{run}")
            continue
        steps = _executed_text(r.get("executed"))
        lines.append(
            f"| {r['method']} | {r['label']} | {r['measured_speedup']:.2f}x | {_spread_text(r)} "
            f"| {r['ideal_speedup']:.2f}x "
            f"| {r['psnr']:.2f} ({r['worst']['psnr']:.2f}) | {r['ssim']:.4f} ({r['worst']['ssim']:.4f}) "
            f"| {r['lpips']:.4f} ({r['worst']['lpips']:.4f}) | {steps} |{run}"
        )
    return "\n".join(lines + timing_warnings(results)) + "\n"


def run_record(meta: dict, command: str, evaluation: dict) -> dict:
    """What a sweep point records about the run that measured it: ``meta``'s date, torch, device, threads and
    rounds, the command line, and ``evaluation`` (:func:`invardiff.bench.bundled.sweep_evaluation`: what its
    quality figures depend on, which a resume must match)."""
    facts = {key: meta[key] for key in ("date", "torch", "device", "threads", "rounds")}
    return facts | {"command": command, "evaluation": evaluation}


def check_resumable(kept: list[dict], evaluation: dict, path: Path) -> None:
    """Refuse to resume ``path`` when a kept point was evaluated otherwise than ``evaluation`` (its run's record;
    points from before runs recorded it cannot be checked and are kept): its figures would not compare with the new
    points'. Raises ``ValueError`` naming the first setting that differs."""
    for result in kept:
        recorded = (result.get("run") or {}).get("evaluation")
        if recorded is None or recorded == evaluation:
            continue
        key = next(k for k in sorted(set(recorded) | set(evaluation)) if recorded.get(k) != evaluation.get(k))
        raise ValueError(
            f"{path} holds {result['label']!r}, evaluated with {key} = {_short(recorded.get(key))}; this run's {key} "
            f"is {_short(evaluation.get(key))}. --resume keeps points only under the same evaluation settings: rerun "
            f"with the settings of that file, or give another --out (or leave out --resume to start the file anew)."
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


_MEASURE = (
    "speedups are medians of the rounds alternating with full compute after a warm-up; ideal = FLOPs of full "
    "compute / FLOPs of the point (torch FlopCounterMode). Metrics against full compute: mean (worst)."
)


def _header(runs: list[dict | None], meta: dict) -> str:
    if len(runs) <= 1:
        run = (runs and runs[0]) or meta
        command = f" Command: `{run['command']}`." if run.get("command") else ""
        measure = _MEASURE.replace("the rounds", f"{run['rounds']} rounds")
        return f"{_machine(run)}; {meta['images']} images per run; {measure}{command}"
    described = [
        f"{number}: {_run_text(run)}" if run else f"{number}: not recorded (points measured before runs were)"
        for number, run in enumerate(runs, start=1)
    ]
    return f"{meta['images']} images per run; {_MEASURE} The points come from {len(runs)} runs (column run): " + (
        "; ".join(described) + "."
    )


def _run_text(run: dict) -> str:
    command = f", `{run['command']}`" if run.get("command") else ""
    return f"{_machine(run)}, {run['rounds']} rounds{command}"


def _machine(run: dict) -> str:
    return f"{run['date']}, torch {run['torch']}, {run['device']}, {run['threads']} threads"


def _distinct_runs(results: list[dict]) -> list[dict | None]:
    """The runs of ``results`` in order of first appearance (``None``: points without a run record)."""
    runs = []
    for result in results:
        if result.get("run") not in runs:
            runs.append(result.get("run"))
    return runs


def _run_number(runs: list, result: dict) -> int:
    return runs.index(result.get("run")) + 1


def _spread_text(result: dict) -> str:
    # Points measured before the spread was recorded (older JSON lines) have none.
    return f"{result['spread']:.0%}" if "spread" in result else "n/a"


def _executed_text(executed: dict | None) -> str:
    parts = []
    for name, record in (executed or {}).items():
        if "steps_computed" in record:
            parts.append(f"{record['steps_computed']} steps ({name})")
        fraction = record.get("computed_fraction")
        if fraction is not None:
            parts.append(f"{fraction:.0%} of attention computations")
    return ", ".join(parts) or "n/a"


def _curves(results: list[dict]) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r:
            curves.setdefault(r["method"], []).append(r)
    return {method: sorted(points, key=lambda r: r["measured_speedup"]) for method, points in curves.items()}


def pareto_front(points: list[dict], metric: str, speed: str = "measured_speedup") -> list[dict]:
    """Points not beaten on both speed and ``metric`` by another point of the same method, by speedup."""
    better = (lambda a, b: a < b) if metric == "lpips" else (lambda a, b: a > b)
    # A point identical to full compute (PSNR inf: a few-step sweep's peer that reused nothing) has no value to
    # interpolate from: between it and a finite point every speedup would read inf.
    points = [p for p in points if np.isfinite(p[metric])]
    front = []
    for p in sorted(points, key=lambda r: -r[speed]):
        if not front or better(p[metric], front[-1][metric]):
            front.append(p)
    return sorted(front, key=lambda r: r[speed])


def at_speedup(points: list[dict], metric: str, speedup: float, speed: str = "measured_speedup") -> float | None:
    """``metric`` at ``speedup``, interpolated linearly along the method's Pareto front; None outside its range."""
    front = pareto_front(points, metric, speed)
    xs = [p[speed] for p in front]
    if not front or speedup < xs[0] or speedup > xs[-1]:
        return None
    return float(np.interp(speedup, xs, [p[metric] for p in front]))


def _cell(points: list[dict], metric: str, speedup: float, speed: str, digits: int) -> str:
    """The interpolated value; past the front's slow end, the slowest front point's value and its speedup.

    A method whose slowest point is already faster than ``speedup`` gives at least that quality at that speed
    (its curve just does not reach down to it), so that point is shown with its speedup instead of a blank.
    """
    value = at_speedup(points, metric, speedup, speed)
    if value is not None:
        return f"{value:.{digits}f}"
    front = pareto_front(points, metric, speed)
    if front and speedup < front[0][speed]:
        return f"{front[0][metric]:.{digits}f} (at {front[0][speed]:.2f}x)"
    return "—"


def equal_speed_table(
    model: str, results: list[dict], speedups=(2.0, 2.5, 3.0), speed: str = "measured_speedup"
) -> str:
    kind = "measured" if speed == "measured_speedup" else "ideal (FLOP-counted, noise-free)"
    lines = [
        f"## {model}: quality at equal {kind} speedup (interpolated along each method's Pareto front)",
        "",
        "— : the method never reaches that speedup. (at Nx): its slowest Pareto point is already faster; its "
        "quality is shown.",
        "",
    ]
    header = "| method | " + " | ".join(f"LPIPS @ {s:g}x | PSNR @ {s:g}x" for s in speedups) + " |"
    lines += [header, "|---|" + "---|---|" * len(speedups)]
    for method, points in _curves(results).items():
        cells = []
        for s in speedups:
            cells += [_cell(points, "lpips", s, speed, 4), _cell(points, "psnr", s, speed, 2)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(model: str, results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the process-wide backend stays as the caller set it

    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for method, points in _curves(results).items():
        for axis, metric in zip(axes, ("lpips", "psnr"), strict=True):
            xs = [p["measured_speedup"] for p in points]
            axis.scatter(xs, [p[metric] for p in points], s=14, alpha=0.5)
            front = pareto_front(points, metric)
            axis.plot([p["measured_speedup"] for p in front], [p[metric] for p in front], marker="o", label=method)
    axes[0].set_ylabel("LPIPS vs full compute (lower is better)")
    axes[1].set_ylabel("PSNR vs full compute, dB (higher is better)")
    for axis in axes:
        axis.set_xlabel("measured speedup (x)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{model}: speed vs fidelity (lines: each method's Pareto front)")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)
