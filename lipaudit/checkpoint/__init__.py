"""Open a checkpoint file or folder and expose its state dict's tensors."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, Ignored, StorageId, TensorInfo
from lipaudit.errors import ResourceLimitError
from lipaudit.text import visible

if TYPE_CHECKING:
    from lipaudit.checkpoint.formats import FORMATS, Format
    from lipaudit.checkpoint.formats.base import natural_key, sha256_of
    from lipaudit.checkpoint.writer import Edits

__all__ = [
    "FORMATS", "Checkpoint", "Edits", "Format", "Ignored", "Limits", "StorageId", "TensorInfo", "natural_key",
    "open_checkpoint", "sha256_of",
]

# Imported on first use: the package itself must not import torch (the CLI starts without it).
_LAZY = {
    "FORMATS": "lipaudit.checkpoint.formats",
    "Format": "lipaudit.checkpoint.formats.base",
    "natural_key": "lipaudit.checkpoint.formats.base",
    "sha256_of": "lipaudit.checkpoint.formats.base",
    "Edits": "lipaudit.checkpoint.writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_checkpoint(
    path: str, key: str | None = None, for_writing: bool = False, limits: Limits | None = None
) -> Checkpoint:
    """Recognise the format by content and read the state dict (tensors load on demand).

    for_writing is kept for callers; every format can now be rewritten from the same opening.
    """
    from lipaudit.checkpoint.formats import detect

    limits = limits or Limits()
    shown = visible(path, 200)
    p = Path(path)
    ckpt = detect(p, shown).open(p, shown, key, limits)
    check_budgets(ckpt.infos, limits, shown)
    return ckpt


def check_budgets(infos: list[TensorInfo], limits: Limits, shown: str) -> None:
    """Logical sizes (numel x itemsize) against the budgets, before any math allocates them."""
    if len(infos) > limits.tensors:
        raise ResourceLimitError(f"{shown}: {len(infos)} tensors, over the limit of {limits.tensors}", shown)
    total = 0
    for info in infos:
        size = info.logical_bytes
        name = visible(info.key, 80)
        if size > limits.tensor_bytes:
            raise ResourceLimitError(
                f"{shown}: tensor {name!r} declares {size} bytes, over the limit of {limits.tensor_bytes} "
                "(--max-tensor-bytes)", shown,
            )
        if info.storage_bytes is not None and size > info.storage_bytes and size > limits.expanded_bytes:
            raise ResourceLimitError(
                f"{shown}: tensor {name!r} declares {size} bytes over a storage of {info.storage_bytes} "
                "(stride 0 or overlapping strides): refused", shown,
            )
        total += size
    if total > limits.total_bytes:
        raise ResourceLimitError(
            f"{shown}: tensors total {total} bytes, over the limit of {limits.total_bytes} (--max-total-bytes)", shown
        )
