"""Hand back the memory pages of a tensor read from a mapped file once its values are copied out.

A checkpoint opened with mmap keeps every page it has read mapped, and counted in the process's
resident memory, until the file is closed: a run that reads each tensor once would peak at the
whole file. MADV_DONTNEED on a private file mapping drops the pages from this process only; they
stay in the page cache, and a later read of the same values faults them back from the file. It
would zero anonymous memory, so it is used only where /proc/self/maps shows that the whole range
lies in one private mapping of a file. Only ranges whose values were copied out and are never
written in place are released. Elsewhere (other platforms, other memory) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Callable

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
# Below this a tensor's pages are not worth two system calls.
_MIN_BYTES = 1 << 20


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_FN = _madvise()


def _file_mapped(lo: int, hi: int) -> bool:
    """[lo, hi) lies inside one private mapping of a regular file."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                a, _, b = parts[0].partition("-")
                start, stop = int(a, 16), int(b, 16)
                if start <= lo < stop:
                    perms, inode, path = parts[1], parts[4], parts[5].strip()
                    # a private mapping of a file on a file system (an unlinked temporary file
                    # included), never a device such as /dev/zero
                    return (hi <= stop and perms.endswith("p") and inode != "0" and path.startswith("/")
                            and not path.startswith("/dev/"))
    except (OSError, ValueError):
        return False
    return False


def release(t: torch.Tensor) -> None:
    """Drop the whole pages under t's values from this process when they map a file (values kept)."""
    if _FN is None or t.device.type != "cpu" or t.numel() == 0 or any(st < 0 for st in t.stride()):
        return
    start = t.data_ptr()
    size = t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)))
    if size < _MIN_BYTES or start == 0:
        return
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + size) // _PAGE * _PAGE
    if hi > lo and _file_mapped(lo, hi):
        _FN(lo, hi - lo, _MADV_DONTNEED)


def release_storage(s: torch.UntypedStorage) -> None:
    """release() for every byte of a storage."""
    if s.nbytes():
        release(torch.empty(0, dtype=torch.uint8).set_(s))
