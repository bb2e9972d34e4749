"""InvarDiff calibration settings: quantile levels (thresholds), named presets, and family behaviour.

Thresholds are quantile *levels* in [0, 1] (SPEC.md A.3): a higher level reuses more, runs faster and drifts
further from full compute. ``nonskip_rate`` is the warm-up fraction of steps that always compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ..families import LazyTable, families, get_family


@dataclass(frozen=True)
class InvarDiffThresholds:
    """Quantile levels of one InvarDiff plan.

    Args:
        nonskip_rate (`float`): warm-up fraction; steps ``[0, max(1, floor(nonskip_rate * T)))`` always compute.
        step (`float`): quantile level of the step rates below which a whole step is reused.
        modules (`dict[str, float]`): quantile level per module kind, keyed ``"<block_list>.<kind>"``
            (e.g. ``"transformer_blocks.ff"``). A level of 0 disables a kind (strict "<" against the minimum).
    """

    nonskip_rate: float
    step: float
    modules: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name, value in [("nonskip_rate", self.nonskip_rate), ("step", self.step), *self.modules.items()]:
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Threshold {name!r} must be a quantile level in [0, 1], got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InvarDiffThresholds:
        return cls(data["nonskip_rate"], data["step"], dict(data["modules"]))


@dataclass(frozen=True)
class FamilyCalibration:
    """How the official code of a family builds plans (SPEC.md A.3 and C.1 item 3); the official behaviour is
    the default and every deviation is an explicit option.

    Attributes:
        correct_step: apply the resampling correction to the step stream too (DiT, Wan); FLUX keeps its
            first-pass step gate.
        provisional_module_warmup: the provisional (first-pass) module books force the warm-up steps to compute
            (DiT, Wan); FLUX forces only step 0 (and the last step).
        provisional_interplay: apply the step-to-module interplay to the provisional books (Wan only).
        tied_kinds: kinds whose quantile level is taken from another kind (FLUX's ``context_attn`` uses the
            ``attn`` level; the joint attention is reused only when both are set).
        record_branches: the classifier-free guidance branches (``cache_context`` names) whose calls are measured;
            ``None``: every branch. Wan records ``("cond",)`` (its official code measures the conditional calls
            only); ``("cond", "uncond")`` measures both, each branch of each sample one run.
    """

    correct_step: bool
    provisional_module_warmup: bool
    provisional_interplay: bool = False
    tied_kinds: dict[str, str] = field(default_factory=dict)
    record_branches: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.record_branches is not None:
            data["record_branches"] = list(self.record_branches)  # as JSON reads it back: plans compare equal
        return data


# The official behaviour of SPEC.md A.3 (DiT, Wan): the calibration of a family that does not say otherwise.
DEFAULT_CALIBRATION = FamilyCalibration(correct_step=True, provisional_module_warmup=True)

# Read from the family files (``FamilySpec.calibration`` and ``.presets``): ``{family: ...}``.
FAMILY_CALIBRATION = LazyTable(lambda: {spec.name: spec.calibration or DEFAULT_CALIBRATION for spec in families()})
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
