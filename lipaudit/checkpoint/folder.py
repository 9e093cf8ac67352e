"""Folders as people keep them: Hugging Face snapshots, pytorch_model.bin shards, one file in a folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import torch

from lipaudit.checkpoint import hf, writer
from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint.formats.base import Format, by_prefix, natural_key, sha256_files, sha256_of
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, Ignored, StorageId, tensor_identity
from lipaudit.checkpoint.safetensors_reader import find_index, read_index
from lipaudit.checkpoint.select import check_size, select_state_dict
from lipaudit.checkpoint.torch_reader import ZipLayout, load_torch, tensor_info
from lipaudit.checkpoint.unpickler import Classes
from lipaudit.checkpoint.writer import Edits, Pending, Staged
from lipaudit.errors import MalformedInputError, OutputError, UsageError
from lipaudit.text import visible

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LOOKS_FOR = (
    "*.safetensors.index.json, pytorch_model.bin.index.json (or another *.bin.index.json), "
    "or a single *.safetensors, *.bin, *.pt, *.pth or *.ckpt file"
)


def _single(folder: Path, suffixes: tuple[str, ...], shown: str) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.name.endswith(suffixes) and not p.name.startswith("."))
    if len(found) > 1:
        names = ", ".join(visible(p.name, 60) for p in found[:5])
        raise UsageError(f"{shown}: the folder holds several checkpoints ({names}); name one", shown)
    return found[0] if found else None


class Folder(Format):
    """Routes a folder (or a .bin index) to the format that reads what it holds."""

    name = "folder"

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        if guess != sn.SHARDED:
            return False
        if path.is_dir():  # a folder with a safetensors index is the sharded safetensors format's own
            return not any(path.glob("*.safetensors.index.json"))
        return path.name.endswith(".bin.index.json")

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        from lipaudit.checkpoint.formats import detect
        from lipaudit.checkpoint.formats.safetensors_format import ShardedSafetensors

        if not path.is_dir():
            return ShardedTorch.open(path, shown, key, limits)
        if hf.is_root(path):  # models--org--name: the snapshot refs/main names (the CLI's --revision picks another)
            snap = hf.snapshot(path, None, shown)
            return detect(snap, f"{shown}/snapshots/{snap.name}").open(snap, f"{shown}/snapshots/{snap.name}", key,
                                                                       limits)
        try:
            # safetensors first, as transformers does when a repository holds both
            index = find_index(path, shown)
            if index is not None:
                return ShardedSafetensors.open(index, shown, key, limits)
            index = find_index(path, shown, "*.bin.index.json")
            if index is not None:
                return ShardedTorch.open(index, shown, key, limits)
            single = _single(path, (".safetensors",), shown) or _single(path, TORCH_SUFFIXES, shown)
        except PermissionError:
            raise UsageError(f"{shown}: cannot list the folder", shown) from None
        if single is None:
            raise UsageError(f"{shown}: a folder without a checkpoint; lipaudit looks for {LOOKS_FOR}", shown)
        inner = f"{shown}/{visible(single.name, 100)}"
        return detect(single, inner).open(single, inner, key, limits)

    def load(self, key: str) -> torch.Tensor:  # pragma: no cover - open returns another format's checkpoint
        raise NotImplementedError

    def stage(self, edits: Edits, target: Path) -> Pending:  # pragma: no cover
        raise NotImplementedError

    def verify(self, edits: Edits, pending: Pending) -> None:  # pragma: no cover
        raise NotImplementedError


class ShardedTorch(Format):
    """pytorch_model.bin shards named by a *.bin.index.json weight_map; each shard a torch.save file."""

    name = "torch-sharded"

    def __init__(self, shown: str, tensors: dict[str, torch.Tensor], index: Path | None = None,
                 where: dict[str, Path] | None = None, limits: Limits | None = None) -> None:
        self.shown = shown
        self.tensors = tensors
        self.index = index  # what normalize needs to write the shards back
        self.where = where or {}
        self.limits = limits or Limits()

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        return guess == sn.SHARDED and path.name.endswith(".bin.index.json")

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        where, _data = read_index(path, shown, limits, suffixes=TORCH_SUFFIXES)
        tensors: dict[str, torch.Tensor] = {}
        ignored: list[Ignored] = []
        classes = Classes()
        shards = list(dict.fromkeys(where.values()))
        for shard in shards:
            inner = f"{shown}: {visible(shard.name, 100)}"
            fmt = sn.sniff(shard, inner)
            if fmt not in (sn.TORCH_ZIP, sn.TORCH_LEGACY):
                raise MalformedInputError(f"{inner}: not a torch.save file, as a .bin index names", shown)
            loaded = load_torch(shard, inner, fmt == sn.TORCH_ZIP, mmap=fmt == sn.TORCH_ZIP, limits=limits)
            root = loaded.root
            classes.built |= loaded.classes.built
            classes.named |= loaded.classes.named
            sel = select_state_dict(root, None, inner, limits, check_size(root, limits, inner))
            ignored += [Ignored(f"{shard.name}: {x.path}", x.reason) for x in sel.ignored]
            for name, t in sel.tensors.items():
                if name in tensors:
                    raise MalformedInputError(f"{shown}: tensor {visible(name, 80)!r} is in two shards", shown)
                if where.get(name) != shard:
                    raise MalformedInputError(
                        f"{shown}: tensor {visible(name, 80)!r} in {visible(shard.name, 80)} is not mapped there "
                        "by the index", shown,
                    )
                tensors[name] = t
            if len(tensors) > limits.tensors:
                raise MalformedInputError(f"{shown}: more than {limits.tensors} tensors", shown)
        missing = [k for k in where if k not in tensors]
        if missing:
            raise MalformedInputError(
                f"{shown}: {len(missing)} tensors in the index are in no shard (first: {visible(missing[0], 80)!r})",
                shown,
            )
        infos = [tensor_info(k, tensors[k]) for k in sorted(tensors, key=natural_key)]
        infos = by_prefix(infos, key, shown)
        digest, files = sha256_files([path, *shards])
        return Checkpoint(
            path=shown, sha256=digest, infos=infos, handle=cls(shown, tensors, path, where, limits),
            key=key or None, ignored=ignored, shards=[p.name for p in shards], files=files, notes=classes.notes(),
        )

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def storage_identity(self, key: str) -> StorageId | None:
        return tensor_identity(self.tensors.get(key))

    def _refuse(self, why: str) -> MalformedInputError:
        return MalformedInputError(
            f"{self.shown}: {why}; convert the shards to safetensors "
            "(save_pretrained(..., safe_serialization=True)) and normalize those", self.shown,
        )

    def write_refusal(self, bake: bool) -> str | None:
        from lipaudit.checkpoint.formats.torch_format import parametrized

        if bake and any(parametrized(k) for k in self.tensors):
            return str(self._refuse("--bake replaces parametrized weights by new keys, which .bin shards cannot "
                                    "take without rewriting their pickles"))
        for shard in dict.fromkeys(self.where.values()):
            if sn.sniff(shard, self.shown) != sn.TORCH_ZIP:
                return str(self._refuse(f"{visible(shard.name, 100)} is a legacy torch file, rewritten only whole"))
        return None

    def write(self, edits: Edits, target: Path) -> None:
        """Into the folder target, created if missing; the index and unedited shards are copied."""
        made = not target.exists() and not target.is_symlink()
        if made:
            try:
                target.mkdir()
            except OSError as e:
                raise OutputError(f"{visible(str(target))}: cannot create the folder ({e.strerror})") from None
        try:
            super().write(edits, target)
        except BaseException:
            if made:
                shutil.rmtree(target, ignore_errors=True)
            raise

    def stage(self, edits: Edits, target: Path) -> Pending:
        """Each edited shard is its zip archive with the edited storage records replaced (the
        pickle byte for byte); names and the index stay as they are. Every shard is staged and
        verified before the first is moved into place."""
        from lipaudit.checkpoint import zip_patch
        from lipaudit.checkpoint.formats.torch_format import record_bytes

        if edits.replaced:
            raise self._refuse("--bake adds keys, which .bin shards cannot take without rewriting their pickles")
        if self.index is None:
            raise self._refuse("rewriting .bin shards opened without their index is not supported")
        if target.is_symlink() or not target.is_dir():
            raise OutputError(f"{visible(str(target))}: not a folder", str(target))
        in_place = target.resolve() == self.index.parent.resolve()
        files: list[Staged] = []
        parts: list[_ShardWrite] = []
        try:
            for shard in dict.fromkeys(self.where.values()):
                keys = [k for k in edits.values if self.where.get(k) == shard]
                inner = f"{self.shown}: {visible(shard.name, 100)}"
                if keys:
                    layout = None
                    if sn.sniff(shard, inner) == sn.TORCH_ZIP:
                        layout = zip_patch.patchable(shard, inner, self.limits)
                    records = {} if layout is None else zip_patch.records_of(shard, inner, self.limits, None, layout)
                    if layout is None or any(k not in records for k in keys):
                        raise self._refuse(f"{visible(shard.name, 100)} is not a little-endian torch zip archive")
                    by_record: dict[str, list[str]] = {}
                    for k in keys:
                        by_record.setdefault(records[k], []).append(k)
                    plan: dict[str, Callable[[], bytes]] = {
                        r: partial(record_bytes, [self.tensors[k] for k in ks], ks, edits)
                        for r, ks in by_record.items()
                    }
                    files.append(writer.stage(target / shard.name, zip_patch.patch_writer(shard, layout, plan)))
                    parts.append(_ShardWrite(shard, files[-1], layout, plan, keys))
                elif not in_place:
                    files.append(writer.stage(target / shard.name, _copy(shard)))
                    parts.append(_ShardWrite(shard, files[-1], None, {}, []))
            if not in_place:
                files.append(writer.stage(target / self.index.name, _copy(self.index)))
                parts.append(_ShardWrite(self.index, files[-1], None, {}, []))
        except BaseException:
            for f in files:
                f.discard()
            raise
        return _ShardsWrite(files, parts)

    def verify(self, edits: Edits, pending: Pending) -> None:
        from lipaudit.checkpoint.formats.torch_format import check_records

        assert isinstance(pending, _ShardsWrite)
        for part in pending.parts:
            written = Path(part.staged.readable_path)
            inner = f"{self.shown}: {visible(part.source.name, 100)}"
            if part.layout is None:
                if sha256_of(written) != sha256_of(part.source):
                    raise OutputError(f"{inner}: the copy differs from the original", self.shown)
                continue
            sub = Edits(values={k: edits.values[k] for k in part.keys})
            check_records(part.source, written, part.layout, part.records, None, sub, inner, self.limits)


@dataclass
class _ShardWrite:
    source: Path
    staged: Staged
    layout: ZipLayout | None  # None: a copy
    records: dict[str, Callable[[], bytes]]
    keys: list[str]


class _ShardsWrite(Pending):
    def __init__(self, files: list[Staged], parts: list[_ShardWrite]) -> None:
        super().__init__(files)
        self.parts = parts


def _copy(src: Path) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 24)

    return write
