"""``invardiff.enable`` is all or nothing: every refusal leaves the model exactly as it was (hook registries,
attributes, classes, forwards, weights), and ``disable`` after a successful enable does too."""

import dataclasses

import pytest
import torch
from diffusers import FirstBlockCacheConfig

import invardiff
from invardiff import CachePlan, DiCacheConfig, ModelFacts, PlanError
from invardiff.policies.plan import PlanConfig

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline
from model_state import ModelState, assert_unchanged


def _flux_plan(transformer, step_cache="0101"):
    return plan_from_bits(facts_for(transformer, "flux"), step_cache)


def _patch_last_attention(pipe):
    # A foreign per-instance forward deep in the model: install fails only after adapting every earlier unit.
    attention = pipe.transformer.single_transformer_blocks[-1].attn
    attention.forward = lambda *args, **kwargs: None


def _patch_last_block(pipe):
    # DiCache adapts the blocks after the probe; the last one is foreign (block-level offloading would do this).
    block = pipe.transformer.single_transformer_blocks[-1]
    block.forward = lambda *args, **kwargs: None


def _enable_fbc(pipe):
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))


REFUSALS = {
    # name: (family, prepare(pipe) or None, config(pipe), exception, words in the message)
    "flux plan on a DiT model": (
        "dit",
        None,
        lambda p: _flux_plan(tiny_pipeline("flux")[1].transformer),
        PlanError,
        "model family 'flux'",
    ),
    "plan for another depth": (
        "flux",
        None,
        lambda p: CachePlan.reuse_nothing(
            ModelFacts.for_family("flux", {"transformer_blocks": 5, "single_transformer_blocks": 1}), 4
        ),
        PlanError,
        "expects 5 blocks",
    ),
    "unsupported config": ("flux", None, lambda p: "fast", TypeError, "Unsupported cache config"),
    "probe deeper than the model": (
        "flux",
        None,
        lambda p: DiCacheConfig(threshold=0.1, probe_depth=50),
        ValueError,
        "probe_depth=50 does not fit",
    ),
    "a diffusers cache already on": (
        "flux",
        _enable_fbc,
        lambda p: _flux_plan(p.transformer),
        ValueError,
        "FirstBlockCacheConfig",
    ),
    "a foreign forward on a late unit": (
        "flux",
        _patch_last_attention,
        lambda p: _flux_plan(p.transformer),
        ValueError,
        "a forward patched by another library",
    ),
    "a foreign forward on a late block": (
        "flux",
        _patch_last_block,
        lambda p: DiCacheConfig(threshold=0.1, num_inference_steps=4),
        ValueError,
        "a forward patched by another library",
    ),
    "one plan per expert on a one-transformer pipeline": (
        "flux",
        None,
        lambda p: {"transformer": _flux_plan(p.transformer)},
        TypeError,
        "One plan or config per transformer|Unsupported cache config",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_leaves_the_model_as_it_was(case):
    family, prepare, make_config, error, words = REFUSALS[case]
    _, pipe = tiny_pipeline(family)
    if prepare is not None:
        prepare(pipe)
    config = make_config(pipe)
    before = ModelState(pipe.transformer)
    with pytest.raises(error, match=words):
        invardiff.enable(pipe, config)
    assert_unchanged(before, pipe.transformer)
    assert not invardiff.is_enabled(pipe)


def test_enabling_twice_is_refused_and_leaves_the_first_enable_in_place():
    _, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _flux_plan(pipe.transformer))
    enabled = ModelState(pipe.transformer)
    with pytest.raises(ValueError, match="already enabled"):
        invardiff.enable(pipe, _flux_plan(pipe.transformer))
    assert_unchanged(enabled, pipe.transformer)


def test_not_a_pipeline_nor_a_transformer_is_refused():
    with pytest.raises(TypeError, match="Expected a diffusers pipeline"):
        invardiff.enable(object(), None)
    module = torch.nn.Linear(2, 2)
    before = ModelState(module)
    with pytest.raises(ValueError):
        invardiff.enable(module, None)
    assert_unchanged(before, module)


@pytest.mark.parametrize(
    "make_config",
    [
        lambda t: _flux_plan(t),
        lambda t: PlanConfig(_flux_plan(t), step_reuse="residual"),
        lambda t: DiCacheConfig(threshold=0.1, num_inference_steps=4),
        lambda t: invardiff.PlanProbeConfig(_flux_plan(t), threshold=0.1),
        lambda t: invardiff.IntervalConfig(interval=2),
    ],
    ids=["plan", "plan-residual", "dicache", "plan+probe", "interval"],
)
def test_disable_after_a_run_leaves_the_model_as_it_was(make_config):
    config, pipe = tiny_pipeline("flux")
    before = ModelState(pipe.transformer)
    invardiff.enable(pipe, make_config(pipe.transformer))
    run_pipeline(pipe, config, 4)
    invardiff.disable(pipe)
    assert_unchanged(before, pipe.transformer)


def test_a_leftover_forward_binding_is_put_back_by_disable():
    # diffusers' remove_hook leaves `module.forward = <bound class forward>`; adapt() drops it, disable restores it.
    config, pipe = tiny_pipeline("flux")
    attention = pipe.transformer.transformer_blocks[0].attn
    attention.forward = attention.forward  # the binding HookRegistry.remove_hook leaves behind
    before = ModelState(pipe.transformer)
    invardiff.enable(pipe, _flux_plan(pipe.transformer))
    invardiff.disable(pipe)
    assert_unchanged(before, pipe.transformer)


def test_failed_install_keeps_the_users_own_registry_and_hooks():
    from diffusers.hooks import HookRegistry, ModelHook

    _, pipe = tiny_pipeline("flux")
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(ModelHook(), "users_hook")
    _patch_last_attention(pipe)
    before = ModelState(pipe.transformer)
    with pytest.raises(ValueError, match="a forward patched by another library"):
        invardiff.enable(pipe, _flux_plan(pipe.transformer))
    assert_unchanged(before, pipe.transformer)


def test_config_objects_are_not_mutated_by_a_refusal():
    config = DiCacheConfig(threshold=0.1, probe_depth=50)
    copy = dataclasses.replace(config)
    _, pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError):
        invardiff.enable(pipe, config)
    assert config == copy
