"""Calibration maths on hand-made feature sequences, with the expected numbers and plans written out."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invardiff import ModelFacts
from invardiff.calibration import (
    FAMILY_CALIBRATION,
    CalibrationRates,
    InvarDiffThresholds,
    RateRecorder,
    final_books,
    interplay,
    provisional_books,
    quantile_threshold,
    warmup_steps,
)
from invardiff.calibration.recorder import CalibrationError
from invardiff.families import get_family


def _record(values, provisional=None):
    """Feed scalar features f_k (one sample) to the step stream; return the (T,) rates."""
    recorder = RateRecorder([], get_family("dit"), len(values), provisional, epsilon=0.0)
    for k, value in enumerate(values):
        recorder.on_hidden(SimpleNamespace(name="default", step=k), torch.tensor([[float(value)]]))
    step, modules = recorder.rates()
    assert modules == {}
    return step[0]


F = [0.0, 1.0, 3.0, 4.0, 4.5, 6.0, 10.0]  # increments |f_k - f_{k-1}|: 1, 2, 1, 0.5, 1.5, 4


def test_first_pass_rate_and_index_convention():
    # rho_j = |f[j+1] - f[j]| / |f[j] - f[j-1]|, stored at j = k - 1; indices 0 and T-1 are never measured.
    rates = _record(F)
    assert np.isnan(rates[0]) and np.isnan(rates[-1])
    assert rates[1:-1] == pytest.approx([2 / 1, 1 / 2, 0.5 / 1, 1.5 / 0.5, 4 / 1.5])


def test_correction_freezes_references_inside_a_provisional_run():
    # Provisional reuse at j = 2, 3 (a = 2, b = 3). SPEC.md A.3 step 4 closed form:
    # j <= a+1 normal; j = a+2 .. b+1: |f[j+1] - f[a+1]| / |f[a+1] - f[a]|; j = b+2: |f[b+3]-f[b+2]| / |f[b+2]-f[a+1]|.
    provisional = {"step": np.array([False, False, True, True, False, False, False])}
    rates = _record(F, provisional)
    expected = [2.0, 0.5, 0.5, (6 - 4) / (4 - 3), (10 - 6) / (6 - 4)]
    assert rates[1:-1] == pytest.approx(expected)


def test_non_finite_features_are_a_clear_error():
    with pytest.raises(CalibrationError, match="Non-finite change rate at step 3 for the pre-head hidden state"):
        _record([0.0, 1.0, 2.0, float("nan"), 4.0])


def test_quantile_threshold_ties_and_level_zero():
    rates = np.array([np.nan, 0.5, 0.9, 0.3, 0.3, 1.2, 0.8, np.nan])
    # Interior sorted: 0.3 0.3 0.5 0.8 0.9 1.2; linear interpolation as torch.quantile.
    assert quantile_threshold(rates, 0.5) == pytest.approx(0.65)
    assert quantile_threshold(rates, 0.2) == pytest.approx(0.3)  # lands exactly on the tied value
    assert quantile_threshold(rates, 0.0) == pytest.approx(0.3)


def _dit_books(step_rates, thresholds, module_rates=None):
    modules = module_rates or {"transformer_blocks.attn": np.ones((len(step_rates), 2))}
    return provisional_books(step_rates, modules, thresholds, FAMILY_CALIBRATION["dit"])


def test_warmup_last_step_ties_and_strict_less_than():
    rates = np.array([np.nan, 0.5, 0.9, 0.3, 0.3, 1.2, 0.8, np.nan])
    levels = {"transformer_blocks.attn": 0.5}
    # Level 0.5 -> threshold 0.65: j = 1, 3, 4 below; warm-up n_ns = floor(0.25 * 8) = 2 removes j = 1.
    step, _ = _dit_books(rates, InvarDiffThresholds(0.25, 0.5, levels))
    assert step.tolist() == [False, False, False, True, True, False, False, False]
    # Level 0.2 -> threshold exactly 0.3: the tied rates at j = 3, 4 are not strictly below it.
    step, _ = _dit_books(rates, InvarDiffThresholds(0.0, 0.2, levels))
    assert not step.any()
    # nonskip 0 still forces step 0 (n_ns = max(1, 0)) and the last step.
    assert warmup_steps(0.0, 8) == 1 and warmup_steps(0.22, 28) == 6


def test_module_kind_at_quantile_zero_reuses_nothing():
    module_rates = {"transformer_blocks.attn": np.linspace(0.1, 2.0, 16).reshape(8, 2)}
    _, modules = _dit_books(np.ones(8), InvarDiffThresholds(0.0, 0.5, {"transformer_blocks.attn": 0.0}), module_rates)
    assert not modules["transformer_blocks.attn"].any()


def test_the_correction_cuts_a_long_run_of_reuse():
    # Increments 4, 2, 1.6, 1.4, 1.3, 1.25, 1.22, 1.2, 3: first-pass rates fall below 1 for j = 1..7.
    f = np.cumsum([0.0, 4, 2, 1.6, 1.4, 1.3, 1.25, 1.22, 1.2, 3])
    thresholds = InvarDiffThresholds(0.0, 0.5, {"transformer_blocks.attn": 0.0})
    options = FAMILY_CALIBRATION["dit"]
    first = _record(f)
    assert first[1:-1] == pytest.approx([0.5, 0.8, 1.4 / 1.6, 1.3 / 1.4, 1.25 / 1.3, 1.22 / 1.25, 1.2 / 1.22, 2.5])
    no_modules = {"transformer_blocks.attn": np.ones((10, 1))}
    provisional, _ = provisional_books(first, no_modules, thresholds, options)
    assert np.flatnonzero(provisional).tolist() == [1, 2, 3, 4]  # threshold (0.929 + 0.962) / 2
    corrected = _record(f, {"step": provisional})
    # Anchored at f[2] = 6 with the denominator frozen at |f[2] - f[1]| = 2 for j = 3..5, then j = 6 = b + 2.
    assert corrected[1:-1] == pytest.approx([0.5, 0.8, 3 / 2, 4.3 / 2, 5.55 / 2, 1.22 / 5.55, 1.2 / 1.22, 2.5])
    step, _ = final_books(first, corrected, no_modules, thresholds, options)
    # Threshold (0.984 + 1.5) / 2 = 1.242: the provisional run 1..4 is cut to 1..2; 6 and 7 now reuse.
    assert step.tolist() == [False, True, True, False, False, False, True, True, False, False]


def test_interplay_scans_forward():
    step = np.array([False, True, True, False, False, True, False])
    modules = interplay(step, {"k": np.array([[False], [False], [False], [True], [True], [False], [True]])})
    # Step-cached rows 1, 2, 5 become all-reuse; rows 3 and 6 (after a run) compute; row 4 keeps its bit.
    assert modules["k"][:, 0].tolist() == [False, True, True, False, True, True, False]


def test_flux_keeps_its_first_pass_step_gate_and_ties_context_attn_to_attn():
    options = FAMILY_CALIBRATION["flux"]
    assert not options.correct_step and not options.provisional_module_warmup
    T = 10
    rng = np.random.default_rng(0)
    first = rng.uniform(0.5, 1.5, T)
    corrected = rng.uniform(0.5, 1.5, T)  # would give another gate if FLUX corrected its step stream
    kinds = {k: rng.uniform(0.5, 1.5, (T, 3)) for k in ("transformer_blocks.attn", "transformer_blocks.context_attn")}
    thresholds = InvarDiffThresholds(0.1, 0.6, {"transformer_blocks.attn": 0.5})
    step, modules = final_books(first, corrected, kinds, thresholds, options)
    expected_step, _ = provisional_books(first, kinds, thresholds, options)
    assert np.array_equal(step, expected_step)
    threshold = quantile_threshold(kinds["transformer_blocks.context_attn"], 0.5)  # attn's level
    executed = ~step
    executed[[0, T - 1]] = False
    after_run = np.r_[False, step[:-1]] & ~step
    expected = (kinds["transformer_blocks.context_attn"] < threshold) & (executed & ~after_run)[:, None]
    assert np.array_equal(modules["transformer_blocks.context_attn"][~step], expected[~step])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_built_plans_satisfy_the_invariants(data):
    T = data.draw(st.integers(3, 30), label="T")
    N = data.draw(st.integers(1, 3), label="runs")
    family = data.draw(st.sampled_from(["dit", "flux"]), label="family")
    layers = {"transformer_blocks": data.draw(st.integers(1, 3))}
    if family == "flux":
        layers["single_transformer_blocks"] = data.draw(st.integers(1, 3))
    facts = ModelFacts.for_family(family, layers)
    positive = st.floats(0.01, 10.0, allow_nan=False)

    def draw(shape):
        return np.array(
            data.draw(st.lists(positive, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        ).reshape(shape)

    kinds = {f"{b.name}.{k}": b.num_layers for b in facts.block_lists for k in b.module_kinds}
    level = st.floats(0.0, 1.0)
    levels = {k: data.draw(level) for k in kinds if k != "transformer_blocks.context_attn"}
    thresholds = InvarDiffThresholds(data.draw(st.floats(0.0, 0.5)), data.draw(level), levels)
    rates = CalibrationRates(
        facts,
        T,
        thresholds,
        FAMILY_CALIBRATION[family],
        draw((N, T)),
        {k: draw((N, T, L)) for k, L in kinds.items()},
        draw((N, T)),
        {k: draw((N, T, L)) for k, L in kinds.items()},
    )
    plan = rates.build_plan()  # CachePlan validates shapes and that every reuse has an earlier compute
    n_ns = warmup_steps(thresholds.nonskip_rate, T)
    assert not plan.step_cache[:n_ns].any() and not plan.step_cache[-1]
    for block_list in plan.module_reuse.values():
        for matrix in block_list.values():
            assert not matrix[:n_ns].any() or plan.step_cache[:n_ns].any()
            assert not matrix[:n_ns][~plan.step_cache[:n_ns]].any()
            assert not matrix[-1].any()
            assert matrix[plan.step_cache].all()
            after_run = np.flatnonzero(plan.step_cache[:-1] & ~plan.step_cache[1:]) + 1
            assert not matrix[after_run].any()


def test_thresholds_take_nonskip_by_its_key_or_its_field_name_once():
    from invardiff.calibration.thresholds import parse_thresholds

    # to_dict() and plan provenance write the field name nonskip_rate: it is the key nonskip, not a module kind.
    assert parse_thresholds("nonskip_rate=0.1,step=0.7", "dit") == parse_thresholds("nonskip=0.1,step=0.7", "dit")
    assert parse_thresholds("nonskip_rate=0.1,step=0.7", "dit").nonskip_rate == 0.1
    with pytest.raises(ValueError, match="'nonskip_rate' is given twice"):
        parse_thresholds("nonskip=0.1,nonskip_rate=0.2,step=0.7", "dit")
    with pytest.raises(ValueError, match="'transformer_blocks.ff' is given twice"):
        parse_thresholds("step=0.7,transformer_blocks.ff=0.2,transformer_blocks.ff=0.3", "dit")
