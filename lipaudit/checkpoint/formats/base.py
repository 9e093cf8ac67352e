"""The checkpoint format interface: recognise, open, write and verify."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, StorageId, TensorInfo
from lipaudit.checkpoint.writer import Edits, Pending
from lipaudit.errors import UsageError
from lipaudit.text import visible


class Format(ABC):
    """One checkpoint format. The class recognises and opens files; an instance is one opened
    checkpoint and keeps whatever state its format needs to read, rewrite and check it."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        """Whether path holds this format; guess is what the byte-level sniffer recognised."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        """Read the index of tensors (not their data) and pick the state dict."""

    @abstractmethod
    def load(self, key: str) -> torch.Tensor:
        """One tensor's data."""

    def storage_identity(self, key: str) -> StorageId | None:
        """Equal for keys that are the same stored tensor; None where the format cannot share storage."""
        return None

    def write_refusal(self, bake: bool) -> str | None:
        """Why normalize could not write this checkpoint back, known from its opening alone (so the
        answer comes before any audit); None when it can. bake: --bake, which adds keys."""
        return None

    @abstractmethod
    def stage(self, edits: Edits, target: Path) -> Pending:
        """Write the edited checkpoint to temporary files beside target; nothing is in place yet."""

    @abstractmethod
    def verify(self, edits: Edits, pending: Pending) -> None:
        """Read the staged files back, tensor by tensor; raise OutputError on any difference."""

    def write(self, edits: Edits, target: Path) -> None:
        """Stage, verify, commit; on any failure the staged files are dropped."""
        pending = self.stage(edits, target)
        try:
            self.verify(edits, pending)
            pending.commit()
        except BaseException:
            pending.discard()
            raise


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """layers.2 before layers.10."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> tuple[str, list[tuple[str, str]]]:
    """Each file's sha256, and one digest that covers them all: the sha256 of their `sha256sum`
    lines ("<hex>  <name>\n", in the order given), so that a change to any shard changes it."""
    each = [(p.name, sha256_of(p)) for p in paths]
    listing = "".join(f"{digest}  {name}\n" for name, digest in each)
    return hashlib.sha256(listing.encode("utf-8", "surrogatepass")).hexdigest(), each


def by_prefix(infos: list[TensorInfo], key: str | None, shown: str) -> list[TensorInfo]:
    """--key for flat formats: the tensors named key or key.*"""
    if key is None or key in ("", "/"):
        return infos
    picked = [i for i in infos if i.key == key or i.key.startswith(key + ".")]
    if not picked:
        raise UsageError(f"{shown}: no tensor name starts with {visible(key, 80)!r}", shown)
    return picked
