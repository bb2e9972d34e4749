"""The parsing of option values that several command modules share: argparse types and value lists.

The bottom of the command-line package: the parser (``arguments.py``), the option groups of other modules
(``policy_args.py``, ``scale.py``, ``search_commands.py``) and the commands import it, and it imports none of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def at_least(minimum: int, what: str = "a count"):
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer ({what}), got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} of at least {minimum}, got {value}")
        return value

    return parse


def registry_choice(names, what: str):
    """An argparse ``type``: one of ``names()``, a registry read when the option is given, not when the parser is
    built or its help shown (the registries import torch and diffusers), so the choices stay exact without a second
    list of names."""

    def parse(text: str) -> str:
        valid = list(names())
        if text not in valid:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} ({what}: {', '.join(valid)})")
        return text

    return parse


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, e.g. 0,1,2; got {text!r}.") from None
    if not values:
        raise ValueError(f"{option} needs at least one integer, got {text!r}.")
    return values


def read_prompts(path: str) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one prompt per line).")
    return prompts


# The cache storage dtypes a plan may name (invardiff.engine.storage maps them to torch dtypes; the CLI stays
# torch-free).
CACHE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
