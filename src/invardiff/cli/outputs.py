"""Output paths checked before a command starts its work: a file where a directory is expected (or the reverse),
or a place that cannot be written, is refused at once instead of after minutes of calibration or sampling."""

from __future__ import annotations

import os
from pathlib import Path


# command: (argparse dest, its option, what it names)
OUTPUTS = {
    "demo": ("out", "--out", "directory"),
    "generate": ("output", "-o", "directory"),
    "calibrate": ("output", "-o", "file"),
    "build-plan": ("output", "-o", "file"),
    "resample-plan": ("output", "-o", "file"),
    "fit-memory": ("output", "-o", "file"),
    "convert-official": ("output", "-o", "file"),
    "plot": ("output", "-o", "file"),
    "bench": ("out", "--out", "directory"),
    "bench-engine": ("out", "--out", "directory"),
}


def check_outputs(args) -> None:
    """Refuse (``ValueError``) the output path of ``args.command`` that the command could not write."""
    dest, option, kind = OUTPUTS.get(args.command, (None, None, None))
    if dest is not None and getattr(args, dest, None) is not None:
        check_output(Path(getattr(args, dest)), kind, option)


def check_output(path: Path, kind: str, option: str) -> None:
    """``path`` can be written as a ``kind`` (``"file"`` or ``"directory"``): it is one already or does not exist,
    and its nearest existing parent is a writable directory. Nothing is created (a refused or failed command leaves
    no empty directory behind)."""
    if path.exists():
        if kind == "directory" and not path.is_dir():
            raise ValueError(f"{option} {path} is a file; expected a directory for the outputs. Give another path.")
        if kind == "file" and path.is_dir():
            raise ValueError(f"{option} {path} is a directory; expected a file name (e.g. {path / 'plan.json'}).")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, so {path} cannot be created. Give another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{option} {path}: {parent.absolute()} is not writable (permission denied). Give another path."
        )
