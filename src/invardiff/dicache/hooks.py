"""Block hooks of the probe policies: where x_k and P_k are read and where the deep blocks run on a subset.

One :class:`ProbeBlockHook` per block, with the roles that block plays:

* ``records_input`` (block 0): its ``hidden_states`` input is x_k, the block-stack input (image tokens).
* ``is_probe`` (block m-1): its image-stream output is P_k; the controller decides there, and the output is cut
  to the computing samples when only some compute.
* ``is_deep`` (blocks m...): while only some samples compute, the per-sample conditioning arguments the block list
  declares (``temb`` for Flux, ``timestep`` and ``class_labels`` for DiT) are cut the same way.
"""

from __future__ import annotations

import inspect

from diffusers.hooks import ModelHook

from ..engine.state import take_rows


PROBE_BLOCK_HOOK = "invardiff_probe_block"


class ProbeBlockHook(ModelHook):
    def __init__(self, engine, block, image_output: int | None, per_sample_args: tuple[str, ...], roles: set[str]):
        super().__init__()
        self.engine = engine
        self.image_output = image_output  # index of the image stream in the block's output tuple, None: a tensor
        self.records_input = "input" in roles
        self.is_probe = "probe" in roles
        self.is_deep = "deep" in roles
        parameters = list(inspect.signature(type(block).forward).parameters)[1:]  # without self
        self.positions = {name: parameters.index(name) for name in (*per_sample_args, "hidden_states")}
        self.per_sample_args = per_sample_args

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self.positions[name]
        return args[position] if position < len(args) else None

    def pre_forward(self, module, *args, **kwargs):
        state = self.engine.active
        if state is None or state.probe is None:
            return args, kwargs
        if self.records_input:
            self.engine.probe.on_block_input(state, self._argument("hidden_states", args, kwargs))
        subset = state.probe.subset
        if self.is_deep and subset is not None:
            args = list(args)
            for name in self.per_sample_args:
                if name in kwargs:
                    kwargs[name] = take_rows(kwargs[name], subset)
                elif self.positions[name] < len(args):
                    args[self.positions[name]] = take_rows(args[self.positions[name]], subset)
            args = tuple(args)
        return args, kwargs

    def post_forward(self, module, output):
        if not self.is_probe:
            return output
        state = self.engine.active
        if state is None or state.probe is None:
            return output
        image = output if self.image_output is None else output[self.image_output]
        subset = self.engine.probe.on_probe_output(state, image)
        return output if subset is None else take_rows(output, subset)
