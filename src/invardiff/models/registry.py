"""Bundled trained reference models: ``load(name)`` returns a ready diffusers pipeline, with no network access."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..families import INPUT_KINDS, get_family, is_video
from ..families.model_config import ModelConfig
from .loading import quiet_loading


@dataclass(frozen=True)
class BundledModel:
    """A bundled model and how it is meant to be sampled.

    Attributes:
        name: registry name; family: invardiff family; pipeline: diffusers pipeline class name.
        num_inference_steps / guidance_scale: the sampling settings the model card reports.
        inputs: ``"prompt"`` (Flux) or ``"class"`` (DiT); examples: the demo's fixed inputs.
        call_shape: :class:`~invardiff.families.model_config.ModelConfig` call-shape fields of one transformer call
            (tokens, batch), for FLOP profiles of the model.
        pipeline_kwargs: further arguments of every pipeline call (a video model's clip size and frame count).
        demo_preset: the InvarDiff preset ``invardiff demo`` calibrates by default (one of the family's presets).
    """

    name: str
    family: str
    pipeline: str
    description: str
    num_inference_steps: int
    guidance_scale: float
    inputs: str
    examples: tuple = field(default_factory=tuple)
    call_shape: dict = field(default_factory=dict, hash=False)
    pipeline_kwargs: dict = field(default_factory=dict, hash=False)
    demo_preset: str = "fast"

    @property
    def directory(self) -> Path:
        return Path(str(resources.files("invardiff") / "models" / "weights" / self.name))

    @property
    def video(self) -> bool:
        """Whether the pipeline returns clips (``.frames``, (B, F, C, H, W)) rather than images."""
        return is_video(self.family)

    def model_config(self):
        """The :class:`~invardiff.families.model_config.ModelConfig` of this model as it samples (its transformer
        config, float32, its call shapes): FLOP profiles and ideal speedups of plans on it."""
        import json

        config = json.loads((self.directory / "config.json").read_text())
        return ModelConfig.from_transformer_config(self.name, self.family, config, **self.call_shape)

    def call_kwargs(self, item, seed: int, batch: int = 1, **overrides) -> dict:
        """Arguments of one pipeline call generating ``item`` (a prompt or a class id) with ``seed``; with
        ``batch`` > 1, that many images of ``item`` in one call, with seeds ``seed, seed + 1, ...``."""
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(batch)]
        generator = generators[0] if batch == 1 else generators
        key = INPUT_KINDS[self.inputs].pipeline_arg
        value = [item] * batch if self.inputs == "class" or batch > 1 else item
        kwargs = {
            key: value,
            "num_inference_steps": self.num_inference_steps,
            "generator": generator,
            "guidance_scale": self.guidance_scale,
            "output_type": get_family(self.family).pipeline.output_type,
            **self.pipeline_kwargs,
        }
        return {**kwargs, **overrides}


MODELS = {
    "flux-shapes": BundledModel(
        "flux-shapes",
        "flux",
        "FluxPipeline",
        "text-conditioned Flux (2 dual + 6 single blocks, hidden 128) on 32x32 procedural coloured shapes",
        num_inference_steps=28,
        guidance_scale=3.5,
        inputs="prompt",
        examples=(
            "a red circle on the left, black background",
            "a blue square in the center, white background",
            "a yellow triangle on the right, black background",
            "a green circle on the top, white background",
        ),
        call_shape={"image_tokens": 256, "text_tokens": 16, "batch": 1},
    ),
    "dit-digits": BundledModel(
        "dit-digits",
        "dit",
        "DiTPipeline",
        "class-conditional DiT (6 blocks, hidden 128) on scikit-learn's 8x8 digits at 16x16",
        num_inference_steps=50,
        guidance_scale=1.5,
        inputs="class",
        examples=(0, 3, 5, 8),
        call_shape={"batch": 2},  # batched CFG
    ),
    "wan-motion": BundledModel(
        "wan-motion",
        "wan",
        "WanPipeline",
        "text-conditioned Wan video (5 blocks, hidden 128) on 8-frame 32x32 clips of procedural moving shapes",
        num_inference_steps=50,
        guidance_scale=5.0,
        inputs="prompt",
        examples=(
            "a red circle moving left fast",
            "a blue square moving up slow",
            "a yellow circle moving down fast",
            "a green square moving right slow",
        ),
        # 8 frames of 32x32 pixels in patches of 2x4x4: 256 tokens; CFG runs cond and uncond as separate calls
        call_shape={"image_tokens": 256, "text_tokens": 8, "batch": 1, "extra": {"latent": (8, 32, 32)}},
        pipeline_kwargs={"height": 32, "width": 32, "num_frames": 8, "max_sequence_length": 8},
        demo_preset="debug-args",  # the thresholds the official Wan script runs with (SPEC.md A.8)
    ),
}


# Models whose training is in progress: listed here (not in MODELS) until they pass their learning check.
UNBUNDLED: dict[str, BundledModel] = {}


def get(name: str, include_unbundled: bool = False) -> BundledModel:
    if include_unbundled and name in UNBUNDLED:
        return UNBUNDLED[name]
    if name in UNBUNDLED:
        raise ValueError(
            f"Model {name!r} is not bundled yet (its training has not passed its learning check); bundled models: "
            f"{sorted(MODELS)}. Train it with training/train_{name.replace('-', '_')}.py."
        )
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; bundled models: {sorted(MODELS)} (see `invardiff models`).")
    return MODELS[name]


def load(name: str, device: str | torch.device = "cpu", include_unbundled: bool = False):
    """The bundled model ``name`` as a diffusers pipeline on ``device`` (float32), loaded from package files.
    ``include_unbundled`` also loads a model under training from its package directory (training scripts)."""
    entry = get(name, include_unbundled)
    if not (entry.directory / "diffusion_pytorch_model.safetensors").exists():
        raise FileNotFoundError(f"The weights of {name!r} are missing from {entry.directory}; reinstall invardiff.")
    with quiet_loading():
        pipe = _LOADERS[entry.name](entry)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_flux_shapes(entry: BundledModel):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from .flux_shapes import build_pipeline

    transformer = FluxTransformer2DModel.from_pretrained(entry.directory, local_files_only=True)
    weights = load_file(str(entry.directory / "text_encoders.safetensors"))
    text_weights = {
        prefix: {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(prefix + ".")}
        for prefix in ("clip", "t5")
    }
    text_weights["t5"]["encoder.embed_tokens.weight"] = text_weights["t5"]["shared.weight"]  # tied, stored once
    return build_pipeline(transformer, text_weights)


def _load_dit_digits(entry: BundledModel):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    from ..toy_components import IdentityVAE

    transformer = DiTTransformer2DModel.from_pretrained(entry.directory, local_files_only=True).eval()
    id2label = {i: f"digit {i}" for i in range(10)}
    pipe = DiTPipeline(
        transformer=transformer,
        vae=IdentityVAE(latent_channels=1),
        scheduler=get_family(entry.family).pipeline.scheduler(),
        id2label=id2label,
    )
    # DiTPipeline does not keep id2label in its config, so save_pretrained would drop it and the saved model would
    # accept all 1000 class ids of its embedding table (10 trained); in the config it is saved and loaded back.
    pipe.register_to_config(id2label=id2label)
    return pipe


def _load_wan_motion(entry: BundledModel):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from .wan_motion import build_pipeline

    transformer = WanTransformer3DModel.from_pretrained(entry.directory, local_files_only=True)
    text_weights = load_file(str(entry.directory / "text_encoders.safetensors"))
    text_weights["encoder.embed_tokens.weight"] = text_weights["shared.weight"]  # tied, stored once
    return build_pipeline(transformer, text_weights)


# How each model's pipeline is put together from its package files, by model name.
_LOADERS = {"flux-shapes": _load_flux_shapes, "dit-digits": _load_dit_digits, "wan-motion": _load_wan_motion}
