"""Write benchmark results as JSON plus a short markdown table."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._version import __version__
from ..files import write_text


def write_results(results: list[dict], directory: Path, stem: str, table=None) -> dict[str, Path]:
    """``stem``.json (results and machine facts) and ``stem``.md (``table(results, meta)``, default the books')."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "invardiff": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    json_path = directory / f"{stem}.json"
    write_text(json_path, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md_path = directory / f"{stem}.md"
    write_text(md_path, (table or engine_table)(results, meta))
    return {"json": json_path, "markdown": md_path}


def engine_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Engine benchmark ({meta['date']}, torch {meta['torch']}, {meta['cuda_device'] or 'CPU'}, "
        f"{meta['threads']} threads). Medians of per-round ratios; stock and reuse-nothing rows are per model."
        + _compiled_note(results),
        "",
        "| book | model config | measured speedup | round spread | ideal speedup | efficiency "
        "| reuse-nothing overhead "
        "| peak cache | all outputs of a step | stock s | book s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        seconds = r["median_seconds"]
        lines.append(
            f"| {r['book']} | {r['model_config']} ({r['dtype']}) | {r['measured_speedup']:.2f}x "
            f"| {r['spread']:.0%} | {r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} | {r['overhead']:+.2%} "
            f"| {r['peak_cache_bytes'] / 2**20:.1f} MiB | {r['all_outputs_bytes'] / 2**20:.1f} MiB "
            f"| {seconds['stock']:.2f} | {seconds[r['book']]:.2f} |"
        )
    return "\n".join(lines + entry_costs(results) + timing_warnings(results)) + "\n"


def entry_costs(results: list[dict]) -> list[str]:
    """Markdown lines: per model config, the measured cost of a reused entry with and without extrapolation."""
    from .extrapolation_cost import cost_line

    configs = {r["model_config"]: r["reused_entry_cost"] for r in results if r.get("reused_entry_cost")}
    return ["", *(cost_line(costs, config) for config, costs in configs.items())] if configs else []


def _compiled_note(results: list[dict]) -> str:
    """How each model config's variants were compiled (regionally by diffusers, or block by block), if they were."""
    compiled = {r["model_config"]: (r["compiled"], r["compiled_graphs"]) for r in results if r.get("compiled")}
    if not compiled:
        return ""
    return (
        " Every variant compiled: "
        + "; ".join(f"{config}: {how}, {graphs} graphs" for config, (how, graphs) in compiled.items())
        + "."
    )


def timing_warnings(results: list[dict]) -> list[str]:
    """Markdown lines after a table: every result's timing warnings (``bench.timing.speedup_figures``)."""
    warnings = [w for r in results for w in r.get("timing_warnings", [])]
    return ["", *(f"**Timing warning**: {w}" for w in warnings)] if warnings else []
