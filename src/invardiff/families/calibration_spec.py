"""What a family says about its calibration: quantile levels (thresholds) and how its official code builds plans.

Plain data at the bottom of the import graph: the family files declare their presets (:class:`InvarDiffThresholds`)
and behaviour (:class:`FamilyCalibration`, ``FamilySpec.calibration``) with these types, and the calibration that
uses them (``invardiff.calibration``) sits above the registry and imports them from here. Thresholds are quantile
*levels* in [0, 1] (SPEC.md A.3): a higher level reuses more, runs faster and drifts further from full compute.
``nonskip_rate`` is the warm-up fraction of steps that always compute.
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
