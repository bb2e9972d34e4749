"""`calibrate_budget(verify=True)`: each target's plan is the candidate (one search per cap on reused runs) whose
sampled outputs on the calibration inputs come closest to full compute's, on a tiny random-weight DiT."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import invardiff
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.budget import calibrate_budget, verified_plans, verify_grid
from invardiff.calibration.search import BudgetError, SearchConfig, search_plan
from invardiff.calibration.trajectory import record_trajectories
from invardiff.flops import profile_flops
from invardiff.policies.plan import PlanConfig
from invardiff.stats import ideal_speedup

from helpers import tiny_pipeline


STEPS, CASES = 10, [(1, 0), (2, 1)]
KWARGS = {"num_inference_steps": STEPS, "guidance_scale": 1.0, "output_type": "np"}


def _sample(pipe) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for _, seed in CASES]
    images = pipe(class_labels=[label for label, _ in CASES], generator=generators, **KWARGS).images
    return torch.as_tensor(np.asarray(images)).float()


def test_verified_search_keeps_the_candidate_of_least_output_error():
    _, pipe = tiny_pipeline("dit")
    results, stats = calibrate_budget(
        pipe, num_inference_steps=STEPS, cases=CASES, speedups=[2.0, 2.5], window=4, verify=True,
        pipeline_kwargs={"guidance_scale": 1.0},  # the default is the pipeline's (DiTPipeline: 4.0); _sample's
    )  # fmt: skip
    flops = profile_flops(pipeline_call_config(pipe, "dit", KWARGS))
    reference = _sample(pipe)
    assert [r.plan.provenance["search"]["speedup"] for r in results] == [2.0, 2.5]
    counts = []
    for result in results:
        verified = result.plan.provenance["search"]["verified"]
        errors = [c["output_mse"] for c in verified["candidates"]]
        assert verified["output_mse"] == min(errors)
        assert ideal_speedup(result.plan, flops) >= result.plan.provenance["search"]["speedup"]
        # Every recorded candidate error is the error of that setting's searched plan, sampled here independently.
        settings = {(c["max_run"], c["reuse_units"], c["last_step_units"]) for c in verified["candidates"]}
        seen = []
        speedup = result.plan.provenance["search"]["speedup"]
        for max_run, units, last, _ in verify_grid(SearchConfig(speedup)):  # no extrapolation asked: none tried
            config = SearchConfig(speedup, max_run=max_run, reuse_units=units, last_step_units=last)
            try:
                plan = search_plan(stats, flops, config).plan
            except BudgetError:
                continue
            if any(
                (plan.step_cache == p.step_cache).all()
                and plan.to_dict()["module_reuse"] == p.to_dict()["module_reuse"]
                for p in seen
            ):
                continue  # the same decisions as a smaller cap: measured once
            seen.append(plan)
            key = (plan.provenance["search"]["max_run"], units, last)
            assert key in settings
            with invardiff.enabled(pipe, plan):
                error = float(((_sample(pipe) - reference) ** 2).mean())
            recorded = next(
                c for c in verified["candidates"] if (c["max_run"], c["reuse_units"], c["last_step_units"]) == key
            )
            # the same runs; the float32 reductions of the CPU kernels may split differently between calls
            assert recorded["output_mse"] == pytest.approx(error, rel=1e-5)
        assert len(seen) == len(verified["candidates"])
        counts.append(len(seen))
    assert max(counts) >= 2  # some target had a choice to make


def test_without_verify_the_plans_are_the_plain_search():
    _, pipe = tiny_pipeline("dit")
    results, stats = calibrate_budget(pipe, num_inference_steps=STEPS, cases=CASES, speedups=[2.0], window=4)
    flops = profile_flops(pipeline_call_config(pipe, "dit", KWARGS))
    plain = search_plan(stats, flops, replace(SearchConfig(2.0)))
    assert results[0].plan == plain.plan and "verified" not in results[0].plan.provenance["search"]


@pytest.mark.slow
def test_refined_plans_move_computed_steps_only_to_lower_sampled_error():
    _, pipe = tiny_pipeline("dit")
    results, stats = calibrate_budget(
        pipe, num_inference_steps=STEPS, cases=CASES, speedups=[2.5], window=4, verify=True, refine=2,
        pipeline_kwargs={"guidance_scale": 1.0},
    )  # fmt: skip
    flops = profile_flops(pipeline_call_config(pipe, "dit", KWARGS))
    search = results[0].plan.provenance["search"]
    moves = search["refined"]["moves"]
    assert moves[0][1] == search["verified"]["output_mse"]  # the descent starts at the verified plan
    errors = [error for _, error in moves]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors) and len(moves) <= 3
    assert np.flatnonzero(~results[0].plan.step_cache).tolist() == moves[-1][0]
    assert ideal_speedup(results[0].plan, flops) >= 2.5
    reference = _sample(pipe)
    with invardiff.enabled(pipe, results[0].plan):
        error = float(((_sample(pipe) - reference) ** 2).mean())
    assert error == pytest.approx(errors[-1], rel=1e-5)  # the kept plan is the one whose error was recorded


def test_verified_selection_samples_candidates_with_the_step_reuse_they_run_with():
    _, pipe = tiny_pipeline("dit")
    stats = record_trajectories(
        pipe, num_inference_steps=STEPS, cases=CASES, window=4, pipeline_kwargs={"guidance_scale": 1.0}
    )
    flops = profile_flops(pipeline_call_config(pipe, "dit", KWARGS))
    config = SearchConfig(2.5, reuse_units=False)
    with pytest.raises(ValueError, match="search without extrapolate_steps"):
        verified_plans(
            pipe, stats, flops, [2.5], replace(config, extrapolate_steps=True), CASES, KWARGS, step_reuse="residual"
        )
    (result,) = verified_plans(pipe, stats, flops, [2.5], config, CASES, KWARGS, step_reuse="residual")
    search = result.plan.provenance["search"]
    assert search["step_reuse"] == "residual"
    reference = _sample(pipe)
    errors = {}
    for reuse in ("state", "residual"):
        with invardiff.enabled(pipe, PlanConfig(result.plan, step_reuse=reuse)):
            errors[reuse] = float(((_sample(pipe) - reference) ** 2).mean())
    # The recorded error is the residual run's (the CPU's float32 reductions may split differently between calls),
    # which differs from the state run's: the candidates were sampled with residual reuse.
    assert search["verified"]["output_mse"] == pytest.approx(errors["residual"], rel=1e-5)
    assert errors["state"] != pytest.approx(errors["residual"], rel=1e-2)
