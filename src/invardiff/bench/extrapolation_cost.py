"""The measured cost of one reused entry with extrapolation beside a plain reused one, on a model's stream sizes.

A plain reuse hands back the cached tensor; an extrapolated one rebuilds it with one ``torch.lerp`` over the two
kept values (``invardiff.policies.extrapolation``). The FLOP count charges that lerp (``invardiff.flops``), but a
lerp is memory-bound, so its time is what tells how far an extrapolating plan falls short of its FLOP-ideal
speedup. Both are timed through the engine's own :func:`~invardiff.policies.extrapolation.extrapolate`, on tensors
of the sizes of the step stream H and of the largest unit output, on the device and in the dtype of the runs.
"""

from __future__ import annotations

import torch

from ..policies.extrapolation import Pair, extrapolate
from .timing import median, timed


def extrapolation_costs(flops, device="cpu", dtype: torch.dtype = torch.float32, repeats: int = 200) -> dict:
    """``{"step": ..., "unit": ...}``, each ``{"elements", "plain_us", "extrapolated_us"}``: the median
    microseconds of one reused entry of that stream's size, plain and extrapolated (``flops``: a
    :class:`~invardiff.flops.FlopProfile`, which records the sizes), over ``repeats`` timed batches of 16 entries
    after a warm-up."""
    units = [float(sizes.max()) for per_unit in flops.unit_elements.values() for sizes in per_unit.values()]
    streams = {"step": flops.step_elements, "unit": max(units, default=0.0)}
    return {name: _cost(int(elements), device, dtype, repeats) for name, elements in streams.items() if elements}


def _cost(elements: int, device, dtype: torch.dtype, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    previous, anchor = (torch.randn(elements, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    kept = Pair(previous, anchor)
    entries = 16  # per timed batch: a single entry is below the timer's resolution on small models

    def plain():
        for _ in range(entries):
            extrapolate(anchor, 0.0)

    def extrapolated():
        for _ in range(entries):
            extrapolate(kept, 0.3)

    seconds = {}
    for name, run in (("plain", plain), ("extrapolated", extrapolated)):
        run()  # warm-up
        seconds[name] = median([timed(run, device)[0] for _ in range(repeats)]) / entries
    return {
        "elements": elements,
        "plain_us": seconds["plain"] * 1e6,
        "extrapolated_us": seconds["extrapolated"] * 1e6,
    }


def cost_line(costs: dict, where: str) -> str:
    """One markdown line naming the measured per-entry costs."""
    parts = [
        f"{name} ({c['elements']} elements) {c['plain_us']:.1f} us plain, {c['extrapolated_us']:.1f} us extrapolated"
        for name, c in costs.items()
    ]
    return f"Reused entry on {where}, measured: " + "; ".join(parts) + "."


def entry_costs(target, device="cpu") -> dict:
    """:func:`extrapolation_costs` on ``target``'s call shapes, in its transformer's dtype: what a sweep run measures
    once and records in each extrapolating point (``entry_costs``), for :func:`sweep_note`."""
    from ..calibration.batching import pipeline_call_config
    from ..flops import profile_flops

    pipe, entry = target.load(), target.entry
    config = pipeline_call_config(pipe, entry.family, entry.call_kwargs(entry.examples[0], 0))
    return extrapolation_costs(profile_flops(config), device, pipe.transformer.dtype, repeats=50)


def extrapolated_count(result: dict) -> dict | None:
    """A sweep point's extrapolated entries per run (:func:`invardiff.stats.extrapolation_work`), or None when it
    extrapolates none."""
    count = result.get("settings", {}).get("extrapolated_entries")
    return count if count and (count["steps"] or count["units"]) else None


def sweep_note(model: str, results: list[dict]) -> str:
    """Markdown for a sweep whose points extrapolate: the per-entry costs their runs measured on the model's call
    shapes (read from the points' records, so that rewriting a report measures nothing) and, per extrapolating
    point, how many entries of a run extrapolate (``""`` when no point does)."""
    counts = {r["label"]: extrapolated_count(r) for r in results}
    counts = {label: c for label, c in counts.items() if c}
    if not counts:
        return ""
    measured = {}  # run date -> costs, over the runs that measured an extrapolating point
    for result in results:
        if result["label"] in counts and result.get("entry_costs"):
            measured[(result.get("run") or {}).get("date", "not recorded")] = result["entry_costs"]
    lines = [""]
    where = "{model} (one transformer call; the run of {date})"
    lines += [cost_line(costs, where.format(model=model, date=date)) for date, costs in measured.items()]
    if not measured:
        lines.append("Per-entry cost of a reused entry: not recorded by the runs of these points.")
    lines += [""] + [
        f"- {label}: {c['steps']} step-cached steps{second_order_text(c)} and {c['units']} unit reuses extrapolate "
        "per run"
        for label, c in counts.items()
    ]
    return "\n".join(lines) + "\n"


def second_order_text(count: dict) -> str:
    """`` (N at second order, two lerps each)`` for an :func:`invardiff.stats.extrapolation_work` count with
    second-order steps, else ``""``."""
    second = count.get("second_order_steps", 0)
    return f" ({second} at second order, two lerps each)" if second else ""
