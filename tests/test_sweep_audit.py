"""benchmarks/sweep_audit.py's verdicts and method names, on hand-made records."""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_audit as script  # noqa: E402


def test_recorded_methods_map_to_the_bench_methods_that_make_them():
    assert script.sweep_methods("invardiff") == {"invardiff", "invardiff-grid"}  # presets and grid plans
    assert script.sweep_methods("invardiff-search+extrap") == {"invardiff-search+extrap"}
    assert script.sweep_methods("dicache-batch-global") == {"dicache"}
    assert script.sweep_methods("plan+probe-batch-global") == {"plan+probe"}
    assert script.sweep_methods("diffusers-magcache") == script.sweep_methods("cache-dit") == {"peers"}


def test_a_point_differs_past_the_tolerance_and_fails_when_only_one_side_raised():
    ran = {"psnr": 30.0}
    assert script.compare(ran, 30.09, None, 0.1) == "same" and script.compare(ran, 29.91, None, 0.1) == "same"
    assert script.compare(ran, 30.11, None, 0.1) == "differs" and script.compare(ran, 29.89, None, 0.1) == "differs"
    assert script.compare(ran, None, "AssertionError()", 0.1) == "fails"
    assert script.compare({"error": "AssertionError()"}, None, "AssertionError()", 0.1) == "same"
    assert script.compare({"error": "AssertionError()"}, 25.0, None, 0.1) == "fails"


def test_a_point_equal_to_full_compute_before_and_now_is_the_same():
    identical = {"psnr": float("inf")}  # a point that reused nothing: its output equals full compute's
    assert script.compare(identical, float("inf"), None, 0.1) == "same"
    assert script.compare(identical, 48.0, None, 0.1) == "differs"
    assert script.compare({"psnr": 48.0}, float("inf"), None, 0.1) == "differs"
