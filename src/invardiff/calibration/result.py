"""What a budgeted search returns (``search.py``, and the second-order refit of its plans, ``second_order.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import CachePlan


@dataclass
class SearchResult:
    plan: CachePlan
    error: float  # the calibration-set error of the plan under the additive model
    step_error: float
    unit_error: float
    ideal_speedup: float
