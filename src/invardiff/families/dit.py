"""DiT (diffusers ``DiTTransformer2DModel``, e.g. DiT-XL/2): 28 adaLN-Zero blocks.

Each block's self-attention (``attn1``, kind ``attn``) and MLP (``ff``, kind ``ff``) can be reused; the adaLN
modulation, the gates, the final adaLN and the linear head are always recomputed. The step cache holds the tokens
entering ``norm_out``. Classifier-free guidance is batched by ``DiTPipeline`` (one call, both halves), so the two
halves share one plan and each cached tensor holds both, aligned by batch position.

Around the engine: class-conditional pipelines (``DiTPipeline``), the official DiT-XL/2 presets and books
(SPEC.md A.6, A.8), and random-weight configs from DiT-XL/2 down to test size.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..plan_file import book_array
from ..toy_components import IdentityVAE
from .calibration_spec import FamilyCalibration, InvarDiffThresholds
from .model_config import ModelConfig
from .spec import BlockListSpec, ConfigSpec, FamilySpec, OfficialSpec, PipelineSpec, ReuseUnit
from .table import register_family


def _conditioning(transformer, call, dtype):
    # The timestep and class embedding of DiTTransformer2DModel.forward: each block's AdaLayerNormZero embeds them
    # with its own weights; the head uses the first block's embedder, and so does this, (B, D).
    return transformer.transformer_blocks[0].norm1.emb(call["timestep"], call["class_labels"], hidden_dtype=dtype)


def _embed_timestep(transformer, call):
    return _conditioning(transformer, call, call["hidden_states"].dtype)


def _run_head(transformer, hidden, call):
    # Same as the output section of DiTTransformer2DModel.forward, on the cached tokens.
    conditioning = _conditioning(transformer, call, hidden.dtype)
    shift, scale = transformer.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)  # (B, D) each
    hidden = transformer.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
    hidden = transformer.proj_out_2(hidden)  # (B, N, p*p*C)
    patch, channels = transformer.patch_size, transformer.out_channels
    side = int(hidden.shape[1] ** 0.5)
    hidden = hidden.reshape(-1, side, side, patch, patch, channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    output = hidden.reshape(-1, channels, side * patch, side * patch)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape),)


def _thresholds(nonskip, step, attn, ff):
    return InvarDiffThresholds(nonskip, step, {"transformer_blocks.attn": attn, "transformer_blocks.ff": ff})


# The official presets (SPEC.md A.8): the DiT README modes.
PRESETS = {"fast": _thresholds(0.0, 0.63, 0.22, 0.22), "slow": _thresholds(0.0, 0.61, 0.2, 0.2)}


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, int(fraction * 999))  # an integer DDPM step


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    side = kw["sample_size"]
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "timestep": torch.full((B,), int(fraction * 999), device=device, dtype=torch.long),
        "class_labels": torch.arange(B, device=device) % kw["num_embeds_ada_norm"],
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, sample_size, in_channels=4):
    """``DiTTransformer2DModel`` arguments of a DiT-XL/2-like transformer (patch size 2, learned sigma)."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels,
        "num_layers": num_layers,
        "sample_size": sample_size,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_zero",
    }


NAMED_CONFIGS = (
    ModelConfig(
        "dit-xl-2",
        "dit",
        transformer_kwargs(28, 16, 72, 32),
        "bfloat16",
        batch=2,
        steps=50,
        description="DiT-XL/2 at 256x256 (32x32 latent), one class with batched CFG",
    ),
    ModelConfig(
        "dit-bench",
        "dit",
        transformer_kwargs(28, 4, 64, 32),
        batch=2,
        steps=50,
        description="DiT depth (28), hidden 256, 256 tokens, batched CFG (CPU benchmark)",
    ),
    ModelConfig(
        "dit-tiny-fulldepth",
        "dit",
        transformer_kwargs(28, 2, 16, 8),
        batch=2,
        steps=50,
        description="DiT depth at hidden 32 (fast CLI tests)",
    ),
    ModelConfig("dit-tiny", "dit", transformer_kwargs(2, 2, 16, 8), batch=2, steps=50, description="tests"),
)


def _scheduler() -> DDIMScheduler:
    # DiT's diffusion: linear betas 1e-4..0.02 over 1000 steps, DDIM without x0 clipping (clip_denoised=False).
    return DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import DiTPipeline

    return DiTPipeline(transformer=transformer, vae=IdentityVAE(), scheduler=_scheduler())


def _bare_pipeline(transformer):
    from diffusers import DiTPipeline

    # No VAE comes with a bare transformer: invardiff's identity VAE returns the latents as the image, which is right
    # for a pixel-space model and wrong for a latent-space one (DiT-XL/2 needs its Stable Diffusion VAE).
    channels = transformer.config.in_channels
    pipe = DiTPipeline(transformer=transformer, vae=IdentityVAE(latent_channels=channels), scheduler=_scheduler())
    note = (
        f"DiTPipeline with invardiff's IdentityVAE (pixel space: the {channels}-channel samples are the images) and "
        "DDIM; a latent-space DiT needs its VAE: --pipeline BASE with --transformer DIR"
    )
    return pipe, note


_LATENTS_LOCK = threading.Lock()


@contextmanager
def _with_latents(pipe, latents: torch.Tensor):
    # DiTPipeline.__call__ takes no latents (diffusers 0.42): it draws them with pipeline_dit.randn_tensor, so that
    # name is replaced for the duration of the call by one that returns the given latents (checked against the shape
    # the pipeline asks for). The lock keeps two such calls in this process from replacing it at once.
    from diffusers.pipelines.dit import pipeline_dit

    def given(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(latents.shape):
            raise ValueError(
                f"The latents have shape {tuple(latents.shape)} but the DiT pipeline draws {tuple(shape)} "
                "(batch, in_channels, sample_size, sample_size)."
            )
        return latents.to(device=device, dtype=dtype)

    with _LATENTS_LOCK:
        drawn = pipeline_dit.randn_tensor
        pipeline_dit.randn_tensor = given
        try:
            yield
        finally:
            pipeline_dit.randn_tensor = drawn


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    labels = [(seed * 7 + i) % 1000 for i in range(max(1, config.batch // 2))]  # batch = labels x CFG halves
    return {
        "class_labels": labels,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.0,
        "generator": generator,
        "output_type": "np",
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    cfg = call_kwargs.get("guidance_scale", 4.0) > 1  # DiTPipeline batches the null class with each sample
    return {"batch": 2 if cfg else 1}


def _official_reuse(book: dict) -> dict:
    return {
        "transformer_blocks": {
            "attn": book_array(book["msa_cache_book"], "msa_cache_book", 2),
            "ff": book_array(book["mlp_cache_book"], "mlp_cache_book", 2),
        }
    }


def _official_book(plan) -> dict:
    # The layout the official DiT sampler loads (SPEC.md A.6): the step gate and a T x L book per kind.
    reuse = plan.module_reuse["transformer_blocks"]
    return {
        "step_cache_book": plan.step_cache.tolist(),
        "msa_cache_book": reuse["attn"].tolist(),
        "mlp_cache_book": reuse["ff"].tolist(),
    }


OFFICIAL = OfficialSpec(
    label="DiT",
    scheduler="DDIMScheduler",
    keys=("msa_cache_book", "mlp_cache_book"),
    reuse=_official_reuse,
    books={
        "fast": "dit-xl2/cache_books_stp50_n0.0_sth0.63_msa0.22_mlp0.22.json",
        "slow": "dit-xl2/cache_books_stp50_n0.0_sth0.61_msa0.2_mlp0.2.json",
    },
    write=_official_book,
)


DIT = register_family(
    FamilySpec(
        name="dit",
        transformer_class=DiTTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "ff"),
                units=(ReuseUnit("attn", ("attn",), "attn1"), ReuseUnit("ff", ("ff",), "ff")),
                per_sample_args=("timestep", "class_labels"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.pos_embed(call["hidden_states"]),  # (B, N, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        presets=PRESETS,
        dicache_preset="flux",  # no official DiCache setting for DiT: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="class",
            output_type="np",
            scheduler=_scheduler,
            # The official code calibrates without classifier-free guidance.
            calibration_kwargs={"guidance_scale": 1.0, "output_type": "np"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            toy_call_kwargs=_toy_call_kwargs,
            bare=_bare_pipeline,
            with_latents=_with_latents,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            # one class with batched CFG, the DiT README's 50 steps; no text; DiT-XL/2's weights are float32
            json_defaults={"batch": 2, "steps": 50, "text_tokens": 0, "dtype": "float32"},
            json_shape=lambda config: {"image_tokens": (config["sample_size"] // config["patch_size"]) ** 2},
            named=NAMED_CONFIGS,
            bench={"cpu": "dit-bench", "full": "dit-xl-2", "tiny": "dit-tiny-fulldepth"},
            tiny="dit-tiny",
        ),
        official=OFFICIAL,
    )
)
