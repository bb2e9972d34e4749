"""invardiff: training-free caching for diffusion transformers on diffusers (InvarDiff cache plans, DiCache).

Every public name is imported on first use (PEP 562), so that ``import invardiff`` and ``invardiff --help`` do not
pull torch and diffusers in; submodules (``invardiff.models``, ``invardiff.metrics``, ...) load on first access too.
"""

from __future__ import annotations

import importlib

from ._version import __version__


# Public name -> the module that defines it.
_PUBLIC = {
    "cache_context": "api",
    "disable": "api",
    "enable": "api",
    "enabled": "api",
    "is_enabled": "api",
    "reset": "api",
    "summary": "api",
    "transformers_of": "api",
    "pipeline_experts": "api",
    "CachePolicy": "engine",
    "EngineError": "engine",
    "EngineSummary": "engine",
    "register_policy": "engine",
    "ProbeDecision": "engine",
    "StepAction": "engine",
    "convert_official_book": "official",
    "ExpertPlans": "expert_plans",
    "load_plan": "expert_plans",
    "CachePlan": "plan",
    "ModelFacts": "plan",
    "PlanError": "plan",
    "IntervalConfig": "policies.interval",
    "PlanConfig": "policies.plan",
    "ideal_speedup": "stats",
    "plan_summary": "stats",
    "DiCacheConfig": "dicache",  # `import invardiff.engine` imports no probe policy
    "PlanProbeConfig": "dicache",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if not name.startswith("_"):
        try:  # a submodule: `import invardiff; invardiff.models.load(...)`
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'invardiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = sorted([*_PUBLIC, "__version__"])
