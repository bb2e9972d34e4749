"""Calibration memory: the per-sample estimate at real sizes, and the peak RSS of a toy calibration at T and 2T steps.

The estimate (``invardiff.memory.calibration_memory``, the recorder itself on the meta device) gives the bytes of
calibration features per sample at FLUX.1-dev 1024x1024 and DiT-XL/2, against the former recorder's two float32
features per stream. The RSS part runs each calibration in a fresh process that reports its own peak RSS, so the
two figures are comparable: calibration keeps one feature per stream and samples x steps x layers rates, so
memory must not grow with the number of steps beyond the (tiny) rate arrays.

    python benchmarks/calibration_memory.py --estimate-only --out benchmarks/results   # seconds
    python benchmarks/calibration_memory.py --steps 10 --out benchmarks/results        # + the RSS runs
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


CONFIG = "flux-calib-1024"
PROMPTS = ["a red cat on a sofa", "blue sky over a small house", "a green tree in a field"]
ESTIMATE_CONFIGS = ["flux1-dev", "dit-xl-2"]


def child(steps: int) -> None:
    import torch

    from invardiff.calibration import calibrate
    from invardiff.model_configs import MODEL_CONFIGS
    from invardiff.toy_pipelines import build_pipeline

    torch.set_num_threads(2)
    config = MODEL_CONFIGS[CONFIG]
    pipe = build_pipeline(config, config.build_transformer(), text_encoders=True)
    pipe.set_progress_bar_config(disable=True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    plan, rates = calibrate(
        pipe,
        num_inference_steps=steps,
        thresholds="fast",
        prompts=PROMPTS,
        seeds=[42],
        batch_size=len(PROMPTS),
        pipeline_kwargs={"height": 512, "width": 512, "max_sequence_length": 64},
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "steps": steps,
                "peak_rss_mib": peak / 1024,
                "rss_before_calibration_mib": baseline / 1024,
                "seconds": seconds,
                "runs": rates.num_runs,
            }
        )
    )


def estimates(out: Path) -> None:
    from invardiff.files import write_text
    from invardiff.memory import calibration_memory
    from invardiff.model_configs import MODEL_CONFIGS

    rows = {name: calibration_memory(MODEL_CONFIGS[name]) for name in ESTIMATE_CONFIGS}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "calibration-memory-estimate.json", json.dumps(rows, indent=1) + "\n")
    gib = 2**30
    table = [
        "| config | streams | references (GiB) | working (GiB) | total per sample (GiB) | former: two float32 (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        table.append(
            f"| {name} | {row['streams']} | {row['references'] / gib:.3f} | {row['working'] / gib:.3f} | "
            f"{row['total'] / gib:.3f} | {row['two_float32_references'] / gib:.3f} |"
        )
    table.append(
        "\nPer sample (per row of the transformer batch), model dtype bfloat16; measured by the calibration "
        "recorder on the meta device (`invardiff inspect --calibration-memory --model-config NAME`)."
    )
    write_text(out / "calibration-memory-estimate.md", "\n".join(table) + "\n")
    print("\n".join(table))


def main(args) -> None:
    from invardiff.files import write_text

    estimates(Path(args.out))
    if args.estimate_only:
        return
    results = []
    for steps in (args.steps, 2 * args.steps):
        output = subprocess.run(
            [sys.executable, __file__, "--child", str(steps)], check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    small, large = results
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
    calibration_growth = (large["peak_rss_mib"] - large["rss_before_calibration_mib"]) / max(
        1e-9, small["peak_rss_mib"] - small["rss_before_calibration_mib"]
    ) - 1
    summary = {
        "config": CONFIG,
        "image_tokens": 1024,
        "prompts": len(PROMPTS),
        "results": results,
        "peak_growth": growth,
        "growth_of_memory_added_by_calibration": calibration_growth,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "calibration-memory.json", json.dumps(summary, indent=1) + "\n")
    table = ["| steps | peak RSS (MiB) | RSS before calibration (MiB) | seconds |", "|---|---|---|---|"]
    table += [
        f"| {r['steps']} | {r['peak_rss_mib']:.0f} | {r['rss_before_calibration_mib']:.0f} | {r['seconds']:.1f} |"
        for r in results
    ]
    table.append(
        f"\nPeak RSS growth when the steps double: {growth:+.1%} (memory added by calibration: "
        f"{calibration_growth:+.1%}). Config {CONFIG}: hidden 256, 4+8 blocks, 1024 image + 64 text tokens, "
        f"{len(PROMPTS)} prompts in one batch."
    )
    write_text(out / "calibration-memory.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--estimate-only", action="store_true", help="only the per-sample estimates (seconds)")
    parsed = parser.parse_args()
    child(parsed.child) if parsed.child else main(parsed)
