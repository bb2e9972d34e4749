"""The converted official books reproduce the reuse statistics of SPEC.md A.7 exactly."""

import numpy as np
import pytest

from invardiff.official import bundled_books, convert_official_book, parse_book_name
from invardiff.stats import kind_stats


# SPEC.md A.7: step-cached indices, and the raw reuse fractions (percent, one decimal) per module kind.
FLUX_STEPS_FAST = [2, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 18, 19, 20, 21]
EXPECTED = {
    "flux/fast": (
        FLUX_STEPS_FAST,
        {
            "transformer_blocks.attn": 75.0,
            "transformer_blocks.ff": 75.0,
            "transformer_blocks.context_ff": 72.0,
            "single_transformer_blocks.attn": 74.9,
            "single_transformer_blocks.mlp": 74.9,
        },
    ),
    "flux/medium-1": (
        FLUX_STEPS_FAST,
        {
            "transformer_blocks.attn": 75.0,
            "transformer_blocks.ff": 60.7,
            "transformer_blocks.context_ff": 60.7,
            "single_transformer_blocks.attn": 74.9,
            "single_transformer_blocks.mlp": 60.7,
        },
    ),
    "flux/medium-2": (
        FLUX_STEPS_FAST[1:],
        {
            "transformer_blocks.attn": 71.4,
            "transformer_blocks.ff": 57.1,
            "transformer_blocks.context_ff": 57.1,
            "single_transformer_blocks.attn": 71.4,
            "single_transformer_blocks.mlp": 57.1,
        },
    ),
    "flux/slow": (
        [6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 18, 19, 20, 21],
        {
            "transformer_blocks.attn": 64.3,
            "transformer_blocks.ff": 64.3,
            "transformer_blocks.context_ff": 50.0,
            "single_transformer_blocks.attn": 64.2,
            "single_transformer_blocks.mlp": 62.8,
        },
    ),
    "dit/slow": (
        [2, 3, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 22, 23, 26, 27, 33, 34, 38, 39, 40, 41, 43, 44, 45, 46, 47],
        {"transformer_blocks.attn": 61.9, "transformer_blocks.ff": 61.9},
    ),
    "dit/fast": (
        [*range(2, 16), 17, 18, 22, 23, 26, 27, 33, 34, 35, 40, 41, 43, 44, 45, 46, 47],
        {"transformer_blocks.attn": 66.1, "transformer_blocks.ff": 66.4},
    ),
}
# SPEC.md A.7, DiT "outside step-cache" column.
DIT_OUTSIDE = {"dit/slow": (9.4, 9.4), "dit/fast": (15.2, 15.9)}


def _stats(book):
    plan = convert_official_book(bundled_books()[book], book.split("/")[0])
    return plan, {f"{s.block_list}.{s.kind}": s for s in kind_stats(plan)}


@pytest.mark.parametrize("book", sorted(EXPECTED))
def test_reuse_fractions_match_spec(book):
    plan, stats = _stats(book)
    steps, fractions = EXPECTED[book]
    assert np.flatnonzero(plan.step_cache).tolist() == steps
    for key, percent in fractions.items():
        assert round(100 * stats[key].reuse_fraction, 1) == percent, key
    if book.startswith("flux"):
        # context_attn equals attn in every shipped book, so the joint attention reuses exactly as attn.
        assert (
            stats["transformer_blocks.context_attn"].reuse_fraction == stats["transformer_blocks.attn"].reuse_fraction
        )
        reused_steps = {
            tuple(s.reused_steps_outside_step_cache) for s in stats.values() if s.reuse_fraction_outside_step_cache
        }
        assert reused_steps == {(23, 24, 25, 26)}  # module reuse only at steps 23-26 in every FLUX book
    else:
        outside = (
            stats["transformer_blocks.attn"].reuse_fraction_outside_step_cache,
            stats["transformer_blocks.ff"].reuse_fraction_outside_step_cache,
        )
        assert tuple(round(100 * f, 1) for f in outside) == DIT_OUTSIDE[book]


def test_shipped_invariants_hold():
    for book, path in bundled_books().items():
        plan = convert_official_book(path, book.split("/")[0])
        for kinds in plan.module_reuse.values():
            for matrix in kinds.values():
                assert matrix[plan.step_cache].all()  # step-cached rows are all True
                after_run = np.flatnonzero(plan.step_cache[:-1] & ~plan.step_cache[1:]) + 1
                assert not matrix[after_run].any()  # the row after a step-cached run computes everything
                assert not matrix[-1].any()


def test_book_name_parameters_and_provenance():
    assert parse_book_name("cache_books_stp28_n0.22_th0.72_attn0.68_ff0.66_ctxff0_sattn0.68_smlp0.62.json") == {
        "num_inference_steps": 28,
        "nonskip_rate": 0.22,
        "step_quantile": 0.72,
        "attn_quantile": 0.68,
        "ff_quantile": 0.66,
        "context_ff_quantile": 0.0,
        "single_attn_quantile": 0.68,
        "single_mlp_quantile": 0.62,
    }
    plan = convert_official_book(bundled_books()["dit/fast"], "dit")
    assert plan.provenance["thresholds"]["step_quantile"] == 0.63
    assert len(plan.provenance["source"]["sha256"]) == 64
    assert plan.model.block_lists[0].num_layers == 28 and plan.num_inference_steps == 50


def test_wrong_family_for_a_book_is_an_error():
    from invardiff import PlanError

    with pytest.raises(PlanError, match="A DiT book needs 'msa_cache_book'; this looks like a FLUX book"):
        convert_official_book(bundled_books()["flux/fast"], "dit")
