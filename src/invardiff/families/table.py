"""The table of registered families: a family file registers its spec here, and the registry reads it.

A bottom module, next to :mod:`.spec`: :func:`register_family` only adds a spec to the table, so a family file
registers without importing the registry (``invardiff.families``), which imports the built-in family files when
first asked for a family. The registry owns the lookups and the loading (:func:`invardiff.families.get_family`).

:func:`find_family` is the lookup for the bottom data types whose methods need their family
(:meth:`~invardiff.families.model_config.ModelConfig.build_transformer`): it is the registry's ``get_family``,
installed by the registry when it is imported. The registry is this module's package, so Python has imported it
before anyone can import this module, and the lookup is always installed by the time it is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .spec import FamilySpec


_FAMILIES: dict[str, FamilySpec] = {}
_lookup: Callable[[str], FamilySpec] | None = None


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register ``spec`` under its name (once) and return it."""
    if spec.name in _FAMILIES:
        raise ValueError(f"Model family {spec.name!r} is already registered.")
    _FAMILIES[spec.name] = spec
    return spec


def registered() -> Mapping[str, FamilySpec]:
    """The families registered so far, by name (a read-only view; the registry loads families before it reads)."""
    return MappingProxyType(_FAMILIES)


def install_lookup(lookup: Callable[[str], FamilySpec]) -> None:
    """Make :func:`find_family` answer with ``lookup`` (the registry's ``get_family``, which loads families)."""
    global _lookup
    _lookup = lookup


def find_family(name: str) -> FamilySpec:
    """The family ``name`` as the registry finds it (built-in and plugin families loaded first); ``ValueError``
    naming the supported families if there is none."""
    if _lookup is None:  # only if this module was loaded without its package, e.g. from its path
        raise RuntimeError("The family registry (invardiff.families) is not imported; import invardiff.families.")
    return _lookup(name)
