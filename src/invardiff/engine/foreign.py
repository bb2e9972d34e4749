"""Other caches on the same transformer: found at ``enable`` and at the start of every run, and refused.

Two caches on one transformer would each skip work on the assumption that the rest of the model computes: diffusers'
FirstBlockCache added after invardiff made every later call fail deep inside a block ("no cached output"), and the
outputs of any stacking would be neither method's. So invardiff refuses to run next to another cache, naming it
and how to remove it. Hooks that are not caches (offloading, layerwise casting, context parallelism) are not
refused; which orders of offloading and invardiff work is tested in tests/test_composition.py.
"""

from __future__ import annotations

import torch


# diffusers.hooks modules whose hooks skip or reuse computation (as of diffusers 0.42).
_DIFFUSERS_CACHE_MODULES = {
    f"diffusers.hooks.{name}": name
    for name in (
        "first_block_cache",
        "mag_cache",
        "taylorseer_cache",
        "pyramid_attention_broadcast",
        "faster_cache",
        "sea_cache",
        "text_kv_cache",
    )
}


def foreign_caches(transformer: torch.nn.Module) -> list[str]:
    """One line per other cache found on ``transformer``: what it is and how to remove it (empty: none)."""
    found = []
    config = getattr(transformer, "_cache_config", None)
    if config is not None:  # diffusers' CacheMixin.enable_cache
        found.append(
            f"diffusers' {type(config).__name__} (transformer.enable_cache); remove it with "
            f"transformer.disable_cache()"
        )
    elif getattr(transformer, "_is_cached", False):  # cache-dit marks the transformer it patched
        found.append("cache-dit (cache_dit.enable_cache); remove it with cache_dit.disable_cache(pipe)")
    if config is None:
        found += _hooks_applied_directly(transformer)
    return found


def _hooks_applied_directly(transformer: torch.nn.Module) -> list[str]:
    # apply_first_block_cache(...) and friends register the same hooks without setting _cache_config.
    hooks = {}
    for name, module in transformer.named_modules():
        registry = vars(module).get("_diffusers_hook")
        for hook_name, hook in registry.hooks.items() if registry is not None else ():
            method = _DIFFUSERS_CACHE_MODULES.get(type(hook).__module__)
            if method is not None:
                hooks.setdefault((method, hook_name), name or "the transformer")
    return [
        f"diffusers' {method} hook {hook_name!r} (on {where}, applied with diffusers.hooks.apply_{method} or "
        f"similar); remove it with transformer._diffusers_hook.remove_hook({hook_name!r}, recurse=True)"
        for (method, hook_name), where in hooks.items()
    ]


def refusal(transformer: torch.nn.Module, when: str) -> str | None:
    """The message refusing to run next to the caches found on ``transformer``, or ``None`` when there are none."""
    found = foreign_caches(transformer)
    if not found:
        return None
    return (
        f"{when}, {type(transformer).__name__} also carries another cache: {'; '.join(found)}. Two caches on one "
        f"transformer skip each other's work; remove the other cache, or call invardiff.disable(...) to use it."
    )


def offload_refusal(transformer: torch.nn.Module) -> str | None:
    """Why invardiff cannot be enabled under accelerate's model offloading installed first, or ``None``.

    ``enable_model_cpu_offload`` re-installs its hook at the end of every pipeline call around the forward it
    saved when it was first installed: installed before invardiff, that is the stock forward, and from the second
    call on invardiff would silently not run. Installed after invardiff it wraps invardiff's forward and works."""
    if "_hf_hook" not in vars(transformer):
        return None
    return (
        f"Cannot enable invardiff: {type(transformer).__name__} already carries accelerate's offloading hook "
        f"(enable_model_cpu_offload), which would drop invardiff at the end of the first pipeline call. Call "
        f"pipe.remove_all_hooks(), enable invardiff, then pipe.enable_model_cpu_offload()."
    )
