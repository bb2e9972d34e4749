"""DiCache against the official code's counters (SPEC.md B.2-B.4, C.2), transcribed here independently of the library.

The official WAN2.1 code keeps one counter over every transformer call: the pipeline calls the transformer twice a
step, conditional then unconditional, so the counter is 2k at step k's conditional call and 2k + 1 at its
unconditional one; the state slot is the counter's parity, ``num_steps`` is 2 T, and a call warms up while
``cnt < int(num_steps * ret_ratio)``. At T = 13 that is calls 0-4: the conditional branch warms up at steps 0-2, the
unconditional one at steps 0-1. :class:`OfficialWanDiCache` runs that control flow on a diffusers Wan transformer
(its blocks wrapped, the rest of its forward unchanged), and the library must make the same decision for every
branch at every step and produce the same outputs. HunyuanVideo's official counter ticks once per call too, and its
pipeline makes one call per step (CFG, when used, is batched into that call), so its warm-up counts steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scripted_family import ScriptedTransformer

import invardiff
from invardiff.dicache.estimators import extrapolate
from invardiff.families import get_family
from invardiff.model_configs import MODEL_CONFIGS

from helpers import probe_decisions


STEP_COUNTS = (10, 13, 14, 20, 28, 50)
THRESHOLD = 0.3  # skips and computes alike on the tiny model
GUIDANCE = 5.0  # WAN's official CFG scale


class OfficialWanDiCache:
    """The official WAN2.1 ``dicache_forward`` (probe depth 1, delta_y, ``<``, gamma in [1, 2], windows of 3 per
    slot, class-level counter over calls), run around a diffusers ``WanTransformer3DModel`` whose blocks it wraps.
    ``decisions[slot]`` lists, per call of that slot, ``"warmup"``, ``"skipped"`` or ``"computed"``."""

    def __init__(self, transformer, sample_steps: int, rel_l1_thresh: float, ret_ratio: float = 0.2):
        self.num_steps = 2 * sample_steps  # the official script: num_steps = sample_steps * 2
        self.rel_l1_thresh, self.ret_ratio = rel_l1_thresh, ret_ratio
        self.cnt = 0
        self.accumulated = [0.0, 0.0]
        self.residual_cache = [None, None]
        self.residual_window, self.probe_residual_window = [[], []], [[], []]
        self.previous_internal_states, self.previous_input = [None, None], [None, None]
        self.decisions = [[], []]
        blocks = transformer.blocks
        for index in range(len(blocks)):
            blocks[index] = _Wrapped(self, blocks[index], index, len(blocks))

    # block 0: the probe, the decision, and on a skipped call the extrapolated output
    def first_block(self, block, x, *args):
        slot = self.cnt % 2
        self.ori_x, self.skip = x, False
        if self.cnt >= int(self.num_steps * self.ret_ratio):
            test_x = block(x.clone(), *args)
            previous = self.previous_internal_states[slot]
            delta_y = (test_x - previous).abs().mean() / previous.abs().mean()
            self.accumulated[slot] += delta_y
            if self.accumulated[slot] < self.rel_l1_thresh:
                self.skip = True
                self.decisions[slot].append("skipped")
                x = x.clone()
                if len(self.residual_window[slot]) >= 2:
                    probe_window, window = self.probe_residual_window[slot], self.residual_window[slot]
                    indicator = test_x - x
                    gamma = (
                        (indicator - probe_window[-2]).abs().mean()
                        / (probe_window[-1] - probe_window[-2]).abs().mean()
                    ).clip(1, 2)
                    x += window[-2] + gamma * (window[-1] - window[-2])
                else:
                    x = x + self.residual_cache[slot]
                self.approx = x
                self.previous_internal_states[slot] = test_x
                self.previous_input[slot] = self.ori_x
                return x
            self.accumulated[slot] = 0
            self.decisions[slot].append("computed")
            self.previous_internal_states[slot] = test_x  # resume from the probe state
            return test_x
        self.decisions[slot].append("warmup")
        out = block(x, *args)
        self.previous_internal_states[slot] = out
        return out

    def deep_block(self, block, x, is_last, *args):
        if self.skip:
            return self.approx if is_last else x
        x = block(x, *args)
        if is_last:
            slot = self.cnt % 2
            residual = x - self.ori_x
            self.residual_cache[slot] = residual
            probe_residual = self.previous_internal_states[slot] - self.ori_x
            self.previous_input[slot] = self.ori_x
            window, probe_window = self.residual_window[slot], self.probe_residual_window[slot]
            if len(window) <= 2:
                window.append(residual)
                probe_window.append(probe_residual)
            else:
                window[-2], window[-1] = window[-1], residual
                probe_window[-2], probe_window[-1] = probe_window[-1], probe_residual
        return x

    def end_call(self):
        self.cnt += 1
        if self.cnt >= self.num_steps:  # the official reset for the next video (decisions are kept for the test)
            self.cnt = 0


class _Wrapped(torch.nn.Module):
    def __init__(self, official, block, index, count):
        super().__init__()
        self.official, self.block, self.index, self.count = official, block, index, count

    def forward(self, hidden_states, *args):
        if self.index == 0:
            return self.official.first_block(self.block, hidden_states, *args)
        return self.official.deep_block(self.block, hidden_states, self.index == self.count - 1, *args)


def _official_warmup(T: int) -> dict[str, list[int]]:
    """The steps each branch warms up at, by the official counter: call c = 2k + slot, warm while c < int(2T * 0.2)."""
    boundary = int(2 * T * 0.2)
    return {
        "cond": [k for k in range(T) if 2 * k < boundary],
        "uncond": [k for k in range(T) if 2 * k + 1 < boundary],
    }


def _wan_inputs():
    config = MODEL_CONFIGS["wan-tiny"]
    call = config.example_call(seed=3)
    generator = torch.Generator().manual_seed(11)
    uncond_text = torch.randn(call["encoder_hidden_states"].shape, generator=generator)
    return config, call, {"cond": call["encoder_hidden_states"], "uncond": uncond_text}


@torch.no_grad()
def _run_both(T: int, batched: bool):
    """One CFG denoising loop driven by the official outputs; at every call the same input goes to the official
    code (two calls a step, cond then uncond) and to the library (two calls, or one batched call). Returns the
    official decisions, the library's per branch, and the largest output difference."""
    config, call, texts = _wan_inputs()
    transformer = config.build_transformer(seed=0)
    official_model = copy.deepcopy(transformer)
    official = OfficialWanDiCache(official_model, T, THRESHOLD)
    preset = invardiff.DiCacheConfig.preset("wan2.1", threshold=THRESHOLD, num_inference_steps=T)
    if batched:
        preset = invardiff.DiCacheConfig.preset(
            "wan2.1", threshold=THRESHOLD, num_inference_steps=T, batch_branches=("cond", "uncond")
        )
    timestep_of = get_family("wan").configs.call_timestep
    latents, worst = call["hidden_states"].clone(), 0.0
    invardiff.enable(transformer, preset)
    try:
        for k in range(T):
            timestep = timestep_of(1.0 - k / T, call["timestep"])
            expected = {}
            for name in ("cond", "uncond"):
                kwargs = dict(call, hidden_states=latents, timestep=timestep, encoder_hidden_states=texts[name])
                (expected[name],) = official_model(**kwargs)
                official.end_call()
            if batched:
                kwargs = dict(
                    call,
                    hidden_states=latents.repeat(2, 1, 1, 1, 1),
                    timestep=timestep.repeat(2),
                    encoder_hidden_states=torch.cat([texts["cond"], texts["uncond"]]),
                )
                with invardiff.cache_context(transformer, "default", step_index=k):
                    (both,) = transformer(**kwargs)
                actual = {"cond": both[:1], "uncond": both[1:]}
            else:
                actual = {}
                for name in ("cond", "uncond"):
                    kwargs = dict(call, hidden_states=latents, timestep=timestep, encoder_hidden_states=texts[name])
                    with invardiff.cache_context(transformer, name, step_index=k):
                        (actual[name],) = transformer(**kwargs)
            for name in ("cond", "uncond"):
                worst = max(worst, float((actual[name] - expected[name]).abs().max()))
            noise = expected["uncond"] + GUIDANCE * (expected["cond"] - expected["uncond"])
            latents = latents - noise / T
        branches = invardiff.summary(transformer).branches
    finally:
        invardiff.disable(transformer)
    if batched:
        rows = [[row[i] for row in probe_decisions(branches["default"])] for i in range(2)]
        library = {"cond": rows[0], "uncond": rows[1]}
    else:
        library = {name: [row[0] for row in probe_decisions(branches[name])] for name in ("cond", "uncond")}
    return {"cond": official.decisions[0], "uncond": official.decisions[1]}, library, worst


@pytest.mark.parametrize("T", [*STEP_COUNTS[:4], *(pytest.param(T, marks=pytest.mark.slow) for T in STEP_COUNTS[4:])])
def test_wan_makes_the_official_decisions_per_call_and_matches_its_outputs(T):
    expected, library, worst = _run_both(T, batched=False)
    # The transcribed counter, checked against the closed form of the issue (T = 13: cond 0-2, uncond 0-1).
    warmup = _official_warmup(T)
    for name in ("cond", "uncond"):
        assert [k for k, d in enumerate(expected[name]) if d == "warmup"] == warmup[name]
    if T == 13:
        assert (warmup["cond"], warmup["uncond"]) == ([0, 1, 2], [0, 1])
    assert {"skipped", "computed"} <= set(expected["cond"]) | set(expected["uncond"])
    assert library == expected
    # Same decisions, formulas and order of additions on the same inputs (bit-identical on this CPU). The tolerance
    # covers gamma's means, which the library reduces per sample (flatten(1).mean(1)) and the official code over
    # the whole tensor: with one sample the same sum, but another reduction kernel may round the last bits of gamma
    # (outputs are of magnitude ~1, so a few ulps of gamma times |W_alpha - W_beta| stay far below 1e-6).
    assert worst <= 1e-6


@pytest.mark.parametrize("T", [13, 14])
def test_wan_batched_cfg_makes_each_branchs_official_decisions(T):
    # One call holding both branches (conditional sample first): each sample warms up as its branch's official
    # call does and, with per-sample state, makes that branch's decisions.
    expected, library, worst = _run_both(T, batched=True)
    assert library == expected
    # A batch of two takes other matmul paths than a batch of one: float32 rounding only (8e-7 measured on this CPU,
    # on outputs of magnitude ~1).
    assert worst < 1e-5


@pytest.mark.parametrize("T", STEP_COUNTS)
def test_hunyuanvideo_warms_up_by_the_official_call_counter(T):
    # The official HunyuanVideo script: num_steps = infer_steps, one call per step (cnt = k), probe from
    # cnt >= int(ret_ratio * num_steps) on. A threshold of 10 skips every post-warm-up step that can skip.
    official = ["warmup" if k < int(0.2 * T) else "probe" for k in range(T)]
    model = ScriptedTransformer([[1.0 + 0.01 * k for k in range(T)], [0.5] * T])
    config = invardiff.DiCacheConfig.preset("hunyuanvideo", threshold=10.0, num_inference_steps=T)
    invardiff.enable(model, config)
    try:
        for k in range(T):
            with invardiff.cache_context(model, "default", step_index=k):
                model(hidden_states=torch.ones(1, 1, 1), timestep=torch.full((1,), k))
        decisions = [row[0] for row in probe_decisions(invardiff.summary(model).branches["default"])]
    finally:
        invardiff.disable(model)
    assert ["warmup" if d == "warmup" else "probe" for d in decisions] == official


def test_bad_batch_branches_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="warmup_counter='calls'"):
        invardiff.DiCacheConfig(threshold=0.1, batch_branches=("cond", "uncond"))
    with pytest.raises(ValueError, match="batch_branches must be a tuple"):
        invardiff.DiCacheConfig(threshold=0.1, warmup_counter="calls", batch_branches=("cond", "negative"))
    with pytest.raises(ValueError, match="warmup_counter must be one of"):
        invardiff.DiCacheConfig(threshold=0.1, warmup_counter="call")


def test_extrapolation_adds_the_input_last_as_the_official_wan_and_flux_code():
    # x = 1, W_beta = 2^-24, gamma = 1, W_alpha - W_beta = 2^-24 in float32:
    #   official x + (W_beta + gamma (W_alpha - W_beta)) = 1 + 2^-23 (exact);
    #   (x + W_beta) + gamma (...) rounds 1 + 2^-24 to 1 (tie to even) twice: 1.
    tiny = 2.0**-24
    x = torch.ones(1, 1, 1)
    beta, alpha = torch.full((1, 1, 1), tiny), torch.full((1, 1, 1), 2 * tiny)
    gamma, has_two = torch.ones(1), torch.ones(1, dtype=torch.bool)
    assert extrapolate(x, alpha, beta, gamma, has_two).item() == 1.0 + 2.0**-23
    assert extrapolate(x, alpha, beta, gamma, has_two, add_input_last=False).item() == 1.0  # HunyuanVideo's order
    assert invardiff.DiCacheConfig.preset("wan2.1").add_input_last
    assert invardiff.DiCacheConfig.preset("flux").add_input_last
    assert not invardiff.DiCacheConfig.preset("hunyuanvideo").add_input_last


def test_presets_count_what_the_official_code_counts():
    presets = invardiff.dicache.PRESETS
    assert presets["wan2.1"].warmup_counter == "calls"
    # FLUX (one call per step without CFG) and HunyuanVideo (one call per step, CFG batched into it): steps.
    assert {presets[name].warmup_counter for name in ("flux", "flux-delta-minus", "hunyuanvideo")} == {"steps"}
    wan = presets["wan2.1"]
    assert [k for k in range(13) if wan.is_warmup(k, 13, "cond")] == [0, 1, 2]
    assert [k for k in range(13) if wan.is_warmup(k, 13, "uncond")] == [0, 1]
    for T in (30, 50):  # floor(0.4 T) is even: both branches warm up floor(0.2 T) steps, as before
        for branch in ("cond", "uncond"):
            assert [wan.is_warmup(k, T, branch) for k in range(T)] == [k < T // 5 for k in range(T)]
