"""Property-based fuzz of the plan and official-book loaders (plan_fuzz.py): every mutated file is a PlanError, or a
plan that runs in the engine on a tiny model of its layout. 120 examples, about 2 s idle; the long run (10,000+ cases
per family) is benchmarks/plan_fuzz.py."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import toy_family  # noqa: F401 - registers the toy families, fuzzed like the built-in ones
from plan_fuzz import fuzz_families, official_families, run_case


CASES = [(family, "plan") for family in fuzz_families()] + [(family, "book") for family in official_families()]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), level=st.sampled_from(["dict", "text"]), data=st.data())
def test_mutated_plans_are_plan_errors_or_run(case, level, data, tmp_path):
    family, form = case
    outcome = run_case(family, form, level, lambda low, high: data.draw(st.integers(low, high)), tmp_path)
    assert outcome.kind in ("rejected", "ran"), outcome.detail
