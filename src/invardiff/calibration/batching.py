"""The calibration batch size from memory: the most runs per pipeline call whose features fit a budget."""

from __future__ import annotations

import logging

import torch

from ..api import transformers_of
from ..families import get_family
from ..families.model_config import ModelConfig


logger = logging.getLogger(__name__)

HOST_BUDGET = 8 * 2**30  # bytes: the default budget when the features live in host memory (CPU, or offloaded)
DEVICE_FRACTION = 0.5  # of the free CUDA memory: the rest is for the model's activations at that batch


def auto_batch_size(
    pipe, family: str, num_samples: int, call_kwargs: dict, budget: int | None = None, offload: str | None = None
) -> int:
    """The largest batch (at most ``num_samples``, at least 1) whose estimated calibration memory fits ``budget``.

    The per-sample estimate is :func:`invardiff.memory.calibration_memory` at the shapes of the pipeline call
    (measured on the meta device), summed over the experts of a pipeline that switches transformers (each
    expert's recorder holds its references until the next call). ``budget`` defaults to half the free memory of
    the transformer's CUDA device (the other half for the activations), or :data:`HOST_BUDGET` when the
    references live in host memory.
    """
    # Not at module level: invardiff.memory imports this package (calibration.recording), whose run.py imports this
    # module, so a module-level import would find invardiff.memory half-initialised when memory is imported first.
    from ..memory import calibration_memory

    configs = [pipeline_call_config(pipe, family, call_kwargs, t) for t in transformers_of(pipe)]
    estimates = [calibration_memory(config, offload) for config in configs]
    estimate = {key: sum(e[key] for e in estimates) for key in ("total", "references", "working")}
    config = configs[0]
    device = pipe.transformer.device
    on_device = device.type == "cuda" and offload != "cpu"
    if budget is None:
        budget = int(torch.cuda.mem_get_info(device)[0] * DEVICE_FRACTION) if on_device else HOST_BUDGET
    rows = config.batch  # transformer rows per calibration sample (DiT with CFG: 2)
    per_sample = estimate["total"] * rows
    batch = max(1, min(num_samples, budget // max(1, per_sample)))
    message = (
        "calibration batch size %d of %d runs: %s of calibration features per sample "
        "(%s references in %s, %s working), budget %s"
    )
    where = "host memory" if (offload == "cpu" or device.type == "cpu") else str(device)
    args = (batch, num_samples, _size(per_sample), _size(estimate["references"] * rows), where)
    args += (_size(estimate["working"] * rows), _size(budget))
    if per_sample > budget:
        logger.warning(message + ": one sample exceeds the budget", *args)
    else:
        logger.info(message, *args)
    return batch


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} bytes"


def pipeline_call_config(pipe, family: str, call_kwargs: dict, transformer=None) -> ModelConfig:
    """The config of ``transformer`` (default: the pipeline's) with the input shapes of one calibration sample of
    the pipeline call (``batch``: its transformer rows)."""
    transformer = pipe.transformer if transformer is None else transformer
    # A pipeline subclass that applies its own call defaults in __call__ (the bundled flux-shapes: 32x32, 16 text
    # tokens) names them in ``call_defaults``; the stock pipeline's call shape would assume the stock defaults.
    call_kwargs = {**getattr(pipe, "call_defaults", {}), **call_kwargs}
    shape = get_family(family).pipeline.call_shape(pipe, call_kwargs)
    dtype = str(transformer.dtype).removeprefix("torch.")
    return ModelConfig.from_transformer_config("calibration", family, transformer.config, dtype=dtype, **shape)
