"""InvarDiff calibration settings: the families' named presets and behaviour, and thresholds from text.

The types (:class:`InvarDiffThresholds`, :class:`FamilyCalibration`) are plain data that the family files declare,
so they live at the bottom, in :mod:`invardiff.families.calibration_spec`; this module reads them from the
registered families. Thresholds are quantile *levels* in [0, 1] (SPEC.md A.3): a higher level reuses more, runs
faster and drifts further from full compute. ``nonskip_rate`` is the warm-up fraction of steps that always compute.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..families import LazyTable, families, get_family
from ..families.calibration_spec import DEFAULT_CALIBRATION, FamilyCalibration, InvarDiffThresholds


# Read from the family files (``FamilySpec.calibration`` and ``.presets``): ``{family: ...}``.
FAMILY_CALIBRATION: Mapping[str, FamilyCalibration] = LazyTable(
    lambda: {spec.name: spec.calibration or DEFAULT_CALIBRATION for spec in families()}
)
PRESETS: Mapping[str, dict[str, InvarDiffThresholds]] = LazyTable(
    lambda: {spec.name: spec.presets for spec in families()}
)


def preset(family: str, name: str) -> InvarDiffThresholds:
    """The official preset ``name`` of ``family`` (e.g. ``preset("flux", "fast")``)."""
    presets = PRESETS.get(family)
    if not presets:
        with_presets = sorted(f for f, p in PRESETS.items() if p)
        raise ValueError(f"No presets for family {family!r}; families with presets: {with_presets}.")
    if name not in presets:
        raise ValueError(f"Unknown {family} preset {name!r}; available: {sorted(presets)}.")
    return presets[name]


def module_keys(family: str) -> list[str]:
    """The ``"<block_list>.<kind>"`` keys a family's thresholds set: every module kind but the tied ones."""
    spec = get_family(family)
    tied = FAMILY_CALIBRATION[family].tied_kinds
    keys = [f"{b.attr}.{kind}" for b in spec.block_lists for kind in b.module_kinds]
    return sorted(key for key in keys if key not in tied)


def uniform_thresholds(family: str, step: float, level: float) -> InvarDiffThresholds:
    """Step level ``step`` and one quantile level for every module kind, with the warm-up of the family's first
    preset (none if it has no presets)."""
    presets = PRESETS.get(family) or {}
    nonskip = next(iter(presets.values())).nonskip_rate if presets else 0.0
    return InvarDiffThresholds(nonskip, step, dict.fromkeys(module_keys(family), level))


# ``parse_thresholds`` keys that are not module kinds, and the field of InvarDiffThresholds each sets: the short
# names and the field names alike (``to_dict`` writes the field names).
SCALAR_KEYS = {"nonskip": "nonskip_rate", "nonskip_rate": "nonskip_rate", "step": "step"}


def parse_thresholds(text: str, family: str) -> InvarDiffThresholds:
    """Parse ``"nonskip=0.1,step=0.7,transformer_blocks.attn=0.68,..."``; unset kinds default to 0 (disabled).

    ``nonskip`` (or its field name ``nonskip_rate``) is the warm-up fraction, ``step`` the step level, and every
    other key a module kind ``<block_list>.<kind>`` of the family."""
    values, scalars = {}, {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"Threshold {item!r} is not KEY=FLOAT (e.g. step=0.7).") from None
        field_name = SCALAR_KEYS.get(key)
        target, name = (scalars, field_name) if field_name else (values, key)
        if name in target:
            alias = " (nonskip and nonskip_rate are one key)" if name == "nonskip_rate" else ""
            raise ValueError(f"Threshold {key!r} is given twice in {text!r}{alias}; give each key once.")
        target[name] = number
    if "step" not in scalars:
        raise ValueError("Thresholds need step=LEVEL (and optionally nonskip=RATE and <block_list>.<kind>=LEVEL).")
    known = set(module_keys(family)) if family in PRESETS else set(values)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown threshold keys {unknown} for family {family!r}: expected nonskip (or nonskip_rate), step, or "
            f"module kinds among {sorted(known)}."
        )
    nonskip = scalars.get("nonskip_rate", 0.0)
    return InvarDiffThresholds(nonskip, scalars["step"], {kind: values.get(kind, 0.0) for kind in sorted(known)})
