"""What the frontier diagnostics score a plan by, on a bundled model: the calibration runs' sampled MSE against full
compute (what ``--verify`` and ``--refine`` rank plans by) and the held-out PSNR on the sweep's evaluation inputs
(mean over the images, and per seed). Shared by ``frontier_coefficient_scales.py`` and ``frontier_second_order.py``.
"""

from __future__ import annotations

import numpy as np

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.targets import bundled_target
from invardiff.calibration.budget import sample_outputs
from invardiff.metrics import output_fidelity
from invardiff.plan import CachePlan
from invardiff.policies.plan import PlanConfig


class PlanScores:
    """A bundled model loaded once, with full compute's outputs on its calibration runs and held-out inputs."""

    def __init__(self, model: str, seeds: list[int]):
        self.target = target = bundled_target(model)
        self.pipe = target.load()
        self.seeds = seeds
        self.cases, self.call_kwargs = target.calibration_runs(), target.sampling_kwargs(self.pipe)
        self.calibration_reference = self._calibration_outputs()
        self.inputs = sweep_inputs(target, seeds)
        self.reference = self.inputs.generate(self.pipe)

    def _calibration_outputs(self):
        return sample_outputs(self.pipe, self.target.family, self.cases, self.call_kwargs, len(self.cases))

    def calibration_mse(self, plan: CachePlan) -> float:
        with invardiff.enabled(self.pipe, PlanConfig(plan)):
            outputs = self._calibration_outputs()
        return float(((outputs - self.calibration_reference) ** 2).mean())

    def held_out(self, plan: CachePlan) -> dict:
        with invardiff.enabled(self.pipe, PlanConfig(plan)):
            psnr = output_fidelity(self.inputs.generate(self.pipe), self.reference)["per_image"]["psnr"]
        by_seed = np.array(psnr).reshape(len(self.seeds), -1).mean(axis=1)
        return {"psnr": float(np.mean(psnr)), "psnr_by_seed": dict(zip(self.seeds, by_seed.tolist(), strict=True))}
