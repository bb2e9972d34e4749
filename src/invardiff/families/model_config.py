"""A named random-weight transformer config with the shape of one denoising call, and the video call-shape helpers.

Plain data at the bottom of the import graph: the family files declare their named configs
(``ConfigSpec.named``) with :class:`ModelConfig`, and the tools that use them (``invardiff.model_configs``: lookup by
name and from a ``config.json``; FLOP profiles, benchmarks, toy pipelines) sit above and import it from here. A
config builds its transformer and example calls through its family, which it finds with
:func:`~invardiff.families.table.find_family` (the registry's lookup, installed by the registry) rather than by
importing the registry, which imports the family files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..seeding import seeded
from .spec import SizeRule
from .table import find_family


@dataclass(frozen=True)
class ModelConfig:
    """A transformer config plus the shape of one denoising call.

    Attributes:
        family: the model family (``invardiff.families``), which builds the transformer and its example calls.
        image_tokens / text_tokens (Flux): tokens per sample; image tokens = (height / 16) * (width / 16).
        batch: samples per transformer call (DiT: 2 = one class with batched CFG).
        extra: family-specific call shapes (video families: ``{"latent": (frames, height, width)}``).
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
        spec = find_family(self.family)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.torch_dtype)  # build in the target dtype: no fp32 copy, no cast warning
        try:
            with torch.device(device), seeded(seed, device):  # the caller's global random state is left as it was
                model = spec.transformer_class(**self.transformer_kwargs)
        finally:
            torch.set_default_dtype(previous)
        if torch.device(device).type == "meta" and spec.configs is not None and spec.configs.on_meta is not None:
            spec.configs.on_meta(model)
        return model.eval().requires_grad_(False)

    def example_call(self, device: str | torch.device = "cpu", timestep: float = 0.5, seed: int = 0) -> dict:
        """Keyword arguments of one transformer forward, as the family's pipeline would pass them."""
        configs = find_family(self.family).configs
        if configs is None:
            raise ValueError(f"Model family {self.family!r} describes no example calls (FamilySpec.configs).")
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=self.torch_dtype)

        return configs.example_call(self, device, timestep, randn)

    @classmethod
    def from_transformer_config(cls, name: str, family: str, config: dict, **fields) -> ModelConfig:
        """The config of a diffusers transformer ``config`` (a ``config.json`` or ``transformer.config``); ``fields``
        are the other :class:`ModelConfig` fields (call shapes, dtype)."""
        init_keys = set(find_family(family).transformer_class.extract_init_dict(dict(config))[0])
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in init_keys}
        return cls(name, family, kwargs, **fields)

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


# The (temporal, spatial) compression of Wan's and HunyuanVideo's VAEs: a video config's unless it names its own.
DEFAULT_VIDEO_COMPRESSION = (4, 8)


def video_fields(
    latent: tuple[int, int, int],
    patch: tuple[int, int, int] = (1, 2, 2),
    compression: tuple[int, int] | None = None,
) -> dict:
    """:class:`ModelConfig` fields of a video latent ``(frames, height, width)`` cut into ``patch`` patches (Wan,
    HunyuanVideo): the image tokens per sample, and the latent shape in ``extra``; ``compression``: the VAE's
    (temporal, spatial) factors where they are not :data:`DEFAULT_VIDEO_COMPRESSION` (LTX-Video: 8 and 32)."""
    frames, height, width = latent
    tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
    extra = {"latent": tuple(latent)}
    if compression is not None:
        extra["compression"] = tuple(compression)
    return {"image_tokens": tokens, "extra": extra}


def video_config(
    name: str,
    family: str,
    transformer_kwargs: dict,
    latent: tuple[int, int, int],
    patch: tuple[int, int, int] = (1, 2, 2),
    compression: tuple[int, int] | None = None,
    **fields,
):
    """A :class:`ModelConfig` of a video family whose calls carry a latent of ``latent`` = (frames, height, width)
    (``patch``, ``compression``: as :func:`video_fields`)."""
    return ModelConfig(name, family, transformer_kwargs, **video_fields(latent, patch, compression), **fields)


def video_pipeline_size(config: ModelConfig) -> dict:
    """The ``height``, ``width`` and ``num_frames`` pipeline arguments whose latent is the video config's, through
    the config's VAE compression (default: 8x spatial and 4x temporal, as Wan's and HunyuanVideo's)."""
    frames, height, width = video_latent_shape(config)
    temporal, spatial = config.extra.get("compression", DEFAULT_VIDEO_COMPRESSION)
    return {"height": height * spatial, "width": width * spatial, "num_frames": (frames - 1) * temporal + 1}


def video_call_fields(pipe, call_kwargs: dict, default_size: tuple[int, int, int], text_tokens: int, patch) -> dict:
    """:class:`ModelConfig` fields of one sample of the video pipeline call ``pipe(**call_kwargs)``;
    ``default_size``: the pipeline's (height, width, num_frames) defaults, ``text_tokens``: its default text length."""
    height, width, frames = (
        call_kwargs.get(key) or default
        for key, default in zip(("height", "width", "num_frames"), default_size, strict=True)
    )
    spatial = pipe.vae_scale_factor_spatial
    latent = ((frames - 1) // pipe.vae_scale_factor_temporal + 1, height // spatial, width // spatial)
    tokens = call_kwargs.get("max_sequence_length") or text_tokens
    return {**video_fields(latent, patch), "text_tokens": tokens, "batch": 1}


def video_size_rules(pipe, patch) -> dict:
    """The :class:`~invardiff.families.spec.SizeRule` of each size argument of a video pipeline call (WanPipeline,
    HunyuanVideoPipeline): both refuse sides that are not multiples of 16, the transformer cuts the latent into
    ``patch`` (frames, height, width) patches, and the VAE compresses frames to ``1 + (F - 1) / temporal``."""
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    side = math.lcm(16, spatial * patch[1], spatial * patch[2])
    why = f"the pipeline's multiple of 16 and the VAE's spatial factor {spatial} x the patch size {patch[1]}"
    frames = SizeRule(temporal, f"the VAE's temporal factor {temporal}", offset=1)
    return {"height": SizeRule(side, why), "width": SizeRule(side, why), "num_frames": frames}


def video_latent_shape(config: ModelConfig) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` latent of one call of a video config."""
    latent = config.extra.get("latent")
    if latent is None:
        raise ValueError(f"Model config {config.name!r} has no video latent shape (extra['latent']).")
    return tuple(latent)
