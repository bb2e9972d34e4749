"""Import the cache books of the official InvarDiff code (github.com/zihaowu25/InvarDiff @ 560db97).

The books are bare boolean lists whose parameters live only in the file name (SPEC.md A.6, C.1 item 11). The
converter maps them onto :class:`CachePlan` with the official semantics and records the file name, its parsed
parameters and the file's SHA-256 as provenance. How a family's books are laid out, and which are shipped, is in
the family file (``FamilySpec.official``).
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

import numpy as np

from .families import OfficialSpec, families
from .plan import CachePlan, ModelFacts, PlanError
from .plan_file import book_array, parse_json, read_bytes


# Names in the file name -> the thresholds they stand for (SPEC.md A.6).
_NAME_KEYS = {
    "stp": "num_inference_steps",
    "n": "nonskip_rate",
    "sth": "step_quantile",
    "th": "step_quantile",
    "msa": "attn_quantile",
    "mlp": "ff_quantile",
    "attn": "attn_quantile",
    "ff": "ff_quantile",
    "ctxff": "context_ff_quantile",
    "sattn": "single_attn_quantile",
    "smlp": "single_mlp_quantile",
}


def bundled_books() -> dict[str, Path]:
    """The official books shipped with invardiff, keyed ``"<family>/<mode>"`` (e.g. ``"flux/fast"``)."""
    root = Path(str(resources.files("invardiff") / "reference_books"))
    return {
        f"{family}/{mode}": root / relative
        for family, layout in _layouts().items()
        for mode, relative in layout.books.items()
    }


def _layouts() -> dict[str, OfficialSpec]:
    return {spec.name: spec.official for spec in families() if spec.official is not None}


def parse_book_name(name: str) -> dict[str, float]:
    """Parse ``cache_books_stp28_n0.1_th0.7_attn0.68...`` into the thresholds it encodes."""
    params = {}
    for token in Path(name).stem.removeprefix("cache_books_").split("_"):
        match = re.fullmatch(r"([a-z]+)([0-9]+(?:\.[0-9]*)?)", token)
        if match and match.group(1) in _NAME_KEYS:
            value = float(match.group(2))
            params[_NAME_KEYS[match.group(1)]] = int(value) if match.group(1) == "stp" else value
    return params


def convert_official_book(path: str | Path, family: str) -> CachePlan:
    """Convert an official InvarDiff cache book (DiT-XL/2, FLUX.1-dev or Wan) into a :class:`CachePlan`.

    The file is read by :func:`invardiff.plan_file.read_json` (size, encoding and nesting limits); every problem is
    a :class:`PlanError` naming the file and the field."""
    path = Path(path)
    layouts = _layouts()
    if family not in layouts:
        raise PlanError(f"Unknown family {family!r} for an official book; expected one of {sorted(layouts)}.")
    layout = layouts[family]
    what = f"an official InvarDiff {layout.label} cache book"
    raw = read_bytes(path, what)
    book = parse_json(raw, path, what)
    try:
        return _convert(book, raw, path, family, layout)
    except PlanError as error:
        raise PlanError(f"{path}: {error}") from None


def _convert(book, raw: bytes, path: Path, family: str, layout: OfficialSpec) -> CachePlan:
    step_key = _step_key(book, layout)
    step_cache = book_array(book[step_key], step_key, ndim=1)
    for key in layout.keys:
        if key not in book:
            raise PlanError(f"A {layout.label} book needs {key!r}; this looks like a {_guess_family(book)} book.")
    reuse = layout.reuse(book)
    num_layers = {name: _num_layers(name, kinds) for name, kinds in reuse.items()}
    provenance = {
        "policy": "invardiff-official-book",
        "source": {
            "file": path.name,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "repository": "github.com/zihaowu25/InvarDiff",
            "commit": "560db97",
        },
        "thresholds": parse_book_name(path.name),
    }
    return CachePlan(
        model=ModelFacts.for_family(family, num_layers),
        num_inference_steps=len(step_cache),
        step_cache=step_cache,
        module_reuse=reuse,
        scheduler=layout.scheduler,
        provenance=provenance,
    )


def _step_key(book, layout: OfficialSpec) -> str:
    # The step gate's name: Wan's loader takes step_cache_bool or its alias step_cache_book; if both are there
    # they must agree, or the book means two things.
    names = " or ".join(repr(key) for key in layout.step_keys)
    present = [key for key in layout.step_keys if isinstance(book, dict) and key in book]
    if not present:
        raise PlanError(f"this is not an official InvarDiff {layout.label} cache book (no {names}).")
    if any(book[key] != book[present[0]] for key in present[1:]):
        raise PlanError(f"the book has both {names} and they differ; keep one.")
    return present[0]


def official_book(plan: CachePlan) -> dict:
    """``plan`` as a book in its family's official layout (the JSON the official sampler loads); raise
    :class:`PlanError` if invardiff does not write that family's books."""
    layout = _layouts().get(plan.model.family)
    if layout is None or layout.write is None:
        writable = sorted(name for name, spec in _layouts().items() if spec.write is not None)
        raise PlanError(f"invardiff writes official books of {writable} only, not of {plan.model.family!r}.")
    return layout.write(plan)


def _num_layers(block_list: str, kinds: dict[str, np.ndarray]) -> int:
    if not kinds:
        raise PlanError(f"The book has no module kind for {block_list!r}.")
    return next(iter(kinds.values())).shape[1]


def _guess_family(book: dict) -> str:
    labels = [layout.label for layout in _layouts().values() if all(key in book for key in layout.keys)]
    return labels[0] if labels else "unknown"
