"""Peak cache memory of every official book at the real model configs (FLUX.1-dev 1024x1024 bf16, DiT-XL/2
256x256 bf16 with batched CFG), measured by the engine's own accounting on the meta device (no GPU needed).

    python benchmarks/cache_memory.py --out benchmarks/results
"""

import argparse
import json
from pathlib import Path

from invardiff.files import write_text
from invardiff.memory import cache_memory
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.official import bundled_books, convert_official_book


def main(args):
    rows = []
    for book, path in bundled_books().items():
        family = book.split("/")[0]
        config = MODEL_CONFIGS["flux1-dev" if family == "flux" else "dit-xl-2"]
        memory = cache_memory(convert_official_book(path, family), config)
        rows.append({"book": book, "model_config": config.name, "dtype": config.dtype, **memory})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "cache-memory-full.json", json.dumps(rows, indent=1) + "\n")
    lines = [
        "| book | model config | peak cache (GiB) | every unit output + H of a step (GiB) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        peak, every = r["peak_cache_bytes"] / 2**30, r["all_outputs_bytes"] / 2**30
        name = f"{r['model_config']} ({r['dtype']})"
        lines.append(f"| {r['book']} | {name} | {peak:.3f} | {every:.3f} | {peak / every:.2f} |")
    write_text(out / "cache-memory-full.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    main(parser.parse_args())
