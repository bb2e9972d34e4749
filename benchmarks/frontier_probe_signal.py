"""Is there a per-sample signal that says which image a fixed plan will hurt? (issue 27: the flux-shapes 4x point
misses +5 dB over MagCache on the sweep's 4 seed-0 images, while each image taking the best of four schedules, with
hindsight, would meet it; ``frontier_oracle.py``.)

A per-sample correction (plan+probe's veto, or a schedule chosen per sample) can only help if something the run can
see separates the images the plan hurts from those it does not. This diagnostic measures, per evaluated image:

* ``psnr``: the plan's held-out PSNR against full compute (what a correction should lift);
* ``h_error``: the plan's extrapolation error on H itself, summed over its reused steps (squared relative L2 error
  of ``H_a + c (H_a - H_p)`` against full compute's H at that step, on full compute's trajectory): the error the plan
  makes, before it propagates;
* ``probe_error``: the same on the first block's output (what a one-block probe could check at every reused step,
  at one block's cost a step): extrapolated with the plan's coefficient against the block's true output;
* ``computed_miss``: free at run time: at each computed step that ends a reused run, the squared relative error of
  the run's last extrapolation carried one step on (``H_a + c' (H_a - H_p)``, ``c' = c (t + 1 - a) / (t - a)`` from
  the run's last coefficient ``c`` at step ``t``) against the H the step computes, in the plan's own run, summed.

and the Pearson correlation of each signal with the PSNR loss (``-psnr``) across the images, and of the probe's error
with H's error across images at each reused step (whether the probe ranks the images as H does).

A diagnostic: nothing here is a policy; full compute's trajectories are held in memory (T x images x H).

Usage: python benchmarks/frontier_probe_signal.py --model flux-shapes PLAN.json [--seeds 0,1,2] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.targets import bundled_target
from invardiff.engine.policy import register_policy
from invardiff.families import resolve_family
from invardiff.files import write_text
from invardiff.metrics import output_fidelity
from invardiff.plan import CachePlan
from invardiff.policies.plan import PlanPolicy


@dataclasses.dataclass(frozen=True)
class RecordingPlan:
    """Run ``plan`` as the plan policy does, appending every computed step's pre-head state to ``record[step]``."""

    plan: CachePlan
    record: dict


class RecordingPolicy(PlanPolicy):
    def __init__(self, plan: CachePlan, units, record: dict):
        super().__init__(plan, units)
        self.record = record
        self.branch = None  # the one branch the run calls the transformer in

    def head_input(self, state, hidden):
        self.branch = self.branch or state.name
        if state.name != self.branch:  # one H per image and step: a second branch's calls would interleave
            raise NotImplementedError(
                f"frontier_probe_signal.py records one call per image and step; this pipeline runs the "
                f"{self.branch!r} and {state.name!r} branches as calls of their own (CFG as two calls, e.g. "
                f"wan-motion). Use a model sampled in one call a step."
            )
        if not self.step_cached[state.step]:
            self.record.setdefault(state.step, []).append(hidden.detach().double().cpu())
        return super().head_input(state, hidden)


@register_policy(RecordingPlan)
def _build(config: RecordingPlan, family, transformer, units) -> RecordingPolicy:
    return RecordingPolicy(config.plan, units, config.record)


def first_block_outputs(transformer, family, record: list):
    """A forward hook on the first block of the family's first block list appending its image-stream output."""
    block = getattr(transformer, family.block_lists[0].attr)[0]

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        outputs = output if isinstance(output, tuple) else (output,)
        stream = next((o for o in outputs if torch.is_tensor(o) and o.shape == hidden.shape), None)
        if stream is None:
            raise NotImplementedError(
                f"{type(module).__name__} returns no tensor shaped like its hidden_states {tuple(hidden.shape)}: "
                f"this diagnostic cannot tell which output is the probe's."
            )
        record.append(stream.detach().double().cpu())

    return block.register_forward_hook(hook, with_kwargs=True)


def per_step(calls: list, steps: int) -> torch.Tensor:
    """(T, images, ...) from one call per image and step, images run one after the other."""
    if len(calls) % steps:
        raise ValueError(f"{len(calls)} recorded calls are not a whole number of {steps}-step runs.")
    images = len(calls) // steps
    return torch.stack([torch.cat([calls[i * steps + t] for i in range(images)]) for t in range(steps)])


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Squared relative L2 error per image."""
    return ((estimate - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)).square().numpy()


def carried_coefficient(c: float, anchor: int, t: int) -> float:
    """The coefficient of step ``t + 1`` on the line that ``c`` draws at reused step ``t`` from ``anchor`` (a fit of
    ``c`` over ``t - anchor`` steps, scaled to one more step; 0 stays 0, plain reuse)."""
    return c * (t + 1 - anchor) / (t - anchor)


def correlation(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("plan")
    parser.add_argument("--seeds", default="0", help="evaluation seeds (the sweep's: 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON lines file (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = CachePlan.load(args.plan)
    target = bundled_target(args.model)
    pipe = target.load()
    family = resolve_family(pipe.transformer)
    inputs = sweep_inputs(target, [int(seed) for seed in args.seeds.split(",")], batch=1)
    T = plan.num_inference_steps
    if target.entry.num_inference_steps != T:
        parser.error(f"the plan has {T} steps, {args.model} samples {target.entry.num_inference_steps}")

    full_H, probes = {}, []
    handle = first_block_outputs(pipe.transformer, family, probes)
    try:
        with invardiff.enabled(pipe, RecordingPlan(CachePlan.reuse_nothing(plan.model, T), full_H)):
            reference = inputs.generate(pipe)
    finally:
        handle.remove()
    H = torch.stack([torch.cat(full_H[t]) for t in range(T)])  # (T, images, ...)
    P = per_step(probes, T)
    plan_H = {}
    with invardiff.enabled(pipe, RecordingPlan(plan, plan_H)):
        outputs = inputs.generate(pipe)
    psnr = np.array(output_fidelity(outputs, reference)["per_image"]["psnr"])

    cached = plan.step_cache
    coefficient = plan.step_extrapolation if plan.step_extrapolation is not None else np.zeros(T)
    computed = [t for t in range(T) if not cached[t]]
    images = H.shape[1]
    h_error, probe_error, miss = np.zeros(images), np.zeros(images), np.zeros(images)
    ranks = []
    for t in np.flatnonzero(cached):
        earlier = [s for s in computed if s < t]
        a, p = earlier[-1], earlier[-2] if len(earlier) > 1 else earlier[-1]
        c = float(coefficient[t])
        e_h = relative_error(H[a] + c * (H[a] - H[p]), H[t])
        e_p = relative_error(P[a] + c * (P[a] - P[p]), P[t])
        h_error += e_h
        probe_error += e_p
        ranks.append(correlation(e_h, e_p))
        if t + 1 < T and not cached[t + 1] and a != p:  # the run ends: the computed step t + 1 checks it for free
            carried = carried_coefficient(c, a, t)
            H_plan = {s: torch.cat(plan_H[s]) for s in (p, a, t + 1)}
            miss += relative_error(H_plan[a] + carried * (H_plan[a] - H_plan[p]), H_plan[t + 1])
    result = {
        "model": args.model,
        "plan": args.plan,
        "seeds": args.seeds,
        "computed_steps": computed,
        "psnr": psnr.round(2).tolist(),
        "h_error": h_error.round(5).tolist(),
        "probe_error": probe_error.round(5).tolist(),
        "computed_miss": miss.round(5).tolist(),
        "corr_loss_h_error": correlation(-psnr, h_error),
        "corr_loss_probe_error": correlation(-psnr, probe_error),
        "corr_loss_computed_miss": correlation(-psnr, miss),
        "corr_probe_h_per_step_mean": float(np.nanmean(ranks)),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        write_text(args.out, json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
