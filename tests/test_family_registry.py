"""A family defined in one file (``toy_family.py``) works end to end through the generic modules, untouched."""

import json

import numpy as np
import pytest

import invardiff
from invardiff.bench.engine import BENCH_CONFIGS
from invardiff.calibration.thresholds import FAMILY_CALIBRATION, PRESETS, parse_thresholds, preset
from invardiff.cli.main import main
from invardiff.dicache import FAMILY_DEFAULT_PRESET
from invardiff.families import family_names, resolve_family
from invardiff.families.calibration_spec import DEFAULT_CALIBRATION
from invardiff.flops import profile_flops
from invardiff.model_configs import MODEL_CONFIGS, get_model_config

from toy_family import TOY, ToyTransformer


T = 6


def test_the_family_is_registered_and_resolved():
    config = MODEL_CONFIGS["toy-tiny"]
    transformer = config.build_transformer()
    assert "toy" in family_names()
    assert isinstance(transformer, ToyTransformer)
    assert resolve_family(transformer) is TOY
    assert TOY.num_layers(transformer) == {"blocks": 3}


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
