"""The official Wan calibration (SPEC.md A.3) on a tiny WanPipeline: only the conditional branch is measured (by
default), the step stream gets the resampling correction, the provisional books get the step-to-module interplay;
the same inputs give a byte-identical plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from invardiff.calibration import calibrate
from invardiff.calibration.build import provisional_books
from invardiff.calibration.recording import recording
from invardiff.calibration.thresholds import FAMILY_CALIBRATION
from invardiff.families.calibration_spec import DEFAULT_CALIBRATION, InvarDiffThresholds
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import facts_for, run_pipeline, tiny_pipeline


T = 6
EPS = 1e-8


def test_wan_family_options_are_the_official_ones():
    options = FAMILY_CALIBRATION["wan"]
    assert options.correct_step and options.provisional_module_warmup and options.provisional_interplay
    assert options.record_branches == ("cond",)


def test_provisional_books_get_the_interplay_on_wan_only():
    # T = 8, L = 2. Step rates under the step threshold at 3 and 4; every module rate under its threshold.
    step_rates = np.array([np.nan, 0.9, 0.8, 0.1, 0.2, 0.7, 0.6, np.nan])
    modules = {"blocks.self_attn": np.full((8, 2), 0.1), "blocks.cross_attn": np.full((8, 2), 0.1)}
    modules["blocks.self_attn"][[0, 7]] = np.nan
    modules["blocks.cross_attn"][[0, 7]] = np.nan
    thresholds = InvarDiffThresholds(0.25, 0.4, {"blocks.self_attn": 0.9, "blocks.cross_attn": 0.9})
    step, wan = provisional_books(step_rates, modules, thresholds, FAMILY_CALIBRATION["wan"])
    _, dit = provisional_books(step_rates, modules, thresholds, DEFAULT_CALIBRATION)
    # Step quantile 0.4 of the interior [0.9, 0.8, 0.1, 0.2, 0.7, 0.6] is 0.6 (linear): 3 and 4 are under it
    # strictly (0.6 itself is not); warm-up floor(0.25 * 8) = 2 steps and the last step compute.
    assert step.astype(int).tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    # Module level 0.9 of twelve equal rates 0.1 is 0.1, and 0.1 < 0.1 is false: nothing reuses on its own ...
    assert not dit["blocks.self_attn"].any()
    # ... but Wan's provisional books take the interplay: step-cached rows 3-4 all reuse, row 5 all computes.
    for kind in modules:
        assert wan[kind].astype(int)[:, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
        assert (wan[kind][:, 0] == wan[kind][:, 1]).all()


def _rates(features: list[torch.Tensor], anchors: dict[int, int] | None = None) -> np.ndarray:
    """rho_j = |f_{j+1} - ref_j|_1 / |ref_j - ref_prev_j|_1, with reference indices frozen inside provisional
    runs (``anchors[j] = (curr, prev)`` indices), written out per index; NaN at 0 and T-1."""
    out = np.full(len(features), np.nan)
    for j in range(1, len(features) - 1):
        curr, prev = anchors.get(j, (j, j - 1)) if anchors else (j, j - 1)
        numerator = (features[j + 1] - features[curr]).abs().sum().item()
        denominator = (features[curr] - features[prev]).abs().sum().item()
        out[j] = numerator / (denominator + EPS)
    return out


def _branch_features(pipe, config):
    # The pre-head state of every call of a stock run: WanPipeline calls cond, then uncond, at each step.
    seen = []
    handle = pipe.transformer.norm_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        run_pipeline(pipe, config, T)
    finally:
        handle.remove()
    return seen[0::2], seen[1::2]


def test_only_the_conditional_branch_is_recorded_and_rates_are_the_hand_computed_ones():
    config, pipe = tiny_pipeline("wan")
    facts = facts_for(pipe.transformer, "wan")
    cond, uncond = _branch_features(pipe, config)
    with recording(pipe, facts, T, branches=("cond",)) as recorder:
        run_pipeline(pipe, config, T)
    step, _ = recorder.rates()
    assert step.shape == (1, T)  # one run: the conditional branch of one sample
    np.testing.assert_allclose(step[0], _rates(cond), rtol=1e-5)
    with recording(pipe, facts, T) as recorder:
        run_pipeline(pipe, config, T)
    both, _ = recorder.rates()
    assert both.shape == (2, T)
    np.testing.assert_allclose(both[1], _rates(uncond), rtol=1e-5)
    assert not np.allclose(both[0, 1:-1], both[1, 1:-1])  # the branches differ: recording one is a choice


def test_the_step_stream_is_corrected_inside_provisional_runs():
    # A provisional step-cached run at a..b = 2..3: rho_j for j = a+2 .. b+1 = 4 is anchored at f_{a+1} = f_3
    # with the denominator frozen at |f_3 - f_2|; the rate after the run (j = b+2 = 5) is T-1 here (not measured).
    config, pipe = tiny_pipeline("wan")
    facts = facts_for(pipe.transformer, "wan")
    cond, _ = _branch_features(pipe, config)
    provisional = {"step": np.array([False, False, True, True, False, False])}
    with recording(pipe, facts, T, provisional, branches=("cond",)) as recorder:
        run_pipeline(pipe, config, T)
    step, _ = recorder.rates()
    expected = _rates(cond, anchors={4: (3, 2)})
    np.testing.assert_allclose(step[0], expected, rtol=1e-5)
    assert not np.isclose(expected[4], _rates(cond)[4])  # the correction changed that rate


@pytest.mark.slow
def test_calibrate_on_wan_records_cond_only_and_is_byte_identical(tmp_path):
    config = MODEL_CONFIGS["wan-tiny"]
    pipe = build_pipeline(config, config.build_transformer(), text_encoders=True)
    shape = {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 8}

    def run(**options):
        return calibrate(
            pipe,
            num_inference_steps=T,
            thresholds="default",
            prompts=["a cat"],
            seeds=[3],
            pipeline_kwargs=shape,
            **options,
        )

    plan, rates = run()
    again, _ = run()
    plan.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert rates.num_runs == 1 and plan.provenance["family_options"]["record_branches"] == ["cond"]
    both = dataclasses.replace(FAMILY_CALIBRATION["wan"], record_branches=("cond", "uncond"))
    _, rates_both = run(family_options=both)
    assert rates_both.num_runs == 2
    np.testing.assert_array_equal(rates_both.first_step[0], rates.first_step[0])  # cond comes first
