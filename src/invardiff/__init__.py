"""invardiff: training-free caching for diffusion transformers on diffusers (InvarDiff cache plans, DiCache)."""

from ._version import __version__
from .api import cache_context, disable, enable, enabled, is_enabled, reset, summary
from .engine import CachePolicy, EngineError, EngineSummary, register_policy
from .official import convert_official_book
from .plan import CachePlan, ModelFacts, PlanError
from .policies.interval import IntervalConfig
from .policies.plan import PlanConfig
from .stats import ideal_speedup, plan_summary


def __getattr__(name: str):
    # The DiCache configs are imported on first use, so that `import invardiff.engine` imports no probe policy.
    if name in ("DiCacheConfig", "PlanProbeConfig"):
        from . import dicache

        return getattr(dicache, name)
    raise AttributeError(f"module 'invardiff' has no attribute {name!r}")


__all__ = [
    "CachePlan",
    "CachePolicy",
    "DiCacheConfig",
    "EngineError",
    "EngineSummary",
    "IntervalConfig",
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
