"""Cache storage dtypes: cached values kept in a narrower dtype than the model's, and read back in the model's.

``float32`` / ``bfloat16`` / ``float16``: a cast. ``float8_e4m3fn``: each tensor divided by a per-tensor scale
(its largest magnitude over 448, e4m3's largest finite value) and cast, the scale kept beside it as a 0-d float32
tensor. Everything is computed on the value's device in its own dtype; nothing is read back to the host.

Trade-off: half (bf16 from fp32, fp8 from bf16) the cache memory, for a rounding error on every reused value
(fp8 e4m3 keeps 3 mantissa bits: a relative error up to 1/16 per element); the README gives the measured cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


CACHE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_BYTES = 4  # the float32 per-tensor scale of an fp8 tensor


def check_cache_dtype(name) -> str:
    """``name`` if it is a supported cache storage dtype; ``ValueError`` naming the choices otherwise."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {name!r}.")
    return name


def stored_bytes(elements: int, dtype: torch.dtype, cache_dtype: str | None) -> int:
    """Bytes one tensor of ``elements`` elements of ``dtype`` occupies in the cache stored as ``cache_dtype``."""
    if cache_dtype is None:
        return elements * dtype.itemsize
    scale = SCALE_BYTES if cache_dtype == "float8_e4m3fn" else 0
    return elements * CACHE_DTYPES[cache_dtype].itemsize + scale


@dataclass(frozen=True)
class StoredTensor:
    """A cached tensor in its storage dtype; ``scale`` (fp8 only) and ``dtype`` (the model's) to read it back."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale


class CacheCodec:
    """Encodes values to keep (tensors, or tuples of them) into ``cache_dtype`` and decodes them for reuse."""

    def __init__(self, cache_dtype: str):
        self.name = check_cache_dtype(cache_dtype)
        self.dtype = CACHE_DTYPES[cache_dtype]

    def encode(self, value):
        if value is None:
            return None
        if torch.is_tensor(value):
            return self._encode_tensor(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.encode(item) for item in value)
        return value

    def decode(self, value):
        if isinstance(value, StoredTensor):
            if value.scale is None:
                return value.data.to(value.dtype)
            return value.data.to(value.dtype) * value.scale.to(value.dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self.decode(item) for item in value)
        return value

    def _encode_tensor(self, tensor: torch.Tensor) -> StoredTensor:
        if not tensor.is_floating_point():
            raise TypeError(f"cache_dtype {self.name} stores floating-point outputs, got a {tensor.dtype} tensor.")
        if self.dtype is not torch.float8_e4m3fn:
            return StoredTensor(tensor.to(self.dtype), None, tensor.dtype)
        # The scale stays a device tensor (no .item()): an all-zero tensor gets scale 1 instead of a division by 0.
        amax = tensor.abs().amax().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        data = (tensor / scale.to(tensor.dtype)).clamp(-FP8_MAX, FP8_MAX).to(self.dtype)
        return StoredTensor(data, scale, tensor.dtype)
