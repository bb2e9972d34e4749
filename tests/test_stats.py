"""FLOP profiles and ideal speedups on hand-checkable numbers."""

import numpy as np
import pytest

from invardiff import CachePlan, ModelFacts, ideal_speedup
from invardiff.flops import FlopProfile, profile_flops
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.official import bundled_books, convert_official_book

from helpers import plan_from_bits


def test_ideal_speedup_on_a_hand_made_profile():
    facts = ModelFacts.for_family("dit", {"transformer_blocks": 2})
    profile = FlopProfile(
        "hand",
        "dit",
        {"transformer_blocks": 2},
        full_step=100.0,
        step_cached=4.0,
        units={"transformer_blocks": {"attn": np.array([10.0, 10.0]), "ff": np.array([30.0, 30.0])}},
    )
    # Steps: 0 full (100), 1 step-cached (4), 2 reuses attn in both layers and ff in layer 1 (100 - 20 - 30 = 50),
    # 3 full (100): 254 FLOPs against 4 x 100.
    plan = plan_from_bits(
        facts, "0100", {"transformer_blocks": {"attn": ["00", "11", "11", "00"], "ff": ["00", "11", "01", "00"]}}
    )
    assert ideal_speedup(plan, profile) == pytest.approx(400 / 254, rel=1e-12)


def test_extrapolated_reuses_pay_their_lerp():
    """An extrapolated reuse rebuilds its value with one lerp: 3 FLOPs per element (subtract, multiply, add)."""
    from invardiff.stats import extrapolation_work

    facts = ModelFacts.for_family("dit", {"transformer_blocks": 2})
    units = {"transformer_blocks": {"attn": np.array([10.0, 10.0]), "ff": np.array([30.0, 30.0])}}
    elements = {"transformer_blocks": {"attn": np.array([2.0, 2.0]), "ff": np.array([1.0, 5.0])}}
    profile = FlopProfile("hand", "dit", {"transformer_blocks": 2}, 100.0, 4.0, units, 7.0, elements)
    # Steps: 0 full (100), 1 full (100), 2 step-cached and extrapolated (4 + 3 x 7 = 25), 3 reuses attn in both
    # layers (the one in layer 0 extrapolated: 3 x 2) and ff in layer 1 (extrapolated: 3 x 5):
    # 100 - 20 - 30 + 6 + 15 = 71; 296 FLOPs against 4 x 100.
    plan = plan_from_bits(
        facts, "0010", {"transformer_blocks": {"attn": ["00", "00", "11", "11"], "ff": ["00", "00", "11", "01"]}}
    )
    plan.step_extrapolation = np.array([0.0, 0.0, 0.5, 0.0])
    plan.unit_extrapolation = {"transformer_blocks": {"attn": np.zeros((4, 2)), "ff": np.zeros((4, 2))}}
    plan.unit_extrapolation["transformer_blocks"]["attn"][3, 0] = -0.25
    plan.unit_extrapolation["transformer_blocks"]["ff"][3, 1] = 0.75
    assert extrapolation_work(plan, profile) == {"steps": 1, "units": 2, "flops": 21.0 + 6.0 + 15.0}
    assert ideal_speedup(plan, profile) == pytest.approx(400 / 296, rel=1e-12)


def test_the_flop_counter_counts_an_extrapolated_reuse():
    """The sweep counts the FLOPs of its runs with flop_counter: an extrapolated reuse (one lerp) is 3 per element,
    a plain one nothing."""
    import torch

    from invardiff.flops import flop_counter
    from invardiff.policies.extrapolation import Pair, extrapolate

    previous, anchor = torch.randn(4, 5), torch.randn(4, 5)
    for kept, coefficient, expected in ((Pair(previous, anchor), 0.3, 60), (anchor, 0.0, 0)):
        counter = flop_counter()
        with counter:
            extrapolate(kept, coefficient)
        assert counter.get_total_flops() == expected


def test_profiles_record_the_sizes_an_extrapolation_rebuilds():
    profile = profile_flops(MODEL_CONFIGS["dit-tiny"])
    # dit-tiny: H and every unit output are (batch 2, 16 tokens, D 32) = 1024 elements.
    assert profile.step_elements == 1024
    assert profile.unit_elements["transformer_blocks"]["attn"].tolist() == [1024, 1024]
    assert profile.unit_elements["transformer_blocks"]["ff"].tolist() == [1024, 1024]


def test_dit_unit_flops_match_the_matmul_count():
    profile = profile_flops(MODEL_CONFIGS["dit-tiny"])
    # dit-tiny: D = 32, 16 tokens (8x8 latent, patch 2), batch 2. FeedForward: D -> 4D -> D, 2 FLOPs per MAC.
    tokens, D = 2 * 16, 32
    assert profile.units["transformer_blocks"]["ff"].tolist() == [2 * tokens * (D * 4 * D) * 2] * 2
    # Attention: q, k, v, out projections (4 D^2 per token) plus scores and values (2 N^2 D per sample).
    attention = 2 * tokens * 4 * D * D + 2 * (2 * 2 * 16 * 16 * D)
    assert profile.units["transformer_blocks"]["attn"].tolist() == [attention] * 2
    assert profile.step_cached < profile.full_step


def test_flux_single_block_proj_out_is_always_paid():
    profile = profile_flops(MODEL_CONFIGS["flux-tiny"])
    facts = ModelFacts.for_family("flux", {"transformer_blocks": 2, "single_transformer_blocks": 4})
    everything = {
        b.name: {k: ["0" * b.num_layers] + ["1" * b.num_layers] for k in b.module_kinds} for b in facts.block_lists
    }
    plan = plan_from_bits(facts, "00", everything)
    saved = sum(v.sum() for units in profile.units.values() for v in units.values())
    assert ideal_speedup(plan, profile) == pytest.approx(2 * profile.full_step / (2 * profile.full_step - saved))
    # Reusing every unit still pays embeddings, modulation, proj_out of single blocks and the head.
    assert profile.full_step - saved > 0.05 * profile.full_step


@pytest.mark.parametrize(
    "book,low,high",
    [("flux/fast", 3.50, 3.56), ("flux/slow", 2.50, 2.56), ("dit/fast", 2.93, 2.99), ("dit/slow", 2.60, 2.65)],
)
def test_official_ideal_speedups_on_the_real_configs(book, low, high):
    # SPEC.md A.7 estimates 3.54 / 2.53 / 2.96 / 2.63 from block FLOPs alone; ours also counts embeddings and head.
    family = book.split("/")[0]
    plan = convert_official_book(bundled_books()[book], family)
    profile = profile_flops(MODEL_CONFIGS["flux1-dev" if family == "flux" else "dit-xl-2"])
    assert low < ideal_speedup(plan, profile) < high


def test_profile_rejects_a_plan_of_another_depth():
    from invardiff import PlanError

    plan = CachePlan.reuse_nothing(ModelFacts.for_family("dit", {"transformer_blocks": 3}), 4)
    with pytest.raises(PlanError, match="expects 3 blocks"):
        ideal_speedup(plan, profile_flops(MODEL_CONFIGS["dit-tiny"]))
