"""Stock diffusers pipelines around random-weight transformers, for benchmarks and tests (no downloads).

Each family builds its own (``FamilySpec.pipeline``): Flux runs from ``prompt_embeds`` (no text encoders) and
returns latents; DiT decodes with the stand-in identity VAE (:mod:`invardiff.toy_components`).
"""

from __future__ import annotations

import torch

from .families import PipelineSpec, get_family
from .families.model_config import ModelConfig

# Pipelines saved before IdentityVAE moved to toy_components name it by this module in their model_index.json
# (models/loading.py imports the module a saved component names): it stays importable from here for them.
from .toy_components import IdentityVAE  # noqa: F401


def build_pipeline(config: ModelConfig, transformer: torch.nn.Module, text_encoders: bool = False):
    """A stock pipeline around ``transformer``; with ``text_encoders``, a text-conditioned family gets tiny random
    text encoders with tokenizers built in code, so that ``pipe(prompt=...)`` works offline."""
    pipe = _pipeline_spec(config).build_toy(config, transformer, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int = 0, device="cpu") -> dict:
    """Arguments for one pipeline call on ``config``'s input shapes (Flux: packed latents are returned)."""
    return _pipeline_spec(config).toy_call_kwargs(config, num_inference_steps, seed, device)


def _pipeline_spec(config: ModelConfig) -> PipelineSpec:
    spec = get_family(config.family).pipeline
    if spec is None or spec.build_toy is None:
        raise ValueError(f"Model family {config.family!r} describes no toy pipeline (FamilySpec.pipeline).")
    return spec
