"""What DiCache's bookkeeping costs on the bundled models, apart from the probe blocks themselves.

* threshold 0: every step computes through the probe hooks; the time ratio to stock is the bookkeeping overhead.
* threshold 1e6: every post-warm-up step skips; measured against the FLOP-counted ideal.
Each ratio is the median of 7 runs alternating with stock. Usage: python benchmarks/dicache_overhead.py
"""

from __future__ import annotations

import statistics
import time

import invardiff
from invardiff.bench.sweep import count_flops
from invardiff.demo import _generate
from invardiff.models import registry


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    for name in ("flux-shapes", "dit-digits"):
        entry, pipe = registry.get(name), registry.load(name)
        cases = [(item, 0) for item in entry.examples]

        def run(pipe=pipe, entry=entry, cases=cases):
            return _generate(pipe, entry, cases)

        full_flops, _ = count_flops(run)
        for threshold in (0.0, 1e6):
            config = invardiff.DiCacheConfig.preset("flux", threshold=threshold)
            ratios = []
            for _ in range(7):
                stock = _seconds(run)
                with invardiff.enabled(pipe, config):
                    ratios.append(stock / _seconds(run))
            with invardiff.enabled(pipe, config):
                flops, _ = count_flops(run)
            print(
                f"{name} threshold {threshold:g}: measured speedup {statistics.median(ratios):.3f}x, "
                f"ideal {full_flops / flops:.3f}x"
            )


if __name__ == "__main__":
    main()
