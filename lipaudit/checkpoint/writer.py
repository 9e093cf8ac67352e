"""Write a rewritten checkpoint atomically, in the input's own format.

Every file goes to an unnamed temporary file in the destination folder (O_TMPFILE: if the
process dies, the kernel drops it), is fsynced, verified by the caller, and only then linked in
and renamed over the target. On any failure the target is untouched and nothing is left.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from lipaudit.errors import OutputError
from lipaudit.text import clean_message, visible

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
# Only the permission bits travel to the new file: never setuid, setgid or sticky.
_PERMISSIONS = 0o777


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
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
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
        self.fd = -1
        fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
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
    mode = (stat.S_IMODE(os.stat(target).st_mode) if target.exists() else 0o666 & ~_umask()) & _PERMISSIONS
    named: Path | None = None
    try:
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (OSError, AttributeError):  # filesystems without O_TMPFILE
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".lipaudit", dir=folder)
            named = Path(name)
    except OSError as e:
        raise OutputError(f"{visible(str(target))}: cannot write ({e.strerror or e})", str(target)) from None
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


def byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's values as raw little-endian bytes, without a Python loop (a copy only when not contiguous)."""
    t = torch.Tensor.detach(t)
    if t.numel() == 0:
        return memoryview(b"")
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data.cast("B")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return byte_view(a).tobytes() == byte_view(b).tobytes()


def writer_of(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write


# A new value, or a function that computes it again on demand: writers call it once per tensor
# when writing and once when verifying, so memory follows the largest tensor, not the file.
Value = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class Edits:
    """What to change: new values for existing keys, and keys replaced by one new key."""

    values: dict[str, Value] = field(default_factory=dict)
    # new key -> (tensor, the keys it replaces, in checkpoint order)
    replaced: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values or self.replaced)

    def value(self, key: str) -> torch.Tensor:
        v = self.values[key]
        return v if isinstance(v, torch.Tensor) else v()

    def replaced_by(self) -> dict[str, str]:
        """Old key -> the new key that takes its place."""
        return {old: new for new, (_, olds) in self.replaced.items() for old in olds}


class Pending:
    """Staged files of one write, in the order they are moved into place."""

    def __init__(self, files: list[Staged]) -> None:
        self.files = files

    def discard(self) -> None:
        for f in self.files:
            f.discard()

    def commit(self) -> None:
        commit_all(self.files)
