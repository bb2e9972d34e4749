"""The cache plan: a step gate ``c[t]`` and, per block list and module kind, a ``T x L`` reuse matrix.

A plan is the artefact InvarDiff calibration produces and the engine executes (SPEC.md A.4): row ``t`` is the
denoising step in sampling order, ``True`` means reuse. It is stored as a versioned, self-describing JSON document
that carries the model facts it depends on, so that a plan can never silently run on the wrong model or step count.

File layout (``format_version`` 1)::

    {
      "format": "invardiff-cache-plan", "format_version": 1,
      "written_by": {"invardiff": "0.1.0"},
      "model": {"family": "flux", "class": "FluxTransformer2DModel",
                "block_lists": [{"name": "transformer_blocks", "num_layers": 19,
                                 "module_kinds": ["attn", "context_attn", "ff", "context_ff"]}, ...]},
      "num_inference_steps": 28,
      "scheduler": "FlowMatchEulerDiscreteScheduler",
      "provenance": {"policy": ..., "thresholds": {...}, "calibration": {...}},
      "step_cache": "0010111111...",                                    # one character per step
      "module_reuse": {"transformer_blocks": {"attn": ["000...", ...]}}  # one string per step, a character per layer
    }

Characters are ``"1"`` (reuse) and ``"0"`` (compute), so that one step is one line of a diff.

Format version 2 adds two optional fields, the extrapolation coefficients of reused steps and units
(``plan_extrapolation.py``): ``"step_extrapolation": [c_0, ..., c_(T-1)]`` and ``"unit_extrapolation":
{block_list: {unit: [[c per layer], ...one row per step]}}``. A plan without them is still written as version 1,
and version 1 files read as plans without extrapolation.

Format version 4 adds the optional second-order coefficients of reused steps (``"step_extrapolation2": [c2_0, ...]``
beside ``step_extrapolation``; ``plan_extrapolation.py``). Only plans that have them are written as version 4, so that
an older invardiff refuses them instead of running them as first-order plans.

Format version 3 adds the optional cache storage dtype (``"cache_dtype": "float8_e4m3fn"``, ``engine/storage.py``):
the engine keeps reused values in that dtype. Only plans that set it are written as version 3, so that an older
invardiff refuses them instead of running them at full cache memory.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .families import get_family
from .files import write_text
from .plan_extrapolation import (
    SECOND_ORDER_VERSION,
    extrapolation_from_dict,
    extrapolation_to_dict,
    validate_extrapolation,
)
from .plan_file import PlanError, parse_json, read_json


PLAN_FORMAT = "invardiff-cache-plan"
PLAN_FORMAT_VERSION = 2  # written only by plans with extrapolation coefficients; the others stay version 1
CACHE_DTYPE_VERSION = 3  # written only by plans with a cache storage dtype
READABLE_VERSIONS = (1, 2, 3, SECOND_ORDER_VERSION)


@dataclass(frozen=True)
class BlockListFacts:
    name: str
    num_layers: int
    module_kinds: tuple[str, ...]


@dataclass(frozen=True)
class ModelFacts:
    """The facts about the model that a plan depends on."""

    family: str
    model_class: str
    block_lists: tuple[BlockListFacts, ...]

    @classmethod
    def for_family(cls, family: str, num_layers: dict[str, int]) -> ModelFacts:
        spec = get_family(family)
        lists = tuple(BlockListFacts(b.attr, num_layers[b.attr], b.module_kinds) for b in spec.block_lists)
        return cls(family, spec.transformer_class.__name__, lists)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "class": self.model_class,
            "block_lists": [
                {"name": b.name, "num_layers": b.num_layers, "module_kinds": list(b.module_kinds)}
                for b in self.block_lists
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelFacts:
        """Validate and rebuild; raises :class:`PlanError` naming the problem."""
        return _model_from_dict(data)


@dataclass
class CachePlan:
    """A binary cache plan for one model family, layer layout and step count.

    Attributes:
        model: the model facts the plan depends on (family, class, layers per block list, module kinds).
        num_inference_steps: T, the number of denoising steps (transformer calls per CFG branch).
        step_cache: ``(T,)`` bool array, ``True`` where the whole step reuses the cached pre-head hidden state.
        module_reuse: ``{block_list: {kind: (T, L) bool array}}``, ``True`` where the module reuses its last
            computed output. Rows of step-cached steps are never executed.
        scheduler: class name of the scheduler the plan was made for (informational, checked by nothing).
        provenance: how the plan was made (policy, thresholds, calibration inputs, source file).
        written_by: versions of the software that wrote the plan.
        step_extrapolation: ``(T,)`` float coefficients (format version 2), or ``None``: a reused step ``t`` returns
            ``H_a + c_t (H_a - H_p)`` from the last two computed pre-head states ``H_p``, ``H_a`` instead of ``H_a``
            (``c_t = 0``: plain reuse). Fitted by least squares on calibration trajectories
            (:mod:`invardiff.calibration.search`); nonzero only at step-cached steps.
        unit_extrapolation: ``{block_list: {unit: (T, L) float}}`` (version 2), or ``None``: the same for reused
            units (keyed by executable unit, e.g. Flux's joint ``attn``); nonzero only where the unit is reused.
        cache_dtype: the dtype the engine stores reused values in (format version 3; ``engine/storage.py``:
            ``float32``, ``bfloat16``, ``float16``, ``float8_e4m3fn`` with a per-tensor scale), or ``None``: the
            model's dtype. Not with extrapolation coefficients.
        step_extrapolation2: ``(T,)`` float second-order coefficients (format version 4, with
            ``step_extrapolation``), or ``None``: a reused step ``t`` adds ``c2_t (H_a - 2 H_p + H_q)`` from the last
            three computed states. Nonzero only at step-cached steps with three computed steps before them. The
            anchor of such a run keeps three states instead of two.

    Trade-off: a plan that reuses more runs faster and drifts further from full compute; see ``invardiff inspect``
    for the compute a plan removes before running it.
    """

    model: ModelFacts
    num_inference_steps: int
    step_cache: np.ndarray
    module_reuse: dict[str, dict[str, np.ndarray]]
    scheduler: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    written_by: dict[str, str] = field(default_factory=lambda: {"invardiff": __version__})
    step_extrapolation: np.ndarray | None = None
    unit_extrapolation: dict[str, dict[str, np.ndarray]] | None = None
    cache_dtype: str | None = None
    step_extrapolation2: np.ndarray | None = None

    def __post_init__(self):
        self.step_cache = np.asarray(self.step_cache, dtype=bool)
        self.module_reuse = {
            name: {kind: np.asarray(matrix, dtype=bool) for kind, matrix in kinds.items()}
            for name, kinds in self.module_reuse.items()
        }
        if self.step_extrapolation is not None:
            self.step_extrapolation = np.asarray(self.step_extrapolation, dtype=np.float64)
        if self.step_extrapolation2 is not None:
            self.step_extrapolation2 = np.asarray(self.step_extrapolation2, dtype=np.float64)
        if self.unit_extrapolation is not None:
            self.unit_extrapolation = {
                name: {unit: np.asarray(matrix, dtype=np.float64) for unit, matrix in units.items()}
                for name, units in self.unit_extrapolation.items()
            }
        validate_plan(self)
        validate_extrapolation(self)
        _validate_cache_dtype(self)

    @property
    def extrapolates(self) -> bool:
        """The plan carries extrapolation coefficients (format version 2 or 4)."""
        return self.step_extrapolation is not None or self.unit_extrapolation is not None

    def step_extrapolation_order(self) -> np.ndarray:
        """``(T,)`` int: the order each step is extrapolated with (0: computed, or reused plainly; 1; 2)."""
        order = np.zeros(self.num_inference_steps, dtype=int)
        if self.step_extrapolation is not None:
            order[self.step_extrapolation != 0] = 1
        if self.step_extrapolation2 is not None:
            order[self.step_extrapolation2 != 0] = 2
        return order

    # ----- construction -----
    @classmethod
    def reuse_nothing(cls, model: ModelFacts, num_inference_steps: int, **header) -> CachePlan:
        """A plan that computes everything: executing it must give output bit-identical to the stock model."""
        T = num_inference_steps
        reuse = {b.name: {k: np.zeros((T, b.num_layers), bool) for k in b.module_kinds} for b in model.block_lists}
        return cls(model, T, np.zeros(T, bool), reuse, **header)

    # ----- queries -----
    @property
    def num_steps(self) -> int:
        return self.num_inference_steps

    def executed_steps(self) -> np.ndarray:
        """Indices of the steps that run the block stack (not step-cached)."""
        return np.flatnonzero(~self.step_cache)

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        version = 1
        if self.cache_dtype:
            version = CACHE_DTYPE_VERSION
        elif self.step_extrapolation2 is not None:
            version = SECOND_ORDER_VERSION
        elif self.extrapolates:
            version = PLAN_FORMAT_VERSION
        return {
            "format": PLAN_FORMAT,
            "format_version": version,
            "written_by": dict(self.written_by),
            "model": self.model.to_dict(),
            "num_inference_steps": self.num_inference_steps,
            "scheduler": self.scheduler,
            "provenance": copy.deepcopy(self.provenance),
            "step_cache": _bits_to_str(self.step_cache),
            "module_reuse": {
                name: {kind: [_bits_to_str(row) for row in matrix] for kind, matrix in kinds.items()}
                for name, kinds in self.module_reuse.items()
            },
            **extrapolation_to_dict(self),
            **({"cache_dtype": self.cache_dtype} if self.cache_dtype else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CachePlan:
        """Rebuild a plan, validating everything; raises :class:`PlanError` naming the first problem found."""
        return _plan_from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the plan as UTF-8 JSON, atomically; refuses (:class:`PlanError`) what :meth:`load` would refuse (a
        NaN, a huge integer or deep nesting in the provenance), so that a saved plan always loads."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"
        parse_json(text.encode("utf-8"), path, "an invardiff plan file")
        write_text(path, text)  # atomically: a failed write leaves the old file, never a truncated one

    @classmethod
    def load(cls, path: str | Path) -> CachePlan:
        """Read and validate a plan file; any problem (missing, unreadable, not UTF-8 JSON, too large or deep,
        malformed) is a :class:`PlanError` naming the file and the field (``plan_file.py`` states the limits)."""
        data = read_json(path, "an invardiff plan file")
        try:
            return cls.from_dict(data)
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachePlan) and self.to_dict() == other.to_dict()

    # ----- checks against a model and a call -----
    def check_model(self, family: str, num_layers: dict[str, int]) -> None:
        """Raise :class:`PlanError` unless the plan was made for this family and layer layout."""
        if family != self.model.family:
            raise PlanError(
                f"The plan is for model family {self.model.family!r} ({self.model.model_class}) but the model is of "
                f"family {family!r}. Use a plan calibrated for this model."
            )
        for facts in self.model.block_lists:
            if num_layers.get(facts.name) != facts.num_layers:
                raise PlanError(
                    f"The plan expects {facts.num_layers} blocks in {facts.name!r} but the model has "
                    f"{num_layers.get(facts.name)}. Use a plan made for this model's depth."
                )

    def check_num_steps(self, num_steps: int) -> None:
        if num_steps != self.num_inference_steps:
            raise PlanError(
                f"The plan is for {self.num_inference_steps} inference steps but the run has {num_steps}. Call the "
                f"pipeline with num_inference_steps={self.num_inference_steps}, or use a plan made for {num_steps}."
            )


def _bits_to_str(bits: np.ndarray) -> str:
    return "".join("1" if bit else "0" for bit in bits)


def _str_to_bits(text: Any, length: int, where: str) -> np.ndarray:
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise PlanError(f"{where} must be a string of '0' (compute) and '1' (reuse) characters, got {text!r:.60}.")
    if len(text) != length:
        raise PlanError(f"{where} must have {length} characters, got {len(text)}.")
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def _require(data: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in data:
        raise PlanError(f"{where} is missing the field {key!r}.")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PlanError(f"{where}.{key} must be of type {names}, got {type(value).__name__} ({value!r:.60}).")
    return value


def _model_from_dict(data: Any) -> ModelFacts:
    if not isinstance(data, dict):
        raise PlanError(f"'model' must be an object, got {type(data).__name__}.")
    family = _require(data, "family", str, "model")
    try:
        spec = get_family(family)
    except ValueError as error:
        raise PlanError(str(error)) from None
    model_class = _require(data, "class", str, "model")
    if model_class != spec.transformer_class.__name__:
        raise PlanError(
            f"model.class is {model_class!r} but family {family!r} is {spec.transformer_class.__name__!r}."
        )
    lists = _require(data, "block_lists", list, "model")
    expected_names = [b.attr for b in spec.block_lists]
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in lists]
    if names != expected_names:
        raise PlanError(f"model.block_lists for family {family!r} must be {expected_names}, got {names}.")
    facts = []
    for entry, block_spec in zip(lists, spec.block_lists, strict=True):
        where = f"model.block_lists[{block_spec.attr}]"
        num_layers = _require(entry, "num_layers", int, where)
        if num_layers < 1:
            raise PlanError(f"{where}.num_layers must be a positive integer, got {num_layers}.")
        kinds = _require(entry, "module_kinds", list, where)
        if not all(isinstance(kind, str) for kind in kinds):
            raise PlanError(
                f"{where}.module_kinds must be a list of names {list(block_spec.module_kinds)}, got {kinds!r:.80}."
            )
        if sorted(kinds) != sorted(block_spec.module_kinds):
            unknown = sorted(set(kinds) - set(block_spec.module_kinds))
            missing = sorted(set(block_spec.module_kinds) - set(kinds))
            raise PlanError(
                f"{where}.module_kinds must be {list(block_spec.module_kinds)} for family {family!r}; "
                f"unknown: {unknown}, missing: {missing}."
            )
        facts.append(BlockListFacts(block_spec.attr, num_layers, block_spec.module_kinds))
    return ModelFacts(family, model_class, tuple(facts))


def _plan_from_dict(data: Any) -> CachePlan:
    if not isinstance(data, dict):
        raise PlanError(f"A plan must be a JSON object, got {type(data).__name__}.")
    if data.get("format") == "invardiff-expert-plans":  # expert_plans.EXPERT_PLANS_FORMAT (it imports this module)
        raise PlanError(
            "This holds one plan per expert of a pipeline that switches transformers (Wan2.2), not one plan: read "
            "it with invardiff.load_plan(path) or invardiff.ExpertPlans.load(path)."
        )
    if data.get("format") != PLAN_FORMAT:
        raise PlanError(
            f"Unknown plan format {data.get('format')!r}; expected {PLAN_FORMAT!r}. Official InvarDiff cache books "
            f"must first be converted with `invardiff convert-official`."
        )
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise PlanError(
            f"Unsupported plan format_version {version!r}; this invardiff ({__version__}) reads versions "
            f"{list(READABLE_VERSIONS)}. Upgrade invardiff or rebuild the plan."
        )
    model = _model_from_dict(data.get("model"))
    T = _require(data, "num_inference_steps", int, "plan")
    if T < 1:
        raise PlanError(f"plan.num_inference_steps must be a positive integer, got {T}.")
    scheduler = data.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str):
        raise PlanError(f"plan.scheduler must be a class name or null, got {scheduler!r}.")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise PlanError(f"plan.provenance must be an object, got {type(provenance).__name__}.")
    written_by = data.get("written_by", {})
    if not isinstance(written_by, dict):
        raise PlanError(f"plan.written_by must be an object, got {type(written_by).__name__}.")
    step_cache = _str_to_bits(data.get("step_cache"), T, "plan.step_cache")
    module_reuse = _module_reuse_from_dict(_require(data, "module_reuse", dict, "plan"), model, T)
    steps, units, second = extrapolation_from_dict(data, version, model, T)
    cache_dtype = data.get("cache_dtype")
    if cache_dtype is not None and version < CACHE_DTYPE_VERSION:
        raise PlanError(f"plan.cache_dtype needs format_version {CACHE_DTYPE_VERSION}, but the file says {version}.")
    if version == CACHE_DTYPE_VERSION and cache_dtype is None:
        raise PlanError(f"format_version {CACHE_DTYPE_VERSION} is for plans with a cache_dtype; this one has none.")
    plan = CachePlan(
        model, T, step_cache, module_reuse, scheduler, provenance, written_by, steps, units, cache_dtype, second
    )
    return plan


def _module_reuse_from_dict(data: dict, model: ModelFacts, T: int) -> dict[str, dict[str, np.ndarray]]:
    expected = [b.name for b in model.block_lists]
    if sorted(data) != sorted(expected):
        raise PlanError(f"plan.module_reuse must have the block lists {expected}, got {sorted(data)}.")
    result = {}
    for facts in model.block_lists:
        kinds = data[facts.name]
        where = f"plan.module_reuse.{facts.name}"
        if not isinstance(kinds, dict) or sorted(kinds) != sorted(facts.module_kinds):
            got = sorted(kinds) if isinstance(kinds, dict) else type(kinds).__name__
            raise PlanError(f"{where} must have the module kinds {list(facts.module_kinds)}, got {got}.")
        result[facts.name] = {}
        for kind in facts.module_kinds:
            rows = kinds[kind]
            if not isinstance(rows, list) or len(rows) != T:
                got = len(rows) if isinstance(rows, list) else type(rows).__name__
                raise PlanError(f"{where}.{kind} must be a list of {T} rows (one per step), got {got}.")
            matrix = [_str_to_bits(row, facts.num_layers, f"{where}.{kind}[{t}]") for t, row in enumerate(rows)]
            result[facts.name][kind] = np.stack(matrix)
    return result


def validate_plan(plan: CachePlan) -> None:
    """Check shapes and the rules every executable plan obeys; raise :class:`PlanError` naming the problem."""
    T = plan.num_inference_steps
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise PlanError(f"num_inference_steps must be a positive integer, got {T!r}.")
    if plan.step_cache.shape != (T,):
        raise PlanError(f"step_cache must have shape ({T},), got {plan.step_cache.shape}.")
    if plan.step_cache[0]:
        raise PlanError("step_cache[0] is set, but step 0 has no earlier hidden state to reuse; it must compute.")
    executed = ~plan.step_cache
    for facts in plan.model.block_lists:
        kinds = plan.module_reuse.get(facts.name)
        if kinds is None or sorted(kinds) != sorted(facts.module_kinds):
            raise PlanError(f"module_reuse[{facts.name!r}] must have the kinds {list(facts.module_kinds)}.")
        for kind, matrix in kinds.items():
            if matrix.shape != (T, facts.num_layers):
                raise PlanError(
                    f"module_reuse[{facts.name!r}][{kind!r}] must have shape ({T}, {facts.num_layers}) "
                    f"(steps x layers), got {matrix.shape}."
                )
            _check_reuse_has_source(matrix[executed], np.flatnonzero(executed), f"{facts.name}.{kind}")


def _validate_cache_dtype(plan: CachePlan) -> None:
    from .engine.storage import CACHE_DTYPES

    if plan.cache_dtype is None:
        return
    if plan.cache_dtype not in CACHE_DTYPES:
        raise PlanError(
            f"cache_dtype must be one of {sorted(CACHE_DTYPES)} or absent (the model's dtype), got "
            f"{plan.cache_dtype!r:.60}."
        )
    if plan.extrapolates:
        raise PlanError(
            "A plan cannot have both a cache_dtype and extrapolation coefficients (an extrapolation pair is kept "
            "in the model's dtype); drop one of them."
        )


def _check_reuse_has_source(rows: np.ndarray, steps: np.ndarray, where: str) -> None:
    # A module can only reuse an output computed at an earlier executed step.
    computed_before = np.cumsum(~rows, axis=0) - (~rows)
    orphan = rows & (computed_before == 0)
    if orphan.any():
        t_index, layer = np.argwhere(orphan)[0]
        raise PlanError(
            f"{where} reuses at step {steps[t_index]}, layer {layer}, but that module has not been computed at any "
            f"earlier executed step, so there is nothing to reuse. Set that entry to compute."
        )
