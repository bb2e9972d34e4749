"""invardiff next to other caches (refused, naming the other cache and how to remove it, in either order) and next
to model offloading (works in the orders tested here, with output bit-identical to invardiff alone)."""

import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks import apply_first_block_cache, apply_group_offloading

import invardiff
from invardiff.engine.engine import EngineError

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline
from model_state import ModelState, assert_unchanged


STEPS = 4


def _plan(transformer):
    # Step 3 step-cached; single-stream attention reused at steps 1-2: both the step and the unit paths run.
    reuse = {"single_transformer_blocks": {"attn": ["0000", "1111", "1111", "0000"]}}
    return plan_from_bits(facts_for(transformer, "flux"), "0001", reuse)


DIFFUSERS_CACHES = {
    "FirstBlockCache": lambda: FirstBlockCacheConfig(threshold=0.1),
    "MagCache": lambda: MagCacheConfig(threshold=0.1, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
    "TaylorSeer": lambda: TaylorSeerCacheConfig(cache_interval=2),
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CACHES))
def test_a_diffusers_cache_before_invardiff_is_refused_by_name(name):
    _, pipe = tiny_pipeline("flux")
    config = DIFFUSERS_CACHES[name]()
    pipe.transformer.enable_cache(config)
    before = ModelState(pipe.transformer)
    with pytest.raises(
        ValueError,
        match=rf"{type(config).__name__} \(transformer.enable_cache\); remove it with "
        r"transformer.disable_cache\(\)",
    ):
        invardiff.enable(pipe, _plan(pipe.transformer))
    assert_unchanged(before, pipe.transformer)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CACHES))
def test_a_diffusers_cache_after_invardiff_is_refused_at_the_next_call_and_removing_it_restores_the_run(name):
    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _plan(pipe.transformer))
    expected = run_pipeline(pipe, config, STEPS)
    pipe.transformer.enable_cache(DIFFUSERS_CACHES[name]())
    with pytest.raises(EngineError, match=r"At step 0 .*also carries another cache: diffusers' .*disable_cache\(\)"):
        run_pipeline(pipe, config, STEPS)
    pipe.transformer.disable_cache()
    assert torch.equal(run_pipeline(pipe, config, STEPS), expected)
    invardiff.disable(pipe)


def test_a_diffusers_cache_hook_applied_directly_is_refused_with_its_hook_name():
    _, pipe = tiny_pipeline("flux")
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match=r"first_block_cache hook 'fbc_leader_block_hook' \(on transformer_blocks.0"):
        invardiff.enable(pipe, _plan(pipe.transformer))


_F1B0 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}  # the tiny model has fewer blocks than the default F8


def test_cache_dit_before_or_after_invardiff_is_refused_by_name():
    cache_dit = pytest.importorskip("cache_dit")
    config, pipe = tiny_pipeline("flux")
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(num_inference_steps=STEPS, **_F1B0))
    with pytest.raises(
        ValueError,
        match=r"cache-dit \(cache_dit.enable_cache\); remove it with "
        r"cache_dit.disable_cache\(pipe\)",
    ):
        invardiff.enable(pipe, _plan(pipe.transformer))
    cache_dit.disable_cache(pipe)

    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _plan(pipe.transformer))
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(num_inference_steps=STEPS, **_F1B0))
    # cache-dit replaces the transformer's forward (invardiff's hook with it): the first adapted unit notices.
    with pytest.raises(RuntimeError, match=r"ran outside an invardiff call: .*cache_dit.disable_cache\(pipe\)"):
        run_pipeline(pipe, config, STEPS)
    cache_dit.disable_cache(pipe)
    invardiff.disable(pipe)


def _group_offload(kind):
    def apply(transformer):
        extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        cpu = torch.device("cpu")
        apply_group_offloading(transformer, onload_device=cpu, offload_device=cpu, offload_type=kind, **extra)

    return apply


def _policies(transformer):
    return {
        "plan": _plan(transformer),
        "dicache": invardiff.DiCacheConfig(threshold=0.5, num_inference_steps=STEPS),
    }


# (policy, offloading, order) combinations that work; the others are refused at enable (test below).
WORKS = [
    ("plan", "block_level", "before"),
    ("plan", "block_level", "after"),
    ("plan", "leaf_level", "after"),
    ("dicache", "leaf_level", "before"),
    ("dicache", "leaf_level", "after"),
    ("dicache", "block_level", "after"),
]


@pytest.mark.parametrize("policy, kind, order", WORKS)
def test_group_offloading_keeps_working_and_gives_the_same_output(policy, kind, order):
    pytest.importorskip("accelerate")  # diffusers' group offloading moves tensors with accelerate
    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _policies(pipe.transformer)[policy])
    expected = run_pipeline(pipe, config, STEPS)
    invardiff.disable(pipe)
    stock = run_pipeline(pipe, config, STEPS)

    config, pipe = tiny_pipeline("flux")
    if order == "before":
        _group_offload(kind)(pipe.transformer)
    invardiff.enable(pipe, _policies(pipe.transformer)[policy])
    if order == "after":
        _group_offload(kind)(pipe.transformer)
    assert torch.equal(run_pipeline(pipe, config, STEPS), expected)
    invardiff.disable(pipe)
    assert torch.equal(run_pipeline(pipe, config, STEPS), stock)  # offloading alone, after invardiff left


@pytest.mark.parametrize("policy, kind", [("plan", "leaf_level"), ("dicache", "block_level")])
def test_group_offloading_on_modules_invardiff_adapts_is_refused_with_the_order_that_works(policy, kind):
    pytest.importorskip("accelerate")
    _, pipe = tiny_pipeline("flux")
    _group_offload(kind)(pipe.transformer)
    before = ModelState(pipe.transformer)
    with pytest.raises(ValueError, match=r"diffusers hooks \['group_offloading'\].*Enable invardiff first"):
        invardiff.enable(pipe, _policies(pipe.transformer)[policy])
    assert_unchanged(before, pipe.transformer)


def test_model_cpu_offload_after_invardiff_keeps_working_and_before_is_refused():
    # enable_model_cpu_offload wants an accelerator by default; device="cpu" installs the same accelerate hooks.
    pytest.importorskip("accelerate")
    config, pipe = tiny_pipeline("flux")
    stock = run_pipeline(pipe, config, STEPS)
    invardiff.enable(pipe, _plan(pipe.transformer))
    expected = run_pipeline(pipe, config, STEPS)
    invardiff.disable(pipe)

    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _plan(pipe.transformer))
    pipe.enable_model_cpu_offload(device="cpu")
    # Each call ends by re-installing the offloading hooks (maybe_free_model_hooks): the second call must still
    # run the plan, not the stock model.
    assert torch.equal(run_pipeline(pipe, config, STEPS), expected)
    assert torch.equal(run_pipeline(pipe, config, STEPS), expected)
    invardiff.disable(pipe)
    assert torch.equal(run_pipeline(pipe, config, STEPS), stock)

    config, pipe = tiny_pipeline("flux")
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(
        ValueError, match=r"accelerate's offloading hook .*pipe.remove_all_hooks\(\), enable invardiff"
    ):
        invardiff.enable(pipe, _plan(pipe.transformer))
    pipe.remove_all_hooks()
    invardiff.enable(pipe, _plan(pipe.transformer))
    assert torch.equal(run_pipeline(pipe, config, STEPS), expected)
