"""benchmarks/few_step_token_reuse.py's token choice and speedup ceiling, on hand-made states."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import few_step_token_reuse as script  # noqa: E402


def test_the_tokens_that_moved_least_take_their_kept_state_per_sample():
    kept = torch.zeros(2, 4, 2)
    computed = torch.tensor(
        [
            [[1.0, 0.0], [0.1, 0.0], [0.5, 0.0], [2.0, 0.0]],
            [[2.0, 0.0], [0.5, 0.0], [0.1, 0.0], [1.0, 0.0]],
        ]
    )
    kept[0, :, 1] = 1.0  # |computed - kept| / |computed|: 1.41, 10.0, 2.24, 1.12 -> token 3 least, then 0
    kept[1, :, 0] = torch.tensor([2.0, 0.5, 0.0, 1.1])  # moves 0, 0, 1 (0.1/0.1), 0.1 -> tokens 0, 1 (ties: index)
    half = script.reuse_still_tokens(kept, computed, 0.5)
    assert torch.equal(half[0], torch.stack([kept[0, 0], computed[0, 1], computed[0, 2], kept[0, 3]]))
    assert torch.equal(half[1], torch.stack([kept[1, 0], kept[1, 1], computed[1, 2], computed[1, 3]]))
    assert script.reuse_still_tokens(kept, computed, 0.2) is computed  # floor(0.2 * 4) = 0 tokens
    assert torch.equal(script.reuse_still_tokens(kept, computed, 1.0), kept)


def test_the_speedup_ceiling_counts_the_middle_steps_only():
    # 8 steps, 45% of the tokens of steps 1-6 reused: 1 / (1 - 0.45 * 6 / 8) = 1 / 0.6625.
    assert script.ceiling_speedup(0.45, 8) == pytest.approx(1 / 0.6625)
    assert script.ceiling_speedup(0.0, 8) == 1.0
