"""The Checkpoint model: which tensors a file holds and how to read each one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lipaudit.checkpoint.formats.base import Format
    from lipaudit.checkpoint.writer import Edits


# Float dtypes torch converts to float64, the only way a weight enters the math. Newer packed
# formats (float4_e2m1fn_x2, ...) have no conversion: such tensors are skipped with a reason.
NUMERIC_FLOATS = frozenset({
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu",
})


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor before its data is read."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    layout: str = "strided"
    is_quantized: bool = False
    is_meta: bool = False
    is_nested: bool = False
    storage_bytes: int | None = None  # torch: bytes of the storage behind the tensor

    @property
    def itemsize(self) -> int:
        bits = re.search(r"(\d+)", self.dtype)
        return 1 if self.dtype == "bool" or not bits else max(1, int(bits.group(1)) // 8)

    @property
    def logical_bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in NUMERIC_FLOATS and not self.is_quantized


@dataclass(frozen=True)
class Ignored:
    """A part of the container that was not audited, with the reason."""

    path: str
    reason: str


# Equal for two keys exactly when they are the same stored tensor (tied weights).
StorageId = tuple[int, int, tuple[int, ...], tuple[int, ...], str]


def tensor_identity(t: torch.Tensor | None) -> StorageId | None:
    """Where a loaded tensor's data lives; None for no tensor, an empty storage, or layouts without one."""
    import torch

    if t is None:
        return None
    try:
        s = torch.Tensor.untyped_storage(t)
        if s.nbytes() == 0:
            return None
        return (s.data_ptr(), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), str(t.dtype))
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, quantized, nested
        return None


@dataclass
class Checkpoint:
    """Tensors of the selected state dict, in display order, read on demand through the format's handle."""

    path: str
    sha256: str
    infos: list[TensorInfo]
    handle: Format
    key: str | None = None
    ignored: list[Ignored] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)  # (name, sha256) of each file of a sharded one
    notes: list[tuple[str, str]] = field(default_factory=list)  # (finding code, message) from reading the file

    @property
    def format(self) -> str:
        return self.handle.name

    def load(self, key: str) -> torch.Tensor:
        return self.handle.load(key)

    def storage_identity(self, key: str) -> StorageId | None:
        """Keys with the same identity share one stored tensor; None where the format cannot share."""
        return self.handle.storage_identity(key)

    def write(self, edits: Edits, target: Path) -> None:
        """Write the edited checkpoint to target in this format: staged, read back and checked, then
        moved into place. On any failure the target is as before and nothing is left."""
        self.handle.write(edits, target)

    @property
    def parameters(self) -> int:
        return sum(i.numel for i in self.infos)
