"""Model families: which diffusers transformers invardiff can cache, and how their blocks are laid out.

Adding a family is one file that builds a :class:`FamilySpec` and calls :func:`register_family`, plus its import in
:func:`_load_builtin_families`. Everything else (calibration, official books, configs, benchmarks, the CLI) reads the
registered specs through :func:`get_family`, :func:`resolve_family` and :func:`family_names`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .spec import (
    INPUT_KINDS,
    BlockListSpec,
    ConfigSpec,
    Expert,
    FamilySpec,
    InputKind,
    OfficialSpec,
    PipelineSpec,
    ReuseUnit,
    SpecError,
    TransformerCall,
    check_spec,
)


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register ``spec`` under its name (once) and return it."""
    if spec.name in _FAMILIES:
        raise ValueError(f"Model family {spec.name!r} is already registered.")
    _FAMILIES[spec.name] = spec
    return spec


def get_family(name: str) -> FamilySpec:
    """The registered family ``name``; raise ``ValueError`` naming the supported families if there is none."""
    _load_builtin_families()
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; supported families are {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def family_names() -> list[str]:
    """The names of the registered families, sorted."""
    _load_builtin_families()
    return sorted(_FAMILIES)


def families() -> list[FamilySpec]:
    """The registered families, sorted by name."""
    return [_FAMILIES[name] for name in family_names()]


class LazyTable(Mapping):
    """A read-only mapping computed from the registered families each time it is read.

    It keeps module-level tables that used to be written out per family (``PRESETS``, ``MODEL_CONFIGS``...)
    importable, while their content comes from the family files, read at use time so that every family has
    registered by then.
    """

    def __init__(self, build: Callable[[], dict[str, Any]]):
        self._build = build

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"LazyTable({self._build()!r})"


def resolve_family(transformer: torch.nn.Module) -> FamilySpec:
    """Return the family of ``transformer`` by its class (or a registered base class); raise if unsupported."""
    _load_builtin_families()
    for cls in type(transformer).__mro__:
        for spec in _FAMILIES.values():
            if spec.transformer_class is cls:
                return spec
    supported = ", ".join(f"{s.transformer_class.__name__} ({s.name})" for s in _FAMILIES.values())
    raise ValueError(
        f"Model class {type(transformer).__name__} is not supported by invardiff. Supported transformers: {supported}."
    )


def is_video(name: str) -> bool:
    """Whether family ``name`` generates video: its pipelines return clips, (B, F, C, H, W) ``.frames``."""
    pipeline = get_family(name).pipeline
    return pipeline is not None and pipeline.video


def _load_builtin_families() -> None:
    # The registry: one import per family file. Imported lazily so that `import invardiff.families` stays cheap and
    # free of import cycles (family files import the generic types they fill, e.g. calibration thresholds).
    from . import dit, flux, hunyuanvideo, wan  # noqa: F401


__all__ = [
    "INPUT_KINDS",
    "BlockListSpec",
    "ConfigSpec",
    "Expert",
    "FamilySpec",
    "InputKind",
    "LazyTable",
    "OfficialSpec",
    "PipelineSpec",
    "ReuseUnit",
    "SpecError",
    "TransformerCall",
    "check_spec",
    "families",
    "family_names",
    "get_family",
    "is_video",
    "register_family",
    "resolve_family",
]
