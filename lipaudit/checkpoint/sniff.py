"""Recognise a checkpoint by its bytes, never by its extension."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from lipaudit.errors import MalformedInputError, UsageError

TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"


def regular_file_size(path: Path, shown: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{shown}: no such file or folder", shown) from None
    except OSError as e:
        raise UsageError(f"{shown}: cannot read ({e.strerror})", shown) from None
    if not stat.S_ISREG(st.st_mode):
        raise MalformedInputError(f"{shown}: not a regular file", shown)
    return st.st_size


def _ends_object(path: Path, n: int) -> bool:
    """Whether the n-byte header ends with '}' (and padding spaces), as a JSON object does."""
    try:
        with open(path, "rb") as f:
            f.seek(8 + max(0, n - 64))
            tail = f.read(min(n, 64))
    except OSError:
        return False
    return tail.rstrip(b" ").endswith(b"}")


def sniff(path: Path, shown: str) -> str:
    """Return the format of the file or folder at path."""
    if path.is_dir():
        return SHARDED
    size = regular_file_size(path, shown)
    if size == 0:
        raise MalformedInputError(f"{shown}: empty file", shown)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UsageError(f"{shown}: cannot read ({e.strerror})", shown) from None
    # The full structure decides, not a prefix: a safetensors header of 640 bytes begins with
    # 80 02, the bytes of a pickle.
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n <= size - 8 and _ends_object(path, n):
            return SAFETENSORS
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        # Torch's legacy format is a pickle stream; a plain pickle goes the same way and
        # is refused by the restricted unpickler or by the magic-number check.
        return TORCH_LEGACY
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= size - 8:
            return SAFETENSORS  # a broken header: the reader says what is wrong with it
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        return SHARDED
    if head.startswith(b"version https://git-lfs"):
        raise MalformedInputError(
            f"{shown}: a Git LFS pointer, not the weights (fetch them with 'git lfs pull')", shown
        )
    if stripped[:15].lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise MalformedInputError(f"{shown}: an HTML or XML page, not a checkpoint", shown)
    raise MalformedInputError(f"{shown}: not a PyTorch or safetensors checkpoint", shown)
