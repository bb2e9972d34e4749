"""bench-engine's plans: official books where a family has them, else synthetic plans of a FLOP-ideal speedup."""

from __future__ import annotations

import pytest

from invardiff.bench.plans import bench_plan, bench_plan_names, default_bench_plans
from invardiff.flops import profile_flops
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.stats import ideal_speedup


def test_families_without_books_get_synthetic_plans():
    assert default_bench_plans("wan") == ["wan/synthetic-2x", "wan/synthetic-3x"]
    assert default_bench_plans("hunyuanvideo") == ["hunyuanvideo/synthetic-2x", "hunyuanvideo/synthetic-3x"]
    assert default_bench_plans("flux") == ["flux/fast", "flux/medium-1", "flux/medium-2", "flux/slow"]
    assert {"dit/slow", "wan/synthetic-3x", "flux/synthetic-2x"} <= set(bench_plan_names())
    with pytest.raises(ValueError, match="Unknown benchmark plan 'wan/fast'"):
        bench_plan("wan/fast", MODEL_CONFIGS["wan-tiny"])


@pytest.mark.parametrize("config", ["wan-tiny", "hunyuanvideo-tiny"])
@pytest.mark.parametrize("target", [2.0, 3.0])
def test_synthetic_plans_just_reach_their_ideal_speedup(config, target):
    config = MODEL_CONFIGS[config]
    flops = profile_flops(config)
    plan = bench_plan(f"{config.family}/synthetic-{int(target)}x", config)
    assert plan.num_inference_steps == config.steps
    assert target <= ideal_speedup(plan, flops) < target * 1.1  # the first plan along the moves to reach it
    assert not plan.step_cache[:3].any() and not plan.step_cache[-1]
    assert plan.step_cache.any()  # both execution paths: step caching ...
    reused = [matrix for kinds in plan.module_reuse.values() for matrix in kinds.values()]
    assert all(matrix[~plan.step_cache].any() for matrix in reused)  # ... and layer-wise reuse of every kind


@pytest.mark.parametrize("family", ["flux", "hunyuanvideo", "wan"])
def test_taylorseer_caches_the_family_attention_units(family):
    import re

    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    from invardiff.bench.peers import _attention_units

    transformer = MODEL_CONFIGS[f"{family}-tiny"].build_transformer("meta")
    names = [name for name, _ in transformer.named_modules()]

    def matched(patterns):
        return {name for name in names if any(re.fullmatch(pattern, name) for pattern in patterns)}

    ours, default = matched(_attention_units(transformer)), matched(_TRANSFORMER_BLOCK_IDENTIFIERS)
    if family == "wan":
        assert not default  # diffusers' defaults match no Wan module (blocks.N.attn1 / attn2)
        assert ours == {f"blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)}
    else:
        assert ours == default and ours
