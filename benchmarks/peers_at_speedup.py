"""Ours against the best peer at one speedup (issue 27: ">= +5 dB over the best peer at 4x, at equal FLOP-ideal and
at equal measured speed"), from a sweep's JSON lines and our point.

Per peer (every method of the sweep that is not ours: FBCache, MagCache, TaylorSeer, DBCache, DiCache): its point
nearest the ideal speedup, and its PSNR interpolated along its Pareto front at our point's ideal speedup and at
our point's measured speedup (``bench/sweep_report.at_speedup``; None outside the front's range: the peer never
gets that fast, or its slowest point is already faster). Prints a markdown table.

Usage: python benchmarks/peers_at_speedup.py SWEEP.jsonl --ideal 4.02 --psnr 33.50 [--measured 3.29]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from invardiff.bench.sweep_report import at_speedup


OURS = ("invardiff", "plan+probe")  # method name prefixes that are ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep", help="a sweep's JSON lines (invardiff bench)")
    parser.add_argument("--ideal", type=float, required=True, help="our point's FLOP-ideal speedup")
    parser.add_argument("--psnr", type=float, required=True, help="our point's PSNR dB (held out)")
    parser.add_argument("--measured", type=float, default=None, help="our point's measured speedup, if timed")
    args = parser.parse_args()
    results = [json.loads(line) for line in Path(args.sweep).read_text().splitlines() if line.strip()]
    peers: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r and not r["method"].startswith(OURS):
            peers.setdefault(r["method"], []).append(r)
    print(
        "| peer | point nearest the ideal speedup (ideal, measured, PSNR dB) | PSNR at equal ideal | "
        "PSNR at equal measured |"
    )
    print("|---|---|---|---|")
    for method, points in peers.items():
        near = min(points, key=lambda p: (round(abs(p["ideal_speedup"] - args.ideal), 2), -p["psnr"]))  # ties: best
        ideal = at_speedup(points, "psnr", args.ideal, "ideal_speedup")
        measured = None if args.measured is None else at_speedup(points, "psnr", args.measured)
        print(
            f"| {method} | {near['label']} ({near['ideal_speedup']:.2f}x, {near['measured_speedup']:.2f}x, "
            f"{near['psnr']:.2f}) | {_text(ideal, args.psnr)} | {_text(measured, args.psnr)} |"
        )


def _text(value: float | None, ours: float) -> str:
    return "—" if value is None else f"{value:.2f} (ours {ours - value:+.2f})"


if __name__ == "__main__":
    main()
