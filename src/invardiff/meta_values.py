"""Known values of constant meta tensors, so that a forward that reads a few values runs on the meta device.

The FLOP profile and the memory estimate run a real-size transformer on the meta device, where tensors have shapes
but no values. Some stock forwards read values on the way: Mochi's attention keeps only the valid text tokens
(``nonzero`` of the padding mask), HunyuanVideo-1.5 reorders its text tokens by masks (boolean indexing) and asks
whether its image embeddings are all zero (``bool(tensor)``). Under :class:`MetaValues`, a meta tensor filled with
one constant (``torch.zeros`` / ``ones`` / ``full`` and their ``_like`` / ``new_`` forms, ``fill_``) carries that
value, and the value follows it through pointwise ops, views, copies, concatenations of equal values and ``all`` /
``any``. The ops that need values then get the exact answer on such tensors: a scalar read, ``nonzero`` and indexing
with a boolean mask. On a meta tensor whose value is not known they raise :class:`MetaValueError`, never guess.
Tensors on other devices are left alone.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


aten = torch.ops.aten


class MetaValueError(RuntimeError):
    """A meta-device run needed the value of a meta tensor that is not a known constant."""


_FACTORIES = {
    aten.zeros.default: lambda args, kwargs: 0,
    aten.ones.default: lambda args, kwargs: 1,
    aten.full.default: lambda args, kwargs: args[1],
    aten.zeros_like.default: lambda args, kwargs: 0,
    aten.ones_like.default: lambda args, kwargs: 1,
    aten.full_like.default: lambda args, kwargs: args[1],
    aten.new_zeros.default: lambda args, kwargs: 0,
    aten.new_ones.default: lambda args, kwargs: 1,
    aten.new_full.default: lambda args, kwargs: args[2],
    aten.scalar_tensor.default: lambda args, kwargs: args[0],
    aten.fill_.Scalar: lambda args, kwargs: args[1],
    aten.fill.Scalar: lambda args, kwargs: args[1],
}
# Ops whose output holds the value of their (first) tensor input.
_KEEPS = {
    aten._to_copy.default,
    aten.clone.default,
    aten.repeat.default,
    aten.contiguous.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten.index.Tensor,
    aten.index_select.default,
}


class MetaValues(TorchDispatchMode):
    """Within this context, constant meta tensors carry their value (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._values = WeakIdKeyDictionary()  # meta tensor -> its constant value (a Python number)

    def value(self, tensor: torch.Tensor):
        """The known constant value of a meta ``tensor``, or ``None``."""
        return self._values.get(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _is_meta(args[0]):
            return self._known(args[0], "read as a Python scalar (bool(), .item())")
        if func is aten.nonzero.default and _is_meta(args[0]):
            return self._nonzero(args[0])
        if func is aten.index.Tensor and _is_meta(args[0]):
            args = (args[0], [self._mask_indices(i) for i in args[1]])
        output = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(output)[0] if _is_meta(t)]  # unbind and split return several views
        if outputs:
            value = self._output_value(func, args, kwargs)
            for tensor in outputs:
                if value is None:
                    self._values.pop(tensor, None)  # an in-place op whose result is not known
                else:
                    self._values[tensor] = _cast(value, tensor.dtype)
        return output

    def _known(self, tensor: torch.Tensor, what: str):
        value = self._values.get(tensor)
        if value is None:
            raise MetaValueError(
                f"A meta tensor of shape {tuple(tensor.shape)} was {what}, but its values are not known: on the meta "
                f"device only constant tensors (zeros, ones, full) carry values. Give the call constant masks."
            )
        return value

    def _nonzero(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._known(tensor, "passed to nonzero"):
            indices = torch.ones(tensor.shape, dtype=torch.bool).nonzero()  # every element: a small CPU tensor
        else:
            indices = torch.zeros((0, tensor.dim()), dtype=torch.long)
        return indices.to("meta")

    def _mask_indices(self, index):
        # A boolean mask index: replaced by the integer indices of its elements (all of them or none).
        if index is None or not _is_meta(index) or index.dtype not in (torch.bool, torch.uint8):
            return index
        if index.dim() != 1:
            raise MetaValueError(f"Indexing with a {index.dim()}-d boolean meta mask is not supported, only 1-d.")
        count = index.shape[0] if self._known(index, "used as a boolean index") else 0
        return torch.arange(count, device="meta")

    def _output_value(self, func, args, kwargs):
        if func in _FACTORIES:
            return _FACTORIES[func](args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not tensors or not all(_is_meta(t) and t in self._values for t in tensors):
            return None
        values = [self._values[t] for t in tensors]
        if func in _KEEPS or getattr(func, "is_view", False):
            return values[0]
        if func in (aten.cat.default, aten.stack.default, aten.constant_pad_nd.default):
            pad = [args[2] if len(args) > 2 else 0] if func is aten.constant_pad_nd.default else []
            return values[0] if all(v == values[0] for v in values + pad) else None
        if func in (aten.all.default, aten.all.dim, aten.any.default, aten.any.dim):
            if args[0].numel() == 0:
                return func in (aten.all.default, aten.all.dim)
            return bool(values[0])
        if torch.Tag.pointwise in func.tags:
            scalars = iter(torch.tensor(v, dtype=t.dtype) for t, v in zip(tensors, values, strict=True))
            flat, spec = tree_flatten((args, kwargs))
            flat = [next(scalars) if isinstance(x, torch.Tensor) else x for x in flat]
            args0, kwargs0 = spec.unflatten(flat)
            return func(*args0, **kwargs0).item()
        return None


def _is_meta(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_meta


def _cast(value, dtype: torch.dtype):
    return torch.tensor(value).to(dtype).item()
