"""Wall-clock timing that is honest on CPU and GPU: synchronize around the timed region, report medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Run ``fn`` once and return (seconds, result), synchronizing the device before and after."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
