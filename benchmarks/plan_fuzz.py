"""The long fuzz of the plan and official-book loaders: N mutated files per family (dict and text level, plans and,
for the families whose official books invardiff writes, books), each a PlanError or a plan that runs in the engine on
a tiny model of its layout. The families are the registered ones with a tiny config (and the test families).

Usage: python benchmarks/plan_fuzz.py --cases 10000 [--families FAMILY ...] [--seed 0]
Prints one JSON line per family: cases, rejected, ran, foreign (exceptions other than PlanError: must be 0), seconds,
and the first foreign findings. Exit status 1 if any case raised anything but PlanError.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fuzz and the toy family live there
import toy_family  # noqa: E402, F401 - registers the toy families
from plan_fuzz import fuzz_families, official_families, run_case  # noqa: E402


def fuzz_family(family: str, cases: int, seed: int) -> dict:
    forms = ["plan", "book"] if family in official_families() else ["plan"]
    counts = {"rejected": 0, "ran": 0, "foreign": 0}
    findings = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        for index in range(cases):
            rng = random.Random(f"{seed}-{family}-{index}")
            form, level = forms[index % len(forms)], ("dict", "text")[(index // len(forms)) % 2]
            outcome = run_case(family, form, level, rng.randint, Path(directory))
            counts[outcome.kind] += 1
            if outcome.kind == "foreign" and len(findings) < 10:
                findings.append({"case": index, "form": form, "level": level, "detail": outcome.detail})
    seconds = round(time.perf_counter() - start, 1)
    return {"family": family, "cases": cases, **counts, "seconds": seconds, "findings": findings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="mutated files per family")
    parser.add_argument("--families", nargs="+", choices=fuzz_families(), default=fuzz_families())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    foreign = 0
    for family in args.families:
        result = fuzz_family(family, args.cases, args.seed)
        foreign += result["foreign"]
        print(json.dumps(result), flush=True)
    return 1 if foreign else 0


if __name__ == "__main__":
    sys.exit(main())
