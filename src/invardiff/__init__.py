"""invardiff: training-free caching for diffusion transformers on diffusers (InvarDiff cache plans)."""

from ._version import __version__
from .api import cache_context, disable, enable, enabled, is_enabled, reset, summary
from .engine import EngineError, EngineSummary, PlanConfig, register_policy
from .official import convert_official_book
from .plan import CachePlan, ModelFacts, PlanError
from .stats import ideal_speedup, plan_summary


__all__ = [
    "CachePlan",
    "EngineError",
    "EngineSummary",
    "ModelFacts",
    "PlanConfig",
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
