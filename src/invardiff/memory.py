"""Cache memory of a plan, and calibration memory, on a model config, measured on the meta device.

The meta device allocates nothing and computes nothing, but the engine keeps and frees exactly the tensors it
would keep on a real device, so its own byte accounting gives the peak cache memory of a run at any size
(FLUX.1-dev at 1024x1024 takes seconds on a CPU).
"""

from __future__ import annotations

import torch

from . import api
from .bench.loop import Trajectory
from .calibration.recording import recording
from .families import get_family
from .families.model_config import ModelConfig
from .meta_values import MetaValues
from .plan import CachePlan, ModelFacts


def cache_memory(plan: CachePlan, config: ModelConfig) -> dict[str, int]:
    """Peak bytes the engine holds for ``plan`` on ``config``, and what keeping every unit output would take."""
    transformer = config.build_transformer("meta")
    api.enable(transformer, plan)
    with MetaValues():  # the constant masks of the calls keep their values for forwards that read them (Mochi)
        trajectory = Trajectory(transformer, config, plan.num_inference_steps, torch.device("meta"))
        for step in range(plan.num_inference_steps):
            trajectory.step(step)
    summary = api.summary(transformer)
    api.disable(transformer)
    return {"peak_cache_bytes": summary.peak_cache_bytes, "all_outputs_bytes": summary.all_outputs_bytes}


def calibration_memory(config: ModelConfig, offload: str | None = None) -> dict[str, int]:
    """Bytes of calibration features per sample on ``config``, measured by the calibration recorder itself on
    the meta device over three full-compute steps (from step 2 on every stream holds all it will hold).

    Keys, in bytes per sample (per row of the transformer batch): ``references`` (one feature per stream, in the
    model's dtype), ``scalars`` (per-stream float32 denominators and the pending rates of one step), ``working``
    (the largest transient of a rate: the float32 difference of the largest stream, plus its reference copied
    back when offloaded), ``total`` (their sum: what one more sample in a calibration batch costs besides the
    model's activations), ``device`` (``total`` less the references when ``offload="cpu"`` keeps them in host
    memory), and ``two_float32_references`` (what two float32 features per stream, the former recorder, would
    hold); ``streams`` counts the streams.
    """
    transformer = config.build_transformer("meta")
    facts = ModelFacts.for_family(config.family, get_family(config.family).num_layers(transformer))
    steps = 3
    with recording(transformer, facts, steps, offload=offload) as recorder, MetaValues():
        trajectory = Trajectory(transformer, config, steps, torch.device("meta"))
        for step in range(steps):
            trajectory.step(step)
        held = recorder.held_bytes()
        references = [stream.reference for run in recorder.branches.values() for stream in run.values()]
        recorder.release()  # meta rates cannot go to the host
    largest = max(references, key=torch.Tensor.numel)
    working = largest.numel() * 4 + (largest.numel() * largest.element_size() if offload == "cpu" else 0)
    per_sample = {
        "references": held["references"] // config.batch,
        "scalars": held["scalars"] // config.batch,
        "working": working // config.batch,
        "two_float32_references": 2 * 4 * sum(r.numel() for r in references) // config.batch,
    }
    per_sample["total"] = per_sample["references"] + per_sample["scalars"] + per_sample["working"]
    per_sample["device"] = per_sample["total"] - (per_sample["references"] if offload == "cpu" else 0)
    return {**per_sample, "streams": held["streams"]}
