"""DiCache on a scripted toy whose probe features are hand-computable (SPEC.md B.2-B.4).

Blocks add a[k] (the probe, m = 1) then b[k]; the head is the identity. With T = 8, warm-up ratio 0.25 (steps
0-2, FLUX's inclusive rule), delta = 0.1, gamma_max = 1.5 and the last step forced:

    a = [1.0, 1.2, 1.4, 1.5, 1.6, 2.3, 2.4, 2.5]     r_k = a_k
    b = [0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.0]   R_k = a_k + b_k = [1.5, 1.6, 1.7, 1.75, 1.8, 2.4, 2.45, 2.5]

Sample 0 has x = 1, so P = [2.0, 2.2, 2.4, 2.5, 2.6, 3.3, 3.4, 3.5]:
    step 3: e = 0.1/2.4 = 0.0416667 -> A = 0.0416667 < 0.1: skip. gamma = |1.5-1.2| / |1.4-1.2| = 1.5.
            Y = x + R_1 + 1.5 (R_2 - R_1) = 1 + 1.6 + 0.15 = 2.75
    step 4: e = 0.1/2.5 = 0.04 -> A = 0.0816667: skip. gamma = |1.6-1.2| / 0.2 = 2 -> clipped to 1.5. Y = 2.75
    step 5: e = 0.7/2.6 = 0.2692308 -> A = 0.3508974 >= 0.1: compute (Y = 3.4), A <- 0; windows R_2, R_5
    step 6: e = 0.1/3.3 = 0.0303030: skip. gamma = |2.4-1.4| / |2.3-1.4| = 1.1111111.
            Y = 1 + 1.7 + 1.1111111 * 0.7 = 3.4777778
    step 7: forced: Y = 3.5
Sample 1 has x = 10, so P = [11, 11.2, 11.4, 11.5, 11.6, 12.3, 12.4, 12.5]: errors 0.1/11.4, 0.1/11.5, 0.7/11.6,
0.1/12.3 accumulate to 0.0087719, 0.0174676, 0.0778124, 0.0859425, all under delta: steps 3-6 skip, with raw gammas
1.5, 2, 5.5, 6, all clipped to 1.5, so Y = 10 + 1.6 + 1.5 * 0.1 = 11.75 on each.
So at step 5 sample 0 computes while sample 1 skips.

Batch-global (per_sample=False): e = mean|dP| / mean|P_prev| over the batch: 0.1/6.9, 0.1/7.0, 0.7/7.1 -> A =
0.0144928, 0.0287785, 0.1273700: skip, skip, compute (both); step 6: 0.1/7.8 = 0.0128205: skip, with the batch gamma
|2.4-1.4| / |2.3-1.4| = 1.1111111: Y = 3.4777778 and 10 + 1.7 + 0.7777778 = 12.4777778.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripted_family import ScriptedTransformer

import invardiff
from invardiff.dicache.estimators import trajectory_gamma


A = [1.0, 1.2, 1.4, 1.5, 1.6, 2.3, 2.4, 2.5]
B = [0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.0]
T = 8
CONFIG = invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=T, warmup_ratio=0.25, gamma_max=1.5)
NAN = float("nan")


def _run(model, inputs, config=CONFIG):
    """inputs: (T, B) values of x; returns the (T, B) outputs and the summary."""
    outputs = []
    invardiff.enable(model, config)
    try:
        for step, row in enumerate(inputs):
            x = torch.tensor(row, dtype=torch.float32).view(-1, 1, 1)  # (B, 1, 1)
            with invardiff.cache_context(model, "default", step_index=step):
                (y,) = model(hidden_states=x, timestep=torch.full((len(row),), step))
            outputs.append(y.flatten().tolist())
        return np.array(outputs), invardiff.summary(model).branches["default"]
    finally:
        invardiff.disable(model)


def test_accumulate_skip_reset_and_gamma_extrapolation_per_sample():
    model = ScriptedTransformer([A, B])
    outputs, branch = _run(model, [[1.0, 10.0]] * T)
    np.testing.assert_allclose(
        outputs[:, 0], [2.5, 2.6, 2.7, 2.75, 2.75, 3.4, 3.4777778, 3.5], rtol=1e-6
    )  # float32 model
    np.testing.assert_allclose(outputs[:, 1], [11.5, 11.6, 11.7, 11.75, 11.75, 11.75, 11.75, 12.5], rtol=1e-6)
    probe = branch.to_dict()["probe"]
    assert [row[0] for row in probe["decision"]] == ["warmup"] * 3 + ["skipped", "skipped", "computed", "skipped"] + [
        "last_step"
    ]
    assert [row[1] for row in probe["decision"]] == ["warmup"] * 3 + ["skipped"] * 4 + ["last_step"]
    accumulator = branch.probe["accumulator"]
    np.testing.assert_allclose(accumulator[3:7, 0], [0.0416667, 0.0816667, 0.3508974, 0.0303030], rtol=1e-5)
    np.testing.assert_allclose(accumulator[3:7, 1], [0.0087719, 0.0174676, 0.0778124, 0.0859425], rtol=1e-5)
    gamma = branch.probe["gamma"]
    np.testing.assert_allclose(gamma[[3, 4, 6], 0], [1.5, 1.5, 1.1111111], rtol=1e-6)
    assert np.isnan(gamma[5, 0])  # computed: no gamma
    np.testing.assert_allclose(gamma[3:7, 1], [1.5] * 4)
    # step status: computed whenever some sample computes
    assert branch.step_status.tolist() == [0, 0, 0, 1, 1, 0, 1, 0]


def test_per_sample_equals_each_sample_alone():
    model = ScriptedTransformer([A, B])
    batched, _ = _run(model, [[1.0, 10.0]] * T)
    alone_0, _ = _run(model, [[1.0]] * T)
    alone_1, _ = _run(model, [[10.0]] * T)
    np.testing.assert_array_equal(batched, np.concatenate([alone_0, alone_1], axis=1))


def test_batch_global_decision_matches_the_official_formula():
    model = ScriptedTransformer([A, B])
    config = invardiff.DiCacheConfig(**{**CONFIG.__dict__, "per_sample": False})
    outputs, branch = _run(model, [[1.0, 10.0]] * T, config)
    np.testing.assert_allclose(outputs[:, 0], [2.5, 2.6, 2.7, 2.75, 2.75, 3.4, 3.4777778, 3.5], rtol=1e-6)
    np.testing.assert_allclose(outputs[:, 1], [11.5, 11.6, 11.7, 11.75, 11.75, 12.4, 12.4777778, 12.5], rtol=1e-6)
    np.testing.assert_allclose(
        branch.probe["accumulator"][3:7, 0], [0.0144928, 0.0287785, 0.1273700, 0.0128205], rtol=1e-5
    )
    assert (branch.probe["decision"][:, 0] == branch.probe["decision"][:, 1]).all()


def test_zero_probe_change_gives_gamma_one_and_exact_output():
    # Constant features: every error is 0 and gamma's denominator |w_alpha - w_beta| is 0 (0/0 officially: NaN).
    model = ScriptedTransformer([[1.0] * T, [0.5] * T])
    outputs, branch = _run(model, [[1.0]] * T)
    np.testing.assert_array_equal(outputs[:, 0], [2.5] * T)
    assert np.isfinite(outputs).all()
    np.testing.assert_array_equal(branch.probe["gamma"][3:7, 0], [1.0] * 4)


def test_gamma_with_zero_denominator_and_moving_probe_is_clipped_to_gamma_max():
    w = torch.ones(1, 2, 2)
    gamma = trajectory_gamma(w * 2, w, w, gamma_max=1.5, per_sample=True)  # x/0 with x > 0: official inf
    assert gamma.tolist() == [1.5]
    nan = trajectory_gamma(torch.full((1, 2, 2), NAN), w, w * 3, gamma_max=2.0, per_sample=True)
    assert nan.tolist() == [1.0]


def test_nan_features_compute_and_do_not_leak_into_other_samples_or_later_steps():
    model = ScriptedTransformer([A, B])
    inputs = [[1.0, 10.0]] * T
    inputs = [list(row) for row in inputs]
    inputs[3][1] = NAN  # sample 1 gets a NaN input at step 3 (e.g. an overflow upstream)
    outputs, branch = _run(model, inputs)
    alone_0, _ = _run(model, [[1.0]] * T)
    np.testing.assert_array_equal(outputs[:, 0], alone_0[:, 0])  # sample 0 untouched
    assert np.isnan(outputs[3, 1])  # full compute of a NaN input is NaN too
    assert np.isfinite(outputs[4:, 1]).all()  # but the NaN does not persist in windows or accumulator
    decisions = branch.to_dict()["probe"]["decision"]
    # steps 3 (NaN input) and 4 (NaN reference) compute; the NaN residual of step 3 restarted the windows, so
    # step 5 skips with plain reuse of step 4's residual: 10 + R_4 = 11.8.
    assert [row[1] for row in decisions[3:6]] == ["non_finite", "non_finite", "skipped"]
    assert outputs[5, 1] == pytest.approx(11.8, rel=1e-6)
    assert np.isfinite(branch.probe["accumulator"][4:7, 1]).all()
    # Batch-global: the NaN makes the batch error NaN, so the whole batch computes: no NaN reaches sample 0.
    config = invardiff.DiCacheConfig(**{**CONFIG.__dict__, "per_sample": False})
    outputs, _ = _run(model, inputs, config)
    assert np.isfinite(outputs[:, 0]).all()


@pytest.mark.parametrize(
    ("preset", "steps", "warmup", "last_forced"),
    [("flux", 30, range(0, 7), True), ("hunyuanvideo", 50, range(0, 10), False), ("wan2.1", 50, range(0, 10), False)],
)
def test_official_warmup_boundaries(preset, steps, warmup, last_forced):
    config = invardiff.DiCacheConfig.preset(preset)
    assert [k for k in range(steps) if config.is_warmup(k, steps)] == list(warmup)
    assert config.is_forced(steps - 1, steps) is last_forced


def test_presets_follow_spec_b5():
    presets = invardiff.dicache.PRESETS
    assert (presets["flux"].threshold, presets["flux"].gamma_max, presets["flux"].skip_when) == (0.4, 1.5, "<")
    minus = presets["flux-delta-minus"]
    assert (minus.error, minus.threshold, minus.warmup_ratio) == ("delta_minus", 0.08, 0.0)
    assert (presets["hunyuanvideo"].threshold, presets["hunyuanvideo"].skip_when) == (0.1, "<=")
    assert (presets["wan2.1"].threshold, presets["wan2.1"].gamma_max) == (0.08, 2.0)


def test_skip_when_less_or_equal_skips_at_the_threshold():
    # With delta exactly the step-3 error (0.1/2.4, as computed in float32), "<" computes and "<=" skips.
    model = ScriptedTransformer([A, B])
    _, branch = _run(model, [[1.0]] * T)
    delta = float(branch.probe["error"][3, 0])
    assert delta == pytest.approx(0.1 / 2.4, rel=1e-6)
    for op, expected in (("<", "computed"), ("<=", "skipped")):
        config = invardiff.DiCacheConfig(**{**CONFIG.__dict__, "threshold": delta, "skip_when": op})
        _, branch = _run(model, [[1.0]] * T, config)
        assert branch.to_dict()["probe"]["decision"][3] == [expected]
