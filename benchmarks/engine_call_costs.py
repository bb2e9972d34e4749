"""Where the engine's own time goes in a transformer call, in place: a saved plan runs the sweep's evaluation inputs
of a bundled model while the engine's entry points (the step hook's begin and end of a call, the head hook, a
reused step's state and head, the unit adapters' calls into the engine) are clocked with ``perf_counter``; the
figures are microseconds per transformer call, averaged over every call of the run (a warm-up run first).

In place means between the model's own operations, on cold caches: the same Python costs several times what a
micro-benchmark loop measures, which is why a small model's per-call bookkeeping shows in its measured speedup.

Usage: python benchmarks/engine_call_costs.py --model wan-motion PLAN.json [--reuse-nothing] [--out DIR]
Writes DIR/engine-call-costs-<model>.{json,md} (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.host_heap import pin_host_heap
from invardiff.bench.targets import bundled_target
from invardiff.engine import adapters, hooks
from invardiff.families import get_family
from invardiff.files import write_text
from invardiff.plan import CachePlan


ENTRY_POINTS = {  # clocked name -> (module, function)
    "begin call": (hooks, "_begin_call"),
    "end call": (hooks, "_end_call"),
    "head hook": (hooks, "_head_input"),
    "reused state": (hooks, "_reused_hidden"),
    "unit computed": (adapters, "_computed_output"),
    "unit reused": (adapters, "_reused_output"),
}
HEAD = "reused step's head: the model's head operations (the head hook inside)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("plan")
    parser.add_argument("--reuse-nothing", action="store_true", help="run a plan of its shape that reuses nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pin_host_heap()
    target = bundled_target(args.model)
    pipe, inputs = target.load(), sweep_inputs(target, [0])
    plan = CachePlan.load(args.plan)
    if args.reuse_nothing:
        plan = CachePlan.reuse_nothing(plan.model, plan.num_inference_steps, scheduler=plan.scheduler)
    totals: dict[str, float] = {}
    family = get_family(plan.model.family)
    clocked = {name: getattr(module, attr) for name, (module, attr) in ENTRY_POINTS.items()}
    run_head = family.run_head
    calls = [0]

    def clock(name, function):
        @functools.wraps(function)
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return timed

    def counted_begin(*a, **k):
        calls[0] += 1
        return clocked["begin call"](*a, **k)

    invardiff.enable(pipe, plan)
    try:
        for name, (module, attr) in ENTRY_POINTS.items():
            setattr(module, attr, clock(name, counted_begin if name == "begin call" else clocked[name]))
        object.__setattr__(family, "run_head", clock(HEAD, run_head))
        inputs.generate(pipe)  # warm-up
        totals.clear()
        calls[0] = 0
        start = time.perf_counter()
        inputs.generate(pipe)
        seconds = time.perf_counter() - start
    finally:
        for name, (module, attr) in ENTRY_POINTS.items():
            setattr(module, attr, clocked[name])
        object.__setattr__(family, "run_head", run_head)
        invardiff.disable(pipe)
    names = [*ENTRY_POINTS, HEAD]
    per_call = {name: totals.get(name, 0.0) / calls[0] * 1e6 for name in names}
    engine = sum(per_call[name] for name in ENTRY_POINTS)
    result = {
        "model": args.model,
        "plan": args.plan,
        "reuse_nothing": args.reuse_nothing,
        "calls": calls[0],
        "run_seconds": seconds,
        "us_per_call": per_call,
        "engine_us_per_call": engine,
        "engine_share_of_run": engine * calls[0] / 1e6 / seconds,
    }
    out = Path(args.out)
    name = f"engine-call-costs-{args.model}{'-reuse-nothing' if args.reuse_nothing else ''}"
    write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {key} | {value:.1f} |" for key, value in per_call.items())
    write_text(
        out / f"{name}.md",
        f"# Engine time per transformer call, in place: {args.model}\n\n`python benchmarks/engine_call_costs.py "
        f"--model {args.model} {args.plan}{' --reuse-nothing' if args.reuse_nothing else ''} --threads "
        f"{args.threads}`: {calls[0]} calls, run {seconds:.3f} s; the engine's entry points {engine:.0f} us a call, "
        f"{result['engine_share_of_run']:.1%} of the run.\n\n| entry point | us per call |\n|---|---|\n{rows}\n",
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
