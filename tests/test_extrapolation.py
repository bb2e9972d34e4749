"""Calibrated extrapolation at run time (plan format version 2): reused steps and units return
``v_a + c (v_a - v_p)``; zero coefficients are bit-identical to plain reuse; version 1 plans still read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sync_counter import count_host_syncs

import invardiff
from invardiff.plan import CachePlan, PlanError

import toy_family  # noqa: F401  (registers the "toy" family)
from helpers import facts_for, plan_from_bits


T = 5
# fp32: only the lerp's rounding; half types: one rounding of the result in the dtype, plus the head's.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def toy(dtype=torch.float32):
    transformer = toy_family.ToyTransformer(in_channels=4, dim=16, num_layers=2).eval().requires_grad_(False)
    return transformer.to(dtype)


def calls(dtype, steps: int = T):
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "hidden_states": torch.randn(2, 6, 4, generator=generator).to(dtype),
            "timestep": torch.full((2,), 1.0 - step / steps, dtype=dtype),
            "return_dict": False,
        }
        for step in range(steps)
    ]


def run(transformer, config, inputs, capture_units=False):
    """Outputs of every step; with ``capture_units``, block 1's attention output at every step."""
    seen = []
    handle = transformer.blocks[1].attn.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    if config is not None:
        invardiff.enable(transformer, config)
    outputs = []
    try:
        for step, call in enumerate(inputs):
            with invardiff.cache_context(transformer, "default", step_index=step):
                outputs.append(transformer(**call)[0])
    finally:
        if config is not None:
            invardiff.disable(transformer)
        handle.remove()
    return (outputs, seen) if capture_units else outputs


def hidden_states(transformer, inputs):
    captured = []
    handle = transformer.norm_out.register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    for call in inputs:
        transformer(**call)
    handle.remove()
    return captured


def with_coefficients(plan: CachePlan, steps=None, units=None) -> CachePlan:
    return CachePlan(
        plan.model,
        plan.num_inference_steps,
        plan.step_cache,
        plan.module_reuse,
        step_extrapolation=steps,
        unit_extrapolation=units,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_reused_steps_extrapolate_from_the_last_two_computed_states(dtype):
    transformer = toy(dtype)
    inputs = calls(dtype)
    plan = plan_from_bits(facts_for(transformer, "toy"), "00110")
    coefficients = np.array([0.0, 0.0, 0.7, 1.4, 0.0])
    extrapolating = with_coefficients(plan, steps=coefficients)
    H = hidden_states(transformer, inputs[:2])
    expected = []
    for step in (2, 3):  # head(H_1 + c (H_1 - H_0)), in float64 then the model's dtype
        hidden = (H[1].double() + coefficients[step] * (H[1].double() - H[0].double())).to(dtype)
        expected.append(toy_family._run_head(transformer, hidden, inputs[step])[0])
    with count_host_syncs() as syncs:
        outputs = run(transformer, extrapolating, inputs)
    rtol, atol = TOLERANCE[dtype]
    for got, want in zip(outputs[2:4], expected, strict=True):
        assert got.dtype == dtype and got.device == want.device
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert syncs.at("invardiff/policies/") == 0, syncs.report()
    plain = run(transformer, plan, inputs)
    assert not torch.allclose(outputs[2].float(), plain[2].float(), atol=1e-3)  # the extrapolation did something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_zero_coefficients_are_bit_identical_to_plain_reuse(dtype):
    transformer = toy(dtype)
    inputs = calls(dtype)
    plan = plan_from_bits(facts_for(transformer, "toy"), "00100", {"blocks": {"attn": ["00", "00", "11", "01", "01"]}})
    zero = with_coefficients(
        plan, steps=np.zeros(T), units={"blocks": {"attn": np.zeros((T, 2)), "ff": np.zeros((T, 2))}}
    )
    assert zero.to_dict()["format_version"] == 2 and plan.to_dict()["format_version"] == 1
    for got, want in zip(run(transformer, zero, inputs), run(transformer, plan, inputs), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_reused_units_extrapolate_from_their_last_two_computed_outputs(dtype):
    transformer = toy(dtype)
    inputs = calls(dtype)
    # Block 1's attention computes at steps 0, 1 and reuses at 2 and 3 (c = 0.5, then 1.0), computes at 4.
    plan = plan_from_bits(facts_for(transformer, "toy"), "00000", {"blocks": {"attn": ["00", "00", "01", "01", "00"]}})
    attn = np.zeros((T, 2))
    attn[2, 1], attn[3, 1] = 0.5, 1.0
    extrapolating = with_coefficients(plan, units={"blocks": {"attn": attn, "ff": np.zeros((T, 2))}})
    with count_host_syncs() as syncs:
        _, seen = run(transformer, extrapolating, inputs, capture_units=True)
    z0, z1 = seen[0].double(), seen[1].double()
    rtol, atol = TOLERANCE[dtype]
    for step, c in ((2, 0.5), (3, 1.0)):
        torch.testing.assert_close(seen[step], (z1 + c * (z1 - z0)).to(dtype), rtol=rtol, atol=atol)
    assert syncs.at("invardiff/policies/") == 0, syncs.report()


def test_plan_version_2_round_trips_and_version_1_still_reads(tmp_path):
    transformer = toy()
    plan = plan_from_bits(facts_for(transformer, "toy"), "00110", {"blocks": {"ff": ["00", "00", "11", "11", "00"]}})
    v1 = plan.to_dict()
    assert v1["format_version"] == 1 and "step_extrapolation" not in v1
    assert CachePlan.from_dict(json.loads(json.dumps(v1))) == plan
    ff = np.zeros((T, 2))
    steps = np.array([0.0, 0.0, 0.25, -0.5, 0.0])
    v2 = with_coefficients(plan, steps=steps, units={"blocks": {"attn": np.zeros((T, 2)), "ff": ff}})
    v2.save(tmp_path / "plan.json")
    loaded = CachePlan.load(tmp_path / "plan.json")
    assert loaded == v2 and loaded.to_dict()["format_version"] == 2
    np.testing.assert_array_equal(loaded.step_extrapolation, steps)


def test_coefficients_where_nothing_is_reused_are_rejected():
    transformer = toy()
    plan = plan_from_bits(facts_for(transformer, "toy"), "00110")
    with pytest.raises(PlanError, match="computed step 1"):
        with_coefficients(plan, steps=np.array([0.0, 0.3, 0.0, 0.0, 0.0]))
    units = {"blocks": {"attn": np.zeros((T, 2)), "ff": np.full((T, 2), 0.1)}}
    with pytest.raises(PlanError, match="not reused"):
        with_coefficients(plan, units=units)
    data = plan.to_dict()
    data["step_extrapolation"] = [0.0] * T
    with pytest.raises(PlanError, match="needs format_version 2"):
        CachePlan.from_dict(data)


def test_extrapolating_without_two_computed_values_is_an_error():
    transformer = toy()
    plan = plan_from_bits(facts_for(transformer, "toy"), "01100")  # steps 1, 2 reuse step 0: no earlier value
    with pytest.raises(PlanError, match="fewer than two computed values"):
        invardiff.enable(transformer, with_coefficients(plan, steps=np.array([0.0, 0.5, 0.0, 0.0, 0.0])))
