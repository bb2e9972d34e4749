"""The built-in runtime policies. Each is one module that registers its config with ``register_policy``:

* ``plan``: an InvarDiff cache plan, executed step-first, then layer-wise (``CachePlan`` / ``PlanConfig``);
* ``interval``: a fixed-interval step skipper (``IntervalConfig``), the simplest online baseline;
* ``invardiff.dicache.policy``: DiCache and plan+probe (``DiCacheConfig``, ``PlanProbeConfig``).

A new policy is one more module and one more line in ``BUILTIN``.
"""

from __future__ import annotations

import importlib


BUILTIN = ("invardiff.policies.plan", "invardiff.policies.interval", "invardiff.dicache.policy")


def load_builtin_policies() -> None:
    # Imported on first use so that importing the engine (or invardiff) imports no policy.
    for module in BUILTIN:
        importlib.import_module(module)
