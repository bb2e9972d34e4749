"""The ``invardiff`` command line.

invardiff demo [--model flux-shapes|dit-digits|wan-motion]
invardiff calibrate --model dit-digits --classes 1,2,3 --steps 50 --preset fast -o plan.json
invardiff generate --model dit-digits --plan plan.json --class 3 -o out/gen
invardiff inspect plan.json --model-config flux1-dev [--json]
invardiff bench-engine [--family flux dit wan hunyuanvideo] [--config cpu|full] [--device cpu|cuda] [--rounds 3]
    [--compile] [--peers] [--json]

A user error (a bad argument, a missing file, an option that does not apply) prints one line and exits with 2;
``-v`` adds the traceback. Each subcommand's options are defined when it is parsed, so ``invardiff --help`` and
``--version`` import neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .._version import __version__
from . import arguments


# (name, help, define(parser), handler in cli/commands.py), in the order of `invardiff --help`.
COMMANDS = (
    ("demo", "calibrate, plan, and compare accelerated vs full compute on a bundled model", arguments.demo, "demo"),
    ("models", "list the bundled trained models", arguments.models, "list_models"),
    ("generate", "generate with a bundled model, optionally with a cache policy", arguments.generate, "generate"),
    ("calibrate", "InvarDiff calibration: two full-compute passes, then a plan", arguments.calibrate, "calibrate"),
    ("build-plan", "rebuild a plan from a rates file without the model", arguments.build_plan, "build_plan"),
    (
        "resample-plan",
        "a plan moved to another step count (no model needed)",
        arguments.resample_plan,
        "resample_plan",
    ),
    (
        "fit-memory",
        "a plan fitted to a bound on peak cache memory, dropping the reuses of least FLOPs (no model needed)",
        arguments.fit_memory,
        "fit_memory",
    ),
    (
        "inspect",
        "reuse statistics of a plan, and its ideal speedup on a model config",
        arguments.inspect,
        "inspect_plan",
    ),
    (
        "convert-official",
        "convert an official InvarDiff cache book into a plan",
        arguments.convert,
        "convert_official",
    ),
    ("plot", "heatmaps of a plan (.json) or of calibration rates (.npz), as PNG", arguments.plot, "plot"),
    ("bench", "speed-quality sweep vs full compute and peers, with plots", arguments.bench, "bench"),
    ("bench-engine", "engine speed vs stock on the official books", arguments.bench_engine, "bench_engine"),
)


class _Parser(argparse.ArgumentParser):
    """An argument error is one line, like every other user error (argparse would print the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _DeferredParser(_Parser):
    """A subcommand's parser whose options are added on first use (parsing it, or its help), so that building the
    whole command line imports nothing that a subcommand's options need (family names, presets, methods)."""

    def __init__(self, *args, define=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._define = define

    def _defined(self) -> None:
        if self._define is not None:
            define, self._define = self._define, None
            define(self)

    def parse_known_args(self, args=None, namespace=None):
        self._defined()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._defined()
        return super().format_help()

    def format_usage(self) -> str:
        self._defined()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="invardiff",
        description="Training-free caching for diffusion transformers on diffusers: InvarDiff cache plans, DiCache. "
        "Start with `invardiff demo`; `invardiff COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"invardiff {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log, and the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_DeferredParser)
    for name, help_text, define, handler in COMMANDS:
        sub.add_parser(name, help=help_text, description=help_text, define=define).set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a result file records as its command line
    # The library only logs; the CLI shows warnings always and, with -v, what each step decided.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="invardiff: %(message)s")
    try:
        from ..models.loading import quiet_loading
        from .outputs import check_outputs

        check_outputs(args)  # before the work: a bad output path is refused now, not after minutes of sampling
        with quiet_loading():  # diffusers, transformers and torchao log at import time too, not only at a load
            from . import commands

            return getattr(commands, args.handler)(args) or 0
    except KeyboardInterrupt:
        print(f"invardiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"invardiff {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def is_user_error(error: BaseException) -> bool:
    """Errors the user can fix (arguments, files, the model or plan given, a missing optional package) or a stated
    limit (``NotImplementedError``: what is not implemented for that model or option, e.g. a toy pipeline's text
    encoders); anything else is a bug and keeps its traceback (``-v`` prints it for these too). PlanError and the
    argument checks are ValueErrors."""
    return isinstance(error, (ValueError, OSError, ImportError, NotImplementedError))


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ImportError) and error.name and error.name not in text:
        text += f" (module {error.name})"
    return text


if __name__ == "__main__":
    sys.exit(main())
