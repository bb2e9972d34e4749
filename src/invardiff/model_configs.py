"""Named transformer configs with the inputs of one denoising call, for FLOP profiles, benchmarks and tests.

The named configs live in the family files (``FamilySpec.configs.named``). ``flux1-dev`` and ``dit-xl-2`` are the
real architectures (random weights: speed and FLOPs only). ``flux-bench`` and ``dit-bench`` keep the real depth at
a width where compute dominates on a 2-core CPU. ``*-tiny`` are for tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import LazyTable, SizeRule, families, get_family
from .models.seeding import seeded


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
        """Random-weight transformer (``device="meta"`` allocates nothing, for FLOP counting; a family whose forward
        cannot run on the meta device as it is adapts that build: ``ConfigSpec.meta_adapt``)."""
        spec = get_family(self.family)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.torch_dtype)  # build in the target dtype: no fp32 copy, no cast warning
        try:
            with torch.device(device), seeded(seed, device):  # the caller's global random state is left as it was
                model = spec.transformer_class(**self.transformer_kwargs)
        finally:
            torch.set_default_dtype(previous)
        if torch.device(device).type == "meta" and spec.configs is not None and spec.configs.meta_adapt is not None:
            spec.configs.meta_adapt(model)
        return model.eval().requires_grad_(False)

    def example_call(self, device: str | torch.device = "cpu", timestep: float = 0.5, seed: int = 0) -> dict:
        """Keyword arguments of one transformer forward, as the family's pipeline would pass them."""
        configs = get_family(self.family).configs
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
        init_keys = set(get_family(family).transformer_class.extract_init_dict(dict(config))[0])
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


def video_fields(latent: tuple[int, int, int], patch: tuple[int, int, int] = (1, 2, 2)) -> dict:
    """:class:`ModelConfig` fields of a video latent ``(frames, height, width)`` cut into ``patch`` patches (Wan,
    HunyuanVideo): the image tokens per sample, and the latent shape in ``extra``."""
    frames, height, width = latent
    tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
    return {"image_tokens": tokens, "extra": {"latent": tuple(latent)}}


def video_config(name: str, family: str, transformer_kwargs: dict, latent: tuple[int, int, int], **fields):
    """A :class:`ModelConfig` of a video family whose calls carry a latent of ``latent`` = (frames, height, width)."""
    return ModelConfig(name, family, transformer_kwargs, **video_fields(latent), **fields)


def video_pipeline_size(config: ModelConfig) -> dict:
    """The ``height``, ``width`` and ``num_frames`` pipeline arguments whose latent is the video config's (a VAE
    with 8x spatial and 4x temporal compression, as Wan's and HunyuanVideo's)."""
    frames, height, width = video_latent_shape(config)
    return {"height": height * 8, "width": width * 8, "num_frames": (frames - 1) * 4 + 1}


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
    """The :class:`~invardiff.families.SizeRule` of each size argument of a video pipeline call (WanPipeline,
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


# Every family's named configs, by name.
MODEL_CONFIGS: Mapping[str, ModelConfig] = LazyTable(
    lambda: {config.name: config for spec in families() if spec.configs for config in spec.configs.named}
)


def get_model_config(name_or_path: str) -> ModelConfig:
    """A named config, or a diffusers ``config.json`` of a supported transformer: the family's default call shapes
    (and those the config determines, :attr:`~invardiff.families.ConfigSpec.json_shape`), in the dtype of the
    safetensors weights beside it (none there: the family's default, else bfloat16)."""
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
    spec = next((f for f in families() if f.transformer_class.__name__ == class_name and f.configs), None)
    if spec is None:
        supported = ", ".join(f.transformer_class.__name__ for f in families() if f.configs)
        raise ValueError(f"{path}: _class_name {class_name!r} is not a supported transformer ({supported}).")
    shapes = {"dtype": "bfloat16", **spec.configs.json_defaults}
    if spec.configs.json_shape is not None:
        shapes.update(spec.configs.json_shape(raw))
    shapes["dtype"] = weights_dtype(path.parent) or shapes["dtype"]
    name = path.parent.name if path.stem == "config" else path.stem  # DIR/config.json is named after DIR
    return ModelConfig.from_transformer_config(name, spec.name, raw, **shapes)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def weights_dtype(directory: Path) -> str | None:
    """The floating dtype of the safetensors weights in ``directory`` (read from a file header, no tensor loaded);
    ``None`` when there are none."""
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None
