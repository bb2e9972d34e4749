"""Import the cache books of the official InvarDiff code (github.com/zihaowu25/InvarDiff @ 560db97).

The books are bare boolean lists whose parameters live only in the file name (SPEC.md A.6, C.1 item 11). The
converter maps them onto :class:`CachePlan` with the official semantics and records the file name, its parsed
parameters and the file's SHA-256 as provenance. ``ip_attn`` (IP-adapter attention, absent without an adapter) is
dropped after checking that it equals ``attn``, as it does in every shipped book.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from .plan import CachePlan, ModelFacts, PlanError


_FAMILY_LAYOUT = {
    "dit": {"step": "step_cache_book", "scheduler": "DDIMScheduler"},
    "flux": {"step": "step_cache_book", "scheduler": "FlowMatchEulerDiscreteScheduler"},
}
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
    modes = {
        "flux/fast": "flux1-dev/cache_books_stp28_n0.1_th0.7_attn0.68_ff0.68_ctxff0.68_sattn0.68_smlp0.68.json",
        "flux/medium-1": "flux1-dev/cache_books_stp28_n0.1_th0.7_attn0.68_ff0_ctxff0_sattn0.68_smlp0.json",
        "flux/medium-2": "flux1-dev/cache_books_stp28_n0.15_th0.7_attn0.68_ff0_ctxff0_sattn0.7_smlp0.json",
        "flux/slow": "flux1-dev/cache_books_stp28_n0.22_th0.72_attn0.68_ff0.66_ctxff0_sattn0.68_smlp0.62.json",
        "dit/fast": "dit-xl2/cache_books_stp50_n0.0_sth0.63_msa0.22_mlp0.22.json",
        "dit/slow": "dit-xl2/cache_books_stp50_n0.0_sth0.61_msa0.2_mlp0.2.json",
    }
    return {name: root / relative for name, relative in modes.items()}


def parse_book_name(name: str) -> dict[str, float]:
    """Parse ``cache_books_stp28_n0.1_th0.7_attn0.68...`` into the thresholds it encodes."""
    params = {}
    for token in Path(name).stem.removeprefix("cache_books_").split("_"):
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", token)
        if match and match.group(1) in _NAME_KEYS:
            value = float(match.group(2))
            params[_NAME_KEYS[match.group(1)]] = int(value) if match.group(1) == "stp" else value
    return params


def convert_official_book(path: str | Path, family: str) -> CachePlan:
    """Convert an official InvarDiff cache book (DiT-XL/2 or FLUX.1-dev) into a :class:`CachePlan`."""
    path = Path(path)
    if family not in _FAMILY_LAYOUT:
        raise PlanError(f"Unknown family {family!r} for an official book; expected one of {sorted(_FAMILY_LAYOUT)}.")
    raw = path.read_bytes()
    try:
        book = json.loads(raw)
    except json.JSONDecodeError as error:
        raise PlanError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(book, dict) or "step_cache_book" not in book:
        raise PlanError(f"{path} is not an official InvarDiff cache book (no 'step_cache_book').")
    step_cache = _bool_array(book["step_cache_book"], "step_cache_book", ndim=1)
    reuse = _dit_reuse(book) if family == "dit" else _flux_reuse(book)
    num_layers = {name: next(iter(kinds.values())).shape[1] for name, kinds in reuse.items()}
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
        scheduler=_FAMILY_LAYOUT[family]["scheduler"],
        provenance=provenance,
    )


def _bool_array(value, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim or array.dtype != bool:
        raise PlanError(f"Official book field {name!r} must be a {ndim}-D list of booleans, got shape {array.shape}.")
    return array


def _dit_reuse(book: dict) -> dict:
    for key in ("msa_cache_book", "mlp_cache_book"):
        if key not in book:
            raise PlanError(f"A DiT book needs {key!r}; this looks like a {_guess_family(book)} book.")
    return {
        "transformer_blocks": {
            "attn": _bool_array(book["msa_cache_book"], "msa_cache_book", 2),
            "ff": _bool_array(book["mlp_cache_book"], "mlp_cache_book", 2),
        }
    }


def _flux_reuse(book: dict) -> dict:
    for key in ("transformer_cache_book", "single_transformer_cache_book"):
        if key not in book:
            raise PlanError(f"A FLUX book needs {key!r}; this looks like a {_guess_family(book)} book.")
    dual = {k: _bool_array(v, f"transformer_cache_book.{k}", 2) for k, v in book["transformer_cache_book"].items()}
    single = {
        k: _bool_array(v, f"single_transformer_cache_book.{k}", 2)
        for k, v in book["single_transformer_cache_book"].items()
    }
    ip_attn = dual.pop("ip_attn", None)
    if ip_attn is not None and not np.array_equal(ip_attn, dual.get("attn")):
        raise PlanError("The book's ip_attn differs from attn; IP-adapter plans are not supported.")
    return {"transformer_blocks": dual, "single_transformer_blocks": single}


def _guess_family(book: dict) -> str:
    return "FLUX" if "transformer_cache_book" in book else "DiT" if "msa_cache_book" in book else "unknown"
