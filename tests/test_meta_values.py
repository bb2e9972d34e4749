"""invardiff.meta_values: constant meta tensors carry their value, so the few value reads of a stock forward (masks,
flags) get exact answers on the meta device, and a read of an unknown value fails by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invardiff.meta_values import MetaValueError, MetaValues


def test_scalar_reads_of_constant_meta_tensors_are_exact():
    with MetaValues():
        zeros = torch.zeros(2, 729, 16, device="meta")
        assert bool(torch.all(zeros == 0)) is True  # HunyuanVideo-1.5's text-to-video test
        assert bool(torch.all(zeros + 1 == 0)) is False
        assert torch.full((3,), 2.5, device="meta").sum(dim=0, keepdim=False).shape == ()
        assert bool(torch.ones(4, device="meta").bool().any()) is True
        assert bool(torch.zeros((0,), device="meta").bool().all()) is True  # empty: all() of nothing


def test_nonzero_and_boolean_indexing_follow_the_constant():
    with MetaValues():
        rows = torch.empty(5, 3, device="meta")
        mask = torch.ones(2, 5, device="meta").bool()
        first = mask[0]  # a view of a constant keeps it
        assert rows[first].shape == (5, 3)
        assert rows[~first].shape == (0, 3)
        assert torch.nonzero(mask).shape == (10, 2)
        assert torch.nonzero(~mask).shape == (0, 2)
        for row in mask:  # iterating (unbind) keeps the constant in every row
            assert rows[row].shape == (5, 3)
        padded = F.pad(mask, (2, 0), value=True)  # a pad of the same value keeps it
        assert torch.nonzero(padded).shape == (14, 2)


def test_a_value_that_is_not_known_fails_by_name():
    with MetaValues():
        random = torch.randn(4, device="meta")
        with pytest.raises(MetaValueError, match=r"shape \(\) was read as a Python scalar"):
            bool(torch.all(random == 0))
        with pytest.raises(MetaValueError, match="passed to nonzero"):
            torch.nonzero(random)
        mixed = F.pad(torch.ones(3, device="meta").bool(), (1, 0), value=False)  # not one constant any more
        with pytest.raises(MetaValueError, match="used as a boolean index"):
            torch.empty(4, device="meta")[mixed]


def test_tensors_on_other_devices_are_left_alone():
    with MetaValues():
        mask = torch.tensor([True, False, True])
        assert torch.nonzero(mask).tolist() == [[0], [2]]
        assert torch.arange(3.0)[mask].tolist() == [0.0, 2.0]
