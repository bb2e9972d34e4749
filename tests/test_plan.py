"""The plan format: lossless round trip and a clear rejection of every malformed plan."""

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invardiff import CachePlan, ModelFacts, PlanError
from invardiff.official import bundled_books, convert_official_book


FLUX_FACTS = ModelFacts.for_family("flux", {"transformer_blocks": 2, "single_transformer_blocks": 3})
DIT_FACTS = ModelFacts.for_family("dit", {"transformer_blocks": 4})


def _valid_dict():
    return CachePlan.reuse_nothing(
        FLUX_FACTS, 5, scheduler="FlowMatchEulerDiscreteScheduler", provenance={"policy": "test"}
    ).to_dict()


@pytest.mark.parametrize("book", sorted(bundled_books()))
def test_official_plans_round_trip_losslessly(book, tmp_path):
    plan = convert_official_book(bundled_books()[book], book.split("/")[0])
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = CachePlan.load(path)
    assert loaded == plan
    assert loaded.to_dict() == json.loads(path.read_text())
    for name, kinds in plan.module_reuse.items():
        for kind, matrix in kinds.items():
            assert np.array_equal(loaded.module_reuse[name][kind], matrix)
    assert np.array_equal(loaded.step_cache, plan.step_cache)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_plans_round_trip(data):
    T = data.draw(st.integers(1, 12))
    step_cache = np.array([False] + data.draw(st.lists(st.booleans(), min_size=T - 1, max_size=T - 1)))
    reuse = {}
    for facts in DIT_FACTS.block_lists:
        reuse[facts.name] = {}
        for kind in facts.module_kinds:
            bits = np.array(data.draw(st.lists(st.booleans(), min_size=T * 4, max_size=T * 4))).reshape(T, 4)
            bits[0] = False  # the first executed row computes (step 0 is never step-cached)
            reuse[facts.name][kind] = bits
    plan = CachePlan(DIT_FACTS, T, step_cache, reuse, provenance={"seed": data.draw(st.integers())})
    assert CachePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def _mutate(path, value):
    data = _valid_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()
ROW = "00"  # a dual-block row (2 layers)

MALFORMED = [
    ("not_an_object", lambda: [1, 2], "must be a JSON object"),
    ("unknown_format", lambda: _mutate(["format"], "cache_books"), "Unknown plan format 'cache_books'"),
    ("future_version", lambda: _mutate(["format_version"], 99), "Unsupported plan format_version 99"),
    ("missing_model", lambda: _mutate(["model"], _DELETE), "'model' must be an object"),
    (
        "unknown_family",
        lambda: _mutate(["model", "family"], "no-such-family"),
        "Unknown model family 'no-such-family'",
    ),
    (
        "class_mismatch",
        lambda: _mutate(["model", "class"], "DiTTransformer2DModel"),
        "model.class is 'DiTTransformer2DModel' but family 'flux'",
    ),
    (
        "wrong_block_lists",
        lambda: _mutate(["model", "block_lists"], [{"name": "blocks"}]),
        "model.block_lists for family 'flux' must be",
    ),
    ("zero_layers", lambda: _mutate(["model", "block_lists", 0, "num_layers"], 0), "num_layers must be a positive"),
    (
        "unknown_kind",
        lambda: _mutate(
            ["model", "block_lists", 0, "module_kinds"], ["attn", "context_attn", "ff", "context_ff", "ip_attn"]
        ),
        "unknown: ['ip_attn']",
    ),
    ("steps_not_int", lambda: _mutate(["num_inference_steps"], "28"), "num_inference_steps must be of type int"),
    ("zero_steps", lambda: _mutate(["num_inference_steps"], 0), "num_inference_steps must be a positive integer"),
    ("step_cache_length", lambda: _mutate(["step_cache"], "0000"), "plan.step_cache must have 5 characters, got 4"),
    ("step_cache_chars", lambda: _mutate(["step_cache"], "00x00"), "must be a string of '0' (compute) and '1'"),
    ("step_zero_cached", lambda: _mutate(["step_cache"], "10000"), "step_cache[0] is set"),
    (
        "missing_block_list",
        lambda: _mutate(["module_reuse", "single_transformer_blocks"], _DELETE),
        "plan.module_reuse must have the block lists",
    ),
    (
        "missing_kind",
        lambda: _mutate(["module_reuse", "transformer_blocks", "ff"], _DELETE),
        "plan.module_reuse.transformer_blocks must have the module kinds",
    ),
    (
        "extra_kind",
        lambda: _mutate(["module_reuse", "transformer_blocks", "ip_attn"], [ROW] * 5),
        "plan.module_reuse.transformer_blocks must have the module kinds",
    ),
    (
        "too_few_rows",
        lambda: _mutate(["module_reuse", "transformer_blocks", "ff"], [ROW] * 4),
        "transformer_blocks.ff must be a list of 5 rows (one per step), got 4",
    ),
    (
        "row_wrong_layers",
        lambda: _mutate(["module_reuse", "transformer_blocks", "ff"], ["000"] * 5),
        r"transformer_blocks.ff\[0\] must have 2 characters, got 3",
    ),
    (
        "reuse_before_compute",
        lambda: _mutate(["module_reuse", "transformer_blocks", "ff"], ["01"] + [ROW] * 4),
        "transformer_blocks.ff reuses at step 0, layer 1, but that module has not been computed",
    ),
    ("provenance_not_object", lambda: _mutate(["provenance"], "calibrated"), "plan.provenance must be an object"),
    ("scheduler_not_string", lambda: _mutate(["scheduler"], 3), "plan.scheduler must be a class name or null"),
]


@pytest.mark.parametrize("name,make,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_plans_are_rejected_with_the_problem_named(name, make, message):
    with pytest.raises(PlanError, match=message if name == "row_wrong_layers" else _literal(message)):
        CachePlan.from_dict(make())


def _literal(text):
    import re

    return re.escape(text)


def test_reuse_after_step_cached_run_needs_an_earlier_compute():
    data = _valid_dict()
    data["step_cache"] = "01000"
    # Layer 0 of ff computes at step 0 (executed) and reuses at step 2 after the step-cached step 1: valid.
    data["module_reuse"]["transformer_blocks"]["ff"] = ["00", "11", "10", "00", "00"]
    plan = CachePlan.from_dict(copy.deepcopy(data))
    assert plan.module_reuse["transformer_blocks"]["ff"][2].tolist() == [True, False]


def test_corrupt_file_is_rejected_with_the_path(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": "invardiff-cache-plan", ')
    with pytest.raises(PlanError, match="plan.json is not valid JSON"):
        CachePlan.load(path)


def test_plan_checks_model_depth_family_and_step_count():
    plan = CachePlan.reuse_nothing(FLUX_FACTS, 5)
    with pytest.raises(PlanError, match="expects 2 blocks in 'transformer_blocks' but the model has 19"):
        plan.check_model("flux", {"transformer_blocks": 19, "single_transformer_blocks": 3})
    with pytest.raises(PlanError, match="for model family 'flux'.*family 'dit'"):
        plan.check_model("dit", {"transformer_blocks": 2})
    with pytest.raises(PlanError, match="for 5 inference steps but the run has 28"):
        plan.check_num_steps(28)


def test_official_book_is_not_mistaken_for_a_plan():
    book = json.loads(bundled_books()["flux/fast"].read_text())
    with pytest.raises(PlanError, match="must first be converted with `invardiff convert-official`"):
        CachePlan.from_dict(book)
