"""How much a per-image choice among searched plans could give, with hindsight: for frontier result files evaluated
on the same images (``frontier.py --seeds``), the mean PSNR when each image takes the plan that served it best,
beside the best single plan. An upper bound for per-sample schedules, not a method (the choice uses the answer).

Usage: python benchmarks/frontier_oracle.py FRONTIER.jsonl [FRONTIER.jsonl ...] [--label-contains stepextrap]
    [--images 4]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--label-contains", default="", help="only the points whose label contains this")
    parser.add_argument("--images", type=int, default=None, help="the first N images only (e.g. the seed-0 ones)")
    args = parser.parse_args()
    rows, names = [], []
    for path in args.results:
        for line in open(path):
            result = json.loads(line)
            if args.label_contains in result["label"]:
                rows.append(result["per_image"]["psnr"][: args.images])
                names.append(f"{path}: {result['label']} {result['computed_steps']}")
    if len({len(row) for row in rows}) != 1:
        raise SystemExit(f"the results were evaluated on different images: {[len(row) for row in rows]} PSNRs")
    psnr = np.array(rows)  # (plans, images)
    for name, row in zip(names, psnr, strict=True):
        print(f"{row.mean():6.2f} dB  {name}")
    print(f"best single plan {psnr.mean(1).max():.2f} dB; per-image best (hindsight) {psnr.max(0).mean():.2f} dB")


if __name__ == "__main__":
    main()
