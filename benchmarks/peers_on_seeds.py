"""Peers at the aggressive settings of the sweep (``bench/peers.py``) on a bundled model, evaluated on more seeds than
the sweep's (a larger held-out set, beside ``frontier.py --seeds``): PSNR per seed and overall, FLOP-ideal speedup.
Quality only, nothing timed. MagCache's ratios come from its calibration mode on the target's calibration runs, as in
the sweep (``bench/points.py``).

Usage: python benchmarks/peers_on_seeds.py --model flux-shapes --seeds 0,1,2 [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from invardiff.bench import peers
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.files import write_text
from invardiff.metrics import output_fidelity


SETTINGS = {"diffusers-magcache": peers.AGGRESSIVE_MAGCACHE}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON lines file (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    target = bundled_target(args.model)
    entry, pipe = target.entry, target.load()
    steps = entry.num_inference_steps
    runs = [lambda case=case: pipe(**entry.call_kwargs(*case)) for case in target.calibration_runs()]
    ratios = peers.calibrate_mag_ratios(pipe.transformer, steps, runs)
    inputs = sweep_inputs(target, seeds)
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    results = []
    for peer in peers.peers(peers.PIPELINE, steps, ratios, settings=SETTINGS):
        detach = peer.attach(pipe.transformer, pipe)
        try:
            flops, images = count_flops(lambda: inputs.generate(pipe))
        finally:
            detach()
        fidelity = output_fidelity(images, reference)
        per_seed = np.array(fidelity["per_image"]["psnr"]).reshape(len(seeds), -1)  # seed-major, as sweep_inputs
        result = {
            "method": peer.method,
            "label": peer.label,
            "settings": peer.settings,
            "ideal_speedup": full_flops / flops,
            "psnr": fidelity["psnr"],
            "worst_psnr": fidelity["worst"]["psnr"],
            "psnr_by_seed": {seed: float(row.mean()) for seed, row in zip(seeds, per_seed, strict=True)},
            "seeds": seeds,
        }
        results.append(result)
        print(json.dumps({k: result[k] for k in ("label", "ideal_speedup", "psnr", "psnr_by_seed")}), flush=True)
        if args.out:
            write_text(args.out, "".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
