"""Process-level tuning shared by every entry point that runs the model."""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep freed tensor buffers in the heap instead of returning them to the OS.

    Streaming allocates and frees the same few-MB buffers every chunk. glibc
    serves blocks above its mmap threshold with fresh mmap()s, so every chunk
    pays page faults on first touch; measured here this halves throughput.
    Raising the thresholds makes the buffers reusable. Returns False where
    glibc's mallopt is unavailable (other libcs): nothing changes then.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # glibc's maximum on 64-bit
            (_M_TRIM_THRESHOLD, 256 * 1024 * 1024),
            (_M_TOP_PAD, 64 * 1024 * 1024),
        )
    )
    log.debug("allocator_tuned", ok=ok)
    return ok
