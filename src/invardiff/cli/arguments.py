"""The options of each ``invardiff`` subcommand, one function per subcommand, called when that subcommand is
parsed (or its help shown): what a function imports is paid only by its own subcommand."""

from __future__ import annotations

from .parsing import CACHE_DTYPES, at_least, registry_choice


def _threads(parser) -> None:
    parser.add_argument("--threads", type=at_least(1, "a thread count"), help="torch CPU threads (default: all cores)")


def _device(parser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")


def _cases(parser, verb: str) -> None:
    parser.add_argument(
        "--cases",
        help=f"a JSON file listing the runs to {verb}, each an (input, seed) pair: "
        '[{"input": "a cat", "seed": 0}, {"input": 3, "seed": 1}, ...] (prompts or class ids)',
    )


def model_source(parser, bundled: str, many: bool = False, config: bool = False):
    """The one model-source option group of every command that runs a model: ``--model NAME`` (bundled), or your
    own ``--pipeline DIR_OR_HUB_ID`` and/or ``--transformer DIR`` (resolved by
    :meth:`invardiff.models.sources.ModelSource.from_args`). ``many``: ``--model`` takes several names;
    ``config``: also ``--model-config`` (a random-weight toy pipeline). Returns the group."""
    group = parser.add_argument_group("model (a bundled --model NAME, or your own --pipeline and/or --transformer)")
    group.add_argument("--model", nargs="+" if many else None, help=f"bundled model: {bundled} (`invardiff models`)")
    group.add_argument(
        "--pipeline",
        metavar="DIR_OR_HUB_ID",
        help="your own pipeline: a directory written by pipe.save_pretrained(DIR), or a Hugging Face hub id already "
        "in the local cache (loaded with local_files_only; never downloaded); calibrate on a Wan2.2 pipeline with "
        "transformer_2 writes one plan per expert, in one file",
    )
    group.add_argument(
        "--transformer",
        metavar="DIR",
        help="your own transformer (config.json + weights, e.g. a fine-tune): with --pipeline BASE it replaces "
        "BASE's transformer; alone, the family's stock pipeline around it (DiT: pixel space, invardiff's "
        "IdentityVAE)",
    )
    if config:
        group.add_argument("--model-config", help="a random-weight toy pipeline: flux-tiny, dit-tiny, flux-bench, ...")
    return group


def demo(p) -> None:
    _device(p)
    model_source(p, "flux-shapes (the default), dit-digits or wan-motion")
    own = p.add_argument_group("your own model (--pipeline / --transformer)")
    own.add_argument("--prompts", help="text file, one prompt per line: the evaluated inputs (Flux, Wan)")
    own.add_argument("--classes", help="comma-separated class ids: the evaluated inputs (DiT)")
    own.add_argument("--steps", type=at_least(3, "a step count"), help="sampling steps")
    own.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's own default)")
    own.add_argument(
        "--calibration-cases",
        help="a JSON file of (input, seed) pairs to calibrate on (default: the evaluated inputs with seeds 1000, "
        "1001, ...: never an evaluated noise)",
    )
    p.add_argument(
        "--preset", help="official preset of the model's family (default: the model's, fast for the image models)"
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds for the fixed evaluation inputs")
    p.add_argument("--rounds", type=at_least(1, "a round count"), default=3, help="timed rounds after a warm-up")
    p.add_argument("--out", default="out/demo", help="directory for the report, grid, plan and rates")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _threads(p)


def models(p) -> None:
    p.add_argument("--json", action="store_true")


def generate(p) -> None:
    from .policy_args import add_policy_arguments

    model_source(p, "flux-shapes, dit-digits, wan-motion")
    add_policy_arguments(p)
    item = p.add_mutually_exclusive_group(required=True)
    item.add_argument("--prompt", help="text prompt (text-conditioned models)")
    item.add_argument("--class", dest="class_id", type=int, help="class id (class-conditioned models)")
    p.add_argument("--seed", type=at_least(0, "a seed"), default=0)
    p.add_argument(
        "--steps",
        type=at_least(1, "a step count"),
        help="default: the bundled model's, or the plan's with --plan (needed for your own pipeline without a plan)",
    )
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's, or the pipeline's own)")
    p.add_argument(
        "--batch", type=at_least(1, "a batch size"), default=1, help="images per call (seeds seed, seed+1, ...)"
    )
    p.add_argument("-o", "--output", required=True, help="output directory (created when the images are written)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace images already in the output directory (many items: also those of other settings)",
    )
    from .scale import add_generate_options

    add_generate_options(p, item)  # --prompts / --classes / --seeds / --ray / --workers: many images


def calibrate(p) -> None:
    model_source(p, "flux-shapes, dit-digits, wan-motion", config=True)
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompts", help="text file, one prompt per line (text-conditioned models)")
    inputs.add_argument("--classes", help="comma-separated class ids (class-conditioned models), e.g. 207,360,387")
    _cases(inputs, "calibrate on")
    p.add_argument(
        "--latents",
        help="instead of seeds: a .pt or .safetensors file of the noises to calibrate with, one per run in run order "
        "(a tensor (N, ...) or a list of N tensors; each the pipeline's latents argument for one sample)",
    )
    p.add_argument(
        "--seeds",
        help="comma-separated seeds: every input runs with every seed. Default: one run per input, each with its own "
        "noise (seeds drawn from --seed); the seeds used are recorded in the plan's provenance",
    )
    p.add_argument(
        "--seed", type=at_least(0, "a seed"), default=42, help="without --seeds: the seed the runs' seeds come from"
    )
    p.add_argument(
        "--steps", type=at_least(3, "a step count"), help="num_inference_steps of the plan (--model: the model's own)"
    )
    _add_threshold_args(p)
    size = "in pixels (default: the model's); a size off the VAE and patch grid is refused with the nearest valid ones"
    p.add_argument("--height", type=at_least(1, "a height"), help=f"image or frame height {size}")
    p.add_argument("--width", type=at_least(1, "a width"), help=f"image or frame width {size}")
    p.add_argument(
        "--guidance-scale",
        type=float,
        help="default: the model's, or the family's official calibration setting (DiT 1.0: no CFG)",
    )
    p.add_argument(
        "--max-sequence-length", type=at_least(1, "a token count"), help="text tokens (text-conditioned models)"
    )
    p.add_argument("--num-frames", type=at_least(1, "a frame count"), help="video pipelines (Wan): frames per clip")
    p.add_argument(
        "--batch-size",
        type=at_least(1, "a batch size"),
        help="calibration runs per pipeline call (default: the most whose calibration features fit the budget)",
    )
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        help="with the default batch size: GiB for the calibration features (default: half the free CUDA memory, "
        "8 on CPU)",
    )
    p.add_argument("--offload", choices=["cpu"], help="keep the calibration reference features in host memory")
    _device(p)
    _threads(p)
    p.add_argument("-o", "--output", required=True, help="plan path; the rates go beside it (.rates.npz)")
    from .scale import add_ray_options

    add_ray_options(p, "record the calibration runs")
    from .search_commands import add_search_arguments

    add_search_arguments(p)


def resample_plan(p) -> None:
    from .search_commands import resample_arguments

    resample_arguments(p)


def build_plan(p) -> None:
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
        type=at_least(1, "a run length"),
        help="at most this many consecutive step-cached steps (a computed step is forced after each run); "
        "a deviation from the official plan, recorded in its provenance",
    )
    p.add_argument("-o", "--output", required=True)


def inspect(p) -> None:
    p.add_argument("plan", nargs="?", help="a plan file (not with --calibration-memory)")
    model_config_arguments(p)
    p.add_argument(
        "--calibration-memory",
        action="store_true",
        help="instead of a plan: calibration feature memory per sample on --model-config (meta device)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="with --model-config: peak cache memory of a run (engine on the meta device, no compute), in the plan's "
        "cache dtype and in each other storage dtype",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def fit_memory(p) -> None:
    p.add_argument("plan", help="a plan file (an official book: convert it first with convert-official)")
    model_config_arguments(p)
    p.add_argument(
        "--max-cache-memory",
        metavar="SIZE",
        required=True,
        help="the bound on peak cache memory, e.g. 1.5GB (10^9 bytes), 1.5GiB (2^30), 800MB, or bytes",
    )
    p.add_argument(
        "--cache-dtype",
        choices=CACHE_DTYPES,
        help="store cached values in this dtype (plan format version 3; fp8 e4m3 with a per-tensor scale); "
        "default: the plan's own (the model's dtype)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=30.0,
        help="seconds of branch and bound (default 30); a fit stopped at the limit says how far from optimal at most",
    )
    p.add_argument(
        "--allow-step-reuse",
        metavar="FRACTION",
        type=float,
        nargs="?",
        const=0.9,
        help="also turn steps whose unit reuses cover at least FRACTION (default 0.9) of their unit FLOPs into "
        "whole-step reuses (only H is kept), chosen with the dropped reuses for the best speedup within the bound",
    )
    p.add_argument("-o", "--output", required=True)


def model_config_arguments(p) -> None:
    """The model config a plan is measured on: named, a config.json, a bundled model, your model's config."""
    p.add_argument("--model-config", help="named config (flux1-dev, dit-xl-2, flux-bench, ...) or a config.json")
    model_source(p, "flux-shapes, dit-digits, wan-motion (their own call shapes); --pipeline / --transformer: the "
                 "transformer config they hold, read without loading weights")  # fmt: skip
    shape = p.add_argument_group("call shape (with a config.json: defaults are the family's, and are printed)")
    shape.add_argument("--image-tokens", type=at_least(1, "a token count"), help="image tokens per transformer call")
    shape.add_argument(
        "--text-tokens", type=at_least(0, "a token count"), help="text tokens per call (text-conditioned)"
    )
    shape.add_argument("--batch", type=at_least(1, "a batch size"), help="rows per transformer call (DiT CFG: 2)")
    shape.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights and activations")


def convert(p) -> None:
    p.add_argument("book")
    p.add_argument(
        "--family",
        type=registry_choice(official_families, "families with official books"),
        required=True,
        help="the family whose official code wrote the book",
    )
    p.add_argument("-o", "--output", required=True)


def plot(p) -> None:
    p.add_argument("plan", help="a plan file, or a rates file written by calibrate")
    p.add_argument("-o", "--output", required=True)


def bench(p) -> None:
    model_source(p, "one or more of flux-shapes, dit-digits (the default: both) and the video model wan-motion", True)
    p.add_argument(
        "--methods",
        nargs="+",
        type=_sweep_method,
        help="invardiff: the presets; invardiff-grid: step x module quantile grid; invardiff-capped: grid plans "
        "with capped step runs; invardiff-search(+extrap): plans searched at FLOP-ideal budgets; "
        "invardiff-frontier: the 4-5x recipe (step extrapolation, 12-step window, 8 rounds of descent; minutes "
        "per target); invardiff-frontier2: the same at second order; invardiff-memory: plans held to a "
        "cache-memory bound (FLUX.1-dev's 1.5 GB, scaled); dicache; plan+probe; peers (default: all but the "
        "invardiff-frontier methods)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds for the model's fixed example inputs")
    p.add_argument("--rounds", type=at_least(1, "a round count"), default=3, help="timed rounds per point")
    _device(p)
    _threads(p)
    p.add_argument("--out", default="benchmarks/results/sweep")
    p.add_argument("--resume", action="store_true", help="keep the points already in the JSON lines, run the rest")
    p.add_argument("--report-only", action="store_true", help="rewrite tables and plots from the JSON lines")
    p.add_argument("--prompts", help="your own model (text-conditioned): a text file, one prompt per line")
    p.add_argument("--classes", help="your own model (class-conditioned): comma-separated class ids")
    _cases(p, "evaluate (your own model, instead of --prompts / --classes and --seeds)")
    p.add_argument(
        "--calibration-cases",
        help="your own model: a JSON file of (input, seed) pairs every method calibrates on (default: the evaluated "
        "inputs with seeds 1000, 1001, ...); an evaluated (input, seed) among them is refused",
    )
    p.add_argument(
        "--steps",
        type=at_least(3, "a step count"),
        help="sampling steps: your own model's; a bundled model's few-step sweep (e.g. 8 or 4: full compute at that "
        "count is the reference, every method calibrates at it; files sweep-MODEL-N-steps.*)",
    )
    p.add_argument(
        "--guidance", type=float, help="your own model: guidance scale (default: the pipeline's own default)"
    )
    p.add_argument(
        "--batch", type=at_least(1, "a batch size"), default=1, help="evaluation images per pipeline call (default 1)"
    )
    from .scale import add_ray_options

    add_ray_options(p, "measure the sweep points (each point's rounds within one worker)")


def bench_engine(p) -> None:
    p.add_argument(
        "--family",
        nargs="+",
        type=registry_choice(bench_families, "families with benchmark configs"),
        help="default: the families with official books",
    )
    p.add_argument(
        "--books",
        nargs="+",
        help="plans by name: official books (flux/fast, dit/slow), synthetic plans of a FLOP-ideal speedup "
        "(wan/synthetic-2x, hunyuanvideo/synthetic-3x) or plan files calibrated on the family's benchmark config "
        "(PLAN.json); default: each --family's books, else its synthetic plans",
    )
    p.add_argument(
        "--config",
        choices=["cpu", "full", "tiny"],
        default="cpu",
        help="cpu: real depth at hidden 256; full: the real configs (FLUX.1-dev, DiT-XL/2, Wan2.1...; GPU); "
        "tiny: real depth at hidden 32, overhead-bound, for tests",
    )
    _device(p)
    p.add_argument("--rounds", type=at_least(1, "a round count"), default=3, help="timed rounds after a warm-up")
    p.add_argument(
        "--schedule",
        choices=["lockstep", "alternate"],
        help="lockstep (default on CPU) or alternate (default on GPU); see invardiff.bench.engine",
    )
    _threads(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="run every variant, stock included, with its blocks compiled (inductor): compile_repeated_blocks where "
        "the model class declares repeated blocks, else block by block (DiT); plan-compiled over stock-compiled; "
        "compilation happens in the warm-up round",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="families with diffusers' CacheMixin (Flux): the books and the peers (diffusers FirstBlockCache, "
        "MagCache, TaylorSeer; cache-dit DBCache F1B0) at several settings on one loop, whole runs alternating "
        "with full compute; writes bench-engine-peers-CONFIG-DEVICE.{json,md}",
    )
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--json", action="store_true", help="print the results as one JSON list")


def _add_threshold_args(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preset", help="an official preset of the model's family, e.g. fast or slow (a name it lacks lists its own)"
    )
    group.add_argument("--thresholds", help="e.g. nonskip=0.1,step=0.7,transformer_blocks.attn=0.68 (unset: 0)")


def bench_families() -> list[str]:
    """Families with benchmark configs (bench-engine runs their books, or synthetic plans where they have none)."""
    from ..families import families

    return [spec.name for spec in families() if spec.configs is not None and spec.configs.bench]


def book_families() -> list[str]:
    """Families whose official books bench-engine runs by default."""
    from ..families import families

    return [spec.name for spec in families() if spec.official is not None and spec.official.books]


def official_families() -> list[str]:
    """Families whose official InvarDiff code ships cache books (convert-official)."""
    from ..families import families

    return [spec.name for spec in families() if spec.official is not None]


def _sweep_methods() -> list[str]:
    from ..bench.bundled import METHODS  # imported only when --methods is given: `bench --help` stays light

    return list(METHODS)


_sweep_method = registry_choice(_sweep_methods, "choose from")
