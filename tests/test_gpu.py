"""GPU checks (skipped without CUDA): identity and exactness of the engine on the device, in bfloat16."""

import pytest
import torch

import invardiff

from helpers import assert_close_reason, facts_for, plan_from_bits, reference_pipeline, run_pipeline, tiny_pipeline
from test_engine_exact import FLUX_MODULES, STEP_ONLY, T


@pytest.mark.gpu
def test_flux_engine_on_cuda_bf16():
    config, pipe = tiny_pipeline("flux")
    pipe.to("cuda", torch.bfloat16)
    stock = run_pipeline(pipe, config, T)
    with invardiff.enabled(pipe, invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, "flux"), T)):
        assert torch.equal(run_pipeline(pipe, config, T), stock)
    plan = plan_from_bits(facts_for(pipe.transformer, "flux"), STEP_ONLY, FLUX_MODULES)
    expected = run_pipeline(reference_pipeline(config, pipe.transformer, plan).to("cuda"), config, T)
    with invardiff.enabled(pipe, plan):
        assert_close_reason(run_pipeline(pipe, config, T), expected)
