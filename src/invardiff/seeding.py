"""Seeded construction of random-weight models that leaves the caller's global random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block with torch's global generators seeded with ``seed``, then restore their state.

    Module constructors draw their initial weights from torch's global generator, so a seeded build must seed it;
    forking it (``torch.random.fork_rng``) keeps the caller's own random stream untouched by loading a model.
    """
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
