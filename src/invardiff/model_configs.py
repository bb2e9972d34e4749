"""Named transformer configs with the inputs of one denoising call, for FLOP profiles, benchmarks and tests.

The named configs live in the family files (``FamilySpec.configs.named``), as
:class:`~invardiff.families.model_config.ModelConfig` (plain data at the bottom of the import graph, which the family
files fill); this module finds them by name, or reads a diffusers ``config.json``. ``flux1-dev`` and ``dit-xl-2``
are the real architectures (random weights: speed and FLOPs only). ``flux-bench`` and ``dit-bench`` keep the real
depth at a width where compute dominates on a 2-core CPU. ``*-tiny`` are for tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .families import LazyTable, families
from .families.model_config import ModelConfig


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
