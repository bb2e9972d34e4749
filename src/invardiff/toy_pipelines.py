"""Stock diffusers pipelines around random-weight transformers, for benchmarks and tests (no downloads).

Each family builds its own (``FamilySpec.pipeline``): Flux runs from ``prompt_embeds`` (no text encoders) and
returns latents; DiT decodes with the stand-in identity VAE below.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .families import PipelineSpec, get_family
from .model_configs import ModelConfig


class IdentityVAE(ModelMixin, ConfigMixin):
    """A stand-in VAE for pixel- or latent-space toys: ``decode`` returns its input (scaling factor 1)."""

    @register_to_config
    def __init__(
        self,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        block_out_channels: tuple = (1,),
        latent_channels: int = 1,
    ):
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=latents) if return_dict else (latents,)


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
