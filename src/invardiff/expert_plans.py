"""One cache plan per expert of a pipeline that switches transformers along the schedule (Wan2.2), as one artifact.

Wan2.2 A14B runs ``transformer`` on the high-noise steps (``t >= boundary_ratio * num_train_timesteps``) and
``transformer_2`` on the rest. Each expert has its own weights, so its own change rates, its own plan and its own
step count (counted from 0 at its first step). :class:`ExpertPlans` holds the pair for one step count of the whole
call; ``invardiff.calibrate`` makes it for such a pipeline, :func:`invardiff.enable` takes it as it is (it is a
mapping ``{expert: plan}``) and checks first that the pipeline gives every expert its plan's steps.

File layout (``format_version`` 1), read through ``plan_file.py`` like a single plan (same limits and errors)::

    {
      "format": "invardiff-expert-plans", "format_version": 1,
      "written_by": {"invardiff": "0.1.0"},
      "pipeline": "WanPipeline", "boundary_ratio": 0.875,
      "num_inference_steps": 40,
      "provenance": {...},
      "experts": [                                    # in schedule order; "steps" is [first, stop) of the call
        {"name": "transformer", "steps": [0, 14], "plan": {"format": "invardiff-cache-plan", ...}},
        {"name": "transformer_2", "steps": [14, 40], "plan": {...}}
      ]
    }

Each ``plan`` is a complete cache plan document (``plan.py``), validated as one; its ``num_inference_steps`` must
be the length of its expert's ``steps``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ._version import __version__
from .files import write_text
from .plan import CachePlan, PlanError
from .plan_file import parse_json, read_json


EXPERT_PLANS_FORMAT = "invardiff-expert-plans"
EXPERT_PLANS_FORMAT_VERSION = 1


class ExpertPlans(Mapping):
    """The cache plans of a pipeline's experts for one step count: ``{expert attribute: CachePlan}``.

    Args:
        plans: expert attribute (``"transformer"``, ``"transformer_2"``) -> its plan, in schedule order; a plan
            covers the steps its expert runs, counted from 0.
        num_inference_steps: the steps of the whole pipeline call the plans were made for.
        boundary_ratio: the pipeline's ``boundary_ratio`` when the plans were made (informational: what
            :meth:`check_pipeline` compares is the split of the steps).
        pipeline: the pipeline's class name (informational).
        provenance: how the pair was made (each plan carries its own provenance too).
    """

    def __init__(
        self,
        plans: Mapping[str, CachePlan],
        num_inference_steps: int,
        boundary_ratio: float | None = None,
        pipeline: str | None = None,
        provenance: dict | None = None,
        written_by: dict | None = None,
    ):
        self.plans = dict(plans)
        self.num_inference_steps = num_inference_steps
        self.boundary_ratio = boundary_ratio
        self.pipeline = pipeline
        self.provenance = dict(provenance or {})
        self.written_by = dict(written_by) if written_by is not None else {"invardiff": __version__}
        self._validate()

    # ----- the mapping enable() reads -----
    def __getitem__(self, name: str) -> CachePlan:
        return self.plans[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)

    def steps(self) -> dict[str, tuple[int, int]]:
        """Each expert's ``[first, stop)`` steps of the call, from the plans' lengths in schedule order."""
        ranges, start = {}, 0
        for name, plan in self.plans.items():
            ranges[name] = (start, start + plan.num_inference_steps)
            start += plan.num_inference_steps
        return ranges

    def _validate(self) -> None:
        if len(self.plans) < 2:
            raise PlanError(f"ExpertPlans holds one plan per expert, at least two; got {list(self.plans)}.")
        for name, plan in self.plans.items():
            if not isinstance(plan, CachePlan):
                raise PlanError(f"The plan of expert {name!r} must be a CachePlan, got {type(plan).__name__}.")
        families = {plan.model.family for plan in self.plans.values()}
        if len(families) != 1:
            raise PlanError(f"The experts' plans must be of one model family, got {sorted(families)}.")
        T = self.num_inference_steps
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise PlanError(f"num_inference_steps must be a positive integer, got {T!r}.")
        total = sum(plan.num_inference_steps for plan in self.plans.values())
        if total != T:
            counts = ", ".join(f"{name!r} {plan.num_inference_steps}" for name, plan in self.plans.items())
            raise PlanError(
                f"The experts' plans cover {total} steps ({counts}) but the pair is for {T}: every step of the call "
                f"belongs to exactly one expert."
            )

    # ----- checks against a pipeline -----
    def check_pipeline(self, pipe, experts: tuple) -> None:
        """Raise :class:`PlanError` unless ``pipe``, whose experts are ``experts`` (``invardiff.pipeline_experts``),
        has these experts, in this order, and a ``num_inference_steps`` call gives each expert the steps its plan has
        (naming the first expert that differs)."""
        split = expert_steps(pipe, self.num_inference_steps, experts)
        if list(split) != list(self.plans):
            raise PlanError(
                f"The plans are for the experts {list(self.plans)}, but this {type(pipe).__name__} has "
                f"{list(split) or 'one transformer'}."
            )
        for name, (start, stop) in self.steps().items():
            given = split[name]
            if (given.start, given.stop) != (start, stop):
                boundary = getattr(pipe.config, "boundary_ratio", None)
                raise PlanError(
                    f"Expert {name!r} runs steps {given.start}-{given.stop - 1} ({given.stop - given.start} steps) "
                    f"of a {self.num_inference_steps}-step call of this {type(pipe).__name__} (boundary_ratio "
                    f"{boundary}), but its plan has {stop - start} steps (made at boundary_ratio "
                    f"{self.boundary_ratio}). Calibrate the pair on this pipeline (invardiff calibrate)."
                )

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        steps = self.steps()
        return {
            "format": EXPERT_PLANS_FORMAT,
            "format_version": EXPERT_PLANS_FORMAT_VERSION,
            "written_by": dict(self.written_by),
            "pipeline": self.pipeline,
            "boundary_ratio": self.boundary_ratio,
            "num_inference_steps": self.num_inference_steps,
            "provenance": copy.deepcopy(self.provenance),
            "experts": [
                {"name": name, "steps": list(steps[name]), "plan": plan.to_dict()} for name, plan in self.plans.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ExpertPlans:
        """Rebuild and validate; raises :class:`PlanError` naming the field (and the expert) at fault."""
        return _from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the pair as UTF-8 JSON, atomically (a temporary file renamed over ``path``); refuses what
        :meth:`load` would refuse."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        parse_json(text.encode("utf-8"), path, "invardiff expert plans")
        write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> ExpertPlans:
        """Read and validate a file written by :meth:`save`; any problem is a :class:`PlanError` naming the file."""
        data = read_json(path, "invardiff expert plans")
        try:
            return cls.from_dict(data)
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertPlans) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {plan.num_inference_steps} steps" for name, plan in self.plans.items())
        return f"ExpertPlans({self.num_inference_steps} steps; {parts})"


def load_plan(path: str | Path) -> CachePlan | ExpertPlans:
    """The plan in ``path``: a :class:`~invardiff.CachePlan`, or an :class:`ExpertPlans` for a pipeline with
    several experts (what ``invardiff calibrate`` writes for Wan2.2); either goes to :func:`invardiff.enable`."""
    data = read_json(path, "an invardiff plan file")
    try:
        if isinstance(data, dict) and data.get("format") == EXPERT_PLANS_FORMAT:
            return ExpertPlans.from_dict(data)
        return CachePlan.from_dict(data)
    except PlanError as error:
        raise PlanError(f"{path}: {error}") from None


def expert_steps(pipe, num_inference_steps: int, experts: tuple) -> dict[str, slice]:
    """The steps each of ``experts`` (the pipeline's, ``invardiff.pipeline_experts(pipe)``) runs in a
    ``num_inference_steps`` call of ``pipe``, in schedule order (``{}`` for a pipeline with one transformer). The
    schedule comes from a copy of the pipeline's scheduler: the pipeline's own is left untouched."""
    if not experts:
        return {}
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return {expert.attr: expert.steps(pipe, scheduler.timesteps) for expert in experts}


def _from_dict(data: Any) -> ExpertPlans:
    if not isinstance(data, dict):
        raise PlanError(f"Expert plans must be a JSON object, got {type(data).__name__}.")
    if data.get("format") != EXPERT_PLANS_FORMAT:
        raise PlanError(f"Unknown format {data.get('format')!r}; expected {EXPERT_PLANS_FORMAT!r}.")
    version = data.get("format_version")
    if type(version) is not int or version != EXPERT_PLANS_FORMAT_VERSION:
        raise PlanError(
            f"Unsupported expert plans format_version {version!r}; this invardiff ({__version__}) reads version "
            f"{EXPERT_PLANS_FORMAT_VERSION}. Upgrade invardiff or recalibrate."
        )
    T = data.get("num_inference_steps")
    if type(T) is not int or T < 1:
        raise PlanError(f"num_inference_steps must be a positive integer, got {T!r:.40}.")
    boundary = data.get("boundary_ratio")
    if boundary is not None and (type(boundary) not in (int, float) or not 0 < boundary < 1):
        raise PlanError(f"boundary_ratio must be a number between 0 and 1 or null, got {boundary!r:.40}.")
    for key, kind in (("pipeline", str), ("provenance", dict), ("written_by", dict)):
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            raise PlanError(f"{key} must be of type {kind.__name__}, got {type(value).__name__}.")
    experts = data.get("experts")
    if not isinstance(experts, list) or len(experts) < 2:
        raise PlanError("'experts' must be a list of at least two {'name', 'steps', 'plan'} objects.")
    plans, start = {}, 0
    for index, entry in enumerate(experts):
        if not isinstance(entry, dict) or sorted(entry) != ["name", "plan", "steps"]:
            raise PlanError(f"experts[{index}] must be an object with exactly 'name', 'steps' and 'plan'.")
        name, steps = entry["name"], entry["steps"]
        if not isinstance(name, str) or not name or name in plans:
            raise PlanError(f"experts[{index}].name must be a new non-empty transformer attribute, got {name!r:.40}.")
        if not (isinstance(steps, list) and len(steps) == 2 and all(type(s) is int for s in steps)):
            raise PlanError(f"Expert {name!r}: 'steps' must be [first, stop], got {steps!r:.40}.")
        if steps[0] != start or not steps[0] < steps[1] <= T:
            raise PlanError(
                f"Expert {name!r}: 'steps' {steps} do not continue the schedule: expected [{start}, stop] with "
                f"{start} < stop <= {T} (experts in schedule order, every step in exactly one)."
            )
        try:
            plan = CachePlan.from_dict(entry["plan"])
        except PlanError as error:
            raise PlanError(f"The plan of expert {name!r}: {error}") from None
        if plan.num_inference_steps != steps[1] - steps[0]:
            raise PlanError(
                f"Expert {name!r} runs steps {steps[0]}-{steps[1] - 1} ({steps[1] - steps[0]} steps) but its plan has "
                f"{plan.num_inference_steps} steps; each expert's plan covers exactly the steps it runs."
            )
        plans[name], start = plan, steps[1]
    if start != T:
        raise PlanError(f"The experts' steps end at {start} but the pair is for {T} steps.")
    return ExpertPlans(plans, T, boundary, data.get("pipeline"), data.get("provenance"), data.get("written_by", {}))
