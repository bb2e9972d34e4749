"""cap_step_runs on hand-written step gates."""

from __future__ import annotations

import numpy as np
import pytest

from invardiff.plan_transforms import cap_step_runs

from helpers import facts_for, plan_from_bits, tiny_pipeline


def _plan():
    _, pipe = tiny_pipeline("dit")
    facts = facts_for(pipe.transformer, "dit")
    rows = ["11"] * 12  # every module reusable on every row, to see the forced rows cleared
    rows[0] = "00"
    return plan_from_bits(facts, "011111110110", {"transformer_blocks": {"attn": rows, "ff": rows}})


def test_runs_longer_than_the_cap_get_a_computed_step_after_every_cap_reused_ones():
    plan = _plan()
    capped = cap_step_runs(plan, 2)
    assert "".join("1" if c else "0" for c in capped.step_cache) == "011011010110"
    forced = [3, 6]
    for kind, matrix in capped.module_reuse["transformer_blocks"].items():
        assert not matrix[forced].any()  # a forced step computes every module
        original = plan.module_reuse["transformer_blocks"][kind]
        np.testing.assert_array_equal(np.delete(matrix, forced, 0), np.delete(original, forced, 0))
    assert capped.provenance["max_step_run"] == 2
    assert cap_step_runs(plan, 7).step_cache.tolist() == plan.step_cache.tolist()  # no run is longer than 7
    with pytest.raises(ValueError, match="max_run must be an integer >= 1"):
        cap_step_runs(plan, 0)
