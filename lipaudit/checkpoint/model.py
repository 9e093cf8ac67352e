"""The Checkpoint model: which tensors a file holds and how to read each one."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
        return self.dtype.startswith(("float", "bfloat")) and not self.is_quantized


@dataclass(frozen=True)
class Ignored:
    """A part of the container that was not audited, with the reason."""

    path: str
    reason: str


@dataclass
class Checkpoint:
    """Tensors of the selected state dict, in display order, read on demand."""

    path: str
    format: str
    sha256: str
    infos: list[TensorInfo]
    loader: Callable[[str], torch.Tensor]
    key: str | None = None
    ignored: list[Ignored] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    # For rewriting: the file (or index) read, and where each tensor lives.
    source: Path | None = None
    root: Any = None  # torch: the whole unpickled object
    slots: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # torch: key -> (container, key)
    files: dict[str, Path] = field(default_factory=dict)  # safetensors: key -> file

    def load(self, key: str) -> torch.Tensor:
        return self.loader(key)

    @property
    def parameters(self) -> int:
        return sum(i.numel for i in self.infos)
