"""bench-engine on every family at its CPU benchmark size (real depth, reduced width and tokens), one family at a time.

Each family runs in its own ``invardiff bench-engine --family NAME --rounds R`` process (lockstep: stock,
reuse-nothing and each synthetic plan take their step ``i`` one after the other), writing
``OUT/NAME/bench-engine-cpu-cpu.{json,md}``; then one table of every family is written to ``OUT/README.md``:
measured and FLOP-ideal speedup, efficiency (measured / ideal), reuse-nothing overhead and the round spread.
A family whose run fails keeps its row with the error, the others go on.

    python benchmarks/bench_engine_families.py --family sd3 flux2 ... [--rounds 3] [--threads N] [--out DIR]
        [--report-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from invardiff.files import write_text


RESULTS = "bench-engine-cpu-cpu.json"


def run_family(family: str, rounds: int, out: Path, timeout: float, threads: int | None = None) -> str | None:
    """Run one family's bench-engine; None on success, else the error's last line."""
    command = ["invardiff", "bench-engine", "--family", family, "--rounds", str(rounds), "--out", str(out / family)]
    command += ["--threads", str(threads)] if threads else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    return None


def table(out: Path, families: list[str]) -> str:
    rows = [
        "| family | plan | model config | threads | measured | ideal | efficiency | reuse-nothing overhead "
        "| round spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dates = []
    for family in families:
        path = out / family / RESULTS
        if not path.exists():
            rows.append(f"| {family} | not measured | | | | | | |")
            continue
        data = json.loads(path.read_text())
        dates.append(data["meta"]["date"])
        for r in data["results"]:
            warn = " (timing warning)" if r["timing_warnings"] else ""
            rows.append(
                f"| {family} | {r['book'].split('/')[-1]} | {r['model_config']} | {data['meta']['threads']} | "
                f"{r['measured_speedup']:.2f}x | "
                f"{r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} | {r['overhead']:+.2%} | {r['spread']:.0%}{warn} |"
            )
    span = f"{min(dates)} to {max(dates)}" if dates else "no run"
    head = (
        f"# bench-engine on every family at its CPU benchmark size\n\n{span}, CPU, lockstep, medians of "
        "per-round ratios (3 timed rounds after a warm-up). Command: `python benchmarks/bench_engine_families.py "
        f"--family {' '.join(families)}`; each family's own results are in its folder.\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench-engine-families"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per family")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads of each run (default: bench-engine's, all cores)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT/README.md from the results")
    args = parser.parse_args()
    if not args.report_only:
        for family in args.family:
            error = run_family(family, args.rounds, args.out, args.timeout, args.threads)
            print(f"{family}: {'done' if error is None else error}", file=sys.stderr)
    write_text(args.out / "README.md", table(args.out, args.family))


if __name__ == "__main__":
    main()
