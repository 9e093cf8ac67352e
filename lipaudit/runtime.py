"""Process-wide settings for the measurements."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The frequency search works in batches of about 32 MiB (and LAPACK's temporaries of that size):
# above glibc's largest mmap threshold (32 MiB), each batch was mapped and zeroed afresh, 600,000
# page faults and 15% of a 512-wide layer's time. Below these sizes they are reused from the heap;
# the heap keeps at most the trim threshold of free memory, and larger tensors are still mapped
# (and returned to the system when freed).
MMAP_BYTES = 80 * 2**20
TRIM_BYTES = 256 * 2**20
_done = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; a no-op elsewhere. True when set."""
    global _done
    if _done:
        return True
    _done = True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
