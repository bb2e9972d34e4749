"""The sweep's record of work done: attention computations per block, counted on rows, against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

import invardiff
from invardiff.bench.block_calls import AttentionCallCounter

from helpers import (
    dicache_where_samples_disagree,
    euler_loop,
    facts_for,
    plan_from_bits,
    run_pipeline,
    tiny_pipeline,
)


STEPS = "00110110"  # steps 2, 3, 5 and 6 reuse the whole step: 4 of 8 steps run the blocks


def _count(pipe, config, plan) -> AttentionCallCounter:
    """One pipeline run with ``plan`` enabled, counted."""
    invardiff.enable(pipe, plan)
    try:
        with AttentionCallCounter(pipe.transformer) as counter:
            run_pipeline(pipe, config, len(STEPS))
    finally:
        invardiff.disable(pipe)
    return counter


def test_a_plan_counts_computed_steps_and_units():
    # DiT tiny: 2 blocks, CFG batched (every call carries 2 rows). Besides the 4 computed steps, the attention of
    # layer 1 is reused at step 4: 4 x 2 - 1 = 7 attention computations of 8 x 2.
    config, pipe = tiny_pipeline("dit")
    attn = ["00", "00", "00", "00", "01", "00", "00", "00"]
    plan = plan_from_bits(facts_for(pipe.transformer, "dit"), STEPS, {"transformer_blocks": {"attn": attn}})
    counter = _count(pipe, config, plan)
    assert counter.fraction == 7 / 16
    # config.batch counts transformer rows: one class label, batched with its unconditional twin.
    assert counter.rows_possible == 8 * 2 * config.batch  # steps x blocks x rows


def test_flux_counts_both_block_lists():
    # Flux tiny: 2 dual + 4 single blocks, step reuse only: exactly half the attention computations.
    config, pipe = tiny_pipeline("flux")
    counter = _count(pipe, config, plan_from_bits(facts_for(pipe.transformer, "flux"), STEPS))
    assert (counter.rows_computed, counter.rows_possible) == (4 * 6, 8 * 6)


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_per_sample_dicache_counts_only_the_rows_that_ran_the_deep_blocks(family):
    # Where one sample skips and the other computes, the deep blocks run on one row: the count must see that.
    transformer, call, config, _ = dicache_where_samples_disagree(family)
    with AttentionCallCounter(transformer) as counter:
        _, branch = euler_loop(transformer, family, call, config)
    blocks = counter.num_blocks
    skipped = np.array(branch.to_dict()["probe"]["decision"]) == "skipped"  # (steps, rows)
    # Every row runs the probe's blocks; rows that skip do not run the deep ones.
    expected = skipped.size * blocks - skipped.sum() * (blocks - config.probe_depth)
    assert 0 < skipped.sum() < skipped.size
    assert counter.rows_computed == expected
    assert counter.rows_possible == skipped.size * blocks
