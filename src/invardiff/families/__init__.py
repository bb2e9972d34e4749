"""Model families: which diffusers transformers invardiff can cache, and how their blocks are laid out.

Adding a family is one small file that builds a :class:`FamilySpec` and calls :func:`register_family`.
"""

from __future__ import annotations

import torch

from .spec import BlockListSpec, FamilySpec, ReuseUnit, TransformerCall


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _FAMILIES:
        raise ValueError(f"Model family {spec.name!r} is already registered.")
    _FAMILIES[spec.name] = spec
    return spec


def get_family(name: str) -> FamilySpec:
    _load_builtin_families()
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; supported families are {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load_builtin_families()
    return sorted(_FAMILIES)


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


def _load_builtin_families() -> None:
    # Imported lazily so that `import invardiff.families` stays cheap and free of import cycles.
    from . import dit, flux  # noqa: F401


__all__ = [
    "BlockListSpec",
    "FamilySpec",
    "ReuseUnit",
    "TransformerCall",
    "family_names",
    "get_family",
    "register_family",
    "resolve_family",
]
