"""How far token-level reuse could go at few steps (issue 27 item 2: wan-motion at 8 steps, >= 35 dB at 1.5x), in its
most favourable form: every block still runs on every token, and at the head a fraction of each sample's tokens
takes its kept pre-head state instead of the computed one.

The tokens that reuse are the ``fraction`` whose pre-head state moved least since it was last kept (relative L2 over
the features), chosen with hindsight from the computed state, greedily step by step. A real token cache chooses
without seeing the computed state and also feeds stale keys and values to the tokens it does compute, so this is
what token-level reuse could at best be expected to keep (greedy, so not a proven bound). Steps 0 and T-1 keep
every token, as the step plans do. The speedup beside each fraction is a ceiling too: the FLOP-ideal speedup if the
whole transformer call scaled with the tokens computed and a reused token cost nothing,
``1 / (1 - fraction (T - 2) / T)``.

Usage: python benchmarks/few_step_token_reuse.py --model wan-motion --steps 8 --fractions 0.2,0.3,0.4,0.45,0.5
Writes benchmarks/results/sweep-few-step/token-reuse-<model>-<steps>-steps.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs, sweep_name
from invardiff.bench.targets import bundled_target
from invardiff.engine.policy import register_policy
from invardiff.families.table import find_family
from invardiff.files import write_text
from invardiff.metrics import output_fidelity
from invardiff.plan import CachePlan, ModelFacts
from invardiff.policies.plan import PlanPolicy


def reuse_still_tokens(kept: torch.Tensor, computed: torch.Tensor, fraction: float) -> torch.Tensor:
    """``computed`` (B, N, D) with, per sample, the ``floor(fraction N)`` tokens whose state moved least from
    ``kept`` (relative L2 over D; ties: the lower token index first) replaced by their ``kept`` state."""
    count = int(fraction * computed.shape[1])
    if count == 0:
        return computed
    moved = (computed - kept).norm(dim=-1) / computed.norm(dim=-1).clamp_min(torch.finfo(computed.dtype).tiny)
    still = moved.argsort(dim=1, stable=True)[:, :count]  # (B, count)
    mask = torch.zeros(moved.shape, dtype=torch.bool, device=computed.device).scatter_(1, still, True)
    return torch.where(mask.unsqueeze(-1), kept, computed)


def ceiling_speedup(fraction: float, steps: int) -> float:
    """The FLOP-ideal speedup if a call's cost scaled with its computed tokens and reused tokens cost nothing."""
    return 1.0 / (1.0 - fraction * (steps - 2) / steps)


@dataclasses.dataclass(frozen=True)
class TokenReuseConfig:
    """Full compute (``plan`` reuses nothing) with ``fraction`` of the tokens' pre-head state reused at the head."""

    plan: CachePlan
    fraction: float


class TokenReusePolicy(PlanPolicy):
    def __init__(self, config: TokenReuseConfig, units):
        super().__init__(config.plan, units)
        self.fraction = config.fraction
        self.kept = {}  # CFG branch -> the pre-head state of its last step, reused tokens included

    def head_input(self, state, hidden):
        kept = self.kept.get(state.name)
        if state.step not in (0, self.num_steps - 1) and kept is not None:
            hidden = reuse_still_tokens(kept, hidden, self.fraction)
        self.kept[state.name] = hidden
        return super().head_input(state, hidden)


@register_policy(TokenReuseConfig)
def _build(config: TokenReuseConfig, family, transformer, units) -> TokenReusePolicy:
    return TokenReusePolicy(config, units)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fractions", default="0.2,0.3,0.4,0.45,0.5")
    parser.add_argument("--seeds", default="0", help="evaluation seeds (the sweep's: 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/sweep-few-step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    target = bundled_target(args.model, num_inference_steps=args.steps)
    pipe = target.load()
    family = find_family(target.family)
    plan = CachePlan.reuse_nothing(ModelFacts.for_family(family.name, family.num_layers(pipe.transformer)), args.steps)
    inputs = sweep_inputs(target, [int(seed) for seed in args.seeds.split(",")])
    reference = inputs.generate(pipe)
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        with invardiff.enabled(pipe, TokenReuseConfig(plan, fraction)):
            fidelity = output_fidelity(inputs.generate(pipe), reference)
        row = {
            "fraction": fraction,
            "ceiling_speedup": ceiling_speedup(fraction, args.steps),
            "psnr": fidelity["psnr"],
            "worst_psnr": fidelity["worst"]["psnr"],
            "lpips": fidelity["lpips"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = f"token-reuse-{sweep_name(args.model, args.steps)}"
    out = Path(args.out)
    write_text(out / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    command = (
        f"python benchmarks/few_step_token_reuse.py --model {args.model} --steps {args.steps} "
        f"--fractions {args.fractions} --seeds {args.seeds} --threads {args.threads}"
    )
    lines = [
        f"# {args.model} at {args.steps} steps: token-level reuse in its most favourable form",
        "",
        f"`{command}` ({time.perf_counter() - started:.0f} s, CPU). Every block runs on every token; at the head the "
        "given fraction of each sample's tokens, those whose pre-head state moved least (chosen with hindsight, step "
        "by step), takes its kept state (steps 0 and T-1 keep none). Ceiling: the FLOP-ideal speedup if a call's cost "
        "scaled with its computed tokens and a reused token cost nothing. PSNR dB against full compute at the same "
        "step count (video: mean over frames, worst frame in brackets).",
        "",
        "| reused tokens | ceiling speedup | PSNR dB | LPIPS |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['fraction']:.0%} | {r['ceiling_speedup']:.2f}x | {r['psnr']:.2f} ({r['worst_psnr']:.2f}) | "
        f"{r['lpips']:.4f} |"
        for r in rows
    ]
    write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print(f"wrote {out / name}.jsonl and .md")


if __name__ == "__main__":
    main()
