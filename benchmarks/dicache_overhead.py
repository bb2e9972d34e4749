"""What DiCache's bookkeeping costs on the bundled models, apart from the probe blocks themselves.

* threshold 0: every step computes through the probe hooks; the time ratio to stock is the bookkeeping overhead.
* threshold 1e6: every post-warm-up step skips; measured against the FLOP-counted ideal.
Each ratio is the median of 7 per-round ratios, runs alternating with stock after a warm-up round (the benchmarks'
one timing loop, ``invardiff.bench.timing``). Usage: python benchmarks/dicache_overhead.py
"""

from __future__ import annotations

import torch

import invardiff
from invardiff.bench.sweep import count_flops
from invardiff.bench.timing import Variant, measure_rounds, whole_run
from invardiff.demo import generate_cases
from invardiff.models import registry


CPU = torch.device("cpu")


def main() -> None:
    for name in ("flux-shapes", "dit-digits"):
        entry, pipe = registry.get(name), registry.load(name)
        cases = [(item, 0) for item in entry.examples]

        def run(pipe=pipe, entry=entry, cases=cases):
            return generate_cases(pipe, entry, cases)

        full_flops, _ = count_flops(run)
        for threshold in (0.0, 1e6):
            config = invardiff.DiCacheConfig.preset("flux", threshold=threshold)
            times = measure_rounds(
                [
                    Variant("stock", whole_run(run, CPU)),
                    Variant(
                        "dicache",
                        whole_run(run, CPU),
                        lambda pipe=pipe, config=config: invardiff.enable(pipe, config),
                        lambda pipe=pipe: invardiff.disable(pipe),
                    ),
                ],
                rounds=7,
            )
            with invardiff.enabled(pipe, config):
                flops, _ = count_flops(run)
            print(
                f"{name} threshold {threshold:g}: measured speedup {times.median_ratio('stock', 'dicache'):.3f}x, "
                f"ideal {full_flops / flops:.3f}x"
            )


if __name__ == "__main__":
    main()
