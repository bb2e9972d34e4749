"""A family defined in one file (``toy_family.py``) works end to end through the generic modules, untouched."""

import json

import numpy as np
import pytest
import torch

import invardiff
from invardiff.bench.engine import BENCH_CONFIGS
from invardiff.calibration.thresholds import DEFAULT_CALIBRATION, FAMILY_CALIBRATION, PRESETS, parse_thresholds, preset
from invardiff.cli.main import main
from invardiff.dicache import FAMILY_DEFAULT_PRESET
from invardiff.families import family_names, get_family, resolve_family
from invardiff.flops import profile_flops
from invardiff.model_configs import MODEL_CONFIGS, get_model_config

from toy_family import TOY, ToyTransformer


T = 6


@torch.no_grad()
def _outputs(transformer, config, plan=None):
    """Per step, the transformer's output on a fixed trajectory of timesteps; with ``plan``, through the engine."""
    spec = get_family(config.family)
    call = config.example_call(seed=1)
    outputs = []
    if plan is not None:
        invardiff.enable(transformer, plan)
    try:
        for step in range(T):
            kwargs = dict(call, timestep=spec.configs.call_timestep(1.0 - step / T, call["timestep"]))
            if plan is None:
                (output,) = transformer(**kwargs)
            else:
                with invardiff.cache_context(transformer, "default", step_index=step):
                    (output,) = transformer(**kwargs)
            outputs.append(output)
    finally:
        if plan is not None:
            invardiff.disable(transformer)
    return outputs


def test_the_family_is_registered_and_resolved():
    config = MODEL_CONFIGS["toy-tiny"]
    transformer = config.build_transformer()
    assert "toy" in family_names()
    assert isinstance(transformer, ToyTransformer)
    assert resolve_family(transformer) is TOY
    assert TOY.num_layers(transformer) == {"blocks": 3}


def test_reuse_nothing_plan_round_trip_is_bit_identical_to_stock():
    config = MODEL_CONFIGS["toy-tiny"]
    transformer = config.build_transformer()
    facts = invardiff.ModelFacts.for_family("toy", TOY.num_layers(transformer))
    plan = invardiff.CachePlan.reuse_nothing(facts, T)
    assert invardiff.CachePlan.from_dict(plan.to_dict()).model == facts
    stock = _outputs(transformer, config)
    cached = _outputs(transformer, config, plan)
    after = _outputs(transformer, config)
    assert all(torch.equal(c, s) for c, s in zip(cached, stock, strict=True))
    assert all(torch.equal(a, s) for a, s in zip(after, stock, strict=True))
    assert not invardiff.is_enabled(transformer)


def test_a_reuse_plan_takes_effect_on_the_new_family():
    config = MODEL_CONFIGS["toy-tiny"]
    transformer = config.build_transformer()
    facts = invardiff.ModelFacts.for_family("toy", TOY.num_layers(transformer))
    plan = invardiff.CachePlan.reuse_nothing(facts, T)
    plan.step_cache[2] = True  # step 2 reruns only the head on step 1's pre-head hidden state
    plan.module_reuse["blocks"]["ff"][4] = True  # step 4 reuses every block's feed-forward
    stock = _outputs(transformer, config)
    cached = _outputs(transformer, config, plan)
    assert torch.equal(cached[1], stock[1])
    assert not torch.equal(cached[2], stock[2])
    assert not torch.equal(cached[4], stock[4])


def test_generic_modules_read_the_family_spec(tmp_path):
    config = MODEL_CONFIGS["toy-tiny"]
    flops = profile_flops(config)
    assert set(flops.units["blocks"]) == {"attn", "ff"}
    assert all((v > 0).all() for v in flops.units["blocks"].values())
    assert 0 < flops.step_cached < flops.full_step
    assert parse_thresholds("step=0.5,blocks.attn=0.3", "toy").modules == {"blocks.attn": 0.3, "blocks.ff": 0.0}
    with pytest.raises(ValueError, match="No presets for family 'toy'"):
        preset("toy", "fast")
    assert PRESETS["toy"] == {} and FAMILY_CALIBRATION["toy"] == DEFAULT_CALIBRATION
    assert FAMILY_DEFAULT_PRESET["toy"] == "flux"
    assert BENCH_CONFIGS["tiny"]["toy"] == "toy-tiny"
    # A diffusers config.json of the family's transformer class is recognised.
    config.build_transformer().save_config(tmp_path)
    from_json = get_model_config(str(tmp_path / "config.json"))
    assert (from_json.family, from_json.batch, from_json.transformer_kwargs["num_layers"]) == ("toy", 2, 3)


def test_cli_inspect_on_the_new_family(tmp_path, capsys):
    facts = invardiff.ModelFacts.for_family("toy", {"blocks": 3})
    plan = invardiff.CachePlan.reuse_nothing(facts, T)
    plan.step_cache[np.array([2, 3])] = True
    plan.save(tmp_path / "plan.json")
    assert main(["inspect", str(tmp_path / "plan.json"), "--model-config", "toy-tiny", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_reused"] == 2 and summary["ideal_speedup"] > 1.0
