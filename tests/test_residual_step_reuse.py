"""PlanConfig(step_reuse="residual"): a step-cached step adds the last computed residual H - x to the current x."""

from __future__ import annotations

import inspect

import pytest
import torch

import invardiff
from invardiff.families import TransformerCall, get_family

from helpers import facts_for, plan_from_bits, tiny_pipeline


@pytest.mark.parametrize("family", ["flux", "dit", "hidream"])
@torch.no_grad()
def test_residual_step_reuse_equals_the_head_on_current_input_plus_last_residual(family):
    config, pipe = tiny_pipeline(family)
    transformer, spec = pipe.transformer, get_family(family)
    plan = plan_from_bits(facts_for(transformer, family), "0110")  # step 1 and 2 reuse step 0's residual
    calls = [config.example_call(seed=step, timestep=1.0 - step / 4) for step in range(4)]
    signature = inspect.signature(transformer.forward)

    # Reference from the stock model: H_0 and x_0 at step 0, then head(x_k + H_0 - x_0) at steps 1 and 2.
    captured = {}

    def capture(module, args):
        captured["H"] = args[0]  # returns None: the call's arguments are untouched

    handle = transformer.get_submodule(spec.head_input).register_forward_pre_hook(capture)
    transformer(**calls[0])
    handle.remove()
    residual = captured["H"] - spec.embed_input(transformer, TransformerCall(signature, (), calls[0]))
    expected = []
    for step in (1, 2):
        call = TransformerCall(signature, (), calls[step])
        expected.append(spec.run_head(transformer, spec.embed_input(transformer, call) + residual, call)[0])

    invardiff.enable(transformer, invardiff.PlanConfig(plan, step_reuse="residual"))
    outputs = []
    for step in range(4):
        with invardiff.cache_context(transformer, "default", step_index=step):
            outputs.append(transformer(**calls[step])[0])
    invardiff.disable(transformer)
    torch.testing.assert_close(outputs[1], expected[0], rtol=1e-5, atol=1e-6)  # float32 reassociation only
    torch.testing.assert_close(outputs[2], expected[1], rtol=1e-5, atol=1e-6)
    # State reuse ignores the current input: it would give a different step-1 output.
    invardiff.enable(transformer, plan)
    for step in range(2):
        with invardiff.cache_context(transformer, "default", step_index=step):
            state_output = transformer(**calls[step])[0]
    invardiff.disable(transformer)
    assert not torch.allclose(state_output, outputs[1], atol=1e-4)


def test_unknown_step_reuse_is_rejected():
    config, pipe = tiny_pipeline("dit")
    plan = plan_from_bits(facts_for(pipe.transformer, "dit"), "0110")
    with pytest.raises(ValueError, match="step_reuse must be one of"):
        invardiff.PlanConfig(plan, step_reuse="delta")
