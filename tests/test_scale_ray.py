"""Data-parallel generation and sharded calibration on a local Ray cluster (2 CPUs) with the bundled DiT: the
images equal the single-process ones bit for bit for every policy, a killed worker loses and duplicates nothing, a
rerun skips what is done, a calibration sharded over 2 workers gives the single-process plan byte for byte.
About 1-2 min on 2 busy cores (Ray start, actors loading the model): python -m pytest -q tests/test_scale_ray.py"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

import invardiff
from invardiff.dicache import DiCacheConfig, PlanProbeConfig
from invardiff.models import get, load
from invardiff.scale import PipelineSource, work_items

from helpers import facts_for, plan_from_bits


ray = pytest.importorskip("ray")
from invardiff.bench.points import dicache_point  # noqa: E402
from invardiff.bench.sweep import SweepInputs, run_sweep  # noqa: E402
from invardiff.calibration import calibrate  # noqa: E402
from invardiff.scale.actors import Workers  # noqa: E402
from invardiff.scale.bench import run_sweep_on_ray  # noqa: E402
from invardiff.scale.calibrate import calibrate_on_ray  # noqa: E402
from invardiff.scale.ray_pool import GenerationPool  # noqa: E402  (after the Ray check)


pytestmark = pytest.mark.slow
MODEL, STEPS = "dit-digits", 6
SOURCE = PipelineSource("bundled", MODEL)
ITEMS = work_items([0, 3, 5, 8], seeds=[0, 1])
# half a CPU each: the generation pool and a calibration or sweep pool fit together on the 2-CPU cluster
HALF_CPU_WORKERS = Workers(2, cpus=0.5)


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with GenerationPool(SOURCE, HALF_CPU_WORKERS, steps=STEPS) as pool:
            yield pool
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pipe():
    return load(MODEL)


def _policies(pipe) -> dict:
    plan = plan_from_bits(facts_for(pipe.transformer, "dit"), "001101")
    return {
        "none": None,
        "plan": plan,
        "dicache": DiCacheConfig.preset("flux", threshold=0.5, warmup_ratio=0.0),
        "plan+probe": PlanProbeConfig(plan, threshold=0.3),
    }


def _single_process(pipe, policy, items) -> tuple[dict, dict]:
    """SHA-256 of each item's float output and its step statuses, from plain pipeline calls in this process."""
    digests, steps = {}, {}
    if policy is not None:
        invardiff.enable(pipe, policy)
    try:
        for item in items:
            kwargs = get(MODEL).call_kwargs(item.input, item.seed, num_inference_steps=STEPS, output_type="np")
            image = np.ascontiguousarray(pipe(**kwargs).images[0])
            digests[item.key] = hashlib.sha256(image.tobytes()).hexdigest()
            if policy is not None:
                summary = invardiff.summary(pipe).to_dict()
                steps[item.key] = {name: branch["steps"] for name, branch in summary["branches"].items()}
    finally:
        if policy is not None:
            invardiff.disable(pipe)
    return digests, steps


def _records(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["none", "plan", "dicache", "plan+probe"])
def test_ray_images_equal_single_process_bit_for_bit(pool, pipe, tmp_path, name):
    policy = _policies(pipe)[name]
    report = pool.run(ITEMS, tmp_path, policy)
    digests, steps = _single_process(pipe, policy, ITEMS)
    records = {r["key"]: r for r in _records(tmp_path)}
    assert report.generated == len(ITEMS) == len(records)
    assert {key: r["output_sha256"] for key, r in records.items()} == digests
    assert len({r["worker"] for r in records.values()}) == 2  # both workers took part
    if policy is None:
        assert all(r["policy"] is None for r in records.values())
    else:  # the manifest carries each item's policy summary, equal to the single-process one
        branches = {key: r["policy"]["branches"] for key, r in records.items()}
        assert {key: {n: b["steps"] for n, b in per_key.items()} for key, per_key in branches.items()} == steps
        assert {r["policy"]["policy"] for r in records.values()} == {name}


def test_killed_worker_loses_and_duplicates_nothing(pool, pipe, tmp_path):
    items = work_items(list(range(10)), seeds=[7])
    killed = []

    def kill_first_worker_once(item):
        if not killed:
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])  # mid-run: it holds batches in flight

    report = pool.run(items, tmp_path, None, progress=kill_first_worker_once)
    records = _records(tmp_path)
    assert killed and killed[0] not in pool.actors and len(pool.actors) == 2  # replaced
    assert report.generated == len(items)
    assert sorted(r["key"] for r in records) == sorted(item.key for item in items)  # each item once
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{i.key}.png" for i in items] + ["manifest.jsonl"])
    digests, _ = _single_process(pipe, None, items)
    assert {r["key"]: r["output_sha256"] for r in records} == digests


def test_rerun_skips_finished_items(pool, tmp_path):
    first = pool.run(ITEMS[:3], tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    again = pool.run(ITEMS, tmp_path)
    assert (first.generated, first.skipped) == (3, 0)
    assert (again.generated, again.skipped) == (len(ITEMS) - 3, 3)
    assert len(_records(tmp_path)) == len(ITEMS)
    assert all(tmp_path.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert pool.run(ITEMS, tmp_path).generated == 0


def test_sharded_calibration_gives_the_single_process_plan_byte_for_byte(pool, pipe, tmp_path):
    options = {"num_inference_steps": 8, "thresholds": "fast", "class_labels": [0, 3, 5, 8, 2], "batch_size": 2}
    single_plan, single_rates = calibrate(pipe, **options)
    seen = []
    plan, rates = calibrate_on_ray(pipe, SOURCE, HALF_CPU_WORKERS, lambda *args: seen.append(args), **options)
    single_plan.save(tmp_path / "single.json")
    plan.save(tmp_path / "sharded.json")
    assert (tmp_path / "sharded.json").read_bytes() == (tmp_path / "single.json").read_bytes()
    for which in ("first", "corrected"):
        step, modules = getattr(rates, f"{which}_step"), getattr(rates, f"{which}_modules")
        np.testing.assert_array_equal(step, getattr(single_rates, f"{which}_step"))
        for kind, values in getattr(single_rates, f"{which}_modules").items():
            np.testing.assert_array_equal(modules[kind], values)
    assert rates.num_runs == 5 and plan.step_cache.any()  # the plan reuses something: pass 2 mattered
    assert [args[0][:6] for args in seen].count("pass 2") == 3  # 3 batches of at most 2 runs


def _few_steps(pipe, entry, cases):
    images = []
    for item, seed in cases:
        kwargs = entry.call_kwargs(item, seed, num_inference_steps=STEPS, output_type="pt")
        images.append(pipe(**kwargs).images)
    return torch.cat(images)  # (N, C, H, W) in [0, 1]


def test_sweep_points_on_ray_measure_what_one_process_measures(pool, tmp_path):
    entry = get(MODEL)
    cases = [(3, 0), (8, 1)]
    inputs = SweepInputs(MODEL, lambda: load(MODEL), lambda p: _few_steps(p, entry, cases), cases, torch.device("cpu"))
    points = [dicache_point("dit", threshold) for threshold in (0.1, 0.5)]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    single = run_sweep(inputs, points, rounds=1)
    arrived = []
    on_ray = run_sweep_on_ray(inputs, points, 1, arrived.append, source=SOURCE, workers=HALF_CPU_WORKERS)
    assert len(arrived) == 2 and [r["label"] for r in on_ray] == [p.label for p in points]
    for mine, theirs in zip(on_ray, single, strict=True):  # the timing differs; nothing else may
        for key in ("psnr", "ssim", "ideal_speedup", "executed"):
            assert mine[key] == theirs[key], key
