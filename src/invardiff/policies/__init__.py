"""The built-in runtime policies. Each is one module that registers its config with ``register_policy``:

* ``plan``: an InvarDiff cache plan, executed step-first, then layer-wise (``CachePlan`` / ``PlanConfig``);
* ``interval``: a fixed-interval step skipper (``IntervalConfig``), the simplest online baseline;
* ``invardiff.dicache.policy``: DiCache and plan+probe (``DiCacheConfig``, ``PlanProbeConfig``).

A new policy is one more module and one more line in ``BUILTIN``; another package adds one through the
``invardiff.policies`` entry point group (``invardiff.plugins``). What a policy may do and see is the interface of
``invardiff.engine.policy`` (``CachePolicy``, ``StepAction``, ``ProbeDecision``, ``register_policy``).
"""

from __future__ import annotations

import importlib
import types

from .. import plugins
from ..engine.policy import registered_policies


BUILTIN = ("invardiff.policies.plan", "invardiff.policies.interval", "invardiff.dicache.policy")


def load_builtin_policies() -> None:
    """Import the built-in policies and, once, those of other packages (entry points)."""
    # Imported on first use so that importing the engine (or invardiff) imports no policy.
    for module in BUILTIN:
        importlib.import_module(module)
    plugins.load(plugins.POLICIES, _accept_plugin_policy)


def _accept_plugin_policy(entry_point, loaded) -> None:
    # Importing the entry point's module registered its config; one that registers nothing is a mistake to name.
    module = loaded.__name__ if isinstance(loaded, types.ModuleType) else None
    builders = registered_policies().values()
    if not any(builder is loaded or builder.__module__ == module for builder in builders):
        raise plugins.PluginError(
            f"The invardiff.policies entry point {entry_point.name!r} = {entry_point.value!r} of package "
            f"{plugins.package_of(entry_point)!r} registered no policy: its module must call "
            f"invardiff.register_policy(ConfigClass)(builder)."
        )
