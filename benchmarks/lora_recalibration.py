"""A plan calibrated on the base model, used under a LoRA, against a plan recalibrated with the LoRA loaded.

On each bundled model: a seeded random low-rank LoRA (``invardiff.bench.lora.random_lora``, on every attention and
feed-forward Linear of the blocks) is loaded with diffusers' ``pipe.load_lora_weights``; one plan is calibrated on
the base model and one on the LoRA model, with the same preset and calibration inputs. Both plans then run on the
LoRA model, on held-out inputs (the model's examples, seed 0; calibration runs on the demo's calibration inputs, seeds
1000 and up), against the LoRA model's full compute: PSNR and LPIPS (per frame for a video model), and each plan's
FLOP-ideal speedup counted on those runs. How visible the LoRA is: the LoRA model's full compute against the base
model's. The base plan on the base model is the reference point of what the preset gives without a LoRA.

No timing: every figure is load-free (FLOPs counted by torch.utils.flop_counter, quality metrics).

Usage: python benchmarks/lora_recalibration.py [--models flux-shapes wan-motion] [--rank 4] [--strength 0.4]
    [--seed 0] [--inputs 4] [--preset NAME] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import invardiff
from invardiff.bench.bundled import calibrate_thresholds
from invardiff.bench.lora import random_lora, save_lora
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.demo import generate_cases
from invardiff.metrics import output_fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["flux-shapes", "wan-motion"])
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--strength", type=float, default=0.4, help="LoRA term / base layer output, per layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random LoRA")
    parser.add_argument("--inputs", type=int, default=4, help="held-out examples evaluated (seed 0 each)")
    parser.add_argument("--preset", default=None, help="InvarDiff preset (default: the model's demo preset)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # checked before any work starts
    if not os.access(out, os.W_OK):
        parser.error(f"--out {out} is not writable")
    for name in args.models:
        bundled_target(name)  # an unknown model fails here, before anything runs
    for name in args.models:  # one pair of files per model, written as soon as it is measured
        row = _measure(name, args)
        print(json.dumps(row), flush=True)
        stem = f"lora-recalibration-{name}"
        _write(out / f"{stem}.json", json.dumps({"settings": vars(args), "result": row}, indent=1) + "\n")
        _write(out / f"{stem}.md", _table([row], args))


def _measure(name: str, args) -> dict:
    target = bundled_target(name)
    entry, pipe = target.entry, target.load()
    preset = args.preset or entry.demo_preset
    cases = [(item, 0) for item in entry.examples[: args.inputs]]  # held out: calibration uses other inputs

    def generate():
        return count_flops(lambda: generate_cases(pipe, entry, cases))

    base_flops, base_full = generate()
    base_plan = calibrate_thresholds(target, preset)
    with invardiff.enabled(pipe, base_plan):
        base_plan_flops, base_plan_on_base = generate()
    with tempfile.TemporaryDirectory() as directory:
        lora = random_lora(pipe.transformer, rank=args.rank, strength=args.strength, seed=args.seed)
        save_lora(lora, Path(directory) / "lora.safetensors")
        pipe.load_lora_weights(directory, weight_name="lora.safetensors", adapter_name="random")
    lora_flops, lora_full = generate()
    lora_plan = calibrate_thresholds(target, preset)  # same preset, inputs and seeds, now on the LoRA model
    results = {}
    for label, plan in (("base plan", base_plan), ("recalibrated plan", lora_plan)):
        with invardiff.enabled(pipe, plan):
            flops, images = generate()
        results[label] = {
            **_fidelity(images, lora_full),
            "ideal_speedup": lora_flops / flops,
            "steps_reused": int(plan.step_cache.sum()),
            "decisions_differing_from_base_plan": _differing_decisions(plan, base_plan),
        }
    pipe.unload_lora_weights()
    return {
        "model": name,
        "preset": preset,
        "steps": entry.num_inference_steps,
        "inputs": [item for item, _ in cases],
        "lora": {"rank": args.rank, "strength": args.strength, "seed": args.seed, "layers": len(lora) // 2},
        "lora_vs_base_full": _fidelity(lora_full, base_full),
        "base_plan_on_base": {
            **_fidelity(base_plan_on_base, base_full),
            "ideal_speedup": base_flops / base_plan_flops,
        },
        "on_lora_model": results,
    }


def _differing_decisions(plan, other) -> int:
    """Step gates and unit reuse entries (step, layer) on which two plans for one model disagree."""
    count = int((plan.step_cache != other.step_cache).sum())
    for block_list, kinds in plan.module_reuse.items():
        count += sum(int((reuse != other.module_reuse[block_list][kind]).sum()) for kind, reuse in kinds.items())
    return count


def _fidelity(images: torch.Tensor, references: torch.Tensor) -> dict:
    metrics = output_fidelity(images, references)
    return {"psnr": metrics["psnr"], "lpips": metrics["lpips"], "worst_psnr": metrics["worst"]["psnr"]}


def _table(rows: list[dict], args) -> str:
    lines = [
        "# A plan calibrated on the base model, used under a LoRA, against one recalibrated with the LoRA",
        "",
        f"Seeded random LoRA (rank {args.rank}, strength {args.strength}, seed {args.seed}) on every attention and "
        f"feed-forward Linear of the blocks, loaded with `pipe.load_lora_weights`. Quality against the LoRA model's "
        f"full compute on {args.inputs} held-out inputs per model (seed 0; calibration on other inputs and seeds); "
        f"per frame for video. FLOP-ideal speedups; no timing. `python benchmarks/lora_recalibration.py`.",
        "",
        "| model | preset | LoRA vs base (full compute) | base plan on base model | plan | PSNR dB | worst PSNR dB "
        "| LPIPS | ideal speedup | steps reused | decisions unlike the base plan's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        visible = f"{r['lora_vs_base_full']['psnr']:.1f} dB, LPIPS {r['lora_vs_base_full']['lpips']:.3f}"
        own = f"{r['base_plan_on_base']['psnr']:.1f} dB at {r['base_plan_on_base']['ideal_speedup']:.2f}x"
        for label, m in r["on_lora_model"].items():
            lines.append(
                f"| {r['model']} | {r['preset']} | {visible} | {own} | {label} | {m['psnr']:.2f} | "
                f"{m['worst_psnr']:.2f} | {m['lpips']:.4f} | {m['ideal_speedup']:.2f}x | {m['steps_reused']} | "
                f"{m['decisions_differing_from_base_plan']} |"
            )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
