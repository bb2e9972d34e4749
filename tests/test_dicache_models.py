"""DiCache and plan+probe on stock diffusers Flux and DiT transformers (tiny random weights). DiCache at delta 0 and
per-branch / per-sample decisions of every family are the conformance kit's (test_family_conformance.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import invardiff
from invardiff.engine import EngineError

from helpers import (
    T_PROBE,
    batched_call,
    euler_loop,
    facts_for,
    plan_from_bits,
    probe_decisions,
    row_of,
    run_pipeline,
    threshold_where_samples_disagree,
    tiny_pipeline,
)


T = T_PROBE
FAMILIES = ["flux", "dit"]


def _only_branch(pipe):
    (branch,) = invardiff.summary(pipe).branches.values()  # Flux: "cond"; DiT: "default" (batched CFG)
    return branch


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_global_decision_is_shared_and_uses_batch_means(family):
    _, transformer, call = batched_call(family)
    config = invardiff.DiCacheConfig(threshold=0.3, num_inference_steps=T, warmup_ratio=0.1, per_sample=False)
    _, branch = euler_loop(transformer, family, call, config)
    decisions = np.array(probe_decisions(branch))
    assert (decisions[:, 0] == decisions[:, 1]).all()
    assert "skipped" in decisions[:, 0]
    error = branch.probe["error"]
    measured = ~np.isnan(error[:, 0])
    assert (error[measured, 0] == error[measured, 1]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_probe_accepting_everything_equals_the_plan(family):
    config, pipe = tiny_pipeline(family)
    plan = plan_from_bits(facts_for(pipe.transformer, family), "0011011010")
    invardiff.enable(pipe, plan)
    with_plan = run_pipeline(pipe, config, T)
    invardiff.disable(pipe)
    invardiff.enable(pipe, invardiff.PlanProbeConfig(plan, threshold=float("inf")))
    accepted = run_pipeline(pipe, config, T)
    branch = _only_branch(pipe)
    invardiff.disable(pipe)
    assert torch.equal(accepted, with_plan)
    assert branch.step_status.tolist() == [int(c) for c in "0011011010"]
    decisions = {row[0] for row, cached in zip(probe_decisions(branch), "0011011010", strict=True) if cached == "1"}
    assert decisions == {"plan_reuse"}


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_probe_vetoing_everything_computes_every_step(family):
    config, pipe = tiny_pipeline(family)
    stock = run_pipeline(pipe, config, T)
    plan = plan_from_bits(facts_for(pipe.transformer, family), "0011011010")
    invardiff.enable(pipe, invardiff.PlanProbeConfig(plan, threshold=0.0))
    vetoed = run_pipeline(pipe, config, T)
    branch = _only_branch(pipe)
    invardiff.disable(pipe)
    assert torch.equal(vetoed, stock)  # a step-only plan whose every reuse is vetoed is full compute
    assert branch.step_status.tolist() == [0] * T
    assert [row[0] for row in probe_decisions(branch)].count("vetoed") == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_probe_equals_the_plan_of_the_steps_it_ran(family):
    """A vetoed step's state is what a later accepted reuse takes (the probe's accumulator restarts there), so
    plan+probe computes exactly the plan whose step-cached steps are the reuses it accepted."""
    config, pipe = tiny_pipeline(family)
    facts = facts_for(pipe.transformer, family)
    plan = plan_from_bits(facts, "0011111110")
    for threshold in np.geomspace(1e-3, 2.0, 40):  # the first at which a veto is followed by an accepted reuse
        with invardiff.enabled(pipe, invardiff.PlanProbeConfig(plan, threshold=float(threshold), per_sample=False)):
            probed = run_pipeline(pipe, config, T)
            branch = _only_branch(pipe)
            ran = "".join(str(status) for status in branch.step_status.tolist())
            decisions = [row[0] for row in probe_decisions(branch)]
        if ("vetoed", "plan_reuse") in set(itertools.pairwise(decisions)):
            break
    else:
        raise AssertionError(f"no threshold vetoes a reuse and accepts the next one; last decisions {decisions}")
    assert ran != "0011111110" and ran.count("1") > 0
    with invardiff.enabled(pipe, plan_from_bits(facts, ran)):
        assert torch.equal(probed, run_pipeline(pipe, config, T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_probe_on_a_batch_equals_the_plan_of_the_steps_it_ran_in_every_dtype(family, dtype):
    """The same on a bare transformer and a batch of two deciding together, in the dtypes a GPU runs."""
    _, transformer, call = batched_call(family)
    transformer.to(dtype)
    call = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call.items()}
    facts = facts_for(transformer, family)
    plan = plan_from_bits(facts, "0011111110")
    for threshold in np.geomspace(1e-3, 2.0, 40):
        config = invardiff.PlanProbeConfig(plan, threshold=float(threshold), per_sample=False)
        probed, branch = euler_loop(transformer, family, call, config)
        decisions = [row[0] for row in probe_decisions(branch)]
        if ("vetoed", "plan_reuse") in set(itertools.pairwise(decisions)):
            break
    else:
        raise AssertionError(f"no threshold vetoes a reuse and accepts the next one; last decisions {decisions}")
    ran = "".join("0" if decision in ("plan_compute", "vetoed") else "1" for decision in decisions)
    assert torch.equal(probed, euler_loop(transformer, family, call, plan_from_bits(facts, ran))[0])


def _module_plan(transformer, family):
    # Step cache at 2-3 and 6-7; layer-wise reuse of every unit of block 0 at steps 4 and 8, which the vetoed
    # steps before them refresh (and must not drop).
    facts = facts_for(transformer, family)
    reuse = {}
    for block in facts.block_lists:
        rows = ["0" * block.num_layers] * T
        for step in (4, 8):
            rows[step] = "1" + "0" * (block.num_layers - 1)
        reuse[block.name] = dict.fromkeys(block.module_kinds, rows)
    return plan_from_bits(facts, "0011001100", reuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_probe_per_sample_veto_equals_each_sample_alone(family):
    _, transformer, call = batched_call(family)
    plan = _module_plan(transformer, family)
    config, alone = threshold_where_samples_disagree(
        transformer, family, call, lambda delta: invardiff.PlanProbeConfig(plan, threshold=delta)
    )
    batched, branch = euler_loop(transformer, family, call, config)
    decisions = probe_decisions(branch)
    assert any(row[0] != row[1] for row in decisions)
    assert {row[0] for row in decisions} >= {"vetoed", "plan_reuse"} or {row[1] for row in decisions} >= {
        "vetoed",
        "plan_reuse",
    }
    for i in range(2):
        solo, _ = euler_loop(transformer, family, row_of(call, i), config)
        torch.testing.assert_close(batched[i : i + 1], solo, rtol=1e-4, atol=1e-5)


def test_summary_json_covers_the_probe():
    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, invardiff.DiCacheConfig(threshold=1.0))
    run_pipeline(pipe, config, T)
    data = invardiff.summary(pipe).to_dict()
    invardiff.disable(pipe)
    assert data["policy"]["policy"] == "dicache" and data["policy"]["threshold"] == 1.0
    probe = data["branches"]["cond"]["probe"]
    assert len(probe["decision"]) == T and len(probe["decision"][0]) == 1
    assert probe["decision"][:3] == [["warmup"]] * 3 and probe["decision"][-1] == ["last_step"]
    assert probe["error"][0] == [None] and isinstance(probe["error"][3][0], float)
    assert data["peak_cache_bytes"] > 0  # the references and the two residual pairs


def test_bad_dicache_settings_are_rejected_with_the_fix():
    config, pipe = tiny_pipeline("dit")
    with pytest.raises(ValueError, match="probe_depth=2 does not fit"):
        invardiff.enable(pipe, invardiff.DiCacheConfig(threshold=0.1, probe_depth=2))  # 2 blocks in all
    with pytest.raises(ValueError, match="threshold"):
        invardiff.DiCacheConfig(threshold=float("nan"))
    with pytest.raises(ValueError, match="gamma_max"):
        invardiff.DiCacheConfig(threshold=0.1, gamma_max=0.5)
    with pytest.raises(ValueError, match="error must be one of"):
        invardiff.DiCacheConfig(threshold=0.1, error="delta_x")
    with pytest.raises(ValueError, match="Unknown DiCache preset"):
        invardiff.DiCacheConfig.preset("sdxl")
    invardiff.enable(pipe, invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=7))
    with pytest.raises(EngineError, match="num_inference_steps=7"):
        run_pipeline(pipe, config, T)
    invardiff.disable(pipe)
    invardiff.enable(pipe.transformer, invardiff.DiCacheConfig(threshold=0.1))
    with pytest.raises(EngineError, match="Set num_inference_steps"):
        with invardiff.cache_context(pipe.transformer, "default", step_index=0):
            pipe.transformer(**config.example_call())
    invardiff.disable(pipe.transformer)


def test_flux_true_cfg_branches_keep_their_own_accumulators():
    config, pipe = tiny_pipeline("flux")
    extra = {
        "true_cfg_scale": 2.0,
        "negative_prompt_embeds": torch.randn(1, config.text_tokens, 32, generator=torch.Generator().manual_seed(5)),
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(6)),
    }
    with invardiff.enabled(pipe, invardiff.DiCacheConfig(threshold=0.6, warmup_ratio=0.1)):
        run_pipeline(pipe, config, T, **extra)
        branches = invardiff.summary(pipe).branches
    assert sorted(branches) == ["cond", "uncond"]
    assert not np.array_equal(branches["cond"].probe["error"], branches["uncond"].probe["error"], equal_nan=True)
    for branch in branches.values():
        error, accumulator = branch.probe["error"][:, 0], branch.probe["accumulator"][:, 0]
        decisions = [row[0] for row in probe_decisions(branch)]
        assert "skipped" in decisions
        for t in range(1, T):
            if decisions[t] in ("skipped", "computed"):
                # A_t = A_{t-1} + e_t after a skip of this branch, e_t after a computed step (reset to 0).
                carried = accumulator[t - 1] if decisions[t - 1] == "skipped" else 0.0
                assert accumulator[t] == pytest.approx(carried + error[t], rel=1e-9)
