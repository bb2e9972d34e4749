"""Count host syncs: the tensor-to-Python conversions that make the host wait for the device.

    with count_host_syncs() as syncs:
        run_something()
    assert syncs.at("invardiff/calibration/") <= num_steps, syncs.report()

Every call of ``Tensor.item``, ``.tolist``, ``.numpy``, ``.cpu``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``, ``__array__`` counts (once, even when one calls another), and ``.to`` when it copies a non-CPU
tensor to the CPU without ``non_blocking``. The calls count whatever the device, so a CPU test sees the syncs a GPU
run would make. Not seen: syncs inside C++ ops (``nonzero``, boolean-mask indexing, ``torch.equal``...); on CUDA,
``torch.cuda.set_sync_debug_mode("warn")`` reports those.

Each sync is attributed to a call site: the innermost frame outside torch and this file, as ``path:line in
function``, so that a count can be narrowed to one package (``syncs.at("invardiff/engine/")``).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw: ``count`` syncs, per call site (``sites``) and per method."""

    count: int = 0
    sites: collections.Counter = field(default_factory=collections.Counter)
    methods: collections.Counter = field(default_factory=collections.Counter)

    def at(self, path_part: str) -> int:
        """Syncs whose call site's path contains ``path_part`` (use ``/`` separators)."""
        return sum(n for site, n in self.sites.items() if path_part in site.replace(os.sep, "/"))

    def report(self, top: int = 10) -> str:
        lines = [f"{self.count} host syncs ({dict(self.methods)}), top call sites:"]
        lines += [f"  {n:6d}  {site}" for site, n in self.sites.most_common(top)]
        return "\n".join(lines)


@contextmanager
def count_host_syncs():
    """Patch ``torch.Tensor``'s host-sync methods with counters for the duration of the ``with`` block."""
    syncs = HostSyncs()
    local = threading.local()  # nesting depth: __array__ calls numpy, item may call __index__...
    originals = {name: torch.Tensor.__dict__.get(name) for name in (*_METHODS, "to")}

    def record(method: str) -> None:
        syncs.count += 1
        syncs.methods[method] += 1
        syncs.sites[_call_site()] += 1

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0 and (name != "to" or _copies_to_host(self, args, kwargs)):
                record(name)
            local.depth = depth + 1
            try:
                return original(self, *args, **kwargs)
            finally:
                local.depth = depth

        counted.__name__ = name
        return counted

    patched = {name: wrap(name) for name in originals}
    for name, function in patched.items():
        setattr(torch.Tensor, name, function)
    try:
        yield syncs
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)  # the method was inherited from torch._C.TensorBase
            else:
                setattr(torch.Tensor, name, original)


def _copies_to_host(tensor, args, kwargs) -> bool:
    if tensor.device.type == "cpu" or kwargs.get("non_blocking"):
        return False
    try:
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    except TypeError:
        return False
    return device is not None and device.type == "cpu" and not non_blocking


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != __file__:
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"
