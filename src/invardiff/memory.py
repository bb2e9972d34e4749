"""Cache memory of a plan on a model config, measured by running the engine on the meta device.

The meta device allocates nothing and computes nothing, but the engine keeps and frees exactly the tensors it
would keep on a real device, so its own byte accounting gives the peak cache memory of a run at any size
(FLUX.1-dev at 1024x1024 takes seconds on a CPU).
"""

from __future__ import annotations

import torch

from . import api
from .bench.loop import Trajectory
from .model_configs import ModelConfig
from .plan import CachePlan


def cache_memory(plan: CachePlan, config: ModelConfig) -> dict[str, int]:
    """Peak bytes the engine holds for ``plan`` on ``config``, and what keeping every unit output would take."""
    transformer = config.build_transformer("meta")
    api.enable(transformer, plan)
    trajectory = Trajectory(transformer, config, plan.num_inference_steps, torch.device("meta"))
    for step in range(plan.num_inference_steps):
        trajectory.step(step)
    summary = api.summary(transformer)
    api.disable(transformer)
    return {"peak_cache_bytes": summary.peak_cache_bytes, "all_outputs_bytes": summary.all_outputs_bytes}
