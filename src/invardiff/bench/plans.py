"""The plans ``bench-engine`` runs: the official books, and synthetic plans of a target FLOP-ideal speedup.

A family without official books (Wan, HunyuanVideo) is benchmarked on synthetic plans named
``"<family>/synthetic-2x"`` and ``"<family>/synthetic-3x"``: built on the benchmark config's own depth and step count,
they mix step caching and layer-wise reuse of every unit, reaching at least the named FLOP-ideal speedup (and just
over it). They measure how much of the ideal the engine turns into wall-clock speed; their outputs are not meant to
be good. A calibrated plan is benchmarked by file (``invardiff bench-engine --books PLAN.json``): a plan calibrated
on the family's benchmark config, e.g. ``invardiff calibrate --model-config wan-bench --steps 50 ...`` (random
weights: its decisions follow the random model's change rates, which is all an engine benchmark needs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..families import families, get_family
from ..families.model_config import ModelConfig
from ..flops import FlopProfile, profile_flops
from ..model_configs import MODEL_CONFIGS
from ..official import bundled_books, convert_official_book
from ..plan import CachePlan, ModelFacts
from ..stats import ideal_speedup


SYNTHETIC = {"synthetic-2x": 2.0, "synthetic-3x": 3.0}


def bench_plan_names() -> list[str]:
    """Every plan name ``bench-engine`` knows: the official books, and each benchmarked family's synthetic plans."""
    synthetic = [
        f"{spec.name}/{label}" for spec in families() if spec.configs and spec.configs.bench for label in SYNTHETIC
    ]
    return [*bundled_books(), *synthetic]


class UnreachableTarget(ValueError):
    """No synthetic plan reaches the target FLOP-ideal speedup on a config: even with every step but 0-2 and the
    last step-cached, the computed steps and every reused step's head cost more than ``1 / target``."""


def default_bench_plans(family: str, size: str | None = None) -> list[str]:
    """What ``bench-engine --family FAMILY`` runs: the family's official books, else its synthetic plans; with
    ``size`` (``"cpu"``, ``"full"``, ``"tiny"``), only the synthetic plans that the family's benchmark config of that
    size can reach (:class:`UnreachableTarget`)."""
    books = [name for name in bundled_books() if name.split("/")[0] == family]
    if books:
        return books
    names = [f"{family}/{label}" for label in SYNTHETIC]
    if size is None:
        return names
    config = MODEL_CONFIGS[get_family(family).configs.bench[size]]
    return [name for name in names if _reaches(name, config)]


def _reaches(name: str, config: ModelConfig) -> bool:
    try:
        bench_plan(name, config)
    except UnreachableTarget:
        return False
    return True


def is_plan_file(name: str) -> bool:
    """Whether a ``--books`` entry names a plan file rather than a bundled book or synthetic plan."""
    return name.endswith(".json") and Path(name).is_file()


def plan_family(name: str) -> str:
    """The family a ``--books`` entry belongs to: the prefix of a book name, the model family of a plan file."""
    return CachePlan.load(name).model.family if is_plan_file(name) else name.split("/")[0]


def bench_plan(name: str, config: ModelConfig) -> CachePlan:
    """The plan ``name`` (see :func:`bench_plan_names`, or a plan file) for the benchmark config ``config``."""
    if is_plan_file(name):
        plan = CachePlan.load(name)
        depth = get_family(config.family).num_layers(config.build_transformer("meta"))
        try:
            plan.check_model(config.family, depth)
            plan.check_num_steps(config.steps)
        except ValueError as error:
            raise ValueError(
                f"{name} does not fit the benchmark config {config.name}: {error} Calibrate it on that config: "
                f"invardiff calibrate --model-config {config.name} --steps {config.steps} ..."
            ) from None
        return plan
    family, _, label = name.partition("/")
    if label in SYNTHETIC:
        depth = get_family(family).num_layers(config.build_transformer("meta"))
        facts = ModelFacts.for_family(family, depth)
        return synthetic_plan(facts, config.steps, SYNTHETIC[label], profile_flops(config))
    books = bundled_books()
    if name not in books:
        raise ValueError(f"Unknown benchmark plan {name!r}; available: {bench_plan_names()}.")
    return convert_official_book(books[name], family)


def synthetic_plan(facts: ModelFacts, num_steps: int, target: float, flops: FlopProfile) -> CachePlan:
    """The first plan along a fixed sequence of reuse moves whose FLOP-ideal speedup reaches ``target``.

    Steps 0-2 and the last step always compute. The moves alternate between step-caching an odd step and reusing
    every unit at an even step (each from the start of the run), so both execution paths are in the plan. Where the
    units are too small a share of the FLOPs for that to reach the target (CogView4 reuses its joint attention
    only), the even steps are then step-cached too, again from the start.
    """
    T = num_steps
    step_moves = [(t, True) for t in range(3, T - 1, 2)]
    unit_moves = [(t, False) for t in range(4, T - 1, 2)]
    moves = [move for pair in zip(step_moves, unit_moves, strict=False) for move in pair]
    moves += step_moves[len(unit_moves) :] + unit_moves[len(step_moves) :]
    moves += [(t, True) for t, _ in unit_moves]
    step_cache = np.zeros(T, dtype=bool)
    reused_rows = np.zeros(T, dtype=bool)
    for t, cache_step in moves:
        step_cache[t] |= cache_step
        reused_rows[t] = not cache_step  # a step-cached step runs no unit
        plan = _plan(facts, step_cache, reused_rows, target)
        if ideal_speedup(plan, flops) >= target:
            return plan
    raise UnreachableTarget(f"No synthetic plan over {T} steps reaches an ideal speedup of {target}x.")


def _plan(facts: ModelFacts, step_cache: np.ndarray, reused_rows: np.ndarray, target: float) -> CachePlan:
    reuse = {
        block.name: {kind: np.repeat(reused_rows[:, None], block.num_layers, axis=1) for kind in block.module_kinds}
        for block in facts.block_lists
    }
    provenance = {"policy": "synthetic", "target_ideal_speedup": target}
    return CachePlan(facts, len(step_cache), step_cache.copy(), reuse, provenance=provenance)
