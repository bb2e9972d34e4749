"""Options and handlers of the scale-out commands: ``generate`` over many items (one process or a Ray pool) and
``calibrate --ray``. The work is done by :mod:`invardiff.scale`; this module parses, reports progress and prints."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path


RAY_TIMEOUT = 600.0  # seconds without progress; the default of invardiff.scale.actors.Workers.timeout


def add_ray_options(parser, what: str) -> None:
    group = parser.add_argument_group("Ray (pip install 'invardiff[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"{what} on a Ray actor pool: --ray alone starts a local Ray; --ray auto joins the cluster of "
        "`ray start`; --ray ray://HEAD:10001 connects through Ray Client",
    )
    group.add_argument(
        "--workers", type=_positive, default=1, help="Ray actors (default 1), each loads the model once"
    )
    group.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs of each actor (its torch threads)")
    group.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs of each actor (it then runs on cuda)")
    group.add_argument(
        "--ray-timeout",
        type=float,
        default=RAY_TIMEOUT,
        metavar="SECONDS",
        help=f"give up when no worker started and no task finished for this long (default {RAY_TIMEOUT:g})",
    )


def add_generate_options(parser, item_group) -> None:
    """``generate`` over many items: --prompts FILE or --classes LIST (beside --prompt / --class) and --seeds."""
    item_group.add_argument(
        "--prompts", help="many outputs: a text file, one prompt per line (text-conditioned models)"
    )
    item_group.add_argument(
        "--classes", help="many outputs: comma-separated class ids (class-conditioned models), e.g. 0,3,5"
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds, every input (--prompt / --class / --prompts / --classes) with every seed "
        "(default: --seed); one image per (input, seed), named by both, skipped when the output directory's "
        "manifest has it with the same settings (model, steps, policy, ...)",
    )
    add_ray_options(parser, "generate")


def wants_many(args) -> bool:
    # --seeds with one --prompt / --class is many items too: one image per seed, as the option says
    return bool(args.prompts or args.classes or args.seeds or args.ray)


def generate_many(args) -> int:
    """``invardiff generate --prompts FILE | --classes LIST | --seeds LIST [--ray [ADDRESS] --workers N] -o DIR``."""
    from tqdm import tqdm

    from ..models.sources import ModelSource, resolve_pipeline, transformer_class
    from ..scale import Manifest, PipelineSource, run_local, work_items
    from ..scale.items import SettingsMismatch, describe
    from ..scale.runner import output_settings
    from .parsing import int_list, read_prompts
    from .policy_args import planned_steps, policy_config

    model = ModelSource.from_args(args)
    if model.transformer:
        raise ValueError(
            "--prompts / --classes / --ray load the model in every worker from a saved pipeline: save the pipeline "
            "with your transformer in it (pipe.save_pretrained(DIR)) and give --pipeline DIR, without --transformer."
        )
    if model.bundled is not None:
        family, kind, video = model.bundled.family, model.bundled.inputs, model.bundled.video
        source = PipelineSource("bundled", args.model, _worker_device(args))
    else:  # a saved pipeline (or a cached hub id), read by every worker; what it takes is its family's
        spec = transformer_class(model.transformer_config())[1]
        family, kind, video = spec.name, spec.pipeline.input_kind, spec.pipeline.video
        source = PipelineSource("pretrained", str(resolve_pipeline(args.pipeline)), _worker_device(args))
    if args.batch != 1:
        raise ValueError("--batch applies to one --prompt / --class; with many items use --seeds (one call each).")
    inputs = _inputs(args, model.name, kind, read_prompts, int_list)
    seeds = int_list(args.seeds, "--seeds") if args.seeds else [args.seed]
    items = work_items(inputs, seeds)
    config = policy_config(args, family)
    planned_steps(args, config)  # a --steps other than the plan's is refused now, not in every worker
    try:  # before any work: a resume must have the settings of the finished items
        manifest = Manifest(args.output, output_settings(source, config, args.steps), args.overwrite)
    except SettingsMismatch as error:
        raise ValueError(
            f"{error.directory} holds {error.count} output(s) made with other settings "
            f"({describe(error.differences)}); pass --overwrite to replace them, or give another -o DIR."
        ) from None
    if args.ray is not None:  # the cluster is joined, and checked to hold the workers, before the progress bars
        from ..scale.actors import connect

        connect(_workers(args))
    done = len(items) - len(manifest.pending(items))
    unit = "clip" if video else "image"
    with tqdm(total=len(items), initial=done, desc=f"generate {model.name}", unit=unit) as bar:
        progress = lambda item: bar.update(1)  # noqa: E731
        if args.ray is None:
            report = run_local(source, items, args.output, config, args.steps, progress, args.overwrite)
        else:
            from ..scale.ray_pool import generate_on_ray

            with start_bar(position=1) as on_start:
                report = generate_on_ray(
                    source, items, args.output, config, _workers(args), args.steps, progress, args.overwrite, on_start
                )
    where = "this process" if args.ray is None else f"{report.workers} Ray worker(s)"
    print(
        f"wrote {report.generated} {unit}(s) to {report.output} ({report.skipped} already there), manifest "
        f"{Path(report.output) / 'manifest.jsonl'}; {report.items_per_second:.2f} items/s on {where}"
    )
    return 0


@contextmanager
def start_bar(position: int = 0):
    """A progress bar of the Ray workers ready, and the ``on_start(ready, count)`` callback that moves it."""
    from tqdm import tqdm

    with tqdm(desc="Ray workers ready", unit="worker", position=position, leave=False) as bar:

        def on_start(ready: int, count: int) -> None:
            bar.total, bar.n = count, ready
            bar.refresh()

        yield on_start


def _inputs(args, name: str, kind: str, read_prompts, int_list) -> list:
    prompt_model = kind == "prompt"
    if prompt_model and (args.classes or args.class_id is not None):
        raise ValueError(f"{name} takes prompts (--prompt TEXT or --prompts FILE), not class ids.")
    if not prompt_model and (args.prompts or args.prompt is not None):
        raise ValueError(f"{name} takes class ids (--class N or --classes LIST), not prompts.")
    if args.prompts:
        return read_prompts(args.prompts)
    if args.classes:
        return int_list(args.classes, "--classes")
    return [args.prompt if prompt_model else args.class_id]


def _workers(args):
    from ..scale.actors import Workers

    address = None if args.ray == "local" else args.ray
    return Workers(args.workers, args.cpus_per_worker, args.gpus_per_worker, address, timeout=args.ray_timeout)


def check_ray_options(args) -> None:
    """``--workers`` and the per-worker resources mean nothing without ``--ray``: refuse them rather than run one
    process while the user expects several."""
    given = args.workers != 1 or args.cpus_per_worker != 1 or args.gpus_per_worker != 0
    if args.ray is None and (given or args.ray_timeout != RAY_TIMEOUT):
        raise ValueError("--workers, --cpus-per-worker, --gpus-per-worker and --ray-timeout need --ray [ADDRESS].")
    if not args.ray_timeout > 0:
        raise ValueError(f"--ray-timeout takes a number of seconds above 0, got {args.ray_timeout:g}.")


def ray_calibration(args):
    """``calibrate`` with its runs on Ray workers: the function to call instead of
    :func:`invardiff.calibration.calibrate`, loading the same pipeline as the driver in every worker (the driver
    sizes the batches; the workers record them)."""
    from ..scale import PipelineSource
    from ..scale.calibrate import calibrate_on_ray

    device = _worker_device(args)
    _no_transformer(args)
    if getattr(args, "model", None):
        source = PipelineSource("bundled", args.model, device)
    elif args.model_config:
        source = PipelineSource("model_config", args.model_config, device)
    else:
        source = PipelineSource("pretrained", args.pipeline, device)

    def run(pipe, **kwargs):
        with start_bar() as on_start:
            return calibrate_on_ray(pipe, source, _workers(args), on_start=on_start, **kwargs)

    return run


def ray_sweep(args, inputs, points, on_result, done) -> list[dict]:
    """``bench --ray``: the sweep's points measured on Ray workers (:func:`invardiff.scale.bench.run_sweep_on_ray`)."""
    from ..scale import PipelineSource
    from ..scale.bench import run_sweep_on_ray

    device = _worker_device(args)
    _no_transformer(args)
    source = PipelineSource("pretrained", args.pipeline, device) if args.pipeline else None
    source = source or PipelineSource("bundled", inputs.model, device)
    with start_bar(position=1) as on_start:
        workers = _workers(args)
        return run_sweep_on_ray(
            inputs, points, args.rounds, on_result, done, source=source, workers=workers, on_start=on_start
        )


def _no_transformer(args) -> None:
    if getattr(args, "transformer", None):
        raise ValueError("--ray does not take --transformer yet: save the pipeline with your transformer in it "
                         "(pipe.save_pretrained(DIR)) and give --pipeline DIR.")  # fmt: skip


def _worker_device(args) -> str:
    # A Ray actor sees only the GPUs it was given, as cuda:0...; without GPUs it runs where --device says.
    return "cuda" if args.gpus_per_worker else getattr(args, "device", "cpu")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
