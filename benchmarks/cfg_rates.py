"""How far the CFG difference moves between steps, against how far the whole guided prediction moves: whether
reusing the uncond branch as ``cond + d`` (FasterCache's CFG-Cache, ``policies/cfg_reuse.py``) can be faithful where
reusing whole steps is not (issue 27 item 2).

Recorded on the model's calibration runs at full compute and its sampling guidance g: per step t the cond and
uncond transformer outputs c_t, u_t of a pipeline that runs the CFG branches as separate calls (Wan), the guided
prediction G_t = u_t + g (c_t - u_t) and the difference d_t = u_t - c_t. Per step, over every run pooled, each RMS
divided by RMS(G_t), what the step's reuse puts into the guided prediction:

* ``step``: G_t - G_(t-1), reusing the whole step's prediction;
* ``d``: d_t - d_(t-1), the change of the difference alone;
* ``cfg reuse``: (g - 1) (d_t - d_(t-1)), the error of G_t when u_t is replaced by c_t + d_(t-1);
* ``cfg reuse, 2 back``: the same from d_(t-2) (two skipped steps in a row);
* ``cfg extrap``: (g - 1) (d_t - (2 d_(t-1) - d_(t-2))), first-order extrapolation of d in the step index;
* ``cfg rescaled`` / ``cfg low/high``: (g - 1) (d_t - a d_(t-1)) with one factor a, or one factor per band of
  d_(t-1) (spatial frequencies up to a quarter of the sampling rate on each axis, and the rest: FasterCache's
  variant), each least-squares fitted on the very step it predicts (a bound on what any calibrated rescaling gives).

and the cosine between d_t and d_(t-1): a d that turns cannot be rescaled into the next.

Usage: python benchmarks/cfg_rates.py --model wan-motion --steps 8 [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from invardiff.bench.targets import bundled_target
from invardiff.calibration.run import call_pipeline


def record_branches(pipe, family: str, cases: list[tuple], call_kwargs: dict, steps: int):
    """``(cond, uncond)``, each ``(runs, T, ...)``: the transformer's outputs of every run, in call order."""
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0].float()))
    try:
        runs = []
        for case in cases:
            outputs.clear()
            call_pipeline(pipe, family, [case], call_kwargs)
            if len(outputs) != 2 * steps:
                raise RuntimeError(
                    f"expected 2 transformer calls per step (cond, uncond) over {steps} steps, got {len(outputs)}; "
                    f"this script needs a pipeline that runs the CFG branches as separate calls (Wan)."
                )
            runs.append(torch.stack(outputs))  # (2T, ...): cond, uncond alternate, cond first (WanPipeline)
    finally:
        hook.remove()
    calls = torch.stack(runs)
    return calls[:, 0::2], calls[:, 1::2]


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def bands(x: torch.Tensor, cutoff: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` split into its spatial frequencies up to ``cutoff`` (cycles per sample, on each of the last two axes)
    and the rest; the two add up to ``x``."""
    spectrum = torch.fft.fftn(x, dim=(-2, -1))
    low_y = torch.fft.fftfreq(x.shape[-2], device=x.device).abs().view(-1, 1) <= cutoff
    low_x = torch.fft.fftfreq(x.shape[-1], device=x.device).abs().view(1, -1) <= cutoff
    low = torch.fft.ifftn(spectrum * (low_y & low_x), dim=(-2, -1)).real
    return low, x - low


def fitted_residual(goal: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """``goal`` minus its least-squares fit by a combination of ``basis``."""
    design = torch.stack([b.flatten().double() for b in basis], dim=1)
    target = goal.flatten().double().unsqueeze(1)
    coefficients = torch.linalg.lstsq(design, target).solution
    return (target - design @ coefficients).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = bundled_target(args.model, num_inference_steps=args.steps)
    entry, pipe = target.entry, target.load()
    g = entry.guidance_scale
    call_kwargs = target.sampling_kwargs(pipe)
    with torch.no_grad():
        cond, uncond = record_branches(pipe, target.family, target.calibration_runs(), call_kwargs, args.steps)
    guided = uncond + g * (cond - uncond)
    d = uncond - cond
    rows = {
        "step": lambda t: guided[:, t] - guided[:, t - 1],
        "d": lambda t: d[:, t] - d[:, t - 1],
        "cfg reuse": lambda t: (g - 1) * (d[:, t] - d[:, t - 1]),
        "cfg reuse, 2 back": lambda t: (g - 1) * (d[:, t] - d[:, t - 2]) if t >= 2 else None,
        "cfg extrap": lambda t: (g - 1) * (d[:, t] - 2 * d[:, t - 1] + d[:, t - 2]) if t >= 2 else None,
        "cfg rescaled": lambda t: (g - 1) * fitted_residual(d[:, t], [d[:, t - 1]]),
        "cfg low/high": lambda t: (g - 1) * fitted_residual(d[:, t], list(bands(d[:, t - 1]))),
    }
    steps = range(1, args.steps)
    print(f"`python benchmarks/cfg_rates.py --model {args.model} --steps {args.steps} --threads {args.threads}`\n")
    print(
        f"# {args.model} at {args.steps} steps, guidance {g:g}: RMS over RMS(G_t) of what a reuse at step t puts "
        f"into the guided prediction ({len(target.calibration_runs())} calibration runs pooled)\n"
    )
    print("| reuse | t = " + ", ".join(map(str, steps)) + " |")
    print("|---|---|")
    for name, error in rows.items():
        cells = []
        for t in steps:
            value = error(t)
            cells.append("-" if value is None else f"{rms(value) / rms(guided[:, t]):.3f}")
        print(f"| {name} | {' '.join(cells)} |")
    cosines = [
        float(torch.nn.functional.cosine_similarity(d[:, t].flatten(), d[:, t - 1].flatten(), dim=0)) for t in steps
    ]
    print("\ncos(d_t, d_(t-1)) at t = 1 ..: " + " ".join(f"{c:.3f}" for c in cosines))
    print("\nRMS(d_t) / RMS(G_t): " + " ".join(f"{rms(d[:, t]) / rms(guided[:, t]):.3f}" for t in range(args.steps)))


if __name__ == "__main__":
    main()
