"""Where the time of a cached run goes on a bundled model: what separates the measured speedup from the FLOP-ideal one.

Full compute and the model's demo plan (calibrated as ``invardiff demo`` does, on the model's calibration inputs)
run in lockstep, input by input, each on its own copy of the model, after a warm-up round. Every transformer call is
timed (wall clock around ``transformer.forward``), and in the cached run so are the engine's own per-call
bookkeeping (``begin_call`` and ``end_call``: step and branch, the timestep check, the policy's decisions, the unit
modes). A run's time is then split into

* the pipeline outside the transformer (text encoding, scheduler steps, CFG): not reducible by a cache;
* computed calls: the blocks, with the plan's unit reuse;
* step-cached calls: the time embedding and output head on the cached hidden state, plus the bookkeeping;

and the measured speedup is compared with the FLOP-ideal one (which counts the transformer's matmuls only).

Usage: python benchmarks/call_costs.py [--model wan-motion] [--rounds 3] [--calibration 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import invardiff
from invardiff.bench.targets import CALIBRATION
from invardiff.bench.timing import Variant, measure_rounds, timed
from invardiff.calibration import calibrate
from invardiff.demo import generate_cases
from invardiff.engine.install import attached_engine
from invardiff.families import INPUT_KINDS
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.models import registry
from invardiff.stats import ideal_speedup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--preset", default=None, help="default: the model's demo preset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=2, help="calibration inputs used (of the demo's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    entry = registry.get(args.model)
    preset = args.preset or entry.demo_preset
    full_pipe, cached_pipe = registry.load(args.model), registry.load(args.model)
    inputs = {INPUT_KINDS[entry.inputs].calibrate_arg: CALIBRATION[args.model][: args.calibration]}
    plan, _ = calibrate(
        full_pipe,
        num_inference_steps=entry.num_inference_steps,
        thresholds=preset,
        seed=0,
        pipeline_kwargs=entry.pipeline_kwargs or None,
        **inputs,
    )
    invardiff.enable(cached_pipe, plan)
    engine = attached_engine(cached_pipe.transformer)
    # Every transformer call, and the engine's begin_call and end_call (the hooks reach them through the instance).
    calls = {"full": [], "cached": [], "begin": [], "end": []}
    full_pipe.transformer.forward = _timed(full_pipe.transformer.forward, calls["full"])
    cached_pipe.transformer.forward = _timed(cached_pipe.transformer.forward, calls["cached"])
    engine.begin_call = _timed(engine.begin_call, calls["begin"])
    engine.end_call = _timed(engine.end_call, calls["end"])
    cases = [(item, 0) for item in entry.examples]
    recorded = []  # per timed round: the call times of each variant and the bookkeeping per call

    def start_round(index: int) -> None:
        for times in calls.values():
            times.clear()

    def end_round(index: int) -> None:
        if index >= 1:  # round 0 warms up
            bookkeeping = np.add(calls["begin"], calls["end"]).tolist()
            recorded.append({"full": list(calls["full"]), "cached": list(calls["cached"]), "bookkeeping": bookkeeping})

    def generate(pipe):
        return lambda index: timed(lambda: generate_cases(pipe, entry, [cases[index]]), "cpu")[0]

    times = measure_rounds(
        [Variant("full", generate(full_pipe)), Variant("cached", generate(cached_pipe))],
        args.rounds,
        steps=len(cases),
        schedule="lockstep",  # full compute and the plan take turns input by input, as in the demo
        on_start=start_round,
        on_round=end_round,
    )
    runs = {"full": [], "cached": []}
    for index, round_calls in enumerate(recorded):
        for name in runs:
            runs[name].append({"seconds": times.seconds[name][index], "calls": round_calls[name]})
        runs["cached"][-1]["bookkeeping"] = round_calls["bookkeeping"]
    report = _report(args.model, preset, plan, entry, cases, runs)
    print(json.dumps(report, indent=1))
    out = Path(args.out)
    write_text(out / f"call-costs-{args.model}.json", json.dumps(report, indent=1) + "\n")
    write_text(out / f"call-costs-{args.model}.md", _markdown(report))


def _timed(function, times: list[float]):
    """``function``, appending the wall-clock seconds of each call to ``times``."""

    def timed_function(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    return timed_function


def _report(model, preset, plan, entry, cases, runs) -> dict:
    steps = entry.num_inference_steps
    per_run = len(runs["full"][0]["calls"]) // len(cases)
    per_step = per_run // steps
    cached_step = np.repeat(plan.step_cache.astype(bool), per_step)  # the step kind of each call of one run

    def rows(name):
        return [np.asarray(r["calls"]).reshape(len(cases), per_run) for r in runs[name]]

    full, cached = rows("full"), rows("cached")
    bookkeeping = [np.asarray(r["bookkeeping"]).reshape(len(cases), per_run) for r in runs["cached"]]

    def median_ms(arrays, mask=slice(None)):
        return 1000 * float(np.median(np.concatenate([a[:, mask].ravel() for a in arrays])))

    def share(name, mask=slice(None)):  # median over rounds of the seconds spent in these calls per run
        return statistics.median(float(a[:, mask].sum()) / len(cases) for a in rows(name))

    def pipeline_share(name):
        return statistics.median((r["seconds"] - sum(r["calls"])) / len(cases) for r in runs[name])

    ratios = [f["seconds"] / c["seconds"] for f, c in zip(runs["full"], runs["cached"], strict=True)]
    ideal = ideal_speedup(plan, profile_flops(entry.model_config()))
    full_run = statistics.median(r["seconds"] for r in runs["full"]) / len(cases)
    parts = {
        "pipeline outside the transformer": pipeline_share("cached"),
        "computed calls": share("cached", ~cached_step),
        "step-cached calls": share("cached", cached_step),
    }
    return {
        "model": model,
        "preset": preset,
        "steps": steps,
        "calls_per_run": per_run,
        "steps_step_cached": int(plan.step_cache.sum()),
        "ideal_speedup": ideal,
        "measured_speedup": statistics.median(ratios),
        "round_speedups": ratios,
        "full_run_seconds": full_run,
        "full_pipeline_outside_seconds": pipeline_share("full"),
        "cached_run_parts_seconds": parts,
        "call_ms": {
            "stock call": median_ms(full),
            "computed call (plan)": median_ms(cached, ~cached_step),
            "step-cached call (plan)": median_ms(cached, cached_step),
            "engine bookkeeping per call": median_ms(bookkeeping),
        },
        # The speedup if every step-cached call and the bookkeeping were free, and if they and the pipeline were:
        "speedup_without_step_cached_cost": full_run
        / (parts["pipeline outside the transformer"] + parts["computed calls"]),
        "speedup_transformer_only": share("full") / parts["computed calls"],
        "rounds": len(ratios),
    }


def _markdown(report: dict) -> str:
    parts = report["cached_run_parts_seconds"]
    cached_total = sum(parts.values())
    lines = [
        f"# Where a cached run's time goes: {report['model']}, preset {report['preset']}, {report['steps']} steps",
        "",
        f"`python benchmarks/call_costs.py --model {report['model']}`, CPU; full compute and the plan in lockstep "
        f"input by input, {report['rounds']} rounds after a warm-up, medians; {report['calls_per_run']} transformer "
        f"calls a run, {report['steps_step_cached']} of {report['steps']} steps step-cached.",
        "",
        f"Measured speedup {report['measured_speedup']:.2f}x (rounds "
        + ", ".join(f"{r:.2f}x" for r in report["round_speedups"])
        + f"), FLOP-ideal {report['ideal_speedup']:.2f}x.",
        "",
        "| per call | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in report["call_ms"].items()),
        "",
        f"| one cached run ({cached_total:.3f} s; full compute {report['full_run_seconds']:.3f} s, of which "
        f"{report['full_pipeline_outside_seconds']:.3f} s outside the transformer) | s | share |",
        "|---|---|---|",
        *(f"| {name} | {s:.3f} | {s / cached_total:.1%} |" for name, s in parts.items()),
        "",
        f"Were step-cached calls free: {report['speedup_without_step_cached_cost']:.2f}x; the transformer's calls "
        f"alone (no pipeline, no step-cached calls): {report['speedup_transformer_only']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
