"""Z-Image beyond the conformance kit: calls the engine refuses (Omni mode, guidance switched off mid-run) and a head
input that is not the pre-head state, on a transformer whose output is a list of per-sample tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageTransformer2DModel

import invardiff
import invardiff.families.table as family_table
from invardiff import CachePlan, EngineError
from invardiff.families import SpecError, get_family

from helpers import facts_for, run_pipeline, tiny_config, tiny_pipeline


T = 4


class _WrongHeadZImage(ZImageTransformer2DModel):
    pass


def test_a_head_input_that_is_not_the_pre_head_state_fails_on_list_outputs(monkeypatch):
    # The output is a list of (C, F, H, W) tensors: the head check compares them as one batch, so the right head
    # passes (the kit) and the last block's input, one block short of the pre-head state, fails by name.
    spec = dataclasses.replace(
        get_family("zimage"), name="zimage-wrong-head", transformer_class=_WrongHeadZImage, head_input="layers.2"
    )
    monkeypatch.setitem(family_table._FAMILIES, spec.name, spec)  # a throwaway family, gone after the test
    config = tiny_config("zimage")
    transformer = config.build_transformer()
    transformer.__class__ = _WrongHeadZImage
    plan = CachePlan.reuse_nothing(facts_for(transformer, spec.name), T)
    with invardiff.enabled(transformer, plan):
        with pytest.raises(SpecError, match="does not reproduce") as error:
            with invardiff.cache_context(transformer, "default", step_index=0):
                transformer(**config.example_call())
    assert error.value.check == "head-input-state"


def test_omni_mode_calls_are_refused():
    config = tiny_config("zimage")
    transformer = config.build_transformer()
    call = config.example_call()
    omni = dict(call, x=[[item] for item in call["x"]], cap_feats=[[item] for item in call["cap_feats"]])
    with invardiff.enabled(transformer, CachePlan.reuse_nothing(facts_for(transformer, "zimage"), T)):
        with pytest.raises(NotImplementedError, match="Omni mode"):
            with invardiff.cache_context(transformer, "default", step_index=0):
                transformer(**omni)


def test_guidance_switched_off_mid_run_is_refused():
    # cfg_truncation < 1 drops the unconditional rows once (1000 - t) / 1000 passes it: the batch halves mid-run.
    config, pipe = tiny_pipeline("zimage")
    plan = CachePlan.reuse_nothing(facts_for(pipe.transformer, "zimage"), T)
    with invardiff.enabled(pipe, plan):
        with pytest.raises(EngineError, match="Input shapes changed within a run"):
            run_pipeline(pipe, config, T, cfg_truncation=0.2)  # (1000 - t) / 1000: 0, 0.1, 0.25, 0.5
        run_pipeline(pipe, config, T)  # the next call starts a new run


def test_the_call_timestep_is_reversed():
    # ZImagePipeline's first call (pure noise) passes 0, its last ones approach 1.
    like = torch.zeros(2)
    timestep = get_family("zimage").configs.call_timestep
    assert timestep(1.0, like).tolist() == [0.0, 0.0]
    assert timestep(0.25, like).tolist() == [0.75, 0.75]
