"""safetensors checkpoints: one file, or a folder of shards with a *.safetensors.index.json.

Files are written as a stream: the header first (every size is known from shapes and dtypes),
then each tensor in turn, kept ones copied from the source by the kernel, so memory follows the
largest edited tensor, not the file. Verification reads the written file back tensor by tensor.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from lipaudit.checkpoint import safetensors_reader as st
from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint import writer
from lipaudit.checkpoint.formats.base import Format, by_prefix, natural_key, sha256_files, sha256_of
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, TensorInfo
from lipaudit.checkpoint.writer import Edits, Pending, Staged
from lipaudit.errors import MalformedInputError, OutputError
from lipaudit.text import clean_message, visible

_CODES = {getattr(torch, name): code for code, name in st._DTYPES.items() if hasattr(torch, name)}
_CHUNK = 16 << 20
# A shard written beside the one it replaces carries this marker until the index names it.
_MARKED = re.compile(r"^(?P<stem>.+)\.lipaudit-[0-9a-f]{12}\.safetensors$")
_HIDDEN = re.compile(r"^\..+\.lipaudit-[0-9a-f]{12}$")


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: int, dst: int, start: int, length: int) -> None:
    """length bytes of src from start, appended to dst: in the kernel where it can, else by reads."""
    done = 0
    fast = True
    while done < length:
        if fast:
            try:
                n = os.copy_file_range(src, dst, length - done, start + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                fast = False
                continue
        else:
            block = os.pread(src, min(_CHUNK, length - done), start + done)
            _write_all(dst, block)
            n = len(block)
        if n == 0:
            raise OSError(errno.EIO, "the input file changed during the run")
        done += n


def _same_range(a: int, a_start: int, b: int, b_start: int, length: int) -> bool:
    done = 0
    while done < length:
        n = min(_CHUNK, length - done)
        x, y = os.pread(a, n, a_start + done), os.pread(b, n, b_start + done)
        if len(x) != n or x != y:
            return False
        done += n
    return True


def _same_as(fd: int, start: int, data: memoryview) -> bool:
    done, length = 0, len(data)
    while done < length:
        n = min(_CHUNK, length - done)
        got = os.pread(fd, n, start + done)
        if len(got) != n or data[done : done + n].tobytes() != got:  # bytes against bytes: a memcmp
            return False
        done += n
    return True


@dataclass
class _Entry:
    name: str
    dtype: str  # safetensors code
    shape: list[int]
    nbytes: int
    kept: tuple[int, int] | None = None  # byte range of an unchanged tensor in the source file
    edited: str | None = None  # key in Edits.values
    value: torch.Tensor | None = None  # a replacement (baked) tensor


class _FilePlan:
    """One safetensors file to write: the source's entries in order, some replaced."""

    def __init__(self, src: Path, header: dict[str, Any], meta: dict[str, str], edits: Edits, shown: str) -> None:
        self.src = src
        self.shown = shown
        self.edits = edits
        self.meta = {**meta, **edits.metadata}
        locations = st.locations(src, header)
        replaced_by = edits.replaced_by()
        self.entries: list[_Entry] = []
        done: set[str] = set()
        for name, entry in header.items():
            loc = locations[name]
            if name in replaced_by:
                new = replaced_by[name]
                if new in done:
                    continue
                done.add(new)
                value = edits.replaced[new][0]
                code = _CODES.get(value.dtype)
                if code is None:
                    raise OutputError(f"{shown}: safetensors cannot hold a {value.dtype} tensor", shown)
                nbytes = value.numel() * value.element_size()
                self.entries.append(_Entry(new, code, list(value.shape), nbytes, value=value))
            elif name in edits.values:
                self.entries.append(_Entry(name, entry["dtype"], list(entry["shape"]), loc.stop - loc.start,
                                           edited=name))
            else:
                self.entries.append(_Entry(name, entry["dtype"], list(entry["shape"]), loc.stop - loc.start,
                                           kept=(loc.start, loc.stop)))

    def header(self) -> bytes:
        out: dict[str, Any] = {"__metadata__": self.meta} if self.meta else {}
        offset = 0
        for e in self.entries:
            out[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(out, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def data(self, e: _Entry) -> memoryview:
        """An edited entry's bytes, in the entry's dtype and shape."""
        value = e.value if e.value is not None else self.edits.value(e.edited or "")
        dtype = getattr(torch, st._DTYPES[e.dtype])
        if list(value.shape) != e.shape:
            raise ValueError(f"{e.name}: new value has shape {list(value.shape)}, not {e.shape}")
        data = writer.byte_view(value.to(dtype))
        if len(data) != e.nbytes:
            raise ValueError(f"{e.name}: {len(data)} bytes, expected {e.nbytes}")
        return data

    def write(self, f: IO[bytes]) -> None:
        f.flush()
        out = f.fileno()
        _write_all(out, self.header())
        with open(self.src, "rb") as g:
            for e in self.entries:
                if e.kept is not None:
                    _copy_range(g.fileno(), out, e.kept[0], e.kept[1] - e.kept[0])
                else:
                    _write_all(out, self.data(e))

    def verify(self, staged: Path, limits: Limits) -> str | None:
        """What differs between the staged file and the plan, read back tensor by tensor."""
        from safetensors import safe_open

        try:
            header, meta = st.read_header(staged, self.shown, limits)
            with safe_open(str(staged), framework="pt", device="cpu") as f:  # a second, independent parser
                names = list(f.keys())
                lib_meta = f.metadata() or {}
        except (MalformedInputError, OSError, RuntimeError, ValueError) as err:
            return f"unreadable ({clean_message(err)})"
        if list(header) != [e.name for e in self.entries] or sorted(names) != sorted(header):
            return "keys differ"
        if meta != self.meta or lib_meta != self.meta:
            return "metadata"
        where = st.locations(staged, header)
        with open(staged, "rb") as out, open(self.src, "rb") as src:
            for e in self.entries:
                entry, loc = header[e.name], where[e.name]
                if entry["dtype"] != e.dtype or list(entry["shape"]) != e.shape or loc.stop - loc.start != e.nbytes:
                    return f"tensor {visible(e.name, 80)}: dtype or shape"
                if e.kept is not None:
                    same = _same_range(out.fileno(), loc.start, src.fileno(), e.kept[0], e.nbytes)
                else:
                    same = _same_as(out.fileno(), loc.start, self.data(e))
                if not same:
                    return f"tensor {visible(e.name, 80)}"
        return None


class _Written(Pending):
    def __init__(self, files: list[Staged], plans: list[_FilePlan | None], sources: list[Path]) -> None:
        super().__init__(files)
        self.plans = plans  # per staged file; None: a plain copy of its source
        self.sources = sources


def _verify(pending: Pending, limits: Limits, shown: str) -> None:
    assert isinstance(pending, _Written)
    for staged, plan, src in zip(pending.files, pending.plans, pending.sources, strict=True):
        path = Path(staged.readable_path)
        if plan is not None:
            why = plan.verify(path, limits)
        else:
            size = src.stat().st_size
            with open(path, "rb") as a, open(src, "rb") as b:
                same = os.fstat(a.fileno()).st_size == size and _same_range(a.fileno(), 0, b.fileno(), 0, size)
            why = None if same else f"copy of {visible(src.name, 80)}"
        if why is not None:
            raise OutputError(f"{shown}: the written file does not read back as intended ({why})", shown)


def _copy_of(src: Path) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.flush()
        with open(src, "rb") as g:
            _copy_range(g.fileno(), f.fileno(), 0, os.fstat(g.fileno()).st_size)

    return write


class Safetensors(Format):
    """A single safetensors file."""

    name = sn.SAFETENSORS

    def __init__(self, path: Path, shown: str, header: dict[str, Any], meta: dict[str, str], limits: Limits) -> None:
        self.path = path
        self.shown = shown
        self.header = header
        self.meta = meta
        self.limits = limits
        self.files = st.SafetensorsFiles(st.locations(path, header), shown)

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        return guess == cls.name

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        header, meta = st.read_header(path, shown, limits)
        infos = by_prefix(sorted(st.infos_from_header(header), key=lambda i: natural_key(i.key)), key, shown)
        return Checkpoint(path=shown, sha256=sha256_of(path), infos=infos,
                          handle=cls(path, shown, header, meta, limits), key=key or None)

    def load(self, key: str) -> torch.Tensor:
        return self.files.load(key)

    def stage(self, edits: Edits, target: Path) -> Pending:
        if target.is_dir() and not target.is_symlink():  # a folder that held this one file
            target = target / self.path.name
        plan = _FilePlan(self.path, self.header, self.meta, edits, self.shown)
        return _Written([writer.stage(target, plan.write)], [plan], [self.path])

    def verify(self, edits: Edits, pending: Pending) -> None:
        _verify(pending, self.limits, self.shown)


def final_name(name: str) -> str:
    """A shard's name without the marker an interrupted write may have left on it."""
    m = _MARKED.match(name)
    return f"{m.group('stem')}.safetensors" if m else name


def _marked(name: str) -> str:
    return f"{name.removesuffix('.safetensors')}.lipaudit-{secrets.token_hex(6)}.safetensors"


@dataclass
class _Shard:
    source: Path
    final: str  # its name once the write is done
    current: str  # its name when the new index first takes effect
    staged: Staged | None  # None: the source file stays as it is


class _ShardedWrite(_Written):
    """Shards first, under names no index refers to; then the index, the commit point; then the
    shards take their final names and a second index names them. A kill at any moment leaves a
    folder whose index describes either the old checkpoint or the new one."""

    def __init__(self, folder: Path, shards: list[_Shard], first: Staged, second: Staged | None,
                 plans: list[_FilePlan | None], made: bool) -> None:
        super().__init__([s.staged for s in shards if s.staged], plans,
                         [s.source for s in shards if s.staged])
        self.folder = folder
        self.shards = shards
        self.first = first
        self.second = second
        self.made = made  # the folder was created for this write

    def discard(self) -> None:
        super().discard()
        self.first.discard()
        if self.second is not None:
            self.second.discard()
        if self.made:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def commit(self) -> None:
        linked: list[Path] = []
        try:
            for s in self.shards:
                if s.staged is not None:
                    s.staged.target = self.folder / s.current
                    s.staged.commit()
                    linked.append(s.staged.target)
            self.first.commit()
        except OSError as e:
            for p in linked:
                try:
                    p.unlink()
                except OSError:
                    pass
            self.discard()
            raise OutputError(f"cannot move the output into place ({e.strerror or e})") from None
        # The folder now reads as the new checkpoint; the rest only restores the shards' names.
        keep = {s.current for s in self.shards}
        try:
            renames = [s for s in self.shards if s.current != s.final]
            for s in renames:
                link = self.folder / f".{s.final}.lipaudit-{secrets.token_hex(6)}"
                os.link(self.folder / s.current, link)
                os.replace(link, self.folder / s.final)
            if self.second is not None:
                writer.fsync_folder(self.folder)
                self.second.commit()
                keep = {s.final for s in self.shards}
        except OSError:
            if self.second is not None:
                self.second.discard()
        tidy(self.folder, keep)


def tidy(folder: Path, keep: set[str]) -> None:
    """Remove what an interrupted write left: marked shards no index names, and hidden temporaries."""
    removed = False
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for name in names:
        if name not in keep and (_MARKED.match(name) or _HIDDEN.match(name)):
            try:
                os.unlink(folder / name)
                removed = True
            except OSError:
                pass
    if removed:
        try:
            writer.fsync_folder(folder)
        except OSError:
            pass


class ShardedSafetensors(Format):
    """A folder of safetensors shards named by an index's weight_map."""

    name = sn.SHARDED

    def __init__(self, index: Path, shown: str, data: dict[str, Any], where: dict[str, Path],
                 headers: dict[Path, tuple[dict[str, Any], dict[str, str]]], files: st.SafetensorsFiles,
                 limits: Limits) -> None:
        self.index = index
        self.shown = shown
        self.data = data
        self.where = where
        self.headers = headers
        self.files = files
        self.limits = limits

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        return guess == cls.name

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        index = path
        if path.is_dir():
            found = st.find_index(path, shown)
            if found is None:
                single = sorted(path.glob("*.safetensors"))
                if len(single) == 1:
                    return Safetensors.open(single[0], shown, key, limits)
                raise MalformedInputError(f"{shown}: folder holds no *.safetensors.index.json", shown)
            index = found
        where, data = st.read_index(index, shown, limits)
        infos: list[TensorInfo] = []
        seen: set[str] = set()
        places: dict[str, st.Location] = {}
        headers: dict[Path, tuple[dict[str, Any], dict[str, str]]] = {}
        for shard in dict.fromkeys(where.values()):
            header, meta = st.read_header(shard, f"{shown}: {shard.name}", limits)
            headers[shard] = (header, meta)
            places.update(st.locations(shard, header))
            for info in st.infos_from_header(header):
                if info.key in seen:
                    raise MalformedInputError(f"{shown}: tensor {visible(info.key, 80)!r} is in two shards", shown)
                if where.get(info.key) != shard:
                    raise MalformedInputError(
                        f"{shown}: tensor {visible(info.key, 80)!r} in {shard.name} is not mapped there by the index",
                        shown,
                    )
                seen.add(info.key)
                infos.append(info)
        missing = [k for k in where if k not in seen]
        if missing:
            raise MalformedInputError(
                f"{shown}: {len(missing)} tensors in the index are in no shard (first: {visible(missing[0], 80)!r})",
                shown,
            )
        infos = by_prefix(sorted(infos, key=lambda i: natural_key(i.key)), key, shown)
        handle = cls(index, shown, data, where, headers, st.SafetensorsFiles(places, shown), limits)
        digest, files = sha256_files([index, *headers])
        return Checkpoint(
            path=shown, sha256=digest, infos=infos, handle=handle, key=key or None,
            shards=[p.name for p in headers], files=files,
        )

    def load(self, key: str) -> torch.Tensor:
        return self.files.load(key)

    def write(self, edits: Edits, target: Path) -> None:
        """Into the folder target, created if missing."""
        made = False
        if not target.exists() and not target.is_symlink():
            try:
                target.mkdir()
                made = True
            except OSError as e:
                raise OutputError(f"{visible(str(target))}: cannot create the folder ({e.strerror})") from None
        try:
            pending = self._stage(edits, target, made)
        except BaseException:
            if made:
                target.rmdir()
            raise
        try:
            self.verify(edits, pending)
            pending.commit()
        except BaseException:
            pending.discard()
            raise

    def stage(self, edits: Edits, target: Path) -> Pending:
        return self._stage(edits, target, False)

    def verify(self, edits: Edits, pending: Pending) -> None:
        _verify(pending, self.limits, self.shown)

    def _stage(self, edits: Edits, folder: Path, made: bool) -> _ShardedWrite:
        if folder.is_symlink() or not folder.is_dir():
            raise OutputError(f"{visible(str(folder))}: not a folder", str(folder))
        in_place = folder.resolve() == self.index.parent.resolve()
        replaced_by = edits.replaced_by()
        for new, (_, olds) in edits.replaced.items():
            if len({self.where[k] for k in olds}) != 1:
                raise OutputError(f"{visible(new)}: cannot replace tensors kept in different shards")
        touched = {self.where[k] for k in edits.values} | {self.where[k] for k in replaced_by}
        shards: list[_Shard] = []
        plans: list[_FilePlan | None] = []
        first: Staged | None = None
        try:
            for src, (header, meta) in self.headers.items():
                final = final_name(src.name)
                if src in touched:
                    plan: _FilePlan | None = _FilePlan(src, header, meta, edits, f"{self.shown}: {src.name}")
                    assert plan is not None
                    shards.append(_Shard(src, final, final, writer.stage(folder / final, plan.write)))
                    plans.append(plan)
                elif not in_place:
                    shards.append(_Shard(src, final, final, writer.stage(folder / final, _copy_of(src))))
                    plans.append(None)
                else:
                    shards.append(_Shard(src, final, src.name, None))
            for s in shards:
                if s.staged is not None and (folder / s.final).exists():
                    s.current = _marked(s.final)
            finals = [s.final for s in shards]
            for s in shards:
                if finals.count(s.final) > 1 or any(o is not s and o.current == s.final for o in shards):
                    s.final = s.current  # names that would collide stay as they are
            first = writer.stage(folder / self.index.name, writer.writer_of(self._index(edits, shards, False)))
            second = None
            if any(s.current != s.final for s in shards):
                second = writer.stage(folder / self.index.name, writer.writer_of(self._index(edits, shards, True)))
        except BaseException:
            for s in shards:
                if s.staged is not None:
                    s.staged.discard()
            if first is not None:
                first.discard()
            raise
        return _ShardedWrite(folder, shards, first, second, plans, made)

    def _index(self, edits: Edits, shards: list[_Shard], final: bool) -> bytes:
        name_of = {s.source.name: (s.final if final else s.current) for s in shards}
        replaced_by = edits.replaced_by()
        weight_map: dict[str, str] = {}
        for key, shard in self.where.items():
            new = replaced_by.get(key)
            if new is None:
                weight_map[key] = name_of[shard.name]
            elif new not in weight_map:
                weight_map[new] = name_of[shard.name]
        data = dict(self.data)
        data["weight_map"] = weight_map
        meta = data.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("total_size"), int) and edits.replaced:
            sizes = {k: v.numel() * v.element_size() for k, (v, _) in edits.replaced.items()}
            infos = {i.key: i.logical_bytes for i in self._all_infos()}
            data["metadata"] = {**meta, "total_size": sum(sizes.get(k, infos.get(k, 0)) for k in weight_map)}
        return (json.dumps(data, indent=2) + "\n").encode()

    def _all_infos(self) -> list[TensorInfo]:
        return [i for header, _ in self.headers.values() for i in st.infos_from_header(header)]
