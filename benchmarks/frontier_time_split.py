"""Where a saved plan's measured speedup goes: time inside the transformer's calls against the pipeline's own work
around them, and the plan's calls by kind (computed, reused, partly reused) against what their FLOPs allow.

The plan and full compute are timed in alternating whole runs (``bench/timing.py``, the sweep's schedule, median over
``--rounds``) on the sweep's evaluation inputs, with forward hooks on the transformer adding up each run's time inside
its calls; one FLOP-counted run of each gives every call's FLOPs. Reported per plan:

* ``efficiency``: measured speedup / FLOP-ideal speedup of the whole run (what ``frontier_timing.py`` reports);
* ``outside_s``: seconds of each run spent outside the transformer (scheduler, guidance, latents, VAE): work that
  caching cannot remove and FLOPs barely count; ``bound``: the efficiency a plan would reach if each of its calls
  took exactly its FLOP share of the matching stock call (an engine and a model with no per-call overhead);
* per call kind (FLOP share of the stock call: computed >= 0.99, reused < 0.05, partial between): how many, their
  time and FLOPs as shares of the matching stock calls, and the seconds they take beyond their FLOP share.

Usage: python benchmarks/frontier_time_split.py --model dit-digits PLAN.json [PLAN.json ...] [--rounds 3]
Writes benchmarks/results/frontier/time-split-<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.points import plan_point
from invardiff.bench.targets import bundled_target
from invardiff.bench.timing import Variant, measure_rounds, whole_run
from invardiff.files import write_text
from invardiff.flops import flop_counter
from invardiff.plan import CachePlan


WARMUP = 1  # warm-up rounds of measure_rounds: their runs are left out of the medians
KINDS = (("computed", 0.99, float("inf")), ("reused", 0.0, 0.05), ("partial", 0.05, 0.99))


class CallClock:
    """Seconds and FLOPs of each transformer call of the current run (forward hooks on the transformer)."""

    def __init__(self, transformer):
        self.seconds: list[float] = []
        self.flops: list[int] = []
        self.counter = None
        self._start = 0.0
        self._flops0 = 0
        self.handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            transformer.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        self._flops0 = self.counter.get_total_flops() if self.counter is not None else 0
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.seconds.append(time.perf_counter() - self._start)
        if self.counter is not None:
            self.flops.append(self.counter.get_total_flops() - self._flops0)

    def counted(self, run) -> tuple[int, list[int]]:
        """Run ``run`` under a FLOP counter: (the run's FLOPs, each call's FLOPs)."""
        self.flops = []
        self.counter = flop_counter()
        with self.counter:
            run()
        total, self.counter = self.counter.get_total_flops(), None
        return total, list(self.flops)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def split(inputs, pipe, clock: CallClock, plan_path: str, rounds: int, full: dict) -> dict:
    plan = CachePlan.load(plan_path)
    point = plan_point(Path(plan_path).stem, plan, {}, method="invardiff-search")
    detach = []
    plan_flops, plan_calls = _attached(point, pipe, lambda: clock.counted(lambda: inputs.generate(pipe)))
    per_run: dict[str, list[list[float]]] = {"full": [], "plan": []}

    def timed_run(name):
        def run():
            clock.seconds = []
            inputs.generate(pipe)
            per_run[name].append(list(clock.seconds))

        return whole_run(run, inputs.device)

    times = measure_rounds(
        [
            Variant("full", timed_run("full")),
            Variant("plan", timed_run("plan"), lambda: detach.append(point.attach(pipe)), lambda: detach.pop()()),
        ],
        rounds,
        warmup_rounds=WARMUP,
    )
    full_s, plan_s = times.median_seconds("full"), times.median_seconds("plan")
    full_calls = [statistics.median(run[i] for run in per_run["full"][WARMUP:]) for i in range(len(full["calls"]))]
    calls = [statistics.median(run[i] for run in per_run["plan"][WARMUP:]) for i in range(len(plan_calls))]
    inside_full = statistics.median(sum(run) for run in per_run["full"][WARMUP:])
    inside_plan = statistics.median(sum(run) for run in per_run["plan"][WARMUP:])
    share = [p / f for p, f in zip(plan_calls, full["calls"], strict=True)]
    ideal = full["flops"] / plan_flops
    # A call taking exactly its FLOP share of the stock call's time, plus the plan's own time outside the calls.
    bound_s = sum(f * s for f, s in zip(full_calls, share, strict=True)) + (plan_s - inside_plan)
    kinds = {}
    for name, low, high in KINDS:
        index = [i for i, s in enumerate(share) if low <= s < high]
        stock = sum(full_calls[i] for i in index)
        kinds[name] = {
            "calls": len(index),
            "time_share": sum(calls[i] for i in index) / stock if index else None,
            "flop_share": sum(plan_calls[i] for i in index) / sum(full["calls"][i] for i in index) if index else None,
            "excess_s": sum(calls[i] - full_calls[i] * share[i] for i in index),
        }
    measured = times.median_ratio("full", "plan")
    return {
        "plan": plan_path,
        "ideal_speedup": ideal,
        "measured_speedup": measured,
        "efficiency": measured / ideal,
        "bound": full_s / bound_s / ideal,
        "seconds": {"full": full_s, "plan": plan_s},
        "outside_s": {"full": full_s - inside_full, "plan": plan_s - inside_plan},
        "kinds": kinds,
        "rounds": rounds,
    }


def _attached(point, pipe, fn):
    detach = point.attach(pipe)
    try:
        return fn()
    finally:
        detach()


def markdown(model: str, results: list[dict], command: str) -> str:
    rows = [
        f"# Where the measured speedup goes: {model}\n",
        f"`{command}` (CPU, {torch.get_num_threads()} thread(s)); seconds per run of the sweep's evaluation inputs.\n",
        "| plan | ideal | measured | efficiency | bound | outside the transformer (full / plan) | computed calls: "
        "time / FLOPs of stock | reused calls: time / FLOPs | partial calls: time / FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = []
        for name, _, _ in KINDS:
            kind = r["kinds"][name]
            cells.append(
                "none"
                if not kind["calls"]
                else f"{kind['calls']}: {kind['time_share']:.3f} / {kind['flop_share']:.4f} "
                f"(+{kind['excess_s']:.3f} s)"
            )
        rows.append(
            f"| {Path(r['plan']).stem} | {r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
            f"{r['efficiency']:.3f} | {r['bound']:.3f} | {r['outside_s']['full']:.3f} / {r['outside_s']['plan']:.3f} "
            f"s of {r['seconds']['full']:.3f} / {r['seconds']['plan']:.3f} s | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frontier"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = bundled_target(args.model)
    pipe = target.load()
    inputs = sweep_inputs(target, [0])
    clock = CallClock(pipe.transformer)
    try:
        flops, calls = clock.counted(lambda: inputs.generate(pipe))  # also full compute's warm-up
        full = {"flops": flops, "calls": calls}
        results = [split(inputs, pipe, clock, path, args.rounds, full) for path in args.plans]
    finally:
        clock.remove()
    command = f"python benchmarks/frontier_time_split.py --model {args.model} --rounds {args.rounds} " + " ".join(
        args.plans
    )
    write_text(args.out / f"time-split-{args.model}.json", json.dumps(results, indent=1) + "\n")
    write_text(args.out / f"time-split-{args.model}.md", markdown(args.model, results, command))
    print(markdown(args.model, results, command))


if __name__ == "__main__":
    main()
