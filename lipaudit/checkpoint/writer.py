"""Write a rewritten checkpoint atomically, in the input's own format.

Every file goes to an unnamed temporary file in the destination folder (O_TMPFILE: if the
process dies, the kernel drops it), is fsynced, verified by the caller, and only then linked in
and renamed over the target. On any failure the target is untouched and nothing is left.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint.model import Checkpoint
from lipaudit.checkpoint.safetensors_reader import read_header
from lipaudit.errors import OutputError
from lipaudit.text import clean_message, visible

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class Staged:
    """A written, fsynced temporary file waiting to replace its target."""

    target: Path
    fd: int
    named: Path | None  # None: an O_TMPFILE without a name yet

    @property
    def readable_path(self) -> str:
        return str(self.named) if self.named is not None else f"/proc/self/fd/{self.fd}"

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.named is not None:
            try:
                os.unlink(self.named)
            except OSError:
                pass

    def commit(self) -> None:
        folder = self.target.parent
        if self.named is None:
            name = folder / f".{self.target.name}.lipaudit-{secrets.token_hex(6)}"
            _link_anonymous(self.fd, name)
            self.named = name
        os.replace(self.named, self.target)
        self.named = None
        os.close(self.fd)
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def _link_anonymous(fd: int, name: Path) -> None:
    """Give an O_TMPFILE a name: linkat(AT_EMPTY_PATH), else the /proc link, else a copy."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) == 0:
            return
    except (OSError, AttributeError):
        pass
    try:
        os.link(f"/proc/self/fd/{fd}", name, follow_symlinks=True)
        return
    except OSError:
        pass
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(out, stat.S_IMODE(os.fstat(fd).st_mode))
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            offset += os.sendfile(out, fd, offset, size - offset)
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(name)
        raise
    os.close(out)


def check_target(target: Path) -> None:
    """The destination must be a regular file or not exist, in an existing folder."""
    shown = visible(str(target))
    if target.is_symlink():
        raise OutputError(f"{shown}: refusing to write through a symbolic link", shown)
    if target.exists() and not target.is_file():
        raise OutputError(f"{shown}: not a regular file", shown)
    if not target.parent.is_dir():
        raise OutputError(f"{shown}: folder {visible(str(target.parent))} does not exist", shown)


def stage(target: Path, write: Callable[[IO[bytes]], None]) -> Staged:
    """Write into a temporary file beside target; the caller verifies, then commits or discards."""
    check_target(target)
    folder = target.parent
    mode = stat.S_IMODE(os.stat(target).st_mode) if target.exists() else 0o666 & ~_umask()
    named: Path | None = None
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):  # filesystems without O_TMPFILE
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".lipaudit", dir=folder)
        named = Path(name)
    staged = Staged(target, fd, named)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.fchmod(fd, mode)
    except BaseException as e:
        staged.discard()
        # torch's zip writer reports a failed write (disk full) as RuntimeError
        if isinstance(e, (OSError, RuntimeError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else clean_message(e)
            raise OutputError(f"{visible(str(target))}: cannot write ({why})", str(target)) from None
        raise
    return staged


@contextmanager
def transaction() -> Iterator[list[Staged]]:
    """Stage several files; all are discarded unless the block commits them."""
    files: list[Staged] = []
    try:
        yield files
    except BaseException:
        for f in files:
            f.discard()
        raise


def commit_all(files: list[Staged]) -> None:
    done = 0
    try:
        for f in files:
            f.commit()
            done += 1
    except OSError as e:
        for f in files[done:]:
            f.discard()
        raise OutputError(f"cannot move the output into place ({e.strerror or e})") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().clone().untyped_storage())


def _bytes_of(t: torch.Tensor) -> Callable[[], bytes]:
    return lambda: tensor_bytes(t)


def writer_of(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write


@dataclass
class Edits:
    """What to change: new values for existing keys, and keys replaced by one new key."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    # new key -> (tensor, the keys it replaces, in checkpoint order)
    replaced: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values or self.replaced)


def _apply_torch(ckpt: Checkpoint, edits: Edits) -> None:
    """Change the unpickled object in place; shared storage (tied weights) changes once."""
    for key, value in edits.values.items():
        container, ck = ckpt.slots[key]
        with torch.no_grad():
            container[ck].copy_(value)
    for new_key, (value, old_keys) in edits.replaced.items():
        container, first = ckpt.slots[old_keys[0]]
        olds = {ckpt.slots[k][1] for k in old_keys}
        # the container's keys are the flat keys less the path of the container itself
        prefix = old_keys[0][: len(old_keys[0]) - len(str(first))]
        if (
            not isinstance(container, dict)
            or any(ckpt.slots[k][0] is not container for k in old_keys)
            or not new_key.startswith(prefix)
        ):
            raise OutputError(f"{visible(new_key)}: cannot replace tensors kept in different containers")
        items = list(container.items())
        container.clear()  # the same object keeps attributes such as _metadata
        for k, v in items:
            if k == first:
                container[new_key[len(prefix) :]] = value
            elif k not in olds:
                container[k] = v


def write_torch(ckpt: Checkpoint, edits: Edits, target: Path) -> Staged:
    _apply_torch(ckpt, edits)
    legacy = ckpt.format == sn.TORCH_LEGACY

    def write(f: IO[bytes]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(ckpt.root, f, _use_new_zipfile_serialization=not legacy)

    return stage(target, write)


def _safetensors_file(src: Path, edits: Edits, shown: str) -> Callable[[IO[bytes]], None]:
    """Rewrite one safetensors file: same entry order, edited bytes, metadata updated."""
    header, meta = read_header(src, shown)
    replaced_by = {old: new for new, (_, olds) in edits.replaced.items() for old in olds}
    entries: list[tuple[str, dict[str, Any], Callable[[], bytes]]] = []
    with src.open("rb") as f:
        base = 8 + struct.unpack("<Q", f.read(8))[0]
    done: set[str] = set()
    for name, entry in header.items():
        if name in replaced_by:
            new = replaced_by[name]
            if new in done:
                continue
            value = edits.replaced[new][0]
            done.add(new)
            entries.append((new, {"dtype": _ST_DTYPES[value.dtype], "shape": list(value.shape)}, _bytes_of(value)))
        elif name in edits.values:
            entries.append((name, {"dtype": entry["dtype"], "shape": entry["shape"]}, _bytes_of(edits.values[name])))
        else:
            start, end = entry["data_offsets"]

            def original(a: int = start, b: int = end) -> bytes:
                with src.open("rb") as f:
                    f.seek(base + a)
                    return f.read(b - a)

            entries.append((name, {"dtype": entry["dtype"], "shape": entry["shape"]}, original))
    new_meta = {**meta, **edits.metadata}

    def write(f: IO[bytes]) -> None:
        offset = 0
        chunks = []
        out: dict[str, Any] = {}
        if new_meta:
            out["__metadata__"] = new_meta
        for name, entry, data in entries:
            blob = data()
            out[name] = {**entry, "data_offsets": [offset, offset + len(blob)]}
            offset += len(blob)
            chunks.append(blob)
        raw = json.dumps(out, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in chunks:
            f.write(blob)

    return write


def write_safetensors(ckpt: Checkpoint, edits: Edits, target: Path) -> list[Staged]:
    """A single file to target, or a sharded folder (index and shards) into target."""
    assert ckpt.source is not None
    if ckpt.format == sn.SAFETENSORS:
        write = _safetensors_file(ckpt.source, edits, ckpt.path)
        return [stage(target, write)]
    touched = {ckpt.files[k] for k in edits.values} | {
        ckpt.files[o] for _, olds in edits.replaced.values() for o in olds
    }
    index_src = ckpt.source
    staged: list[Staged] = []
    same_folder = target.resolve() == index_src.parent.resolve()
    try:
        for shard in dict.fromkeys(ckpt.files.values()):
            dest = target / shard.name
            if shard in touched:
                shown = f"{ckpt.path}: {shard.name}"
                staged.append(stage(dest, _safetensors_file(shard, edits, shown)))
            elif not same_folder:
                staged.append(stage(dest, _copy_of(shard)))
        index = json.loads(index_src.read_text(encoding="utf-8"))
        if edits.replaced:
            wm = index["weight_map"]
            for new, (_, olds) in edits.replaced.items():
                where = wm[olds[0]]
                for o in olds:
                    wm.pop(o, None)
                wm[new] = where
            text = (json.dumps(index, indent=2) + "\n").encode()
            staged.append(stage(target / index_src.name, writer_of(text)))
        elif not same_folder:
            staged.append(stage(target / index_src.name, _copy_of(index_src)))
    except BaseException:
        for s in staged:
            s.discard()
        raise
    return staged


def _copy_of(src: Path) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        with src.open("rb") as g:
            while block := g.read(1 << 20):
                f.write(block)

    return write


def write_checkpoint(ckpt: Checkpoint, edits: Edits, target: Path) -> list[Staged]:
    """Stage the rewritten checkpoint (same format as read); nothing is in place yet."""
    if ckpt.format in (sn.TORCH_ZIP, sn.TORCH_LEGACY):
        return [write_torch(ckpt, edits, target)]
    return write_safetensors(ckpt, edits, target)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return tensor_bytes(a) == tensor_bytes(b)


def verify(ckpt: Checkpoint, edits: Edits, staged: list[Staged]) -> None:
    """Read the staged files back: same keys in the same order, every tensor as intended."""
    from lipaudit.checkpoint.select import select_state_dict
    from lipaudit.checkpoint.torch_reader import load_torch

    replaced_by = {old: new for new, (_, olds) in edits.replaced.items() for old in olds}
    expected_keys = []
    order = [i.key for i in ckpt.infos]
    if ckpt.format == sn.SAFETENSORS and ckpt.source is not None:
        order = list(read_header(ckpt.source, ckpt.path)[0])  # the file's own order
    for key in order:
        new = replaced_by.get(key)
        if new is None:
            expected_keys.append(key)
        elif new not in expected_keys:
            expected_keys.append(new)

    def expected(key: str) -> torch.Tensor:
        if key in edits.replaced:
            return edits.replaced[key][0]
        return edits.values[key] if key in edits.values else ckpt.load(key)

    def fail(why: str) -> OutputError:
        return OutputError(f"{ckpt.path}: the written file does not read back as intended ({why})", ckpt.path)

    if ckpt.format in (sn.TORCH_ZIP, sn.TORCH_LEGACY):
        [s] = staged
        root = load_torch(Path(s.readable_path), ckpt.path, ckpt.format == sn.TORCH_ZIP, mmap=False)
        got = select_state_dict(root, ckpt.key, ckpt.path).tensors
        if list(got) != expected_keys and ckpt.key is not None:
            raise fail("keys differ")
        for key in expected_keys:
            if key not in got or not _same(got[key], expected(key)):
                raise fail(f"tensor {visible(key)}")
        return
    from safetensors import safe_open

    seen: list[str] = []
    for s in staged:
        if s.target.name.endswith(".json"):
            continue
        header, meta = read_header(Path(s.readable_path), ckpt.path)
        if any(meta.get(k) != v for k, v in edits.metadata.items()) and any(
            k in edits.values or k in edits.replaced for k in header
        ):
            raise fail("metadata")
        with safe_open(s.readable_path, framework="pt", device="cpu") as f:
            for key in header:
                if not _same(f.get_tensor(key), expected(key)):
                    raise fail(f"tensor {visible(key)}")
                seen.append(key)
    if ckpt.format == sn.SAFETENSORS and seen != expected_keys:
        raise fail("keys differ")
