"""What reusing the CFG difference can reach on a model that runs cond and uncond as separate calls (issue 27 item 2,
FasterCache's "CFG-Cache", arXiv 2410.19355): at the chosen steps the uncond prediction is replaced by
``cond_t + d``, d = uncond - cond from the last step where both branches ran (``--order 0``), or extrapolated
linearly in the step index from the last two such steps (``--order 1``; plain reuse while only one is known).

A measurement harness, not a cache: a forward hook on the transformer replaces the uncond call's output, so the
sampled trajectory is the one the reuse gives (each replaced prediction feeds the next step), while the uncond call
still runs (the quality figures do not depend on it). The speedup given is the transformer-call ideal, 2T / (2T - k)
for k replaced uncond calls of T steps (every call of the pipeline has the same cost; text encoding and the VAE,
which no cache touches, are left out, so it slightly overstates a FLOP-counted ideal).

Two modes:

* every skip set (default; for a few steps): every set of k uncond calls among steps 1 .. T-1, for each k in
  ``--skips``, sampled on the calibration runs (the error a user could select on) and on the sweep's evaluation
  inputs (held out: PSNR, mean over frames, against full compute at T steps). Per k the table gives the set of least
  calibration error (kept) and the best held-out one (an oracle, chosen with hindsight: what this reuse can give at
  best, not a point a user gets).
* ``--interval N,.. --warmup W,..``: FasterCache's rule, every combination, no selection: both branches run at the
  first W steps and the last; after them the uncond call runs once every N steps and is replaced on the others.

Writes benchmarks/results/sweep-few-step/cfg-reuse-<model>-<T>-steps[-interval].{jsonl,md}.

Usage: python benchmarks/cfg_reuse_scan.py --model wan-motion --steps 8 [--skips 1,2,3,4,5,6] [--threads 1]
       python benchmarks/cfg_reuse_scan.py --model wan-motion --steps 50 --interval 2,3 --warmup 5,10,20
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from invardiff.bench.bundled import sweep_inputs, sweep_name
from invardiff.bench.targets import bundled_target
from invardiff.calibration.budget import sample_outputs
from invardiff.files import write_text
from invardiff.metrics.video import output_fidelity


class UncondReuse:
    """A forward hook that replaces the uncond output at ``skips`` by cond + (extrapolated) d. Calls alternate cond,
    uncond, cond first (WanPipeline); each pipeline call makes ``2 * steps`` of them, which :meth:`check` verifies."""

    def __init__(self, steps: int, skips: set[int], order: int):
        self.steps, self.skips, self.order = steps, skips, order
        self.calls = 0
        self.cond = None
        self.differences: list[tuple[int, torch.Tensor]] = []  # (step, d) of the last two steps that ran both

    def __call__(self, module, args, output):
        step, branch = divmod(self.calls % (2 * self.steps), 2)
        self.calls += 1
        sample = output[0]
        if step == 0 and branch == 0:
            self.differences.clear()  # a new pipeline call
        if branch == 0:
            self.cond = sample
            return None
        if step not in self.skips:
            self.differences = [*self.differences[-1:], (step, sample - self.cond)]
            return None
        return (self.cond + self._difference(step), *output[1:])

    def _difference(self, step: int) -> torch.Tensor:
        (last_step, last) = self.differences[-1]
        if self.order == 0 or len(self.differences) < 2:
            return last
        previous_step, previous = self.differences[0]
        return last + (step - last_step) / (last_step - previous_step) * (last - previous)

    def check(self, runs: int) -> None:
        if self.calls != 2 * self.steps * runs:
            raise RuntimeError(
                f"expected {2 * self.steps} transformer calls (cond, uncond) per run over {runs} runs, got "
                f"{self.calls}: this harness needs a pipeline that runs the CFG branches as separate calls (Wan)."
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skips", default="1,2,3,4,5,6")
    parser.add_argument("--orders", default="0,1")
    parser.add_argument("--interval", default=None, help="FasterCache's rule: intervals, e.g. 2,3")
    parser.add_argument("--warmup", default="2", help="with --interval: warm-up steps, e.g. 5,10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/sweep-few-step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    T = args.steps
    target = bundled_target(args.model, num_inference_steps=T)
    pipe = target.load()
    cases = target.calibration_runs()
    call_kwargs = target.sampling_kwargs(pipe)
    inputs = sweep_inputs(target, [0])
    calibration_reference = sample_outputs(pipe, target.family, cases, call_kwargs, 1)
    reference = inputs.generate(pipe)

    def evaluate(skips: tuple[int, ...], order: int) -> dict:
        hook = UncondReuse(T, set(skips), order)
        handle = pipe.transformer.register_forward_hook(hook)
        try:
            sampled = sample_outputs(pipe, target.family, cases, call_kwargs, 1)
            videos = inputs.generate(pipe)
        finally:
            handle.remove()
        hook.check(len(cases) + len(inputs.cases))
        return {
            "skips": list(skips),
            "k": len(skips),
            "order": order,
            "call_ideal_speedup": 2 * T / (2 * T - len(skips)),
            "calibration_mse": float(((sampled - calibration_reference) ** 2).mean()),
            **{k: v for k, v in output_fidelity(videos, reference).items() if k != "per_frame"},  # kept small
        }

    orders = [int(o) for o in args.orders.split(",")]
    if args.interval is not None:
        rules = itertools.product([int(n) for n in args.interval.split(",")], [int(w) for w in args.warmup.split(",")])
        schedules = [
            (interval_skips(T, interval, warmup), {"interval": interval, "warmup": warmup})
            for interval, warmup in rules
        ]
        name = f"cfg-reuse-{sweep_name(args.model, T)}-interval"
    else:
        counts = [int(k) for k in args.skips.split(",")]
        schedules = [(s, None) for k in counts for s in itertools.combinations(range(1, T), k)]
        name = f"cfg-reuse-{sweep_name(args.model, T)}"
    results = []
    jsonl = Path(args.out) / f"{name}.jsonl"
    for order in orders:
        for skips, rule in schedules:
            results.append({**evaluate(skips, order), **({"rule": rule} if rule else {})})
            shown = ("skips", "order", "call_ideal_speedup", "calibration_mse", "psnr")
            print(json.dumps({key: results[-1][key] for key in shown}), flush=True)
            write_text(jsonl, "".join(json.dumps(r) + "\n" for r in results))
    minutes = (time.perf_counter() - started) / 60
    write_text(Path(args.out) / f"{name}.md", _report(args, results, minutes))


def interval_skips(steps: int, interval: int, warmup: int) -> tuple[int, ...]:
    """FasterCache's rule: both branches run at the first ``warmup`` steps and the last; after the warm-up the uncond
    call runs once every ``interval`` steps and is replaced on the others."""
    return tuple(t for t in range(warmup, steps - 1) if (t - warmup) % interval != 0)


def _report(args, results: list[dict], minutes: float) -> str:
    command = (
        f"python benchmarks/cfg_reuse_scan.py --model {args.model} --steps {args.steps} --orders {args.orders} "
        + (f"--interval {args.interval} --warmup {args.warmup}" if args.interval else f"--skips {args.skips}")
        + f" --threads {args.threads}"
    )
    lines = [
        f"# {args.model} at {args.steps} steps: uncond replaced by cond + d (CFG-difference reuse), held out",
        "",
        f"`{command}` ({minutes:.0f} min on a 2-core CPU, whatever else ran on it; {len(results)} runs of the "
        "calibration and "
        "evaluation inputs). d from the last step that ran both branches (order 0) or extrapolated from the last two "
        "(order 1). Ideal: transformer calls, 2T / (2T - k). PSNR dB against full compute at the same step count, "
        "mean over frames (worst frame in brackets).",
        "",
        "| k (uncond calls replaced) | order | pick | replaced at steps | ideal | PSNR dB | LPIPS | calibration MSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if args.interval is not None:
        lines[-2:] = [
            "| interval | warm-up | order | k (uncond calls replaced) | ideal | PSNR dB | LPIPS | calibration MSE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['rule']['interval']} | {r['rule']['warmup']} | {r['order']} | {r['k']} | "
                f"{r['call_ideal_speedup']:.2f}x | {r['psnr']:.2f} ({r['worst']['psnr']:.2f}) | {r['lpips']:.4f} | "
                f"{r['calibration_mse']:.3g} |"
            )
        return "\n".join(lines) + "\n"
    for k in sorted({r["k"] for r in results}):
        for order in sorted({r["order"] for r in results}):
            points = [r for r in results if r["k"] == k and r["order"] == order]
            if not points:
                continue
            picks = {"kept (least calibration error)": min(points, key=lambda r: r["calibration_mse"])}
            if len(points) > 1:
                picks["oracle (best held-out PSNR)"] = max(points, key=lambda r: r["psnr"])
            for pick, r in picks.items():
                lines.append(
                    f"| {k} | {order} | {pick} | {r['skips']} | {r['call_ideal_speedup']:.2f}x | {r['psnr']:.2f} "
                    f"({r['worst']['psnr']:.2f}) | {r['lpips']:.4f} | {r['calibration_mse']:.3g} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
