"""How far two runs of the same sweep agree: measured speedups (timing noise) and the deterministic columns.

Usage: python benchmarks/sweep_repeatability.py EARLIER.jsonl LATER.jsonl
e.g. an earlier commit's results against the current ones:
    python benchmarks/sweep_repeatability.py <(git show 157fd42:benchmarks/results/sweep/sweep-dit-digits.jsonl) \
        benchmarks/results/sweep/sweep-dit-digits.jsonl
Prints, over the points both ran: the spread of the ratio later / earlier of the measured speedup (standard
deviation, extremes), and how many points differ in ideal speedup, PSNR or LPIPS (expected: none).
"""

from __future__ import annotations

import json
import statistics
import sys


def _measured(path: str) -> dict[str, dict]:
    with open(path) as lines:
        results = [json.loads(line) for line in lines if line.strip()]
    return {r["label"]: r for r in results if "error" not in r}


def main(earlier_path: str, later_path: str) -> None:
    earlier, later = _measured(earlier_path), _measured(later_path)
    common = sorted(set(earlier) & set(later))
    ratios = [later[label]["measured_speedup"] / earlier[label]["measured_speedup"] for label in common]
    differ = [
        label
        for label in common
        if any(later[label][key] != earlier[label][key] for key in ("ideal_speedup", "psnr", "lpips"))
    ]
    print(f"{len(common)} points in both runs")
    print(
        f"measured speedup, later / earlier: median {statistics.median(ratios):.3f}, standard deviation "
        f"{statistics.pstdev(ratios):.3f}, min {min(ratios):.2f}, max {max(ratios):.2f}"
    )
    print(f"points whose ideal speedup, PSNR or LPIPS differ: {len(differ)}" + (f" {differ}" if differ else ""))


if __name__ == "__main__":
    main(*sys.argv[1:3])
