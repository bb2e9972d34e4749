"""A steady host heap for lockstep timing: glibc's malloc thresholds pinned, so that no variant pays page faults
that another variant's allocations caused.

In a lockstep run every variant's step runs right after the others' in one process, on one glibc heap. glibc moves
its mmap threshold with the sizes freed and returns the heap's top to the kernel past a trim threshold that follows
it, so the allocation pattern of one variant decides whether the next variant's temporaries come from resident
heap pages or from fresh pages the kernel must fault in and zero. On chroma-bench (synthetic-2x, 1 thread, CPU time)
stock's steps took about 38,000 minor page faults each while the plan's variant ran its cheap steps beside them
(none when stock ran alone), which made stock about 15% slower and the measured speedup 2.42x against a FLOP-ideal
2.14x; with the thresholds pinned the faults were gone and the speedup was 2.13x. Pinning fixes the mmap threshold
at glibc's largest (32 MiB: bigger tensors are mapped and faulted alike for every variant) and turns trimming off,
so the heap keeps the pages of the largest step that ran.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging


logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
NO_TRIM = 2**31 - 1  # mallopt takes an int: the heap top is never given back below 2 GiB of free space

_pinned: bool | None = None


def pin_host_heap() -> bool:
    """Pin glibc's mmap and trim thresholds for the rest of the process (see the module docstring); returns whether
    they are pinned (False where the C library is not glibc: nothing is changed there). Idempotent."""
    global _pinned
    if _pinned is None:
        _pinned = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and _mallopt(M_TRIM_THRESHOLD, NO_TRIM)
        logger.info("host heap for lockstep timing: %s", "glibc thresholds pinned" if _pinned else "left as it is")
    return _pinned


def _mallopt(parameter: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (macOS, musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(parameter, value) == 1
