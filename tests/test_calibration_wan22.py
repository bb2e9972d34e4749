"""Calibrating a Wan2.2 pipeline (two experts switched at boundary_ratio) on a tiny random one: each expert is
recorded over its own steps and gets its own plan; the pair is one versioned file that enable takes as it is."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_calibration_wan import _rates

import invardiff
from invardiff import CachePlan, ExpertPlans, PlanError
from invardiff.calibration import calibrate
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import assert_close_reason, expert_reference_pipeline, facts_for, plan_from_bits


T = 8  # boundary_ratio 0.9 splits Wan's 8-step schedule (999 972 937 | 893 ...) into 3 high-noise + 5 low-noise steps
SPLIT = {"transformer": (0, 3), "transformer_2": (3, 8)}
SHAPE = {"height": 64, "width": 64, "max_sequence_length": 8, "num_frames": 9}  # in the CLI's order
PROMPT = "a cat"


def _two_expert_pipeline():
    config = MODEL_CONFIGS["wan-tiny"]
    high, low = config.build_transformer(seed=0), config.build_transformer(seed=1)
    pipe = build_pipeline(config, high, text_encoders=True)
    pipe = type(pipe)(**{**pipe.components, "transformer_2": low}, boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calibrate(pipe, **options):
    return calibrate(
        pipe,
        num_inference_steps=T,
        thresholds="default",
        prompts=[PROMPT],
        seeds=[3],
        pipeline_kwargs=SHAPE,
        **options,
    )


def _sample(pipe, steps=T):
    generator = torch.Generator().manual_seed(3)
    return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent", **SHAPE).frames


@pytest.fixture(scope="module")
def calibrated():
    pipe = _two_expert_pipeline()
    plans, rates = _calibrate(pipe)
    return pipe, plans, rates


def _cond_features(pipe):
    # Each expert's pre-head state at every call of a stock run: cond, then uncond, at each step it runs.
    seen = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).norm_out.register_forward_pre_hook(lambda m, args, n=name: seen[n].append(args[0].clone()))
        for name in seen
    ]
    try:
        _sample(pipe)
    finally:
        for handle in handles:
            handle.remove()
    return {name: features[0::2] for name, features in seen.items()}


def test_each_expert_is_calibrated_over_its_own_steps(calibrated):
    pipe, plans, rates = calibrated
    assert isinstance(plans, ExpertPlans) and list(plans) == ["transformer", "transformer_2"]
    assert plans.steps() == SPLIT and plans.num_inference_steps == T and plans.boundary_ratio == 0.9
    assert {name: plan.num_inference_steps for name, plan in plans.items()} == {"transformer": 3, "transformer_2": 5}
    # Pass 1's step rates of each expert are the hand-computed rates of that expert's own conditional pre-head
    # states, counted from its first step (rates at 0 and at its last step are never measured).
    features = _cond_features(pipe)
    assert [len(f) for f in features.values()] == [3, 5]
    for name, part in rates.items():
        assert part.first_step.shape == (1, len(features[name]))
        np.testing.assert_allclose(part.first_step[0], _rates(features[name]), rtol=1e-5)
        assert part.provenance["expert"] == name and part.provenance["steps"] == list(SPLIT[name])
        assert plans[name] == part.build_plan()  # each plan is its own rates' plan


def test_the_pair_file_round_trips_and_is_validated(calibrated, tmp_path):
    _, plans, _ = calibrated
    path = tmp_path / "pair.json"
    plans.save(path)
    loaded = invardiff.load_plan(path)
    assert isinstance(loaded, ExpertPlans) and loaded == plans and loaded == ExpertPlans.load(path)
    assert loaded.to_dict() == plans.to_dict() and loaded.provenance == plans.provenance
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    data = json.loads(path.read_text())
    assert data["format"] == "invardiff-expert-plans" and data["format_version"] == 1
    assert [(e["name"], e["steps"]) for e in data["experts"]] == [(n, list(s)) for n, s in SPLIT.items()]
    with pytest.raises(PlanError, match=r"invardiff.load_plan\(path\)"):
        CachePlan.load(path)  # not one plan: the message says how to read it

    # A pair whose low-noise plan lost a step: refused on load, naming the expert.
    edited = copy.deepcopy(data)
    low = edited["experts"][1]["plan"]
    low["num_inference_steps"] = 4
    low["step_cache"] = low["step_cache"][:4]
    low["module_reuse"] = {b: {k: rows[:4] for k, rows in kinds.items()} for b, kinds in low["module_reuse"].items()}
    (tmp_path / "bad.json").write_text(json.dumps(edited))
    with pytest.raises(
        PlanError, match=r"bad.json: Expert 'transformer_2' runs steps 3-7 \(5 steps\) but its plan has 4"
    ):
        invardiff.load_plan(tmp_path / "bad.json")
    edited["experts"][1]["steps"] = [2, 8]
    with pytest.raises(PlanError, match=r"Expert 'transformer_2': 'steps' \[2, 8\] do not continue the schedule"):
        ExpertPlans.from_dict(edited)


def test_enable_takes_the_pair_and_reuse_nothing_is_bit_identical(calibrated):
    pipe, plans, _ = calibrated
    stock = _sample(pipe)
    nothing = ExpertPlans(
        {name: CachePlan.reuse_nothing(plan.model, plan.num_inference_steps) for name, plan in plans.items()}, T, 0.9
    )
    with invardiff.enabled(pipe, nothing):
        assert torch.equal(_sample(pipe), stock)
    with invardiff.enabled(pipe, plans):
        cached = _sample(pipe)
        counts = {name: invardiff.summary(getattr(pipe, name)).branches["cond"].step_status.tolist() for name in plans}
    assert not invardiff.is_enabled(pipe)
    assert {name: len(status) for name, status in counts.items()} == {"transformer": 3, "transformer_2": 5}
    assert plans["transformer_2"].step_cache.any()  # the calibrated low-noise plan step-caches ...
    assert (cached - stock).abs().max() > 0  # ... so the output moves away from full compute
    assert counts["transformer_2"] == plans["transformer_2"].step_cache.astype(int).tolist()


def test_a_pair_with_the_wrong_steps_for_one_expert_is_refused_naming_it(calibrated):
    pipe, plans, _ = calibrated
    facts = facts_for(pipe.transformer, "wan")
    # The pair splits 8 steps 3 + 5 at boundary_ratio 0.9; the same experts at 0.875 split them 4 + 4.
    other = type(pipe)(**pipe.components, boundary_ratio=0.875)
    with pytest.raises(PlanError, match=r"runs steps 0-3 \(4 steps\) .* \(boundary_ratio 0.875\), but its plan has 3"):
        invardiff.enable(other, plans)
    wrong_split = ExpertPlans(
        {"transformer": plan_from_bits(facts, "0000"), "transformer_2": plan_from_bits(facts, "0000")}, 8
    )
    with pytest.raises(PlanError, match=r"Expert 'transformer' runs steps 0-2 \(3 steps\) of a 8-step call"):
        invardiff.enable(pipe, wrong_split)
    assert not invardiff.is_enabled(pipe)
    # The calibrated pair called with another step count: the first expert whose steps differ is named at once.
    with invardiff.enabled(pipe, plans):
        with pytest.raises(PlanError, match=r"Expert 'transformer' runs steps 0-3 \(4 steps\) of this 10-step call"):
            _sample(pipe, steps=10)
    # A plain mapping cannot be checked before the call; the engine names the expert when its part starts.
    with invardiff.enabled(
        pipe, {"transformer": plans["transformer"], "transformer_2": plan_from_bits(facts, "0000")}
    ):
        with pytest.raises(PlanError, match=r"Expert 'transformer_2' runs steps 3-7 \(5 steps\) of this 8-step call"):
            _sample(pipe)


def test_budgeted_calibration_of_two_experts_is_not_implemented(calibrated):
    from invardiff.calibration.budget import calibrate_budget

    pipe, _, _ = calibrated
    with pytest.raises(NotImplementedError, match="transformer, transformer_2.*--preset / --thresholds"):
        calibrate_budget(pipe, num_inference_steps=T, cases=[(PROMPT, 3)], speedups=[2.0])


def test_an_expert_with_too_few_steps_is_named():
    pipe = _two_expert_pipeline()
    with pytest.raises(ValueError, match=r"Expert 'transformer' runs 2 of the 5 steps \(boundary_ratio 0.9\)"):
        calibrate(pipe, num_inference_steps=5, thresholds="default", prompts=[PROMPT], pipeline_kwargs=SHAPE)


def test_the_cli_calibrates_a_saved_wan22_pipeline_into_one_file(calibrated, tmp_path, capsys):
    from invardiff.cli.main import main

    pipe, plans, _ = calibrated
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    out = tmp_path / "pair.json"
    source = ["calibrate", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt")]
    source += ["--height", "64", "--width", "64", "--num-frames", "9", "--max-sequence-length", "8"]
    argv = [*source, "--seeds", "3", "--steps", str(T), "--preset", "default", "-o", str(out)]
    assert main(argv) == 0
    assert "one plan per expert" in capsys.readouterr().out
    # A second calibration, of the same weights saved and loaded again, through the CLI: the same file, byte for
    # byte (provenance included), as the library's.
    written = invardiff.load_plan(out)
    plans.save(tmp_path / "library.json")
    assert out.read_bytes() == (tmp_path / "library.json").read_bytes()
    assert written == plans
    for name in plans:
        assert (tmp_path / f"pair.{name}.rates.npz").is_file()
    assert main([*source, "--steps", str(T), "--budget", "2x", "-o", str(tmp_path / "b.json")]) == 2
    assert "is not implemented" in capsys.readouterr().err
    # generate reads the pair, and refuses it before loading a model: every bundled model has one transformer.
    assert main(["generate", "--model", "wan-motion", "--prompt", PROMPT, "--plan", str(out), "-o", "x"]) == 2
    assert "holds one plan per expert (transformer, transformer_2)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_calibrated_pair_runs_as_the_reference_executor(calibrated):
    pipe, plans, _ = calibrated
    reference = expert_reference_pipeline(pipe, plans)
    expected = _sample(reference)
    with invardiff.enabled(pipe, plans):
        actual = _sample(pipe)
    assert_close_reason(actual, expected)
