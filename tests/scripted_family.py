"""A scripted two-block transformer whose features are hand-computable, registered as a test-only family.

Block ``b`` adds ``table[b][step]`` to its input, where ``step`` is the call's ``timestep``; the head is the
identity. So for an input x the probe (m = 1) is P = x + a[step], the output is Y = x + a[step] + b[step], and the
residuals are r = a, R = a + b: every DiCache number can be written out by hand.
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from invardiff.families import BlockListSpec, FamilySpec, ReuseUnit, register_family


class _Adder(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.tensor(values, dtype=torch.float64))

    def forward(self, hidden_states, timestep):
        return hidden_states + self.values[timestep].view(-1, 1, 1).to(hidden_states.dtype)  # (B, N, D)


class _Block(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.add = _Adder(values)

    def forward(self, hidden_states, timestep):
        return self.add(hidden_states, timestep)


class ScriptedTransformer(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(values) for values in table)
        self.norm_out = torch.nn.Identity()

    def forward(self, hidden_states, timestep, return_dict: bool = False):
        for block in self.blocks:
            hidden_states = block(hidden_states, timestep)
        output = self.norm_out(hidden_states)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def _run_head(transformer, hidden, call):
    output = transformer.norm_out(hidden)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


SCRIPTED = register_family(
    FamilySpec(
        name="scripted",
        transformer_class=ScriptedTransformer,
        block_lists=(
            BlockListSpec("blocks", ("add",), (ReuseUnit("add", ("add",), "add"),), per_sample_args=("timestep",)),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=lambda call: (tuple(call["hidden_states"].shape),),
    )
)
