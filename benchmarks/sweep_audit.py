"""Do a committed sweep's quality figures still come out of the current code? Every point of ``sweep-MODEL.jsonl`` is
made again (its method's calibration rerun, or, for the frontier methods, its saved plan loaded) and sampled once on
the sweep's evaluation inputs; its PSNR is compared with the committed one. Nothing is timed.

Quality is deterministic on this CPU, so a point off by more than ``--tolerance`` dB was measured by other code: a
regression (the plan+probe one of 2026-12-06: a vetoed step's state was no longer kept), or a change that moved it
on purpose (calibration inputs, the search) and left the committed point stale. Points that could not run when they
were measured (an ``error`` record) must fail again; points whose method no longer makes them are listed.

A few-step sweep (``invardiff bench --model MODEL --steps N``, files ``sweep-MODEL-N-steps.jsonl`` in
``benchmarks/results/sweep-few-step``) is audited with ``--steps N``.

Usage: python benchmarks/sweep_audit.py --model dit-digits [--steps N] [--dir benchmarks/results/sweep]
    [--tolerance 0.1] [--frontier]
Writes DIR/audit-MODEL[-N-steps].{jsonl,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invardiff.bench.bundled import FRONTIER_METHODS, METHODS, sweep_folder, sweep_inputs, sweep_name, sweep_points
from invardiff.bench.points import peer_points, plan_point
from invardiff.bench.targets import bundled_target
from invardiff.files import read_json_lines, write_text
from invardiff.metrics import output_fidelity
from invardiff.plan import CachePlan


def sweep_methods(recorded: str) -> set[str]:
    """The ``invardiff bench`` methods that make the points recorded under method ``recorded``."""
    if recorded == "invardiff":  # the presets, and the grid's plans (recorded as plain plans)
        return {"invardiff", "invardiff-grid"}
    if recorded in METHODS:
        return {recorded}
    for method in ("dicache", "plan+probe"):  # their batch-global variants record a method of their own
        if recorded.startswith(method):
            return {method}
    return {"peers"}  # diffusers-*, cache-dit


def compare(committed: dict, psnr: float | None, failure: str | None, tolerance: float) -> str:
    """``"same"``, ``"differs"`` or ``"fails"`` (a point that ran before and raises now, or the other way round)."""
    if "error" in committed or failure is not None:
        return "same" if "error" in committed and failure is not None else "fails"
    # Equal outputs measure an infinite PSNR, and inf - inf is NaN: equal figures are the same point before any sum.
    same = psnr == committed["psnr"] or abs(psnr - committed["psnr"]) <= tolerance
    return "same" if same else "differs"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, help="a few-step sweep's step count (its files say it)")
    parser.add_argument("--dir", help="default: benchmarks/results/sweep, or sweep-few-step with --steps")
    parser.add_argument("--tolerance", type=float, default=0.1, help="dB of PSNR a point may move")
    parser.add_argument(
        "--frontier", action="store_true", help="calibrate the frontier methods' points again too (minutes a target)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder = Path(args.dir or sweep_folder(args.steps))
    name = sweep_name(args.model, args.steps)
    committed = {r["label"]: r for r in read_json_lines(folder / f"sweep-{name}.jsonl")}
    methods = set().union(*(sweep_methods(r["method"]) for r in committed.values()))
    if not args.frontier:  # their points are made from their saved plans, where the run saved them
        methods -= set(FRONTIER_METHODS)
    target = bundled_target(args.model, num_inference_steps=args.steps)
    pipe = target.load()
    inputs = sweep_inputs(target, [0])
    reference = inputs.generate(pipe)
    runs = {}  # label -> (attach, plan); frontier points from their saved plans
    for point in sweep_points(target, tuple(sorted(methods)), None, peer_points):
        runs[point.label] = (point.attach, point.plan)
    for label, record in committed.items():
        if label not in runs and record["method"] in FRONTIER_METHODS and record.get("plan_file"):
            plan = CachePlan.load(folder / record["plan_file"])
            runs[label] = (plan_point(label, plan, {}).attach, plan)
    rows = []
    for label, record in committed.items():
        if label not in runs:
            rows.append(
                {
                    "label": label,
                    "method": record["method"],
                    "committed_psnr": record.get("psnr"),
                    "measured": (record.get("run") or {}).get("date"),
                    "verdict": "not made",
                }
            )
            continue
        attach, plan = runs[label]
        psnr = failure = None
        try:
            detach = attach(pipe)
            try:
                psnr = float(output_fidelity(inputs.generate(pipe), reference)["psnr"])
            finally:
                detach()
        except Exception as error:  # a peer that cannot run on this model: recorded, as the sweep does
            failure = repr(error)
        saved = record.get("plan_file")
        same_plan = None if plan is None or not saved else CachePlan.load(folder / saved) == plan
        row = {
            "label": label,
            "method": record["method"],
            "committed_psnr": record.get("psnr"),
            "psnr": psnr,
            "error": failure,
            "same_plan": same_plan,
            "measured": (record.get("run") or {}).get("date"),
            "verdict": compare(record, psnr, failure, args.tolerance),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_text(folder / f"audit-{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    verdicts = ("same", "differs", "fails", "not made")
    counts = {verdict: sum(r["verdict"] == verdict for r in rows) for verdict in verdicts}
    lines = [
        f"# Sweep audit: {name}",
        "",
        f"`python benchmarks/sweep_audit.py --model {args.model}{f' --steps {args.steps}' if args.steps else ''} "
        f"--dir {folder} --tolerance {args.tolerance:g}{' --frontier' if args.frontier else ''}` "
        f"({time.perf_counter() - started:.0f} s, CPU, {args.threads} thread(s)): every committed point made again "
        "with the current code and sampled once; PSNR dB against full compute on the sweep's evaluation inputs. "
        + ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
        + ".",
        "",
        "| point | measured | committed PSNR | now | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["verdict"] == "same":
            continue
        now = r.get("error") or (f"{r['psnr']:.2f}" if r.get("psnr") is not None else "—")
        was = r.get("committed_psnr")
        lines.append(
            f"| {r['label']} | {r.get('measured') or 'not recorded'} | "
            f"{'error' if was is None else f'{was:.2f}'} | {now} | {r['verdict']} |"
        )
    if counts["not made"]:
        lines += [
            "",
            "not made: the method no longer makes that label, or a frontier point without a saved plan "
            "(`--frontier` calibrates them again).",
        ]
    write_text(folder / f"audit-{name}.md", "\n".join(lines) + "\n")
    print(f"wrote {folder}/audit-{name}.jsonl and .md")


if __name__ == "__main__":
    main()
