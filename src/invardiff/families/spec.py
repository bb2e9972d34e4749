"""Data that describes how a model family's transformer is laid out for caching.

A family file (``flux.py``, ``dit.py``) only fills these dataclasses and writes the few lines of model code that
cannot be data: embedding the input and the timestep of a call, and running the output head on a cached hidden
state (with the same conditioning code). Everything else (hooks, plans, statistics, FLOP profiles) is generic and
reads the spec. The optional parts describe what the tools around the engine need: calibration defaults
(:attr:`FamilySpec.calibration`, presets), the stock pipeline (:class:`PipelineSpec`), random-weight configs
(:class:`ConfigSpec`) and the official books (:class:`OfficialSpec`).

The bottom of the import graph: the engine facts and the tools' data are plain data here (and in
``calibration_spec.py``, ``model_config.py``); the code that uses the tools' data (calibration, official books,
config lookup, toy pipelines) sits above the registry and imports this module, never the other way round.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .calibration_spec import FamilyCalibration, InvarDiffThresholds


@dataclass(frozen=True)
class ReuseUnit:
    """One piece of a block that is either computed or replaced by its last computed output.

    Attributes:
        name: name of the unit inside its block list, used in summaries and FLOP profiles.
        kinds: plan module kinds that control the unit. The unit is reused only when every kind's bit is set
            (Flux's joint attention serves both ``attn`` and ``context_attn``, so it is reused only when both are).
        module: path of the submodule, relative to the block, whose output is the branch output before gating.
        passthrough: path of a submodule applied right after ``module`` whose output is what is cached (Flux single
            blocks cache ``act_mlp(proj_mlp(x))``); on reuse it passes the cached tensor through untouched.
        kind_outputs: for each kind, the index of its feature in the unit's output tuple, or ``None`` for the whole
            output (Flux joint attention returns ``(image, text)``: ``attn`` is index 0, ``context_attn`` 1).
            Calibration measures each kind on its own feature.
        present: for a unit that some blocks lack, ``present(block)`` says whether ``block`` has it (SD3's last
            joint block has no ``ff_context``); ``None``: every block has it, and a block whose ``module`` path
            does not resolve fails ``invardiff.enable`` with a :class:`SpecError` naming the block. A block without
            the unit has nothing to compute or reuse: the plan's bits for it are ignored (the summary shows it as
            not executed, its FLOP saving is 0), so that plans calibrated or written for the whole list stay valid.
    """

    name: str
    kinds: tuple[str, ...]
    module: str
    passthrough: str | None = None
    kind_outputs: tuple[int | None, ...] | None = None
    present: Callable[[torch.nn.Module], bool] | None = field(default=None, compare=False)

    def in_block(self, block: torch.nn.Module) -> bool:
        """Whether ``block`` has this unit (always, unless the spec says some blocks lack it)."""
        return self.present is None or bool(self.present(block))

    def kind_features(self, output) -> dict[str, torch.Tensor]:
        """The feature of each kind in this unit's output."""
        if self.kind_outputs is None:
            return dict.fromkeys(self.kinds, output)
        return {
            kind: output if i is None else output[i] for kind, i in zip(self.kinds, self.kind_outputs, strict=True)
        }

    @property
    def submodules(self) -> tuple[str, ...]:
        return (self.module,) if self.passthrough is None else (self.module, self.passthrough)


# The module kinds of an MMDiT dual-stream block (FLUX, FLUX.2, Chroma, HunyuanVideo, Qwen-Image).
DUAL_STREAM_KINDS = ("attn", "context_attn", "ff", "context_ff")
SELF_CROSS_FF_KINDS = ("self_attn", "cross_attn", "ffn")  # the kinds of self_cross_ff_units()


def joint_attention_unit(module: str = "attn", present=None) -> ReuseUnit:
    """The joint attention of a block at path ``module``: one call over image and text tokens that returns ``(image,
    text)``, reused only when both its kinds ``attn`` and ``context_attn`` are set; ``present`` as
    :attr:`ReuseUnit.present`."""
    return ReuseUnit("attn", ("attn", "context_attn"), module, kind_outputs=(0, 1), present=present)


def dual_stream_units(
    ff: str = "ff", context_ff: str = "ff_context", attn_present=None, attn: str = "attn", context_ff_present=None
) -> tuple[ReuseUnit, ...]:
    """The reusable units of an MMDiT dual-stream block: the joint attention at ``attn``
    (:func:`joint_attention_unit`), the image feed-forward at ``ff`` and the text feed-forward at ``context_ff``
    (module paths in the block); ``attn_present`` and ``context_ff_present`` as :attr:`ReuseUnit.present` (a
    ``context_pre_only`` last block has no text feed-forward: SD3, Mochi)."""
    return (
        joint_attention_unit(attn, attn_present),
        ReuseUnit("ff", ("ff",), ff),
        ReuseUnit("context_ff", ("context_ff",), context_ff, present=context_ff_present),
    )


def self_cross_ff_units(ff: str = "ff") -> tuple[ReuseUnit, ...]:
    """The reusable units of a block of self-attention at ``attn1``, text cross-attention at ``attn2`` and a
    feed-forward at ``ff`` (Wan: ``ffn``; LTX-Video, Allegro, Sana: ``ff``), of kinds :data:`SELF_CROSS_FF_KINDS`."""
    return (
        ReuseUnit("self_attn", ("self_attn",), "attn1"),
        ReuseUnit("cross_attn", ("cross_attn",), "attn2"),
        ReuseUnit("ffn", ("ffn",), ff),
    )


@dataclass(frozen=True)
class BlockListSpec:
    """A ``ModuleList`` of identical blocks on the transformer, e.g. ``transformer_blocks``.

    Attributes:
        attr: the attribute holding the list.
        module_kinds: the plan module kinds of its blocks.
        units: the reusable units of each block.
        image_output: index of the image stream in a block's output tuple (Flux blocks return ``(text, image)``),
            or ``None`` when a block returns one tensor. The DiCache probe reads it.
        per_sample_args: the block ``forward`` arguments with one row per sample besides the hidden states, cut
            to the computing samples when the deep blocks run on some samples only.
    """

    attr: str
    module_kinds: tuple[str, ...]
    units: tuple[ReuseUnit, ...]
    image_output: int | None = None
    per_sample_args: tuple[str, ...] = ()

    def unit_reuse(self, kind_reuse: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Where each unit is reused, given where each module kind is (boolean arrays of one shape, e.g. a plan's
        ``(T, L)`` books of this list): where every kind that controls the unit is."""
        return {unit.name: np.logical_and.reduce([kind_reuse[kind] for kind in unit.kinds]) for unit in self.units}

    def check_kinds_unshared(self, why: str) -> None:
        """Raise ``NotImplementedError`` when one module kind controls two units (a plan bit would then decide both):
        tools that choose reuse per unit (the budgeted search, fit-memory) cannot write such a plan; ``why`` says
        which tool and why."""
        seen: dict[str, str] = {}
        for unit in self.units:
            for kind in unit.kinds:
                if kind in seen:
                    raise NotImplementedError(
                        f"Module kind {kind!r} of {self.attr!r} controls units {seen[kind]!r} and {unit.name!r}; "
                        f"{why}."
                    )
                seen[kind] = unit.name

    def __post_init__(self):
        used = {kind for unit in self.units for kind in unit.kinds}
        if used != set(self.module_kinds):
            raise ValueError(
                f"Block list {self.attr!r}: the units use module kinds {sorted(used)} but the list declares "
                f"{sorted(self.module_kinds)}; every declared kind must control exactly the units that name it."
            )


@dataclass(frozen=True)
class HeadStreams:
    """The pre-head state of a family whose blocks carry several token streams, each to a head of its own (LTX-2: a
    video and an audio stream, normalised and projected by ``norm_out`` / ``proj_out`` and ``audio_norm_out`` /
    ``audio_proj_out``, and both returned).

    The engine keeps one tensor per step as the pre-head state H and hands one tensor to every policy, so such a
    family's streams are packed into one: each ``(B, N_i, D_i)`` stream flattened to ``(B, N_i * D_i)`` and the
    streams concatenated along dim 1, in the order of :attr:`outputs` (:meth:`pack`). Rows stay samples, so the
    per-sample row cutting of probe policies works on the packed state as on a single stream. The engine reads the
    streams where all of them exist: the output of the last block in execution order, which must enter the heads
    unchanged (the engine's head check at the first computed call verifies it through ``FamilySpec.run_head``). The
    block-stack input x (``FamilySpec.embed_input``, the first block's stream arguments) and a probe's features (the
    probe block's output streams) are packed the same way, so that residuals ``H - x`` pair element by element.

    Attributes:
        outputs: the index of each stream in a block's output tuple, in packing order.
        arguments: the block ``forward`` argument that carries each stream in, in the same order.
        modules: the head module of each stream (whose first input is that stream's pre-head state), in the same
            order: what the memory and FLOP tools read, and the tests' independent reference executor swaps.
        latents: the transformer ``forward`` argument of each stream's noisy latents, in the order of the
            transformer's outputs (output ``i`` is the prediction for ``latents[i]``): what bare-transformer loops
            (benchmarks, tests) advance.
    """

    outputs: tuple[int, ...]
    arguments: tuple[str, ...]
    modules: tuple[str, ...]
    latents: tuple[str, ...]

    def __post_init__(self):
        counts = {len(self.outputs), len(self.arguments), len(self.modules), len(self.latents)}
        if len(counts) != 1 or len(self.outputs) < 2:
            raise ValueError(
                f"HeadStreams needs one output index, block argument, head module and latent argument per stream, "
                f"for two streams or more; got outputs={self.outputs}, arguments={self.arguments}, "
                f"modules={self.modules}, latents={self.latents}."
            )

    @staticmethod
    def pack(streams: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, sum_i N_i * D_i)``: each ``(B, N_i, D_i)`` stream flattened per sample, concatenated in order."""
        return torch.cat([stream.reshape(stream.shape[0], -1) for stream in streams], dim=1)

    @staticmethod
    def unpack(packed: torch.Tensor, shapes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        """The streams of ``packed`` (:meth:`pack`), each of shape ``(B, *shapes[i])``: views where possible."""
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) != packed.shape[1]:
            raise ValueError(
                f"A packed pre-head state of {packed.shape[1]} elements per sample does not hold streams of shapes "
                f"{[tuple(shape) for shape in shapes]} ({sum(sizes)} elements)."
            )
        parts = packed.split(sizes, dim=1)
        return tuple(part.reshape(packed.shape[0], *shape) for part, shape in zip(parts, shapes, strict=True))


def pre_head_capture(spec: FamilySpec, model: torch.nn.Module) -> tuple[list, Callable[[], torch.Tensor]]:
    """Plain forward pre-hooks that record the pre-head state of ``model``'s next forward (the input of
    :attr:`FamilySpec.head_input`, or the packed inputs of the :class:`HeadStreams` modules): ``(handles, read)``;
    ``read()`` returns the state once the forward ran. Remove the handles afterwards."""
    streams = spec.head_streams
    paths = (spec.head_input,) if streams is None else streams.modules
    seen: dict[str, torch.Tensor] = {}

    def recorder(path):
        def capture(module, args):
            seen[path] = args[0]  # returns None: the call's arguments stay unchanged

        return capture

    handles = [model.get_submodule(path).register_forward_pre_hook(recorder(path)) for path in paths]

    def read() -> torch.Tensor:
        return seen[paths[0]] if streams is None else streams.pack([seen[path] for path in paths])

    return handles, read


@dataclass(frozen=True)
class FamilySpec:
    """Everything the engine needs to know about one model family.

    Attributes:
        name: short family name written into plans (``"flux"``, ``"dit"``).
        transformer_class: the diffusers transformer class the family describes.
        block_lists: the block lists in execution order.
        head_input: path of the module whose first input is the pre-head hidden state H (the step cache).
        timestep_scale: factor that maps the timestep argument of a transformer call onto the scheduler's
            timestep values (Flux pipelines pass ``t / 1000``): the schedule's entry is
            ``timestep_offset + timestep_scale * call[timestep_arg]``.
        run_head: ``run_head(transformer, hidden, call)`` runs the conditioning and the output head on a cached
            pre-head hidden state with the current call's timestep and returns what ``forward`` would return.
        input_signature: ``input_signature(call)`` returns the shape facts that must stay constant within a run.
        embed_input: ``embed_input(transformer, call)`` returns the block-stack input x (the patch-embedded image
            tokens the first block receives), for residual step reuse and for policies that decide from the input
            of the block stack; ``None`` if the family does not support it.
        embed_timestep: ``embed_timestep(transformer, call)`` returns the call's timestep embedding as the stock
            ``forward`` computes it: the output of the embedder of the timestep (with what the family combines with
            it: pooled text, guidance, class label) from which the blocks' and the head's modulations are
            computed, e.g. FLUX's ``temb`` (B, D). For policies that decide from the modulated block input
            (TeaCache- or MagCache-like) without writing the family's conditioning again; ``run_head`` uses the
            same code. ``None``: not provided (:meth:`timestep_embedding` then raises ``NotImplementedError``).
        calibration: how the family's official code builds plans; ``None``: the official DiT/Wan behaviour
            (``invardiff.families.calibration_spec.DEFAULT_CALIBRATION``).
        presets: the official calibration presets by name (first: the default of sweeps); may be empty.
        dicache_preset: the DiCache preset the family runs with by default (a name in ``invardiff.dicache.PRESETS``).
        pipeline: how the stock diffusers pipeline is called; ``None`` if the family has none.
        configs: random-weight configs and example calls (FLOP profiles, memory, benchmarks); ``None`` if none.
        official: layout of the official InvarDiff cache books; ``None`` if the official code has none.
        latent_arg: the ``forward`` argument that carries the noisy latents: a tensor with one row per sample, or a
            list of per-sample tensors (Z-Image); it gives a call's batch size and device (:class:`TransformerCall`).
        timestep_arg: the ``forward`` argument that carries the timestep (HiDream: ``timesteps``, Z-Image: ``t``).
        timestep_offset: see ``timestep_scale`` (Z-Image passes ``(1000 - t) / 1000``: offset 1000, scale -1000).
        rows_in_place: the transformer's ``forward`` joins full-batch tensors with the block stream between blocks
            (HiDream concatenates each block's Llama hidden state), so on a probe step where some samples skip, the
            stream cannot be cut to the computing rows once after the probe: instead each deep block cuts them out of
            its own inputs and writes its output back into the full batch (the skipped rows pass through), and the
            head takes the computing rows.
        head_streams: for a family whose pre-head state is several token streams with a head each (LTX-2's video
            and audio), how they are packed into the one tensor the engine and the policies see
            (:class:`HeadStreams`); ``run_head`` and ``embed_input`` then take and return the packed state, and
            ``head_input`` names the first stream's head module. ``None``: one stream, read at ``head_input``.
    """

    name: str
    transformer_class: type
    block_lists: tuple[BlockListSpec, ...]
    head_input: str
    timestep_scale: float
    run_head: Callable[[torch.nn.Module, torch.Tensor, TransformerCall], Any]
    input_signature: Callable[[TransformerCall], tuple]
    embed_input: Callable[[torch.nn.Module, TransformerCall], torch.Tensor] | None = None
    embed_timestep: Callable[[torch.nn.Module, TransformerCall], torch.Tensor] | None = None
    calibration: FamilyCalibration | None = field(default=None, hash=False)
    presets: dict[str, InvarDiffThresholds] = field(default_factory=dict, hash=False)
    dicache_preset: str = "flux"  # DiT has no official DiCache setting either: FLUX's rules are the generic ones
    pipeline: PipelineSpec | None = field(default=None, hash=False)
    configs: ConfigSpec | None = field(default=None, hash=False)
    official: OfficialSpec | None = field(default=None, hash=False)
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    timestep_offset: float = 0.0
    rows_in_place: bool = False
    head_streams: HeadStreams | None = field(default=None, hash=False)

    def block_stack_input(self, transformer: torch.nn.Module, call: TransformerCall) -> torch.Tensor:
        """The block-stack input of ``call`` (:attr:`embed_input`); ``NotImplementedError`` if the family has none."""
        return self._provided("embed_input", "block-stack input")(transformer, call)

    def timestep_embedding(self, transformer: torch.nn.Module, call: TransformerCall) -> torch.Tensor:
        """The timestep embedding of ``call`` (:attr:`embed_timestep`); ``NotImplementedError`` if the family has
        none."""
        return self._provided("embed_timestep", "timestep embedding")(transformer, call)

    def _provided(self, field_name: str, what: str) -> Callable:
        function = getattr(self, field_name)
        if function is None:
            raise NotImplementedError(
                f"Model family {self.name!r} does not provide its {what} (FamilySpec.{field_name} is None), which "
                f"this policy needs; give the family's spec an {field_name}, or use a policy that does not need it."
            )
        return function

    def units_of(self, transformer: torch.nn.Module) -> list[tuple[BlockListSpec, int, ReuseUnit, torch.nn.Module]]:
        """``(block list, layer, unit, block)`` of every unit ``transformer`` has, in engine order (block lists in
        execution order, then layers, then the list's units), leaving out units a block lacks (``ReuseUnit.present``).

        The spec is checked against the model first (:func:`check_spec`): a wrong spec fails here, by name."""
        check_spec(self, transformer)
        return [
            (spec, layer, unit, block)
            for spec in self.block_lists
            for layer, block in enumerate(getattr(transformer, spec.attr))
            for unit in spec.units
            if unit.in_block(block)
        ]

    def block_list(self, attr: str) -> BlockListSpec:
        for block_list in self.block_lists:
            if block_list.attr == attr:
                return block_list
        raise KeyError(attr)

    def num_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        return {spec.attr: len(getattr(transformer, spec.attr)) for spec in self.block_lists}


class SpecError(ValueError):
    """A family spec does not describe the model it is applied to; ``check`` names the failed check:

    * ``"block-list"``: a block list is not a list of modules on the transformer;
    * ``"unit-path"``: a unit's module path does not resolve in a block that the spec says has the unit;
    * ``"head-input-path"``: ``head_input`` does not resolve on the transformer;
    * ``"head-input-state"``: at the first computed call, running ``run_head`` on what the ``head_input`` module
      received does not reproduce the transformer's output, so ``head_input`` is not the pre-head hidden state (or
      ``run_head`` is not the model's head) and every step-cached step would be silently wrong.
    """

    def __init__(self, check: str, message: str):
        super().__init__(f"Family spec check {check!r} failed: {message}")
        self.check = check


def check_spec(spec: FamilySpec, transformer: torch.nn.Module) -> None:
    """Raise :class:`SpecError` unless every path of ``spec`` resolves on ``transformer`` (nothing is modified)."""
    model = type(transformer).__name__
    for block_list in spec.block_lists:
        blocks = getattr(transformer, block_list.attr, None)
        if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise SpecError(
                "block-list",
                f"family {spec.name!r}: {model}.{block_list.attr} is {type(blocks).__name__}, not a ModuleList of "
                f"blocks; fix BlockListSpec.attr.",
            )
        for layer, block in enumerate(blocks):
            for unit in block_list.units:
                if not unit.in_block(block):
                    continue
                for path in unit.submodules:
                    try:
                        block.get_submodule(path)
                    except AttributeError:
                        raise SpecError(
                            "unit-path",
                            f"family {spec.name!r}: {block_list.attr}.{layer} ({type(block).__name__}) has no module "
                            f"{path!r} (unit {unit.name!r}). Fix the path, or, if some blocks lack this unit, say "
                            f"which with ReuseUnit(present=...).",
                        ) from None
    heads = (spec.head_input,) + (() if spec.head_streams is None else spec.head_streams.modules)
    for path in heads:
        try:
            transformer.get_submodule(path)
        except AttributeError:
            raise SpecError(
                "head-input-path",
                f"family {spec.name!r}: {model} has no module {path!r} (FamilySpec.head_input or a HeadStreams "
                f"module: a module whose first input is a pre-head hidden state).",
            ) from None


@dataclass(frozen=True)
class InputKind:
    """What a pipeline is conditioned on, and the argument names that carry it.

    Attributes:
        calibrate_arg: the keyword of :func:`invardiff.calibration.calibrate` (``"prompts"``).
        pipeline_arg: the keyword of the diffusers pipeline call (``"prompt"``).
        cli_flag: the command-line option that gives such inputs (``"--prompts"``).
    """

    calibrate_arg: str
    pipeline_arg: str
    cli_flag: str


# Keyed by ``PipelineSpec.input_kind`` (and ``BundledModel.inputs``).
INPUT_KINDS = {
    "prompt": InputKind("prompts", "prompt", "--prompts"),
    "class": InputKind("class_labels", "class_labels", "--classes"),
}


@dataclass(frozen=True)
class Expert:
    """One transformer of a pipeline that switches transformers along the schedule (Wan2.2's two experts).

    Attributes:
        attr: the pipeline attribute holding the transformer (``"transformer_2"``).
        steps: ``steps(pipe, timesteps)`` returns the ``slice`` of the scheduler's schedule this transformer runs;
            its plan or policy covers those steps only, counted from 0.
    """

    attr: str
    steps: Callable[[Any, torch.Tensor], slice]


@dataclass(frozen=True)
class SizeRule:
    """What a size argument of a pipeline call (``height``, ``width``, ``num_frames``) must be: a positive
    ``offset + k * multiple`` (``k >= 0``). ``reason`` says where the multiple comes from (VAE compression, patch)."""

    multiple: int
    reason: str
    offset: int = 0

    @property
    def lowest(self) -> int:
        return self.offset if self.offset > 0 else self.multiple

    def check(self, name: str, value, where: str = "this pipeline") -> None:
        """Raise ``ValueError`` naming the nearest valid values if ``value`` breaks the rule."""
        if isinstance(value, int) and value >= self.lowest and (value - self.offset) % self.multiple == 0:
            return
        what = (
            f"a multiple of {self.multiple}" if self.offset == 0 else f"{self.offset} + a multiple of {self.multiple}"
        )
        below = self.offset + (value - self.offset) // self.multiple * self.multiple if isinstance(value, int) else 0
        nearest = [v for v in (below, below + self.multiple) if v >= self.lowest] or [self.lowest]
        raise ValueError(
            f"{name}={value!r} does not fit {where}: {name} must be {what} ({self.reason}); the nearest valid "
            f"values are {' and '.join(map(str, nearest))}."
        )


@dataclass(frozen=True)
class PipelineSpec:
    """How the family's stock diffusers pipeline is called (calibration, sweeps, the demo) and a toy one is built.

    Attributes:
        input_kind: a key of :data:`INPUT_KINDS`: ``"prompt"`` or ``"class"``.
        output_type: the ``output_type`` under which the pipeline returns images in [0, 1] as tensors or arrays.
        video: the pipeline returns clips (``.frames``, (B, F, C, H, W)) rather than images.
        scheduler: ``scheduler()`` returns a new scheduler of the family's sampler (toy and bundled pipelines).
        calibration_kwargs: pipeline arguments of every calibration call unless the caller overrides them (the
            official code's settings, e.g. DiT calibrates without classifier-free guidance).
        batched_cfg: the pipeline runs the classifier-free guidance branches as one batched transformer call, so a
            call carries rows of different branches (per-sample and batch-global probe decisions then differ).
        guided: the pipeline runs classifier-free guidance branches (batched or one call each); ``False`` for a
            guidance-distilled pipeline that takes no negative prompt and calls the transformer once per step with
            the guidance scale as an input (FLUX.2), so its calls form one branch.
        build_toy: ``build_toy(config, transformer, text_encoders)`` returns a stock pipeline around a random-weight
            transformer that runs offline (``text_encoders``: tiny random text encoders, for ``prompt=`` calls).
        call_shape: ``call_shape(pipe, call_kwargs)`` returns the :class:`~.model_config.ModelConfig`
            call-shape fields (tokens, transformer rows) of one sample of the pipeline call ``pipe(**call_kwargs)``.
        toy_call_kwargs: ``toy_call_kwargs(config, num_inference_steps, seed, device)`` returns the arguments of one
            call of that toy pipeline on the config's input shapes, with a CPU generator seeded with ``seed``.
        experts: ``experts(pipe)`` returns the :class:`Expert` transformers of a pipeline that switches
            transformers along the schedule, or ``()`` when one transformer runs every step.
        bare: ``bare(transformer)`` returns the stock pipeline around a bare trained transformer and a note on what
            it assumed, for families whose pipeline needs nothing else (``--transformer DIR`` alone); ``None``:
            the family's pipeline needs more (text encoders, a VAE), so a bare transformer needs a base pipeline.
        with_latents: ``with_latents(pipe, latents)`` returns a context manager within which the pipeline's calls
            start from ``latents`` instead of drawing them, for pipelines whose ``__call__`` takes no ``latents``
            (DiTPipeline); ``None``: the pipeline takes ``latents=`` (or explicit latents are not supported).
        size_rules: ``size_rules(pipe)`` returns the size arguments the pipeline takes and the :class:`SizeRule`
            each must follow; ``None``: the pipeline takes none (DiT samples at its transformer's ``sample_size``).
            Checked before calibration samples, instead of a shape error mid-run or the pipeline's silent rounding.
        toy_cfg_kwargs: ``toy_cfg_kwargs(config, seed, device)`` returns the arguments to add to a toy call (over
            ``toy_call_kwargs``) to run classifier-free guidance, when that call runs without it (Flux's true CFG:
            negative embeddings and ``true_cfg_scale``); ``None`` when ``toy_call_kwargs`` already guides. How the
            branches run is ``batched_cfg``'s: one batched call, or one call per branch in
            ``cache_context("cond" / "uncond")``.
        call_branches: ``call_branches(pipe)`` returns the CFG branch of each transformer call of one step, in call
            order (``("cond", "uncond")``), for pipelines that run the branches as separate calls without diffusers'
            ``cache_context`` (``ChromaPipeline``): the engine then gives each call its branch's state, as the context
            would. ``None``: the pipeline names its calls itself (or batches them), and an unnamed call is the
            ``"default"`` branch.
        branch_names: the branch name of each ``cache_context`` name that the pipeline sets and that is not the
            usual ``"cond"`` / ``"uncond"`` (diffusers' guiders, as ``HunyuanVideo15Pipeline``'s, name their calls
            ``"pred_cond"`` / ``"pred_uncond"``), so that every family's branches have the same names in summaries,
            calibration (``record_branches``) and DiCache's call order.
    """

    input_kind: str
    output_type: str
    scheduler: Callable[[], Any]
    calibration_kwargs: dict = field(default_factory=dict)
    video: bool = False
    batched_cfg: bool = False
    guided: bool = True
    build_toy: Callable[..., Any] | None = None
    call_shape: Callable[[Any, dict], dict] | None = None
    toy_call_kwargs: Callable[..., dict] | None = None
    experts: Callable[[Any], tuple[Expert, ...]] | None = None
    bare: Callable[[Any], tuple[Any, str]] | None = None
    with_latents: Callable[[Any, torch.Tensor], Any] | None = None
    size_rules: Callable[[Any], dict[str, SizeRule]] | None = None
    toy_cfg_kwargs: Callable[..., dict] | None = None
    call_branches: Callable[[Any], tuple[str, ...]] | None = None
    branch_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {sorted(INPUT_KINDS)}, got {self.input_kind!r}.")

    @property
    def inputs(self) -> InputKind:
        return INPUT_KINDS[self.input_kind]


@dataclass(frozen=True)
class ConfigSpec:
    """Random-weight configs of the family and one transformer call on them (FLOP profiles, memory, benchmarks).

    Attributes:
        example_call: ``example_call(config, device, fraction, randn)`` returns the keyword arguments of one
            transformer ``forward`` as the family's pipeline passes them, at the time ``fraction`` of the
            trajectory (1 = pure noise); ``randn(*shape)`` draws seeded noise on the device in the config's dtype.
        call_timestep: ``call_timestep(fraction, like)`` returns the ``timestep`` argument at ``fraction``, shaped
            and typed like the tensor ``like`` (Flux passes ``t / 1000``, DiT an integer step in [0, 999]).
        json_defaults: :class:`~.model_config.ModelConfig` fields for a diffusers ``config.json`` of the family
            (the call shapes a config file does not say, e.g. tokens per sample).
        json_shape: ``json_shape(config)`` returns the call-shape fields that a ``config.json`` determines (DiT: its
            image tokens from the sample and patch sizes), over ``json_defaults``; ``None``: none.
        named: the family's named configs (:class:`~.model_config.ModelConfig`), found by name through
            ``invardiff.model_configs.MODEL_CONFIGS``.
        bench: benchmark size (``"cpu"``, ``"full"``, ``"tiny"``) -> the name of the config ``bench-engine`` uses.
        tiny: the name of the family's smallest named config (a few blocks, a few tokens): what the tests and the
            conformance kit (``tests/test_family_conformance.py``) run the family on; ``None`` if it has none.
        on_meta: ``on_meta(transformer)`` makes a transformer built on the meta device (FLOP profiles, memory
            estimates) runnable where its stock forward cannot run there (HiDream's mixture-of-experts routing counts
            the tokens of each expert on the host; Mochi's RoPE opens an autocast region on its tensors' device type,
            which the meta device lacks), on that instance only and with the same FLOPs; ``None``: the stock forward
            runs on the meta device as it is.
    """

    example_call: Callable[..., dict]
    call_timestep: Callable[[float, torch.Tensor], torch.Tensor]
    json_defaults: dict = field(default_factory=dict)
    json_shape: Callable[[dict], dict] | None = None
    named: tuple[Any, ...] = ()  # ModelConfig; model_config.py imports this module, so it is not named here
    bench: dict[str, str] = field(default_factory=dict)
    tiny: str | None = None
    on_meta: Callable[[torch.nn.Module], None] | None = None


@dataclass(frozen=True)
class OfficialSpec:
    """The layout of the family's official InvarDiff cache books (``invardiff.official``).

    Attributes:
        label: the name the official code uses for the family, in messages (``"FLUX"``).
        scheduler: the scheduler class the official books were made with (recorded in the plan).
        keys: the top-level keys every book of the family has besides ``step_cache_book``.
        reuse: ``reuse(book)`` maps a parsed book onto ``{block_list: {kind: (T, L) bool array}}``.
        books: the books shipped with invardiff, mode (``"fast"``) -> path under ``invardiff/reference_books``.
        step_keys: the names under which a book may hold its step gate, in order of preference (Wan's loader
            takes ``step_cache_bool`` or ``step_cache_book``).
        write: ``write(plan)`` returns the book of ``plan`` in the official layout (``invardiff.official``'s
            export); ``None`` if invardiff does not write the family's books.
    """

    label: str
    scheduler: str
    keys: tuple[str, ...]
    reuse: Callable[[dict], dict]
    books: dict[str, str] = field(default_factory=dict)
    step_keys: tuple[str, ...] = ("step_cache_book",)
    write: Callable[[Any], dict] | None = None


@dataclass(frozen=True)
class BlockOutputs:
    """What a block's ``forward`` returns: the index of the image stream and, for a block that returns both streams,
    the index of the text stream (``None``: the block returns the image stream alone), with the ``forward`` arguments
    that carry each stream in (a skipped block passes them through)."""

    hidden_index: int = 0
    encoder_index: int | None = None
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"


# Blocks that diffusers' TransformerBlockRegistry does not describe (0.42 has no entry for Chroma's dual block): the
# family file describes them here, rather than writing into diffusers' global registry (which its own hooks read).
_BLOCK_OUTPUTS: dict[type, BlockOutputs] = {}


def describe_block_outputs(block_class: type, outputs: BlockOutputs) -> None:
    """Say what ``block_class`` returns, for a block class that diffusers' block metadata does not describe."""
    _BLOCK_OUTPUTS[block_class] = outputs


def block_outputs(block_class: type) -> BlockOutputs | None:
    """What ``block_class`` returns: from :func:`describe_block_outputs`, else diffusers' block metadata; ``None``
    when neither describes it."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    if block_class in _BLOCK_OUTPUTS:
        return _BLOCK_OUTPUTS[block_class]
    try:
        meta = TransformerBlockRegistry.get(block_class)
    except ValueError:
        return None
    return BlockOutputs(
        meta.return_hidden_states_index,
        meta.return_encoder_hidden_states_index,
        meta.hidden_states_argument_name,
        meta.encoder_hidden_states_argument_name,
    )


def image_output_index(block_class: type) -> int | None:
    """The index of the image stream in the output of ``block_class`` (:func:`block_outputs`); ``None`` when the
    block returns one tensor (no text-stream index)."""
    outputs = block_outputs(block_class)
    if outputs is None:
        raise ValueError(
            f"{block_class.__name__} is not described by diffusers' TransformerBlockRegistry; describe what it "
            f"returns with describe_block_outputs(...) before reading its image output."
        )
    return None if outputs.encoder_index is None else outputs.hidden_index


class CallBinder:
    """Binds a ``forward``'s arguments to its parameter names, defaults applied, as ``inspect.Signature.bind`` does.

    Made once per transformer: ``Signature.bind`` costs ~25 us a call, which a small model's few-millisecond step
    notices. Calls it cannot bind plainly (a ``*args`` / ``**kwargs`` parameter, a missing, unknown or repeated
    argument) go through ``Signature.bind``, which binds them or raises its usual ``TypeError``."""

    _PLAIN = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)

    def __init__(self, signature: inspect.Signature):
        parameters = list(signature.parameters.values())
        self.signature = signature
        self.plain = all(parameter.kind in self._PLAIN for parameter in parameters)
        self.positional = [p.name for p in parameters if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
        self.defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        self.names = frozenset(p.name for p in parameters)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        if self.plain and len(args) <= len(self.positional) and kwargs.keys() <= self.names:
            arguments = dict(self.defaults)
            arguments.update(zip(self.positional, args, strict=False))  # fewer args than positional parameters
            if not kwargs.keys() & self.positional[: len(args)]:  # else an argument given twice: bind raises
                arguments.update(kwargs)
                if len(arguments) == len(self.names):  # else a required argument is missing: bind raises
                    return arguments
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments


class TransformerCall:
    """The arguments of one transformer ``forward`` call, bound to parameter names (defaults applied);
    ``latent_arg`` names the argument holding the latents (:attr:`FamilySpec.latent_arg`)."""

    def __init__(
        self, signature: inspect.Signature | CallBinder, args: tuple, kwargs: dict, latent_arg: str = "hidden_states"
    ):
        binder = signature if isinstance(signature, CallBinder) else CallBinder(signature)
        self.arguments = binder.bind(args, kwargs)
        self.latent_arg = latent_arg

    @property
    def batch(self) -> int:
        """The samples (rows) of the call: the latents' first dimension, or the length of a per-sample list."""
        latents = self.arguments[self.latent_arg]
        return len(latents) if isinstance(latents, (list, tuple)) else latents.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of the call's latents."""
        latents = self.arguments[self.latent_arg]
        return (latents[0] if isinstance(latents, (list, tuple)) else latents).device

    def __getitem__(self, name: str) -> Any:
        return self.arguments[name]
