"""glibc's allocator, set for a long-running worker: memory freed is memory given back.

By default glibc raises its mmap threshold each time a large block is freed, so later large blocks (the
model's weights while it loads, activations of long batches) come from the heap, where freed memory stays
in the process. A fixed threshold keeps them mmapped and returns them to the system when freed: the
worker's resident memory follows what it uses (docs/benchmarks.md, "Memory")."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def give_back_freed_memory() -> bool:
    """Fix glibc's mmap threshold (call before the model loads); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("not glibc: allocator left as it is")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
