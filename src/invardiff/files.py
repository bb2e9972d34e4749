"""Writing output files so that a failure never leaves a truncated one: every output of the library and the CLI
(plans, rates, reports, images, clips, manifests) goes through :func:`atomic_path` or the helpers on top of it.

A file is written under a temporary name in its own directory, flushed to disk, then renamed onto its name
(``os.replace``, atomic on POSIX and Windows within one file system). A full disk, a killed process or an
exception in the writer therefore leaves the previous file as it was, or no file, and no partial one; the
temporary file is removed when the writer fails.

The JSON-lines logs (a batch generation's manifest, a sweep's results) are appended to instead, a line at a time:
rewriting them whole for each line would cost quadratic time. :func:`append_json_line` starts a line on a fresh
line after an interrupted append, and :func:`read_json_lines` skips the one unfinished line such an append leaves at
the end, so a log stays readable.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write to; when the block ends normally the file is
    flushed to disk and renamed onto ``path``, when it raises the temporary file is removed and ``path`` is left
    as it was. The temporary name keeps ``path``'s suffix, so writers that pick a format by suffix (Pillow,
    matplotlib, numpy) write the same bytes. The parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8 into ``path``, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` into ``path``, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def append_json_line(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` and flush it to disk. After an append that was cut short
    (the file does not end with a newline) the record starts on a line of its own."""
    path = Path(path)
    with path.open("a+b") as stream:
        stream.seek(0, os.SEEK_END)
        start = b""
        if stream.tell() > 0:
            stream.seek(-1, os.SEEK_END)
            start = b"" if stream.read(1) == b"\n" else b"\n"
        stream.write(start + json.dumps(record).encode("utf-8") + b"\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file written by :func:`append_json_line`; a line that does not parse (an
    append cut short by a full disk or a kill) is skipped with a warning, and its item counts as not done."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: line %d is incomplete (an interrupted write); ignored", path, number)
    return records
