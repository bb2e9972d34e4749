"""The calibration policy: full compute (a reuse-nothing plan) with a :class:`RateRecorder` seeing every feature."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.policy import register_policy
from ..plan import CachePlan
from ..policies.plan import PlanPolicy, check_plan_fits


@dataclass(frozen=True)
class RecordConfig:
    """Run ``plan`` (normally ``CachePlan.reuse_nothing``) and hand every computed unit output and pre-head hidden
    state to ``recorder`` (``on_unit(state, unit_index, output)``, ``on_hidden(state, hidden)``)."""

    plan: CachePlan
    recorder: object


class RecordPolicy(PlanPolicy):
    name = "calibration"
    observes_units = True

    def __init__(self, config: RecordConfig, units):
        super().__init__(config.plan, units)
        self.recorder = config.recorder

    def unit_to_keep(self, state, unit: int, output):
        self.recorder.on_unit(state, unit, output)
        return super().unit_to_keep(state, unit, output)

    def head_input(self, state, hidden):
        self.recorder.on_hidden(state, hidden)
        return super().head_input(state, hidden)


@register_policy(RecordConfig)
def _build_record_policy(config: RecordConfig, family, transformer, units) -> RecordPolicy:
    check_plan_fits(config.plan, family, transformer)
    return RecordPolicy(config, units)
