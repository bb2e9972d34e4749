"""InvarDiff calibration settings: quantile levels (thresholds), named presets, and family behaviour.

Thresholds are quantile *levels* in [0, 1] (SPEC.md A.3): a higher level reuses more, runs faster and drifts
further from full compute. ``nonskip_rate`` is the warm-up fraction of steps that always compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    """

    correct_step: bool
    provisional_module_warmup: bool
    provisional_interplay: bool = False
    tied_kinds: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


FAMILY_CALIBRATION = {
    "flux": FamilyCalibration(
        correct_step=False,
        provisional_module_warmup=False,
        tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
    ),
    "dit": FamilyCalibration(correct_step=True, provisional_module_warmup=True),
}


def _flux(nonskip, step, attn, ff, context_ff, single_attn, single_mlp):
    return InvarDiffThresholds(
        nonskip,
        step,
        {
            "transformer_blocks.attn": attn,
            "transformer_blocks.ff": ff,
            "transformer_blocks.context_ff": context_ff,
            "single_transformer_blocks.attn": single_attn,
            "single_transformer_blocks.mlp": single_mlp,
        },
    )


def _dit(nonskip, step, attn, ff):
    return InvarDiffThresholds(nonskip, step, {"transformer_blocks.attn": attn, "transformer_blocks.ff": ff})


# The official presets (SPEC.md A.8): FLUX README speed modes, DiT README modes.
PRESETS: dict[str, dict[str, InvarDiffThresholds]] = {
    "flux": {
        "fast": _flux(0.1, 0.7, 0.68, 0.68, 0.68, 0.68, 0.68),
        "medium-1": _flux(0.1, 0.7, 0.68, 0, 0, 0.68, 0),
        "medium-2": _flux(0.15, 0.7, 0.68, 0, 0, 0.7, 0),
        "slow": _flux(0.22, 0.72, 0.68, 0.66, 0, 0.68, 0.62),
    },
    "dit": {
        "fast": _dit(0.0, 0.63, 0.22, 0.22),
        "slow": _dit(0.0, 0.61, 0.2, 0.2),
    },
}


def preset(family: str, name: str) -> InvarDiffThresholds:
    if family not in PRESETS:
        raise ValueError(f"No presets for family {family!r}; families with presets: {sorted(PRESETS)}.")
    if name not in PRESETS[family]:
        raise ValueError(f"Unknown {family} preset {name!r}; available: {sorted(PRESETS[family])}.")
    return PRESETS[family][name]


def parse_thresholds(text: str, family: str) -> InvarDiffThresholds:
    """Parse ``"nonskip=0.1,step=0.7,transformer_blocks.attn=0.68,..."``; unset kinds default to 0 (disabled)."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"Threshold {item!r} is not KEY=FLOAT (e.g. step=0.7).") from None
    if "step" not in values:
        raise ValueError("Thresholds need step=LEVEL (and optionally nonskip=RATE and <block_list>.<kind>=LEVEL).")
    nonskip = values.pop("nonskip", 0.0)
    step = values.pop("step")
    known = set(next(iter(PRESETS[family].values())).modules) if family in PRESETS else set(values)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown module kinds {unknown} for family {family!r}; expected some of {sorted(known)}.")
    return InvarDiffThresholds(nonskip, step, {kind: values.get(kind, 0.0) for kind in sorted(known)})
