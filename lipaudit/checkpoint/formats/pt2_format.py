"""torch.export archives (.pt2) as checkpoints: their parameters and buffers, by state-dict name.

Rewrites change only the rescaled weights' bytes (and their CRCs); the graph and every other
member stay byte-identical. The reader itself is lipaudit.checkpoint.pt2.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint import writer
from lipaudit.checkpoint.formats.base import Format, by_prefix, sha256_of
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, Ignored, StorageId, TensorInfo
from lipaudit.checkpoint.pt2 import FORMAT, Pt2Archive, is_pt2, open_pt2, patched_archive, weight_edits, write_to
from lipaudit.checkpoint.writer import Edits, Pending
from lipaudit.errors import MalformedInputError, OutputError, ResourceLimitError, UnsafeInputError, UsageError
from lipaudit.text import visible


class Pt2(Format):
    """A torch.export archive as a checkpoint: its parameters and buffers, by state-dict name."""

    name = FORMAT

    def __init__(self, arch: Pt2Archive) -> None:
        self.arch = arch

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        return guess == sn.TORCH_ZIP and is_pt2(path)

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        arch = open_pt2(path, limits)
        infos = [
            TensorInfo(key=p.name, shape=p.shape, dtype=str(p.dtype).removeprefix("torch."),
                       storage_bytes=None if p.use_pickle else arch.members[
                           f"{arch.root}data/weights/{p.path_name}"].file_size)
            for p in arch.weights.values()
        ]
        infos = by_prefix(infos, key, shown)
        ignored = [Ignored(path=s.split(":", 1)[0], reason=s.split(":", 1)[-1].strip()) for s in arch.ignored]
        return Checkpoint(path=shown, sha256=sha256_of(path), infos=infos, handle=cls(arch), key=key or None,
                          ignored=ignored)

    def load(self, key: str) -> torch.Tensor:
        return self.arch.weight(key)

    def storage_identity(self, key: str) -> StorageId | None:
        p = self.arch.weights[key]
        if p.use_pickle:
            return None
        ident = zlib.crc32(p.path_name.encode()) & 0x7FFFFFFF
        return (ident, p.offset, p.shape, p.stride, str(p.dtype))

    def stage(self, edits: Edits, target: Path) -> Pending:
        if edits.replaced:
            raise UsageError(f"{self.arch.shown}: a .pt2 archive's weights can only be rescaled, not replaced",
                             self.arch.shown)
        values = {k: edits.value(k) for k in edits.values}
        data = patched_archive(self.arch, weight_edits(self.arch, values))
        return Pending([writer.stage(target, write_to(data))])

    def verify(self, edits: Edits, pending: Pending) -> None:
        [staged] = pending.files
        shown = self.arch.shown

        def fail(why: str) -> OutputError:
            return OutputError(f"{shown}: the written archive does not read back as intended ({why})", shown)

        try:
            new = open_pt2(Path(staged.readable_path), self.arch.limits)
        except (MalformedInputError, ResourceLimitError, UnsafeInputError) as e:
            raise fail(e.message) from None
        old = self.arch
        if list(new.members) != list(old.members):
            raise fail("members differ")
        changed = {old.weight_member(k) for k in edits.values}
        for name in old.members:
            if name not in changed and new.read_member(name) != old.read_member(name):
                raise fail(f"member {visible(name, 80)} changed")
        for key in old.weights:
            want = edits.value(key).to(old.weights[key].dtype) if key in edits.values else old.weight(key)
            if not torch.equal(new.weight(key), want):
                raise fail(f"tensor {visible(key, 80)}")
