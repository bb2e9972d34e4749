"""Full compute with the calibration recorder observing: one :class:`RateRecorder` per transformer of a pass.

Apart from ``run.py`` (the calibration passes) because the calibration memory estimate
(``invardiff.memory.calibration_memory``), which ``run.py`` sizes its batches with, records too: both import it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from .. import api
from ..engine.install import enumerate_units, unwrap
from ..families import resolve_family
from ..plan import CachePlan, ModelFacts
from .record_policy import RecordConfig
from .recorder import RateRecorder


@dataclass(frozen=True)
class CalibrationPart:
    """One transformer a calibration pass records: ``name`` is its pipeline attribute for an expert of a pipeline
    that switches transformers (``None``: the pipeline's one transformer), ``steps`` the ``[first, stop)`` steps
    of the call it runs."""

    name: str | None
    facts: ModelFacts
    steps: tuple[int, int]

    @property
    def num_steps(self) -> int:
        return self.steps[1] - self.steps[0]

    def provenance(self, calibration: dict) -> dict:
        """The calibration's provenance, with the expert and its steps for an expert."""
        return calibration if self.name is None else {**calibration, "expert": self.name, "steps": list(self.steps)}


@contextmanager
def recording(target, facts: ModelFacts, num_steps: int, provisional=None, epsilon=1e-8, offload=None, branches=None):
    """Full compute on ``target`` (a pipeline or transformer) with a :class:`RateRecorder` observing every step of
    the CFG ``branches`` (``None``: all); on exit the engine is removed and the recorder's reference features are
    freed (its rates stay)."""
    part = CalibrationPart(None, facts, (0, num_steps))
    with recording_parts(target, (part,), {None: provisional}, epsilon, offload, branches) as recorders:
        yield recorders[None]


@contextmanager
def recording_parts(target, parts: tuple[CalibrationPart, ...], provisional: dict, epsilon, offload, branches):
    """:func:`recording` of every part: one recorder per transformer (``{part name: recorder}``), all enabled at
    once (a pipeline with experts takes one recording policy per expert)."""
    recorders, configs = {}, {}
    for part in parts:
        transformer = unwrap(
            getattr(target, "transformer", target) if part.name is None else getattr(target, part.name)
        )
        family = resolve_family(transformer)
        units = enumerate_units(transformer, family)
        recorder = RateRecorder(units, family, part.num_steps, provisional.get(part.name), epsilon, offload, branches)
        recorders[part.name] = recorder
        configs[part.name] = RecordConfig(CachePlan.reuse_nothing(part.facts, part.num_steps), recorder)
    api.enable(target, configs[None] if None in configs else configs)
    try:
        yield recorders
        for recorder in recorders.values():
            recorder.finish()  # the last step's rates to the host (and their NaN check)
    finally:
        api.disable(target)
        for recorder in recorders.values():
            recorder.release()
