"""Load a pipeline saved with ``save_pretrained``, including the pipelines and components invardiff itself defines
(the bundled flux-shapes pipeline class, the identity VAE of pixel-space models), which diffusers cannot resolve
by name."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# Load-time log lines of diffusers and transformers that do not concern a user of these models, by logger name:
# substrings of the messages silenced while loading. Everything else they log still shows.
QUIET_AT_LOAD = {
    # an image processor the pipelines never use (no image inputs)
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # accelerate only speeds up loading large checkpoints
    "diffusers.models.modeling_utils": ("because `accelerate` was not found",),
    "diffusers.pipelines.pipeline_utils": (
        "because `accelerate` was not found",
        "Expected types for vae",
        "Expected types for id2label",
    ),
    # diffusers 0.42 registers torchao < 0.16 tensor classes for torch.load when torchao is installed (the dev
    # extras install it for the quantization tests); bundled models are safetensors, never torchao pickles
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    # torchao's wheel carries CUDA kernels for another Python; its CPU int8 path does not use them, nor Triton
    "torchao": ("Failed to load",),
    "torchao.kernel.intmm": ("Detected no triton",),
    # torchao registers its enums with torch's pytree at import, which torch 2.13 no longer needs
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence :data:`QUIET_AT_LOAD` (these messages on these loggers only) and diffusers' loading progress bar for
    the duration of a model load."""
    from diffusers.utils import logging as diffusers_logging

    filters = [(logging.getLogger(name), _DropMessages(fragments)) for name, fragments in QUIET_AT_LOAD.items()]
    for logger, dropper in filters:
        logger.addFilter(dropper)
    bar = diffusers_logging.is_progress_bar_enabled()  # "Loading pipeline components": a bar per load, on stderr
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
        for logger, dropper in filters:
            logger.removeFilter(dropper)


# Pipeline classes of invardiff that a saved model_index.json may name, by class name -> module.
PIPELINE_CLASSES = {"ShapesFluxPipeline": "invardiff.models.flux_shapes"}


def load_saved_pipeline(path: str | Path):
    """The pipeline saved in directory ``path`` (``local_files_only``; no network access).

    Components of an ``invardiff.*`` library (the parameter-free :class:`~invardiff.toy_pipelines.IdentityVAE`)
    are rebuilt from their ``config.json``: they have no weights file for diffusers to load. Components saved as
    ``None`` (a random-weight WanPipeline without a VAE) load as ``None``.
    """
    import diffusers

    directory = Path(path)
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise ValueError(
            f"{path} is not a saved diffusers pipeline (no model_index.json there); save one with "
            f"pipe.save_pretrained(DIR), or use a bundled model with --model NAME."
        )
    index = json.loads(index_path.read_text())
    class_name = index.get("_class_name")
    if class_name in PIPELINE_CLASSES:
        pipeline_class = getattr(importlib.import_module(PIPELINE_CLASSES[class_name]), class_name)
    elif isinstance(class_name, str) and hasattr(diffusers, class_name):
        pipeline_class = diffusers.DiffusionPipeline
    else:
        raise ValueError(
            f"{path} holds a {class_name!r} pipeline, which is neither a diffusers pipeline class nor one of "
            f"invardiff's ({', '.join(PIPELINE_CLASSES)})."
        )
    with quiet_loading():
        own = {}
        for name, value in index.items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("invardiff."):
                component_class = getattr(importlib.import_module(value[0]), value[1])
                own[name] = component_class.from_config(component_class.load_config(directory / name))
            elif value == [None, None]:  # saved without it (a toy WanPipeline's VAE): diffusers would ask for it
                own[name] = None
        return pipeline_class.from_pretrained(directory, local_files_only=True, **own)
