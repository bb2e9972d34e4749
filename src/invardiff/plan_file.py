"""Reading a plan or an official cache book from disk: the one entry that turns untrusted bytes into JSON values.

Every failure is a :class:`PlanError` that names the file, what is wrong and what to do; no ``OSError``,
``UnicodeDecodeError``, ``RecursionError`` or ``ValueError`` of the standard library escapes. The steps, in order:

1. the file is a regular file, readable, and at most :data:`MAX_BYTES` (read up to the limit, never further);
2. the bytes are UTF-8 (a leading byte-order mark is tolerated, as some editors write one);
3. brackets nest at most :data:`MAX_DEPTH` deep (checked before parsing, so the parser never recurses deeply);
4. JSON with no duplicate key, no ``NaN`` / ``Infinity``, no non-finite float and no integer of more than
   :data:`MAX_INT_DIGITS` digits.

Field types are checked by the callers (``plan.py``, ``official.py``) before any comparison; the fields of an official
book by :func:`book_array` and :func:`book_table` below, which the family files' book layouts
(``OfficialSpec.reuse``) call, so they live in this bottom module rather than in ``official.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np


# The largest real plans (HunyuanVideo / Wan 14B books: 40-60 blocks, 50 steps, indented JSON of booleans) are a few
# hundred KB; 16 MiB is 20x that and still reads in a fraction of a second.
MAX_BYTES = 16 * 2**20
# A plan nests 5 deep (plan > module_reuse > block list > kind > rows); provenance adds a few levels.
MAX_DEPTH = 32
# No plan field holds an integer near 10**100 (seeds, counts and sizes are below 2**64); Python would parse a
# 4,300-digit one before failing.
MAX_INT_DIGITS = 100

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included (unrolled: linear)


class PlanError(ValueError):
    """A plan file or object is malformed, or does not match the model or the call it is used with."""


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``; ``what`` names the expected content in messages (``"an invardiff plan"``)."""
    return parse_json(read_bytes(path, what), path, what)


def parse_json(raw: bytes, path: str | Path, what: str) -> Any:
    """The JSON value of the bytes ``raw`` read from ``path`` (steps 2-4 above)."""
    path = Path(path)
    text = _decode(raw, path, what)
    _check_depth(text, path, what)
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as error:
        raise PlanError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); expected {what}."
        ) from None
    except PlanError as error:
        raise PlanError(f"{path}: {error} Expected {what}.") from None


def read_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``, at most :data:`MAX_BYTES` (step 1 above)."""
    path = Path(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise PlanError(f"{path} is a directory; expected {what} (a JSON file). Give the path of the file.")
        if not stat.S_ISREG(info.st_mode):
            raise PlanError(f"{path} is not a regular file; expected {what} (a JSON file).")
        if info.st_size > MAX_BYTES:
            raise PlanError(_too_large(path, what))
        with open(path, "rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise PlanError(f"{path} does not exist; expected {what}. Check the path.") from None
    except PermissionError:
        raise PlanError(f"{path} cannot be read (permission denied); make it readable or copy it.") from None
    except OSError as error:
        raise PlanError(f"{path} cannot be read ({error.strerror or error}); expected {what}.") from None
    if len(raw) > MAX_BYTES:  # the file grew after the stat
        raise PlanError(_too_large(path, what))
    return raw


def _too_large(path: Path, what: str) -> str:
    return (
        f"{path} is larger than {MAX_BYTES // 2**20} MiB, the limit for {what} (real plans are under 1 MiB); "
        f"this is not a plan file. Check the path."
    )


def _decode(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            found = "UTF-16 text (it starts with a UTF-16 byte-order mark)"
        else:
            found = f"not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})"
        raise PlanError(f"{path} is {found}; expected {what} in UTF-8. Save the file as UTF-8.") from None


def _check_depth(text: str, path: Path, what: str) -> None:
    outside_strings = _STRING.sub("", text).encode("utf-8", "replace")
    codes = np.frombuffer(outside_strings, dtype=np.uint8)
    brackets = codes[(codes == ord("[")) | (codes == ord("{")) | (codes == ord("]")) | (codes == ord("}"))]
    if brackets.size == 0:
        return
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    depth = int(np.cumsum(steps).max())
    if depth > MAX_DEPTH:
        raise PlanError(
            f"{path} nests arrays or objects {depth} deep, more than the {MAX_DEPTH} any plan needs; expected {what}."
        )


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise PlanError(f"it holds an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS}).")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PlanError(f"it holds the number {text[:40]}, which is out of the float range.")
    return value


def _reject_constant(name: str):
    raise PlanError(f"it holds {name}, which is not JSON.")


def _object(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise PlanError(f"the key {duplicate!r:.60} appears twice in one object; keep one.")
    return result


def book_array(value, name: str, ndim: int) -> np.ndarray:
    """Field ``name`` of a book (1-D: a list of booleans; 2-D: a list of equally long, non-empty lists of booleans)
    as a boolean array; raise :class:`PlanError` otherwise. Types are checked before numpy sees the value."""
    rows = value if ndim == 2 else [value]
    if ndim not in (1, 2) or not isinstance(value, list) or not value:
        raise PlanError(f"Official book field {name!r} must be a non-empty {ndim}-D list of booleans.")
    for index, row in enumerate(rows):
        where = f"{name}[{index}]" if ndim == 2 else name
        if not isinstance(row, list) or not row or not all(type(bit) is bool for bit in row):
            raise PlanError(f"Official book field {where!r} must be a non-empty list of booleans, got {row!r:.60}.")
        if len(row) != len(rows[0]):
            raise PlanError(f"Official book field {where!r} has {len(row)} entries; row 0 has {len(rows[0])}.")
    return np.array(value, dtype=bool)


def book_table(book: dict, key: str) -> dict[str, np.ndarray]:
    """Field ``key`` of a book: an object of module kind -> 2-D boolean list, as arrays; :class:`PlanError` else."""
    table = book[key]
    if not isinstance(table, dict) or not table:
        raise PlanError(f"Official book field {key!r} must be a non-empty object of module kind -> 2-D list.")
    return {kind: book_array(rows, f"{key}.{kind}", 2) for kind, rows in table.items()}
