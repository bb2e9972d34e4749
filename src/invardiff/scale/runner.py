"""One process's share of a batch generation: load the pipeline once, enable the policy once, run items.

The same :class:`ItemRunner` runs inside every Ray actor (:mod:`invardiff.scale.ray_pool`) and in the plain loop
:func:`run_local`, so a Ray run and a single-process run execute the same calls: one pipeline call per item, with
its own seeded generator. An item's image therefore does not depend on the worker, the worker count or the order.
A video model's item is a clip (written as an animated GIF), an image model's an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .items import Manifest, WorkItem, settings_digest


SOURCE_KINDS = ("bundled", "pretrained", "model_config")


@dataclass(frozen=True)
class PipelineSource:
    """Where a worker loads its pipeline from: picklable, so that it can be shipped to Ray actors.

    Attributes:
        kind: ``"bundled"`` (a model of ``invardiff models``), ``"pretrained"`` (a local diffusers pipeline
            directory) or ``"model_config"`` (a random-weight toy pipeline, seeded: every worker builds the same).
        name: the model name, directory or config name.
        device: torch device of the pipeline in the worker (``"cuda"`` is the GPU Ray gave the actor).
    """

    kind: str
    name: str
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"PipelineSource.kind must be one of {SOURCE_KINDS}, got {self.kind!r}.")

    def load(self):
        if self.kind == "bundled":
            from ..models import load

            return load(self.name, self.device)
        if self.kind == "model_config":
            from ..model_configs import get_model_config
            from ..toy_pipelines import build_pipeline

            config = get_model_config(self.name)
            pipe = build_pipeline(config, config.build_transformer(self.device), text_encoders=True)
        else:
            from ..models.sources import ModelSource

            # a directory or a cached hub id; invardiff's own pipeline classes and IdentityVAE included
            pipe = ModelSource(pipeline=self.name).load()
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def identity(self) -> dict:
        """What identifies the model's weights, for the manifest: a bundled model's name and the SHA-256 of its
        files; a pipeline directory's resolved path, the SHA-256 of its JSON configs and the names and sizes of
        its other files (hashing multi-GiB weights on every run would cost minutes); a toy config's name (its
        weights are seeded: every load is the same)."""
        if self.kind == "model_config":
            return {"kind": self.kind, "name": self.name}
        if self.kind == "bundled":
            from ..models import get

            directory = get(self.name).directory
            return {"kind": self.kind, "name": self.name, "files_sha256": _files_digest(directory, everything=True)}
        directory = Path(self.name).resolve()
        return {"kind": self.kind, "name": str(directory), "files_sha256": _files_digest(directory, everything=False)}

    def call_settings(self, steps: int) -> dict:
        """The arguments of every item's pipeline call besides its input and generator (steps, guidance, size,
        frames, ...): the bundled model's sampling settings, or the step count for other pipelines (which are
        called with their own defaults otherwise)."""
        if self.kind != "bundled":
            return {"num_inference_steps": steps, "output_type": "np"}
        from ..families import INPUT_KINDS
        from ..models import get

        entry = get(self.name)
        kwargs = entry.call_kwargs(None, 0, num_inference_steps=steps, output_type="np")
        del kwargs["generator"], kwargs[INPUT_KINDS[entry.inputs].pipeline_arg]
        return kwargs

    def default_steps(self) -> int | None:
        if self.kind == "bundled":
            from ..models import get

            return get(self.name).num_inference_steps
        return None

    def call_kwargs(self, pipe, item: WorkItem, steps: int) -> dict:
        """One pipeline call generating ``item``: the bundled model's sampling settings, or the family's input
        argument and output type for other pipelines."""
        if self.kind == "bundled":
            from ..models import get

            return get(self.name).call_kwargs(item.input, item.seed, num_inference_steps=steps, output_type="np")
        from ..families import resolve_family

        spec = resolve_family(pipe.transformer).pipeline
        return {
            spec.inputs.pipeline_arg: [item.input],
            "generator": torch.Generator(device="cpu").manual_seed(item.seed),
            "num_inference_steps": steps,
            "output_type": "np",
        }


def _files_digest(directory: Path, everything: bool) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{path.stat().st_size}\0".encode())
        if everything or path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def sampling_steps(source: PipelineSource, requested: int | None, policy) -> int:
    """The step count of a run: ``requested``, else the plan's (bare, or inside a plan / plan+probe config; DiCache
    may fix one too), else the bundled model's."""
    planned = getattr(getattr(policy, "plan", policy), "num_inference_steps", None)
    steps = requested or planned or source.default_steps()
    if steps is None:
        raise ValueError(f"Give the number of sampling steps for {source.kind} pipeline {source.name!r}.")
    return steps


def output_settings(source: PipelineSource, policy, steps: int | None = None) -> dict:
    """Everything besides an item's input and seed that changes its output, as JSON values: the model
    (:meth:`PipelineSource.identity`), the pipeline call's arguments (:meth:`PipelineSource.call_settings`) and the
    policy with every setting (:func:`policy_settings`). The device is left out: a run resumed on another device
    makes the same outputs up to floating-point rounding."""
    call = source.call_settings(sampling_steps(source, steps, policy))
    return {"model": source.identity(), "call": call, "policy": policy_settings(policy)}


def policy_settings(value):
    """A policy config (``None``, a :class:`~invardiff.plan.CachePlan`, or a dataclass config such as
    :class:`~invardiff.policies.plan.PlanConfig` or :class:`~invardiff.dicache.DiCacheConfig`) as JSON values:
    the config's type and each field, a plan as the SHA-256 of its JSON (with its provenance), arrays as digests."""
    from ..plan import CachePlan

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # JSON has no inf (plan+probe's accept-all veto)
    if isinstance(value, CachePlan):
        return {"plan_sha256": settings_digest(value.to_dict())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: policy_settings(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [policy_settings(item) for item in value]
    if isinstance(value, dict):
        return {str(key): policy_settings(item) for key, item in value.items()}
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # an Enum
        return value.value
    raise TypeError(
        f"Cannot record a {type(value).__name__} in the manifest's settings; give the policy as a dataclass config "
        "of plain values (invardiff.enable's configs are)."
    )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as 8-bit pixels, rounded as ``invardiff generate`` rounds them."""
    return (np.asarray(image) * 255).round().astype(np.uint8)


class ItemRunner:
    """A pipeline loaded once, generating one item per pipeline call under the policy last given to :meth:`use`.

    Args:
        source: where the pipeline comes from.
        steps: sampling steps (default: the plan's, else the bundled model's).
        threads: torch CPU threads of this process (``None``: unchanged). A Ray actor gets its CPU share.
    """

    def __init__(self, source: PipelineSource, steps: int | None = None, threads: int | None = None):
        from ..families import is_video, resolve_family

        if threads is not None:
            torch.set_num_threads(threads)
        self.source, self.requested_steps = source, steps
        self.pipe = source.load()
        self.policy = None
        self.steps = sampling_steps(source, steps, None)
        self.video = is_video(resolve_family(self.pipe.transformer).name)  # its pipeline returns clips (.frames)

    def use(self, policy) -> None:
        """Enable ``policy`` (a config for :func:`invardiff.enable`; ``None``: full compute) instead of the
        current one. Enabling validates the policy against the model once, not per item."""
        from .. import api

        self.close()
        self.steps = sampling_steps(self.source, self.requested_steps, policy)
        if policy is not None:
            api.enable(self.pipe, policy)
        self.policy = policy

    @torch.no_grad()
    def run(self, item: WorkItem) -> tuple[np.ndarray, dict]:
        """The item's image as uint8 ``(H, W, C)`` (a video model's clip: ``(F, H, W, C)``) and its manifest fields:
        the SHA-256 of the pipeline's float output (bit identity across workers is checked on it, not on the
        rounded pixels) and the policy summary."""
        result = self.pipe(**self.source.call_kwargs(self.pipe, item, self.steps))
        image = np.ascontiguousarray((result.frames if self.video else result.images)[0])  # [F,] H, W, C in [0, 1]
        info = {"output_sha256": hashlib.sha256(image.tobytes()).hexdigest(), "steps": self.steps}
        info["policy"] = policy_summary(self.pipe) if self.policy is not None else None
        return to_uint8(image), info

    def close(self) -> None:
        """Disable the current policy (the pipeline stays loaded)."""
        from .. import api

        if self.policy is not None:
            api.disable(self.pipe)
            self.policy = None


def policy_summary(pipe) -> dict:
    """The manifest's record of what the policy did on the last item: the policy's scalar settings and, per CFG
    branch, each step's status and the computed / reused counts per module kind."""
    from .. import api

    summary = api.summary(pipe)
    settings = {k: v for k, v in summary.policy.items() if isinstance(v, (str, int, float, bool)) or v is None}
    branches = {}
    for name, branch in summary.branches.items():
        full = branch.to_dict()
        branches[name] = {key: full[key] for key in ("steps", "steps_computed", "steps_step_cached", "module_counts")}
    return {**settings, "num_steps": summary.num_steps, "branches": branches}


@dataclass
class RunReport:
    """What a batch generation did: items generated now, items skipped as already done, wall time of the loop
    (pipeline loading excluded), workers, and items per second over the generated items."""

    generated: int
    skipped: int
    seconds: float
    workers: int
    output: str

    @property
    def items_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**self.__dict__, "items_per_second": self.items_per_second}


def run_local(
    source: PipelineSource,
    items: list[WorkItem],
    output: str | Path,
    policy=None,
    steps: int | None = None,
    progress: Callable[[WorkItem], None] | None = None,
    overwrite: bool = False,
) -> RunReport:
    """The plain loop: generate the pending ``items`` in this process, writing each to ``output`` and its
    manifest. The same runner as every Ray actor, so the images are those of :func:`ray_pool.generate_on_ray`.
    ``output`` holding items of other settings raises :class:`~invardiff.scale.items.SettingsMismatch` unless
    ``overwrite``."""
    manifest = Manifest(output, output_settings(source, policy, steps), overwrite)
    pending = manifest.pending(items)
    runner = ItemRunner(source, steps)
    runner.use(policy)
    try:
        start = time.perf_counter()
        for item in pending:
            image, info = runner.run(item)
            manifest.record(item, image, {**info, "worker": "local"})
            if progress is not None:
                progress(item)
        seconds = time.perf_counter() - start
    finally:
        runner.close()
    return RunReport(len(pending), len(items) - len(pending), seconds, 1, str(manifest.directory))
