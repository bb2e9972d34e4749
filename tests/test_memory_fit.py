"""Peak cache memory from a plan's decisions (cache_footprint.py) and fitting a plan to a bound (memory_fit.py)."""

import itertools

import numpy as np
import pytest

from invardiff.cache_footprint import ReuseLayout, measure_footprint, peak_cache_bytes, replay_peak
from invardiff.flops import profile_flops
from invardiff.memory import cache_memory
from invardiff.memory_fit import MemoryBoundError, _greedy, _windows, fit_layout, fit_memory, parse_size
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.plan import CachePlan, ModelFacts
from invardiff.stats import ideal_speedup

from helpers import plan_from_bits


# The tiny FLUX plan of test_engine_exact (2 dual + 4 single blocks, 8 steps): reuse runs of every length, the joint
# attention's two kinds disagreeing once, step caching between computed steps.
STEP_ONLY = "00110110"
FLUX_MODULES = {
    "transformer_blocks": {
        "attn": ["00", "00", "11", "11", "01", "00", "11", "00"],
        "context_attn": ["00", "00", "11", "10", "01", "00", "11", "00"],
        "ff": ["00", "11", "11", "00", "10", "11", "00", "00"],
        "context_ff": ["00", "01", "01", "01", "00", "00", "00", "00"],
    },
    "single_transformer_blocks": {
        "attn": ["0000", "1100", "1111", "0011", "0000", "1010", "0000", "0000"],
        "mlp": ["0000", "0011", "0011", "1100", "0000", "0101", "1111", "0000"],
    },
}


@pytest.fixture(scope="module")
def flux_tiny():
    config = MODEL_CONFIGS["flux-tiny"]
    transformer = config.build_transformer("meta")
    from invardiff.families import get_family

    facts = ModelFacts.for_family("flux", get_family("flux").num_layers(transformer))
    return config, facts, measure_footprint(config), profile_flops(config)


def _random_plan(facts, rng, T=8):
    step_cache = rng.random(T) < 0.3
    step_cache[0] = step_cache[-1] = False
    reuse = {}
    for block in facts.block_lists:
        reuse[block.name] = {}
        for kind in block.module_kinds:
            matrix = rng.random((T, block.num_layers)) < 0.6
            matrix[0] = False
            reuse[block.name][kind] = matrix
    return CachePlan(facts, T, step_cache, reuse)


@pytest.mark.parametrize("cache_dtype", [None, "bfloat16", "float8_e4m3fn"])
def test_replayed_peak_equals_the_engine_on_the_meta_device(flux_tiny, cache_dtype):
    config, facts, footprint, _ = flux_tiny
    rng = np.random.default_rng(0)
    plans = [plan_from_bits(facts, STEP_ONLY, FLUX_MODULES)] + [_random_plan(facts, rng)]
    for plan in plans:
        plan.cache_dtype = cache_dtype
        assert peak_cache_bytes(plan, footprint) == cache_memory(plan, config)["peak_cache_bytes"]


def test_cache_dtype_halves_a_float32_plans_peak(flux_tiny):
    # flux-tiny runs in float32: bfloat16 storage is exactly half, fp8 a quarter plus 4 bytes per stored tensor.
    _, facts, footprint, _ = flux_tiny
    plan = plan_from_bits(facts, "00000000", {"transformer_blocks": {"ff": ["00", "11"] + ["00"] * 6}})
    full = peak_cache_bytes(plan, footprint)
    assert peak_cache_bytes(plan, footprint, "bfloat16") * 2 == full
    assert peak_cache_bytes(plan, footprint, "float8_e4m3fn") == full // 4 + 2 * 4


# ----- the fit on hand-made layouts: exact against brute force -----
def _toy_layout(seed: int):
    rng = np.random.default_rng(seed)
    T, U = 7, 4
    executed = np.array([True, True, False, True, True, True, True])
    reuse = (rng.random((T, U)) < 0.55) & executed[:, None]
    reuse[0] = False
    hidden = np.array([0, 2, 0, 0, 0, 0, 0])  # step 2 is step-cached: H is kept after step 1
    return ReuseLayout(reuse, executed, hidden), [2, 0, 3, 1], np.array([3, 5, 2, 4]), np.array([4.0, 7.0, 3.0, 5.0])


def _every_subset(layout, order, sizes, savings):
    """(peak, FLOPs kept) of every subset of the layout's reuses."""
    entries = list(zip(*np.nonzero(layout.reuse), strict=True))
    results = []
    for mask in itertools.product([False, True], repeat=len(entries)):
        reuse = np.zeros_like(layout.reuse)
        for (t, u), kept in zip(entries, mask, strict=True):
            reuse[t, u] = kept
        peak = replay_peak(ReuseLayout(reuse, layout.executed, layout.hidden_after), order, sizes)
        results.append((peak, sum(savings[u] for (t, u), kept in zip(entries, mask, strict=True) if kept)))
    return results


@pytest.mark.parametrize("seed", [0, 2, 4, 6])
def test_fit_is_the_brute_force_optimum_on_toys(seed):
    layout, order, sizes, savings = _toy_layout(seed)
    assert 8 <= layout.reuse.sum() <= 10  # enumerable
    subsets = _every_subset(layout, order, sizes, savings)
    full = replay_peak(layout, order, sizes)
    for bound in range(int(layout.hidden_after.max()), full + 2):
        kept, report = fit_layout(layout, order, sizes, savings, bound)
        assert report["optimal"]
        assert not (kept & ~layout.reuse).any()  # only drops reuses
        peak = replay_peak(ReuseLayout(kept, layout.executed, layout.hidden_after), order, sizes)
        assert peak <= bound
        value = float(savings[np.nonzero(kept)[1]].sum())
        assert value == max(v for p, v in subsets if p <= bound)
        total = float(savings[np.nonzero(layout.reuse)[1]].sum())
        assert total - value >= report["flops_dropped_lower_bound"] - 1e-9  # the bound is a bound


def test_greedy_fill_respects_every_window():
    layout, order, sizes, savings = _toy_layout(1)
    U = len(order)
    rows = _windows(layout, np.flatnonzero(layout.executed), U, 6)
    position = np.argsort(order)
    steps, units = np.nonzero(layout.reuse)
    index = {t: i for i, t in enumerate(np.flatnonzero(layout.executed))}
    keys = np.array([index[t] * U + position[u] for t, u in zip(steps, units, strict=True)])
    sort = np.argsort(keys)
    keys, steps, units = keys[sort], steps[sort], units[sort]
    starts = np.searchsorted(keys, list(rows), side="left")
    ends = np.searchsorted(keys, np.array(list(rows)) + U, side="left")
    keep = _greedy(starts, ends, np.array(list(rows.values()), float), sizes[units].astype(float), savings[units])
    reuse = np.zeros_like(layout.reuse)
    reuse[steps[keep], units[keep]] = True
    assert replay_peak(ReuseLayout(reuse, layout.executed, layout.hidden_after), order, sizes) <= 6
    assert keep.any()


# ----- the fit on a real (tiny) model: the bound holds exactly, too small a bound is an error -----
def test_fitted_plan_holds_the_bound_on_the_engine(flux_tiny):
    config, facts, footprint, flops = flux_tiny
    plan = plan_from_bits(facts, STEP_ONLY, FLUX_MODULES)
    full = peak_cache_bytes(plan, footprint)
    for bound in (full, full - 1, full // 2, footprint.hidden_bytes()):
        fitted = fit_memory(plan, footprint, flops, bound)
        assert cache_memory(fitted, config)["peak_cache_bytes"] <= bound
        assert ideal_speedup(fitted, flops) <= ideal_speedup(plan, flops)
        for name, kinds in fitted.module_reuse.items():  # only reuses were dropped
            for kind, matrix in kinds.items():
                assert not (matrix & ~plan.module_reuse[name][kind]).any()
    assert fit_memory(plan, footprint, flops, full) is plan  # already fits: unchanged
    assert fit_memory(plan, footprint, flops, full - 1).provenance["memory_fit"]["reuses_dropped"] >= 1


def test_bound_below_what_any_fit_needs_is_a_clear_error(flux_tiny):
    _, facts, footprint, flops = flux_tiny
    plan = plan_from_bits(facts, STEP_ONLY, FLUX_MODULES)
    needed = footprint.hidden_bytes()  # the step cache keeps H whatever the units do
    with pytest.raises(MemoryBoundError, match=f"at least {needed} bytes"):
        fit_memory(plan, footprint, flops, needed - 1)
    with pytest.raises(ValueError, match="integer >= 0"):
        fit_memory(plan, footprint, flops, -5)


def test_fit_sets_the_cache_dtype(flux_tiny):
    _, facts, footprint, flops = flux_tiny
    plan = plan_from_bits(facts, STEP_ONLY, FLUX_MODULES)
    bound = peak_cache_bytes(plan, footprint) // 2 + 64
    plain = fit_memory(plan, footprint, flops, bound)
    narrow = fit_memory(plan, footprint, flops, bound, cache_dtype="bfloat16")
    assert narrow.cache_dtype == "bfloat16"
    assert peak_cache_bytes(narrow, footprint) <= bound
    assert ideal_speedup(narrow, flops) == ideal_speedup(plan, flops) > ideal_speedup(plain, flops)


@pytest.mark.parametrize(
    "text, size",
    [("1.5GB", 1_500_000_000), ("1.5GiB", 3 * 2**29), ("800mb", 800_000_000), ("30MiB", 30 * 2**20), ("123", 123)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5 TB", "-3GB", "GB", "1.5x"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


def test_sweep_bound_is_flux1_devs_scaled():
    # invardiff-memory's bound: 1.5 GB on FLUX.1-dev, the same fraction of every unit output and H elsewhere.
    from invardiff.bench.memory_points import FLUX1_DEV_BOUND, every_output_bytes, scaled_bound

    flux1_dev = measure_footprint(MODEL_CONFIGS["flux1-dev"])
    assert abs(scaled_bound(flux1_dev) - FLUX1_DEV_BOUND) <= 1
    assert every_output_bytes(flux1_dev) == cache_memory_all_outputs_flux1_dev()


def cache_memory_all_outputs_flux1_dev() -> int:
    # The engine's all_outputs_bytes of FLUX.1-dev 1024x1024 bf16 (benchmarks/results/cache-memory-full.json).
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).parents[1] / "benchmarks/results/cache-memory-full.json").read_text())
    return next(r["all_outputs_bytes"] for r in rows if r["model_config"] == "flux1-dev")


# ----- step reuse: the fit may turn steps into whole-step reuses; exact against brute force -----
def _small_plan(facts, seed):
    """5 steps, about 8 reused entries at steps 2-4 (brute force: every step subset times every entry subset)."""
    rng = np.random.default_rng(seed)
    T = 5
    reuse = {b.name: {k: np.zeros((T, b.num_layers), dtype=bool) for k in b.module_kinds} for b in facts.block_lists}
    for t in (2, 3, 4):
        for name, kinds in (("transformer_blocks", ("attn", "context_attn")), ("single_transformer_blocks", ("mlp",))):
            layer = int(rng.integers(reuse[name][kinds[0]].shape[1]))
            for kind in kinds:
                reuse[name][kind][t, layer] = True
        if rng.random() < 0.7:
            reuse["transformer_blocks"]["ff"][t, int(rng.integers(2))] = True
    return CachePlan(facts, T, np.zeros(T, dtype=bool), reuse)


def _brute_force_with_steps(plan, footprint, flops, bound):
    from invardiff.cache_footprint import reuse_layout
    from invardiff.memory_fit import _drop_reuses, _reuse_steps

    candidates = [t for t in range(1, plan.num_inference_steps) if reuse_layout(plan, footprint).reuse[t].any()]
    best = None
    for count in range(len(candidates) + 1):
        for steps in itertools.combinations(candidates, count):
            converted = _reuse_steps(plan, list(steps))
            layout = reuse_layout(converted, footprint)
            entries = list(zip(*np.nonzero(layout.reuse), strict=True))
            for mask in range(2 ** len(entries)):
                dropped = np.zeros_like(layout.reuse)
                for i, (t, u) in enumerate(entries):
                    dropped[t, u] = bool(mask >> i & 1)
                candidate = _drop_reuses(converted, footprint, dropped, None)
                if peak_cache_bytes(candidate, footprint) <= bound:
                    speed = ideal_speedup(candidate, flops)
                    best = speed if best is None else max(best, speed)
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_step_reuse_fit_is_the_brute_force_optimum(flux_tiny, seed):
    _, facts, footprint, flops = flux_tiny
    plan = _small_plan(facts, seed)
    full = peak_cache_bytes(plan, footprint)
    hidden = footprint.hidden_bytes()
    for bound in (full // 2, hidden + full // 5, hidden):
        fitted = fit_memory(plan, footprint, flops, bound, step_reuse=1e-9)
        assert peak_cache_bytes(fitted, footprint) <= bound
        record = fitted.provenance["memory_fit"]
        assert record["optimal"]
        assert ideal_speedup(fitted, flops) == pytest.approx(_brute_force_with_steps(plan, footprint, flops, bound))
        assert record["ideal_speedup"]["bound"] == pytest.approx(ideal_speedup(fitted, flops))


def test_step_reuse_is_off_by_default_and_converts_only_candidate_steps(flux_tiny):
    _, facts, footprint, flops = flux_tiny
    plan = _small_plan(facts, 0)
    bound = footprint.hidden_bytes()
    plain = fit_memory(plan, footprint, flops, bound)
    assert not plain.step_cache.any()  # the default only drops reuses
    fitted = fit_memory(plan, footprint, flops, bound, step_reuse=1e-9)
    converted = fitted.provenance["memory_fit"]["step_reuse"]["converted"]
    assert converted and fitted.step_cache[converted].all() and fitted.step_cache.sum() == len(converted)
    assert ideal_speedup(fitted, flops) > ideal_speedup(plain, flops)
    # a step that reuses less than the fraction of its unit FLOPs is never a candidate
    assert fit_memory(plan, footprint, flops, bound, step_reuse=1.0).step_cache.sum() == 0
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        fit_memory(plan, footprint, flops, bound, step_reuse=0)
