"""DiCache (SPEC.md Part B) and plan+probe on the invardiff engine: configs, presets and the online probe."""

from .config import FAMILY_DEFAULT_PRESET, PRESETS, DiCacheConfig, PlanProbeConfig
from .policy import DiCachePolicy, PlanProbePolicy
from .probe import DECISIONS


__all__ = [
    "DECISIONS",
    "FAMILY_DEFAULT_PRESET",
    "PRESETS",
    "DiCacheConfig",
    "DiCachePolicy",
    "PlanProbeConfig",
    "PlanProbePolicy",
]
