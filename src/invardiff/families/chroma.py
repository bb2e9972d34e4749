"""Chroma (diffusers ``ChromaTransformer2DModel``): FLUX.1-schnell's layout, 19 dual-stream, 38 single-stream blocks.

The blocks have FLUX's reusable units: a dual block's joint attention (image and text in one call, reused only when
both ``attn`` and ``context_attn`` are set), ``ff`` (image) and ``context_ff`` (text) feed-forwards; a single block's
``attn`` and ``mlp`` = ``act_mlp(proj_mlp(x))`` (its ``proj_out`` over the concatenation, the norm and the gate are
always paid). Unlike FLUX, the single blocks take text and image as one concatenated sequence, and no block has a
modulation network of its own: one ``distilled_guidance_layer`` (the approximator) computes every block's shifts,
scales and gates from the timestep, once per call, and each block receives its slice as ``temb``, with the text
padding ``attention_mask``, both per sample. The step cache holds the image tokens entering ``norm_out``.

``ChromaPipeline`` conditions on T5 alone and runs true classifier-free guidance as two transformer calls per step
(conditional first) without diffusers' ``cache_context``, so the family names the calls (``call_branches``): each
branch keeps its own cache, as with FLUX's true CFG. There is no official InvarDiff or DiCache code for Chroma:
calibration follows FLUX's official rules (the same block kinds, ``context_attn`` tied to ``attn``), DiCache runs
FLUX's preset, and there are no official presets or books.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformerBlock

from .. import toy_components
from .flux import FLUX, call_shape, call_timestep, input_signature, size_rules
from .model_config import ModelConfig
from .spec import (
    BlockOutputs,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    describe_block_outputs,
    image_output_index,
)
from .table import register_family


# diffusers 0.42 does not describe Chroma's blocks in its TransformerBlockRegistry: a dual block returns
# (encoder_hidden_states, hidden_states) like FLUX's; a single block returns the one concatenated sequence (text, then
# image), so the DiCache probe reads text and image tokens there, as the older FLUX single blocks gave it.
describe_block_outputs(ChromaTransformerBlock, BlockOutputs(hidden_index=1, encoder_index=0))
describe_block_outputs(ChromaSingleTransformerBlock, BlockOutputs())


def _temb(transformer, call, dtype):
    # ChromaTransformer2DModel.forward's conditioning: the approximator's modulation rows of the timestep x 1000 in
    # the block stack's dtype, (B, rows, D): each block takes its own rows, the head the last two.
    timestep = call["timestep"].to(dtype) * 1000
    return transformer.distilled_guidance_layer(transformer.time_text_embed(timestep))


def _embed_timestep(transformer, call):
    return _temb(transformer, call, call["hidden_states"].dtype)


def _run_head(transformer, hidden, call):
    # The output section of ChromaTransformer2DModel.forward on the cached image tokens: the approximator's last two
    # modulation rows (shift, scale) condition norm_out.
    temb = _temb(transformer, call, hidden.dtype)[:, -2:]
    output = transformer.proj_out(transformer.norm_out(hidden, temb))  # (B, N_img, C)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    tokens = config.text_tokens + config.image_tokens
    return {
        "hidden_states": randn(B, config.image_tokens, kw["in_channels"]),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["joint_attention_dim"]),
        "timestep": torch.full((B,), fraction, device=device, dtype=dtype),
        "img_ids": torch.zeros(config.image_tokens, 3, device=device),
        "txt_ids": torch.zeros(config.text_tokens, 3, device=device),
        # The pipeline always passes the text padding mask, extended over the image tokens (all kept here).
        "attention_mask": torch.ones(B, tokens, device=device, dtype=dtype),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, num_single_layers, heads, head_dim, axes, joint_dim, approximator, in_channels=64):
    """``ChromaTransformer2DModel`` arguments (patch size 1 on packed latents); ``approximator`` is the
    ``(num_channels, hidden_dim, layers)`` of the distilled guidance layer."""
    channels, hidden, layers = approximator
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "axes_dims_rope": axes,
        "approximator_num_channels": channels,
        "approximator_hidden_dim": hidden,
        "approximator_layers": layers,
    }


NAMED_CONFIGS = (
    # lodestones/Chroma1-HD transformer/config.json as recalled (not verified online from here): 19 + 38 blocks,
    # 24 heads of 128, T5-XXL width 4096, RoPE axes (16, 56, 56), approximator 64 channels / hidden 5120 / 5 layers;
    # these are also ChromaTransformer2DModel's defaults in diffusers, which were set from that checkpoint. At
    # 1024x1024 (4096 packed tokens) with the pipeline's 512 T5 tokens, one row per call (true CFG: two calls).
    ModelConfig(
        "chroma1-hd",
        "chroma",
        transformer_kwargs(19, 38, 24, 128, (16, 56, 56), 4096, (64, 5120, 5)),
        "bfloat16",
        image_tokens=4096,
        text_tokens=512,
        description="Chroma1-HD (19+38 blocks, hidden 3072) at 1024x1024, 512 text tokens",
    ),
    ModelConfig(
        "chroma-bench",
        "chroma",
        transformer_kwargs(19, 38, 4, 64, (16, 24, 24), 256, (64, 256, 5)),
        image_tokens=256,
        text_tokens=64,
        description="Chroma depth (19+38), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
    ),
    ModelConfig(
        "chroma-tiny",
        "chroma",
        transformer_kwargs(2, 4, 2, 16, (4, 6, 6), 32, (16, 32, 2), in_channels=16),
        image_tokens=64,
        text_tokens=8,
        description="tests",
    ),
)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    # Without a text encoder the pipeline runs from prompt_embeds; with one, a tiny random T5 encoder with a tokenizer
    # built in code makes `pipe(prompt=...)` work offline (Chroma conditions on T5 alone).
    encoder = {"text_encoder": None, "tokenizer": None}
    if text_encoders:
        encoder = toy_components.tiny_t5(config.transformer_kwargs["joint_attention_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler()  # FLUX's toy scheduler
    return ChromaPipeline(scheduler=scheduler, vae=None, transformer=transformer, **encoder)


def _toy_prompt(config: ModelConfig, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    # T5 embeddings and the pipeline's padding mask (float, the embeddings' dtype): the last quarter of the text
    # tokens are padding, so that the mask takes part.
    kw = config.transformer_kwargs
    embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    mask = torch.ones(config.batch, config.text_tokens)
    mask[:, config.text_tokens - config.text_tokens // 4 :] = 0
    return embeds.to(device, config.torch_dtype), mask.to(device, config.torch_dtype)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    embeds, mask = _toy_prompt(config, generator, device)
    side = int(config.image_tokens**0.5) * 16  # 16 px per packed latent token (VAE x8, 2x2 packing)
    return {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask,
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 1.0,  # no CFG: one call per step (toy_cfg_kwargs turns it on)
        "output_type": "latent",  # packed latents: there is no VAE
        "generator": generator,
    }


def _toy_cfg_kwargs(config: ModelConfig, seed: int, device) -> dict:
    # True CFG: a conditional and an unconditional call per step, named by call_branches.
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)  # not the prompt's draw
    embeds, mask = _toy_prompt(config, generator, device)
    return {"negative_prompt_embeds": embeds, "negative_prompt_attention_mask": mask, "guidance_scale": 4.0}


def _call_branches(pipe) -> tuple[str, ...]:
    # ChromaPipeline.__call__ sets the guidance scale before its loop, then calls the conditional branch first.
    return ("cond", "uncond") if pipe.do_classifier_free_guidance else ("cond",)


CHROMA = register_family(
    FamilySpec(
        name="chroma",
        transformer_class=ChromaTransformer2DModel,
        # FLUX's block lists and units (the same modules); Chroma's blocks are their own classes, and every block
        # also takes the prompt's padding mask, one row per sample.
        block_lists=tuple(
            dataclasses.replace(
                flux_list, image_output=image_output_index(block), per_sample_args=("temb", "attention_mask")
            )
            for flux_list, block in zip(
                FLUX.block_lists, (ChromaTransformerBlock, ChromaSingleTransformerBlock), strict=True
            )
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        calibration=FLUX.calibration,  # no official Chroma code: FLUX's rules on the same block kinds
        dicache_preset="flux",
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=FLUX.pipeline.scheduler,
            calibration_kwargs={"output_type": "latent"},  # the decoded images are not needed
            build_toy=_build_toy,
            call_shape=call_shape,
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
            toy_cfg_kwargs=_toy_cfg_kwargs,
            call_branches=_call_branches,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 512},  # 1024x1024 px, 512 T5 tokens
            named=NAMED_CONFIGS,
            bench={"cpu": "chroma-bench", "full": "chroma1-hd", "tiny": "chroma-tiny"},
            tiny="chroma-tiny",
        ),
    )
)
