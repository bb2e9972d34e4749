"""Data that describes how a model family's transformer is laid out for caching.

A family file (``flux.py``, ``dit.py``) only fills these dataclasses and writes the few lines of model code that
cannot be data: reading the timestep of a call, and running the output head on a cached hidden state. Everything
else (hooks, plans, statistics, FLOP profiles) is generic and reads the spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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
    """

    name: str
    kinds: tuple[str, ...]
    module: str
    passthrough: str | None = None
    kind_outputs: tuple[int | None, ...] | None = None

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

    def __post_init__(self):
        used = {kind for unit in self.units for kind in unit.kinds}
        if used != set(self.module_kinds):
            raise ValueError(
                f"Block list {self.attr!r}: the units use module kinds {sorted(used)} but the list declares "
                f"{sorted(self.module_kinds)}; every declared kind must control exactly the units that name it."
            )


@dataclass(frozen=True)
class FamilySpec:
    """Everything the engine needs to know about one model family.

    Attributes:
        name: short family name written into plans (``"flux"``, ``"dit"``).
        transformer_class: the diffusers transformer class the family describes.
        block_lists: the block lists in execution order.
        head_input: path of the module whose first input is the pre-head hidden state H (the step cache).
        timestep_scale: factor that maps the ``timestep`` argument of a transformer call onto the scheduler's
            timestep values (Flux pipelines pass ``t / 1000``).
        run_head: ``run_head(transformer, hidden, call)`` runs the conditioning and the output head on a cached
            pre-head hidden state with the current call's timestep and returns what ``forward`` would return.
        input_signature: ``input_signature(call)`` returns the shape facts that must stay constant within a run.
        embed_input: ``embed_input(transformer, call)`` returns the block-stack input x (the patch-embedded image
            tokens), for residual step reuse; ``None`` if the family does not support it.
    """

    name: str
    transformer_class: type
    block_lists: tuple[BlockListSpec, ...]
    head_input: str
    timestep_scale: float
    run_head: Callable[[torch.nn.Module, torch.Tensor, TransformerCall], Any]
    input_signature: Callable[[TransformerCall], tuple]
    embed_input: Callable[[torch.nn.Module, TransformerCall], torch.Tensor] | None = None

    def block_list(self, attr: str) -> BlockListSpec:
        for block_list in self.block_lists:
            if block_list.attr == attr:
                return block_list
        raise KeyError(attr)

    def num_layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        return {spec.attr: len(getattr(transformer, spec.attr)) for spec in self.block_lists}


class TransformerCall:
    """The arguments of one transformer ``forward`` call, bound to parameter names (defaults applied)."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.arguments = bound.arguments

    def __getitem__(self, name: str) -> Any:
        return self.arguments[name]

    def timestep_values(self, scale: float) -> torch.Tensor:
        timestep = self.arguments["timestep"]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep])
        return timestep.detach().float().reshape(-1).cpu() * scale
