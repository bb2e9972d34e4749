"""benchmarks/cfg_reuse_scan.py's uncond replacement, on a module that returns what it is given: the replaced uncond
output is cond_t + d of the last step that ran both branches (order 0) or d extrapolated from the last two (order 1),
every other output passes untouched, each pipeline call starts afresh, and the rule skips FasterCache's steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cfg_reuse_scan as script  # noqa: E402


class Echo(torch.nn.Module):
    def forward(self, value: torch.Tensor):
        return (value.clone(),)


def run(hook, cond: list[float], uncond: list[float]) -> list[float]:
    """One pipeline call: cond then uncond at every step; the uncond outputs as returned."""
    module = Echo()
    handle = module.register_forward_hook(hook)
    try:
        out = []
        for c, u in zip(cond, uncond, strict=True):
            module(torch.tensor([c]))
            out.append(float(module(torch.tensor([u]))[0]))
    finally:
        handle.remove()
    return out


COND = [1.0, 2.0, 4.0, 8.0, 16.0]
UNCOND = [3.0, 6.0, 9.0, 12.0, 15.0]  # d = 2, 4, 5, 4, -1


def test_order_0_returns_cond_plus_the_last_difference():
    hook = script.UncondReuse(5, {2, 3}, order=0)
    # steps 2 and 3 reuse d_1 = 4: 4 + 4, 8 + 4; the others are the model's own
    assert run(hook, COND, UNCOND) == [3.0, 6.0, 8.0, 12.0, 15.0]
    hook.check(1)


def test_order_1_extrapolates_the_difference_in_the_step_index():
    hook = script.UncondReuse(5, {2, 4}, order=1)
    # step 2: d_0 = 2, d_1 = 4 -> 6, so 4 + 6; step 4: d_1 = 4, d_3 = 4 -> 4, so 16 + 4
    assert run(hook, COND, UNCOND) == [3.0, 6.0, 10.0, 12.0, 20.0]


def test_order_1_reuses_while_only_one_difference_is_known():
    hook = script.UncondReuse(5, {1, 2}, order=1)
    assert run(hook, COND, UNCOND) == [3.0, 4.0, 6.0, 12.0, 15.0]  # d_0 = 2 at steps 1 and 2


def test_nothing_replaced_returns_the_model_outputs_and_each_call_starts_afresh():
    assert run(script.UncondReuse(5, set(), order=1), COND, UNCOND) == UNCOND
    hook = script.UncondReuse(2, {1}, order=0)
    assert run(hook, [1.0, 2.0], [3.0, 6.0]) == [3.0, 4.0]  # d_0 = 2
    assert run(hook, [1.0, 2.0], [11.0, 6.0]) == [11.0, 12.0]  # a second call: its own d_0 = 10, not the first's
    hook.check(2)


def test_check_refuses_a_pipeline_that_does_not_make_two_calls_per_step():
    hook = script.UncondReuse(5, set(), order=0)
    run(hook, COND[:4], UNCOND[:4])
    with pytest.raises(RuntimeError, match="expected 10 transformer calls"):
        hook.check(1)


def test_interval_rule_skips_between_the_warm_up_and_the_last_step():
    assert script.interval_skips(10, 2, 3) == (4, 6, 8)
    assert script.interval_skips(10, 3, 2) == (3, 4, 6, 7)
    assert script.interval_skips(4, 2, 3) == ()
