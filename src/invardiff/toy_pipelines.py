"""Stock diffusers pipelines around random-weight transformers, for benchmarks and tests (no downloads).

Flux runs from ``prompt_embeds`` (no text encoders); DiT decodes with a stand-in identity VAE. Both return latents
when asked for ``output_type="latent"`` (Flux) or decode trivially (DiT).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

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


def dit_scheduler() -> DDIMScheduler:
    # DiT's diffusion: linear betas 1e-4..0.02 over 1000 steps, DDIM without x0 clipping (clip_denoised=False).
    return DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def build_pipeline(config: ModelConfig, transformer: torch.nn.Module, text_encoders: bool = False):
    """A stock pipeline around ``transformer``; Flux with ``text_encoders`` gets tiny random CLIP and T5 encoders
    with character-level tokenizers built in code, so that ``pipe(prompt=...)`` works offline."""
    if config.family == "flux":
        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        encoders = _tiny_text_encoders(config) if text_encoders else dict.fromkeys(names)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=transformer, **encoders)
    else:
        pipe = DiTPipeline(transformer=transformer, vae=IdentityVAE(), scheduler=dit_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int = 0, device="cpu") -> dict:
    """Arguments for one pipeline call on ``config``'s input shapes (Flux: packed latents are returned)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if config.family == "flux":
        kw = config.transformer_kwargs
        side = int(config.image_tokens**0.5) * 16  # 16 px per packed latent token (VAE x8, 2x2 packing)
        embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
        pooled = torch.randn(config.batch, kw["pooled_projection_dim"], generator=generator)
        return {
            "prompt_embeds": embeds.to(device, config.torch_dtype),
            "pooled_prompt_embeds": pooled.to(device, config.torch_dtype),
            "height": side,
            "width": side,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": 3.5,
            "output_type": "latent",
            "generator": generator,
        }
    labels = [(seed * 7 + i) % 1000 for i in range(max(1, config.batch // 2))]
    return {
        "class_labels": labels,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.0,
        "generator": generator,
        "output_type": "np",
    }


def _tiny_text_encoders(config: ModelConfig, seed: int = 0) -> dict:
    from .models import text

    clip_tokenizer, t5_tokenizer = text.clip_tokenizer(), text.t5_tokenizer(words=[])
    kw = config.transformer_kwargs
    clip, t5 = text.text_encoders(
        len(clip_tokenizer), len(t5_tokenizer), kw["pooled_projection_dim"], seed, t5_width=kw["joint_attention_dim"]
    )
    return {"text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tokenizer}
