"""Open a checkpoint file or folder and expose its state dict's tensors."""

from __future__ import annotations

from pathlib import Path

from lipaudit.checkpoint.formats import FORMATS, Format, detect
from lipaudit.checkpoint.formats.base import natural_key, sha256_of
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, Ignored, StorageId, TensorInfo
from lipaudit.checkpoint.writer import Edits
from lipaudit.errors import ResourceLimitError
from lipaudit.text import visible

__all__ = [
    "FORMATS", "Checkpoint", "Edits", "Format", "Ignored", "Limits", "StorageId", "TensorInfo", "natural_key",
    "open_checkpoint", "sha256_of",
]


def open_checkpoint(
    path: str, key: str | None = None, for_writing: bool = False, limits: Limits | None = None
) -> Checkpoint:
    """Recognise the format by content and read the state dict (tensors load on demand).

    for_writing is kept for callers; every format can now be rewritten from the same opening.
    """
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
