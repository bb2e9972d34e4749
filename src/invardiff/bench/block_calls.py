"""What a cache actually computed, counted the same way for every method: attention computations per block."""

from __future__ import annotations


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class AttentionCallCounter:
    """Counts attention computations (rows through each block's ``to_q``) against what full compute would run.

    Full compute runs every block's attention on every row of every transformer call, so the fraction is
    ``sum(rows into to_q) / (sum(rows per transformer call) x blocks)``. Counting ``to_q`` rather than blocks sees
    work skipped by hooks that replace a block's forward (FirstBlockCache, cache-dit, our step reuse), below it
    (TaylorSeer, our layer-wise reuse) and on part of a batch (per-sample DiCache running the deep blocks on the
    computing rows only). Plain forward pre-hooks, removed by ``remove`` or on leaving a ``with`` block.
    """

    def __init__(self, transformer):
        blocks = [block for name in BLOCK_LISTS for block in getattr(transformer, name, [])]
        self.num_blocks = len(blocks)
        self.rows_possible = self.rows_computed = 0
        self.handles = [transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)]
        for block in blocks:
            attention = getattr(block, "attn", None) or block.attn1
            self.handles.append(attention.to_q.register_forward_pre_hook(self._on_attention))

    def _on_transformer(self, module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.rows_possible += hidden_states.shape[0] * self.num_blocks

    def _on_attention(self, module, args):
        self.rows_computed += args[0].shape[0]

    @property
    def fraction(self) -> float | None:
        return self.rows_computed / self.rows_possible if self.rows_possible else None

    def __enter__(self) -> AttentionCallCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
