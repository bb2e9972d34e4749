"""The ``invardiff`` command line.

invardiff convert-official BOOK --family flux -o plan.json
invardiff inspect plan.json --model-config flux1-dev [--json]
invardiff inspect --calibration-memory --model-config flux1-dev [--json]
invardiff plot plan.json -o plan.png
invardiff bench-engine [--family flux dit] [--config cpu|full] [--device cpu|cuda] [--rounds 3] [--peers] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .. import __version__
from ..families import families
from ..plan import PlanError
from . import commands
from .policy_args import add_policy_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invardiff", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"invardiff {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log (what was enabled, batch sizes, ...)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="reuse statistics of a plan, and its ideal speedup on a model config")
    p.add_argument("plan", nargs="?", help="a plan file (not with --calibration-memory)")
    p.add_argument("--model-config", help="named config (flux1-dev, dit-xl-2, flux-bench, ...) or a config.json")
    p.add_argument(
        "--calibration-memory",
        action="store_true",
        help="instead of a plan: calibration feature memory per sample on --model-config (meta device)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="with --model-config: peak cache memory of a run (engine on the meta device, no compute)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=commands.inspect_plan)

    p = sub.add_parser("convert-official", help="convert an official InvarDiff cache book into a plan")
    p.add_argument("book")
    p.add_argument("--family", choices=_official_families(), required=True)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(handler=commands.convert_official)

    p = sub.add_parser("plot", help="heatmaps of a plan (.json) or of calibration rates (.npz), as PNG")
    p.add_argument("plan", help="a plan file, or a rates file written by calibrate")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(handler=commands.plot)

    p = sub.add_parser("calibrate", help="InvarDiff calibration: two full-compute passes, then a plan")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="a local diffusers pipeline directory (FluxPipeline or DiTPipeline)")
    source.add_argument("--model-config", help="a random-weight toy pipeline: flux-tiny, dit-tiny, flux-bench, ...")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompts", help="text file, one prompt per line (Flux)")
    inputs.add_argument("--classes", help="comma-separated class ids (DiT), e.g. 207,360,387")
    p.add_argument("--seeds", default="42", help="comma-separated seeds; every input runs with every seed")
    p.add_argument("--steps", type=int, required=True, help="num_inference_steps of the plan")
    _add_threshold_args(p)
    p.add_argument("--height", type=int, help="Flux image height in pixels")
    p.add_argument("--width", type=int, help="Flux image width in pixels")
    p.add_argument("--guidance-scale", type=float, help="default: Flux 3.5 (distilled), DiT 1.0 (no CFG, official)")
    p.add_argument("--max-sequence-length", type=int, help="Flux T5 tokens (default: the pipeline's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="calibration runs per pipeline call (default: the most whose calibration features fit the budget)",
    )
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        help="with the default batch size: GiB for the calibration features (default: half the free CUDA memory, "
        "8 on CPU)",
    )
    p.add_argument("--offload", choices=["cpu"], help="keep the calibration reference features in host memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", required=True, help="plan path; the rates go beside it (.rates.npz)")
    p.set_defaults(handler=commands.calibrate)

    p = sub.add_parser("build-plan", help="rebuild a plan from a rates file without the model")
    p.add_argument("rates")
    _add_threshold_args(p)
    p.add_argument(
        "--correction",
        choices=["exact", "stored", "none"],
        default="exact",
        help="exact: only at thresholds whose provisional plan was measured; stored: reuse the stored "
        "corrected rates (approximate); none: first pass only",
    )
    p.add_argument(
        "--max-step-run",
        type=int,
        help="at most this many consecutive step-cached steps (a computed step is forced after each run); "
        "a deviation from the official plan, recorded in its provenance",
    )
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(handler=commands.build_plan)

    p = sub.add_parser("models", help="list the bundled trained models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=commands.list_models)

    p = sub.add_parser(
        "generate", help="generate with a bundled model, optionally with a cache policy (plan, dicache, plan+probe)"
    )
    p.add_argument("--model", required=True, help="bundled model name (see `invardiff models`)")
    add_policy_arguments(p)
    item = p.add_mutually_exclusive_group(required=True)
    item.add_argument("--prompt", help="text prompt (Flux models)")
    item.add_argument("--class", dest="class_id", type=int, help="class id (DiT models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="default: the model's (the plan's, with --plan)")
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call (seeds seed, seed+1, ...)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(handler=commands.generate)

    p = sub.add_parser("demo", help="calibrate, plan, and compare accelerated vs full compute on a bundled model")
    p.add_argument("--device", default="cpu", help="torch device of the pipeline and the metrics (cpu, cuda, ...)")
    p.add_argument("--model", default="flux-shapes", help="bundled model: flux-shapes or dit-digits")
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds for the fixed evaluation inputs")
    p.add_argument("--rounds", type=int, default=3, help="timed alternating rounds after a warm-up")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=commands.demo)

    p = sub.add_parser("bench", help="speed-quality sweep vs full compute and peers on bundled models, with plots")
    p.add_argument("--model", nargs="+", default=["flux-shapes", "dit-digits"], help="bundled model(s)")
    p.add_argument(
        "--methods",
        nargs="+",
        type=_sweep_method,
        help="invardiff: the presets; invardiff-grid: step x module quantile grid; invardiff-capped: grid plans "
        "with capped step runs; dicache; plan+probe; peers (default: all)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds for the model's fixed example inputs")
    p.add_argument("--rounds", type=int, default=3, help="timed alternating rounds per point after a warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/sweep")
    p.add_argument("--resume", action="store_true", help="keep the points already in the JSON lines, run the rest")
    p.add_argument("--report-only", action="store_true", help="rewrite tables and plots from the JSON lines")
    p.add_argument("--pipeline", help="instead of bundled models: a saved diffusers Flux / DiT pipeline directory")
    p.add_argument("--prompts", help="with --pipeline (Flux): a text file, one prompt per line")
    p.add_argument("--classes", help="with --pipeline (DiT): comma-separated class ids")
    p.add_argument("--steps", type=int, help="with --pipeline: sampling steps")
    p.add_argument("--guidance", type=float, default=3.5, help="with --pipeline: guidance scale (default 3.5)")
    p.set_defaults(handler=commands.bench)

    p = sub.add_parser("bench-engine", help="engine speed vs stock on the official books")
    p.add_argument("--family", nargs="+", choices=_official_families(), default=_official_families())
    p.add_argument("--books", nargs="+", help="official books by name, e.g. flux/fast dit/slow (default: all)")
    p.add_argument(
        "--config",
        choices=["cpu", "full", "tiny"],
        default="cpu",
        help="cpu: real depth at hidden 256; full: FLUX.1-dev / DiT-XL/2 real configs (GPU); "
        "tiny: real depth at hidden 32, overhead-bound, for tests",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument(
        "--schedule",
        choices=["lockstep", "alternate"],
        help="lockstep (default on CPU) or alternate (default on GPU); see invardiff.bench.engine",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run every variant, stock included, under compile_repeated_blocks (inductor): plan-compiled over "
        "stock-compiled; compilation happens in the warm-up round",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="families with diffusers' CacheMixin (Flux): the books and the peers (diffusers FirstBlockCache, "
        "MagCache, TaylorSeer; cache-dit DBCache F1B0) at several settings on one loop, whole runs alternating "
        "with full compute; writes "
        "bench-engine-peers-CONFIG-DEVICE.{json,md}",
    )
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--json", action="store_true", help="print the results as one JSON list")
    p.set_defaults(handler=commands.bench_engine)
    return parser


def _add_threshold_args(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", help=f"official preset: {_preset_names()}")
    group.add_argument("--thresholds", help="e.g. nonskip=0.1,step=0.7,transformer_blocks.attn=0.68 (unset: 0)")


def _official_families() -> list[str]:
    # Families whose official InvarDiff code ships cache books (convert-official, bench-engine).
    return [spec.name for spec in families() if spec.official is not None]


def _preset_names() -> str:
    return "; ".join(f"{spec.name} {', '.join(spec.presets)}" for spec in families() if spec.presets)


def _sweep_method(name: str) -> str:
    from ..bench.bundled import METHODS  # imported only when --methods is given: --help and --version stay light

    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(METHODS)})")
    return name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library only logs; the CLI shows warnings always and, with -v, what each step decided.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="invardiff: %(message)s")
    try:
        return args.handler(args) or 0
    except (PlanError, ValueError, FileNotFoundError) as error:
        print(f"invardiff {args.command}: error: {error}", file=sys.stderr)
        return 2


def print_json(value) -> None:
    print(json.dumps(value, indent=1))


if __name__ == "__main__":
    sys.exit(main())
