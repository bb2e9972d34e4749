"""What a reused step should take, on a fixed plan of a bundled model: reused-step predictors fitted per step by least
squares on the full-compute calibration trajectories (the plan's computed steps as anchors), evaluated held out
against full compute (issue 27: flux-shapes at 4x FLOP-ideal).

Predictors of the pre-head state at reused step ``t`` from the last two computed steps ``a`` (anchor) and ``p``
(``x``: the block-stack input, ``R = H - x``: the residual; ``g``, ``c``, ``alpha``, ``beta`` fitted per step,
pooled over the calibration samples):

* ``state``: ``H_a`` (the official InvarDiff rule); ``state-gain``: ``g H_a``; ``state-extrap``: ``H_a + c (H_a -
  H_p)``, ``c`` fitted on H itself (the search's ``step_fit="direct"``); ``state-2``: ``alpha H_a + beta H_p`` (the
  same direction as ``step_fit="scale_free"``); ``state-ln``: ``H_a + c (H_a - H_p)`` with ``c`` on a grid of
  0.02 minimising the error after a LayerNorm (what a head that normalises H per token sees); ``state-channel``:
  ``H_a + c * (H_a - H_p)`` with ``c`` a vector over H's channels (last dimension), each fitted alone (more freedom
  than the plan format's one coefficient a step: does the scalar leave quality on the table?);
* ``residual``: ``x_t + R_a`` (``PlanConfig(step_reuse="residual")``, TeaCache / MagCache); ``residual-gain``:
  ``x_t + g R_a`` (MagCache's magnitude ratio, fitted); ``residual-extrap``: ``x_t + R_a + c (R_a - R_p)``;
  ``residual-2``: ``x_t + alpha R_a + beta R_p`` (gain and extrapolation).

Each predictor's sampled MSE on the calibration runs (``calibration_mse``, the runs its coefficients were fitted on)
is what a verified selection (``calibrate --verify``) would rank it by.

A diagnostic, not a policy: the run keeps every computed step's H and x (memory grows with the computed steps); the
plan's unit reuse runs as planned, its own extrapolation coefficients are dropped. Each predictor's PSNR is held out
on the sweep's evaluation inputs (``--seeds 0``; more seeds: a larger held-out set); ideal speedup FLOP-counted,
the diagnostic's patch embedding of x at every step included (the predictors' elementwise operations are not).

Usage: python benchmarks/frontier_step_predictors.py --model flux-shapes PLAN.json [--predictors state,state-2]
    [--seeds 0,1,2] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration.budget import sample_outputs
from invardiff.calibration.run import call_pipeline, check_cases
from invardiff.engine.policy import register_policy
from invardiff.files import write_text
from invardiff.metrics import output_fidelity
from invardiff.plan import CachePlan
from invardiff.policies.plan import PlanPolicy


PREDICTORS = (
    "state",
    "state-gain",
    "state-extrap",
    "state-2",
    "state-ln",
    "state-channel",
    "residual",
    "residual-gain",
    "residual-extrap",
    "residual-2",
)
LN_GRID = np.linspace(-0.5, 2.0, 126)  # state-ln's coefficients: steps of 0.02


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Run ``plan``, reused steps from ``predictor`` with ``coefficients[t]``; every computed H and x into
    ``record`` (``{"H": {t: H}, "x": {t: x}}``, the current run's)."""

    plan: CachePlan
    predictor: str | None
    coefficients: dict
    record: dict


class PredictorPolicy(PlanPolicy):
    def __init__(self, config: PredictorConfig, units, embed_input):
        super().__init__(config.plan, units, "state", embed_input)
        self.config = config
        self.computed = [int(t) for t in np.flatnonzero(~config.plan.step_cache)]
        self.branch = None  # the one branch the run calls the transformer in

    def head_input(self, state, hidden):
        self.branch = self.branch or state.name
        if state.name != self.branch:  # the record holds one H per step: a second branch would overwrite it
            raise NotImplementedError(
                f"frontier_step_predictors.py records one call per step; this pipeline runs the {self.branch!r} and "
                f"{state.name!r} branches as calls of their own (CFG as two calls, e.g. wan-motion). Use a model "
                f"sampled in one call a step."
            )
        record = self.config.record
        record.setdefault("H", {})[state.step] = hidden.detach().clone()
        record.setdefault("x", {})[state.step] = self.embed_input(state.call).detach().clone()
        return super().head_input(state, hidden)

    def reused_hidden(self, transformer, state):
        t = state.step
        anchor, previous = anchors(self.computed, t)
        record = self.config.record
        fixed, free = terms(
            self.config.predictor, record["H"], record["x"], anchor, previous, self.embed_input(state.call)
        )
        return sum(fixed) + sum(c * term for c, term in zip(self.config.coefficients[t], free, strict=True))


@register_policy(PredictorConfig)
def _build(config: PredictorConfig, family, transformer, units) -> PredictorPolicy:
    return PredictorPolicy(config, units, lambda call: family.embed_input(transformer, call))


def anchors(computed: list[int], t: int) -> tuple[int, int | None]:
    earlier = [s for s in computed if s < t]
    return earlier[-1], (earlier[-2] if len(earlier) > 1 else None)


def terms(predictor: str, H: dict, x: dict, a: int, p: int | None, x_t: torch.Tensor):
    """(fixed terms, terms with a fitted coefficient) of ``predictor``; the extrapolating ones need ``p``."""
    R = {s: H[s] - x[s] for s in (a, p) if s is not None}
    base, kind = predictor.split("-", 1) if "-" in predictor else (predictor, "plain")
    stream, fixed = (H, []) if base == "state" else (R, [x_t])
    if kind == "plain":
        return [*fixed, stream[a]], []
    if kind == "gain":
        return fixed, [stream[a]]
    if p is None:  # no two computed values yet: plain reuse
        return [*fixed, stream[a]], []
    if kind in ("extrap", "ln", "channel"):
        return [*fixed, stream[a]], [stream[a] - stream[p]]
    return fixed, [stream[a], stream[p]]  # "2"


def fit(predictor: str, H: dict, x: dict, computed: list[int], t: int) -> list[float]:
    """Least-squares coefficients of ``predictor`` at step ``t`` on full-compute trajectories (pooled samples)."""
    a, p = anchors(computed, t)
    fixed, free = terms(predictor, H, x, a, p, x[t])
    if not free:
        return []
    if predictor == "state-channel":  # one coefficient per channel: sums over every other dimension
        target, basis = (H[t] - fixed[0]).double(), free[0].double()
        dims = tuple(range(target.ndim - 1))
        squared = (basis * basis).sum(dims)
        fitted = (target * basis).sum(dims) / squared.clamp_min(torch.finfo(squared.dtype).tiny)
        return [torch.where(squared > 0, fitted, 0.0).to(H[t].dtype)]  # a channel that does not move: plain reuse
    if predictor == "state-ln":
        target = _layer_norm(H[t])
        errors = [float(((_layer_norm(fixed[0] + c * free[0]) - target) ** 2).sum()) for c in LN_GRID]
        return [float(LN_GRID[int(np.argmin(errors))])]
    target = (H[t] - sum(fixed)).double().reshape(-1, 1) if fixed else H[t].double().reshape(-1, 1)
    basis = torch.stack([term.double().reshape(-1) for term in free], dim=1)
    return [float(c) for c in torch.linalg.lstsq(basis, target).solution[:, 0]]


def _rounded(coefficient):
    if torch.is_tensor(coefficient):  # state-channel's vector
        return [round(c, 4) for c in coefficient.tolist()]
    return round(coefficient, 4)


def _layer_norm(value: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(value.double(), value.shape[-1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("plan")
    parser.add_argument("--predictors", default=",".join(PREDICTORS))
    parser.add_argument("--seeds", default="0", help="evaluation seeds (the sweep's: 0; more: a larger held-out set)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON lines file (default: print only)")
    args = parser.parse_args()
    predictors = args.predictors.split(",")
    unknown = [name for name in predictors if name not in PREDICTORS]
    if unknown:
        parser.error(f"--predictors takes names from {list(PREDICTORS)}, got {unknown[0]!r}")
    torch.set_num_threads(args.threads)
    plan = dataclasses.replace(CachePlan.load(args.plan), step_extrapolation=None, unit_extrapolation=None)
    target = bundled_target(args.model)
    pipe = target.load()
    call_kwargs = {**target.sampling_kwargs(pipe), "num_inference_steps": plan.num_inference_steps}
    cases = check_cases(target.calibration_runs())
    trajectories = {}
    full_compute = CachePlan.reuse_nothing(plan.model, plan.num_inference_steps)
    with invardiff.enabled(pipe, PredictorConfig(full_compute, None, {}, trajectories)):
        call_pipeline(pipe, target.family, cases, call_kwargs)
    calibration_reference = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
    computed = [int(t) for t in np.flatnonzero(~plan.step_cache)]
    inputs = sweep_inputs(target, [int(seed) for seed in args.seeds.split(",")])
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    results = []
    for predictor in predictors:
        coefficients = {
            int(t): fit(predictor, trajectories["H"], trajectories["x"], computed, int(t))
            for t in np.flatnonzero(plan.step_cache)
        }
        with invardiff.enabled(pipe, PredictorConfig(plan, predictor, coefficients, {})):
            flops, images = count_flops(lambda: inputs.generate(pipe))
            calibration = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
        fidelity = output_fidelity(images, reference)
        result = {
            "plan": args.plan,
            "seeds": args.seeds,
            "predictor": predictor,
            "ideal_speedup": full_flops / flops,
            "psnr": fidelity["psnr"],
            "worst_psnr": fidelity["worst"]["psnr"],
            "lpips": fidelity["lpips"],
            # what a verified selection would rank it by: its sampled error on the runs it was fitted on
            "calibration_mse": float(((calibration - calibration_reference) ** 2).mean()),
            "computed_steps": computed,
            "coefficients": {t: [_rounded(c) for c in values] for t, values in coefficients.items()},
        }
        results.append(result)
        shown = ("predictor", "ideal_speedup", "psnr", "worst_psnr", "calibration_mse")
        print(json.dumps({k: result[k] for k in shown}), flush=True)
        if args.out:
            write_text(args.out, "".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
