"""invardiff: training-free caching for diffusion transformers on diffusers (InvarDiff cache plans, DiCache)."""

from ._version import __version__
from .api import cache_context, disable, enable, enabled, is_enabled, reset, summary
from .dicache import DiCacheConfig, PlanProbeConfig
from .engine import EngineError, EngineSummary, PlanConfig, register_policy
from .official import convert_official_book
from .plan import CachePlan, ModelFacts, PlanError
from .stats import ideal_speedup, plan_summary


__all__ = [
    "CachePlan",
    "DiCacheConfig",
    "EngineError",
    "EngineSummary",
    "ModelFacts",
    "PlanConfig",
    "PlanProbeConfig",
    "PlanError",
    "__version__",
    "cache_context",
    "convert_official_book",
    "disable",
    "enable",
    "enabled",
    "ideal_speedup",
    "is_enabled",
    "plan_summary",
    "register_policy",
    "reset",
    "summary",
]
