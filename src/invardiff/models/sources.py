"""Where a command's model comes from: a bundled model by name, your own saved pipeline (a directory written by
``save_pretrained``, or a Hugging Face hub id already in the local cache), a bare transformer directory inside its
family's stock pipeline, or a base pipeline with your (fine-tuned) transformer swapped in.

Nothing here downloads: a hub id is looked up in the local cache only (``local_files_only``), and a missing one is
an error that names the command that downloads it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .registry import BundledModel


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """One model source: ``model`` (a bundled name) alone, or ``pipeline`` and/or ``transformer``.

    Attributes:
        model: a bundled model (``invardiff models``).
        pipeline: a saved diffusers pipeline: a directory, or a hub id (``ORG/NAME``) in the local cache.
        transformer: a transformer directory (``config.json`` and weights). With ``pipeline``: it replaces that
            pipeline's transformer (a fine-tune on its base pipeline); alone: the family's stock pipeline around it
            (:attr:`invardiff.families.PipelineSpec.bare`).
    """

    model: str | None = None
    pipeline: str | None = None
    transformer: str | None = None

    def __post_init__(self):
        if self.model is not None and (self.pipeline or self.transformer):
            raise ValueError(
                f"Give --model {self.model} (a bundled model) or your own --pipeline / --transformer, not both."
            )
        if not (self.model or self.pipeline or self.transformer):
            raise ValueError(
                "Give a model: --model NAME (bundled, see `invardiff models`), --pipeline DIR_OR_HUB_ID (a saved "
                "pipeline) or --transformer DIR (a bare transformer; with --pipeline BASE, a fine-tune of BASE)."
            )

    @classmethod
    def from_args(cls, args, default_model: str | None = None) -> ModelSource:
        """The source of a command's ``--model`` / ``--pipeline`` / ``--transformer`` (``default_model`` when none
        is given)."""
        pipeline, transformer = getattr(args, "pipeline", None), getattr(args, "transformer", None)
        model = getattr(args, "model", None)
        if model is None and not (pipeline or transformer):
            model = default_model
        return cls(model, pipeline, transformer)

    @property
    def name(self) -> str:
        """A short label for file names and reports: the bundled name, else the transformer's or the pipeline's
        directory name (a hub id's last part)."""
        if self.model:
            return self.model
        return Path((self.transformer or self.pipeline).rstrip("/")).name

    @property
    def bundled(self) -> BundledModel | None:
        """The registry entry of a bundled model (its sampling settings), else ``None``."""
        if self.model is None:
            return None
        from .registry import MODELS, get

        if self.model not in MODELS and Path(self.model).is_dir():
            raise ValueError(f"--model takes a bundled model name; {self.model} is a directory: use --pipeline.")
        return get(self.model)

    def load(self, device="cpu"):
        """The pipeline, on ``device``, progress bar off. No network access."""
        if self.model is not None:
            from .registry import load

            _ = self.bundled  # a bad name fails with the list of bundled models (or says to use --pipeline)
            return load(self.model, device)
        from .loading import load_saved_pipeline, quiet_loading

        transformer = load_transformer(self.transformer) if self.transformer else None
        if self.pipeline:
            pipe = load_saved_pipeline(resolve_pipeline(self.pipeline))
            if transformer is not None:
                swap_transformer(pipe, transformer, self.transformer, self.pipeline)
        else:
            with quiet_loading():
                pipe = bare_pipeline(transformer, self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def transformer_config(self) -> Path:
        """The ``config.json`` of the transformer the source samples with, found without loading any weights
        (``inspect``)."""
        if self.model is not None:
            return self.bundled.directory / "config.json"
        if self.transformer:
            return Path(self.transformer) / "config.json"
        return resolve_pipeline(self.pipeline) / "transformer" / "config.json"

    def sampling(self, pipe, steps: int | None = None, guidance_scale: float | None = None, examples=()):
        """How to sample the source (a :class:`BundledModel`): a bundled model's own settings, else the family's
        input kind and output type, ``steps`` (required) and ``guidance_scale`` (default: the pipeline's own
        default, e.g. DiTPipeline 4.0, FluxPipeline 3.5). ``examples``: the inputs evaluated by default."""
        entry = self.bundled
        if entry is not None:
            overrides = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
            return dataclasses.replace(entry, **{k: v for k, v in overrides.items() if v is not None})
        from ..families import resolve_family

        family = resolve_family(pipe.transformer)
        if family.pipeline is None:
            raise ValueError(f"{self.name} is a {family.name} model, whose family describes no pipeline calls.")
        if steps is None:
            raise ValueError(f"Give --steps N: the number of sampling steps of {self.name} (a plan also fixes it).")
        if guidance_scale is None:
            guidance_scale = pipeline_default(pipe, "guidance_scale")
        where = " + ".join(str(part) for part in (self.pipeline, self.transformer) if part)
        kind = family.pipeline.input_kind
        return BundledModel(
            self.name, family.name, type(pipe).__name__, where, steps, guidance_scale, kind, tuple(examples)
        )


def pipeline_default(pipe, argument: str):
    """The default of ``argument`` in the pipeline's ``__call__``, or in the first base class's that names it (a
    subclass may wrap its base's call with ``**kwargs``, as flux-shapes' does); ``None`` when none has one."""
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        parameter = inspect.signature(call).parameters.get(argument) if call is not None else None
        if parameter is not None:
            return None if parameter.default is inspect.Parameter.empty else parameter.default
    return None


def resolve_pipeline(reference: str) -> Path:
    """The directory of ``reference``: a directory as is, or a hub id's snapshot in the local Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``; never downloaded)."""
    path = Path(reference)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--pipeline {reference} is a file; expected a pipeline directory (save_pretrained).")
        return path
    if reference.count("/") != 1 or reference.startswith((".", "/", "~")):
        raise ValueError(
            f"--pipeline {reference}: no such directory, and not a hub id (ORG/NAME) either; give a directory saved "
            "with pipe.save_pretrained(DIR) or the hub id of a downloaded model."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(reference, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"--pipeline {reference}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and invardiff "
            f"never downloads; download it first with `hf download {reference}` (older huggingface_hub: "
            f"`huggingface-cli download {reference}`), or give a local directory."
        ) from None


def transformer_class(config_path: Path):
    """The diffusers transformer class named by a ``config.json`` (``_class_name``), and its family; one-line errors
    for a missing file or an unsupported class."""
    from ..families import families

    if not config_path.is_file():
        raise ValueError(
            f"{config_path.parent} is not a transformer directory (no config.json); save one with "
            "transformer.save_pretrained(DIR), or give a whole pipeline with --pipeline."
        )
    class_name = json.loads(config_path.read_text()).get("_class_name")
    for spec in families():
        if spec.transformer_class.__name__ == class_name:
            return spec.transformer_class, spec
    supported = ", ".join(spec.transformer_class.__name__ for spec in families())
    raise ValueError(f"{config_path}: _class_name {class_name!r} is not a supported transformer ({supported}).")


def load_transformer(directory: str):
    """The transformer saved in ``directory`` (class from its ``config.json``, ``local_files_only``)."""
    from .loading import quiet_loading

    cls, _ = transformer_class(Path(directory) / "config.json")
    with quiet_loading():
        return cls.from_pretrained(directory, local_files_only=True).eval()


def swap_transformer(pipe, transformer, transformer_path: str, pipeline_ref: str) -> None:
    """Put ``transformer`` (a fine-tune) into the base pipeline ``pipe`` in place of its own; the families must
    match."""
    from ..families import resolve_family

    base, tuned = resolve_family(pipe.transformer), resolve_family(transformer)
    if base.name != tuned.name:
        raise ValueError(
            f"--transformer {transformer_path} is a {type(transformer).__name__} ({tuned.name}) but --pipeline "
            f"{pipeline_ref} is a {base.name} pipeline; give the base pipeline of that transformer's family."
        )
    pipe.register_modules(transformer=transformer)


def bare_pipeline(transformer, path: str):
    """The family's stock pipeline around a bare ``transformer``, where the family has one that needs nothing
    else (:attr:`~invardiff.families.PipelineSpec.bare`); otherwise an error that says what else is needed."""
    from ..families import resolve_family

    family = resolve_family(transformer)
    bare = family.pipeline.bare if family.pipeline is not None else None
    if bare is None:
        raise ValueError(
            f"--transformer {path} is a {type(transformer).__name__} ({family.name}), whose pipeline also needs "
            f"text encoders, tokenizers and a VAE that a transformer directory does not hold; give the base "
            f"model's pipeline too: --pipeline BASE_DIR_OR_HUB_ID --transformer {path} (your transformer replaces "
            "the base pipeline's)."
        )
    pipe, note = bare(transformer)
    logger.warning("--transformer %s: %s", path, note)
    return pipe
