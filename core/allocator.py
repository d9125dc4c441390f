"""glibc allocator settings that stop the kernel from eating a third of inference time.

By default glibc serves allocations above a (dynamic) threshold with fresh ``mmap`` pages
and returns them on free. Backbone activations are tens of MB, allocated and freed every
batch, so every batch page-faults the same memory in again: measured here, decode +
backbone over 770 ELPV cells spent ~40 % of CPU time in the kernel. Raising the mmap
threshold keeps those buffers in the heap and reuses them.

Raising the thresholds without bound is not safe: a heap that is never trimmed keeps every
fragment a growing memory bank leaves behind (seen: 24 GB). So the mmap threshold is fixed
at 128 MB (larger blocks, e.g. a memory bank, still get their own mapping and go back to
the OS when freed), the trim threshold at 512 MB (at most that much free heap top is kept),
and :func:`release_free_memory` (``malloc_trim``) runs at the end of every long job to hand
interior free pages back. The benchmark ``benchmarks/bench_engine.py`` measures both effects.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 20
TRIM_THRESHOLD = 512 << 20

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name or "libc.so.6")
            lib.mallopt  # noqa: B018 - raises AttributeError on non-glibc
            lib.malloc_trim  # noqa: B018
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def tune_allocator() -> bool:
    """Apply the bounded thresholds; returns False where glibc is not in use or
    ``OKNG_MALLOC_TUNING=0`` disables it."""
    if os.environ.get("OKNG_MALLOC_TUNING", "1") == "0":
        return False
    lib = _glibc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("allocator tuned: %s", ok)
    return ok


def release_free_memory() -> None:
    """Return free heap pages to the OS (cheap; call after a long job)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
