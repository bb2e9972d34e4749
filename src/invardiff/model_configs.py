"""Named transformer configs with the inputs of one denoising call, for FLOP profiles, benchmarks and tests.

``flux1-dev`` and ``dit-xl-2`` are the real architectures (random weights: speed and FLOPs only). ``flux-bench`` and
``dit-bench`` keep the real depth at a width where compute dominates on a 2-core CPU. ``*-tiny`` are for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel


@dataclass(frozen=True)
class ModelConfig:
    """A transformer config plus the shape of one denoising call.

    Attributes:
        image_tokens / text_tokens (Flux): tokens per sample; image tokens = (height / 16) * (width / 16).
        batch: samples per transformer call (DiT: 2 = one class with batched CFG).
    """

    name: str
    family: str
    transformer_kwargs: dict
    dtype: str = "float32"
    image_tokens: int = 256
    text_tokens: int = 64
    batch: int = 1
    steps: int = 28
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def build_transformer(self, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
        """Random-weight transformer (``device="meta"`` allocates nothing, for FLOP counting)."""
        cls = FluxTransformer2DModel if self.family == "flux" else DiTTransformer2DModel
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.torch_dtype)  # build in the target dtype: no fp32 copy, no cast warning
        try:
            with torch.device(device):
                model = cls(**self.transformer_kwargs)
        finally:
            torch.set_default_dtype(previous)
        return model.eval().requires_grad_(False)

    def example_call(self, device: str | torch.device = "cpu", timestep: float = 0.5, seed: int = 0) -> dict:
        """Keyword arguments of one transformer forward, as the family's pipeline would pass them."""
        generator = torch.Generator().manual_seed(seed)
        kw = self.transformer_kwargs
        dtype, B = self.torch_dtype, self.batch

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        if self.family == "flux":
            return {
                "hidden_states": randn(B, self.image_tokens, kw["in_channels"]),
                "encoder_hidden_states": randn(B, self.text_tokens, kw["joint_attention_dim"]),
                "pooled_projections": randn(B, kw["pooled_projection_dim"]),
                "timestep": torch.full((B,), timestep, device=device, dtype=dtype),
                "guidance": torch.full((B,), 3.5, device=device, dtype=dtype) if kw.get("guidance_embeds") else None,
                "img_ids": torch.zeros(self.image_tokens, 3, device=device),
                "txt_ids": torch.zeros(self.text_tokens, 3, device=device),
                "return_dict": False,
            }
        side = kw["sample_size"]
        return {
            "hidden_states": randn(B, kw["in_channels"], side, side),
            "timestep": torch.full((B,), int(timestep * 999), device=device, dtype=torch.long),
            "class_labels": torch.arange(B, device=device) % kw["num_embeds_ada_norm"],
            "return_dict": False,
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "dtype": self.dtype,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            "batch": self.batch,
            "transformer": self.transformer_kwargs,
        }


def _flux(num_layers, num_single_layers, heads, head_dim, axes, joint_dim, pooled_dim, in_channels=64):
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "pooled_projection_dim": pooled_dim,
        "guidance_embeds": True,
        "axes_dims_rope": axes,
    }


def _dit(num_layers, heads, head_dim, sample_size, in_channels=4):
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


MODEL_CONFIGS: dict[str, ModelConfig] = {
    config.name: config
    for config in [
        ModelConfig(
            "flux1-dev",
            "flux",
            _flux(19, 38, 24, 128, (16, 56, 56), 4096, 768),
            "bfloat16",
            image_tokens=4096,
            text_tokens=512,
            description="FLUX.1-dev at 1024x1024, 512 text tokens",
        ),
        ModelConfig(
            "flux-bench",
            "flux",
            _flux(19, 38, 4, 64, (16, 24, 24), 256, 256),
            image_tokens=256,
            text_tokens=64,
            description="FLUX depth (19+38), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
        ),
        ModelConfig(
            "flux-tiny",
            "flux",
            _flux(2, 4, 2, 16, (4, 6, 6), 32, 32, in_channels=16),
            image_tokens=64,
            text_tokens=8,
            description="tests",
        ),
        ModelConfig(
            "flux-tiny-fulldepth",
            "flux",
            _flux(19, 38, 2, 16, (4, 6, 6), 32, 32, in_channels=16),
            image_tokens=64,
            text_tokens=8,
            description="FLUX depth at hidden 32 (fast CLI tests)",
        ),
        ModelConfig(
            "flux-calib-1024",
            "flux",
            _flux(4, 8, 4, 64, (16, 24, 24), 256, 256),
            image_tokens=1024,
            text_tokens=64,
            description="hidden 256, 4+8 blocks, 1024 image tokens (512x512 px): calibration memory benchmark",
        ),
        ModelConfig(
            "dit-xl-2",
            "dit",
            _dit(28, 16, 72, 32),
            "bfloat16",
            batch=2,
            steps=50,
            description="DiT-XL/2 at 256x256 (32x32 latent), one class with batched CFG",
        ),
        ModelConfig(
            "dit-bench",
            "dit",
            _dit(28, 4, 64, 32),
            batch=2,
            steps=50,
            description="DiT depth (28), hidden 256, 256 tokens, batched CFG (CPU benchmark)",
        ),
        ModelConfig(
            "dit-tiny-fulldepth",
            "dit",
            _dit(28, 2, 16, 8),
            batch=2,
            steps=50,
            description="DiT depth at hidden 32 (fast CLI tests)",
        ),
        ModelConfig("dit-tiny", "dit", _dit(2, 2, 16, 8), batch=2, steps=50, description="tests"),
    ]
}


def get_model_config(name_or_path: str) -> ModelConfig:
    """A named config, or a diffusers ``config.json`` of a Flux or DiT transformer (default input shapes)."""
    if name_or_path in MODEL_CONFIGS:
        return MODEL_CONFIGS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"Unknown model config {name_or_path!r}: expected one of {sorted(MODEL_CONFIGS)} or a path to a "
            f"diffusers transformer config.json."
        )
    raw = json.loads(path.read_text())
    class_name = raw.get("_class_name")
    family = {"FluxTransformer2DModel": "flux", "DiTTransformer2DModel": "dit"}.get(class_name)
    if family is None:
        raise ValueError(f"{path}: _class_name {class_name!r} is not a supported transformer (Flux or DiT).")
    cls = FluxTransformer2DModel if family == "flux" else DiTTransformer2DModel
    init_keys = set(cls.extract_init_dict(raw)[0])
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in init_keys}
    if family == "flux":
        return ModelConfig(path.stem, "flux", kwargs, "bfloat16", image_tokens=4096, text_tokens=512)
    return ModelConfig(path.stem, "dit", kwargs, "bfloat16", batch=2, steps=50)
