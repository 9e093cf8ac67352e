"""Read PyTorch zip and legacy checkpoints with lipaudit's restricted unpickler only."""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import TensorInfo
from lipaudit.checkpoint.unpickler import Bounded, Classes, Marker, Storage, refuse_dangerous, unpickle
from lipaudit.errors import LipauditError, MalformedInputError, ResourceLimitError, UnsafeInputError
from lipaudit.text import clean_message, visible


@dataclass(frozen=True)
class Member:
    offset: int  # of the data, in the file
    size: int


@dataclass(frozen=True)
class ZipLayout:
    size: int
    prefix: str  # "archive/": the folder every member sits in
    pickle: str
    members: dict[str, Member]


def check_zip(path: Path, shown: str, limits: Limits) -> ZipLayout:
    """Refuse TorchScript archives, zips that torch and zipfile would read differently, and
    members that would inflate or claim more than the file holds; locate each member's data."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RecursionError) as e:
        raise MalformedInputError(f"{shown}: broken zip archive ({clean_message(e)})", shown) from None
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        raise MalformedInputError(f"{shown}: zip archive has duplicate member names", shown)
    if len({n.casefold() for n in names}) != len(names):
        # torch finds members whatever their case: it could read another member than this reader
        raise MalformedInputError(f"{shown}: zip member names that differ only in case", shown)
    if any("/code/" in n or n.endswith(("/constants.pkl", "/bytecode.pkl")) for n in names):
        raise UnsafeInputError(f"{shown}: a TorchScript archive (it carries code); refused", shown)
    pickles = [n for n in names if n.casefold().endswith(".pkl") and not n.endswith(("/data.pkl", "data.pkl"))]
    if pickles:
        # torch never writes another pickle beside data.pkl: one nobody scans could be read by something else
        raise MalformedInputError(
            f"{shown}: zip archive holds the pickle {visible(pickles[0], 80)!r} beside data.pkl", shown
        )
    if len(members) > limits.tensors + 16:
        raise ResourceLimitError(f"{shown}: {len(members)} zip members, over the limit of {limits.tensors}", shown)
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise MalformedInputError(f"{shown}: zip archive without data.pkl: not a torch checkpoint", shown)
    if len(pkl) > 1:
        # torch and this reader could pick different ones, and only one would be checked.
        raise MalformedInputError(f"{shown}: zip archive holds {len(pkl)} data.pkl members", shown)
    prefix = pkl[0][: -len("data.pkl")]
    if prefix.count("/") > 1:
        # torch takes the archive folder from the first path component only
        raise MalformedInputError(f"{shown}: data.pkl is nested below the archive folder", shown)
    if any(not n.startswith(prefix) for n in names):
        raise MalformedInputError(f"{shown}: zip members outside the archive folder {visible(prefix, 80)!r}", shown)
    located: dict[str, Member] = {}
    with open(path, "rb") as f:
        for m in members:
            if m.compress_type != zipfile.ZIP_STORED:
                # torch.save never compresses; inflating is how a 260 KB file asks for 256 MB
                raise ResourceLimitError(
                    f"{shown}: compressed zip member {visible(m.filename, 80)!r} "
                    f"({m.compress_size} bytes inflating to {m.file_size}): refused", shown,
                )
            f.seek(m.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise MalformedInputError(f"{shown}: zip member {visible(m.filename, 80)!r} has no local header", shown)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = m.header_offset + 30 + name_len + extra_len
            if m.file_size != m.compress_size or start + m.file_size > size:
                raise MalformedInputError(
                    f"{shown}: zip member {visible(m.filename, 80)!r} is larger than the file", shown
                )
            located[m.filename] = Member(start, m.file_size)
    if located[pkl[0]].size > limits.pickle_bytes:
        raise ResourceLimitError(f"{shown}: data.pkl over {limits.pickle_bytes} bytes", shown)
    return ZipLayout(size, prefix, pkl[0], located)


def _err(e: LipauditError, shown: str) -> LipauditError:
    """The same error, its message prefixed with the file."""
    if e.path is not None:
        return e
    out = type(e)(f"{shown}: {e.message}", shown)
    return out


@dataclass
class Loaded:
    root: Any
    classes: Classes  # outside the allowlist: built (with --allow-unknown-classes) or named only


def load_torch(path: Path, shown: str, zip_format: bool, mmap: bool, limits: Limits | None = None) -> Loaded:
    """Unpickle a torch checkpoint with lipaudit's restricted unpickler: nothing named by the file
    is imported or called, and tensors are rebuilt from checked records."""
    limits = limits or Limits()
    classes = Classes()
    try:
        if zip_format:
            return Loaded(_load_zip(path, shown, mmap, limits, classes), classes)
        return Loaded(_load_legacy(path, shown, limits, classes), classes)
    except LipauditError as e:
        raise _err(e, shown) from None
    except MemoryError:
        raise ResourceLimitError(f"{shown}: not enough memory to load the checkpoint", shown) from None
    except RecursionError:
        raise ResourceLimitError(f"{shown}: containers nested too deeply", shown) from None
    except Exception as e:  # a broken pickle raises many types; all mean a broken file
        reason = clean_message(e)
        detail = f" ({reason})" if reason else ""
        raise MalformedInputError(f"{shown}: malformed or truncated torch checkpoint{detail}", shown) from None


def _storage_pid(pid: object, legacy: bool) -> tuple[torch.dtype, str, int]:
    n = 6 if legacy else 5
    if not isinstance(pid, tuple) or len(pid) != n or pid[0] != "storage":
        raise MalformedInputError("a persistent reference that is not a storage record")
    stype, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(stype, Marker) or stype.dtype is None:
        raise MalformedInputError("a storage record without a storage type")
    if not isinstance(key, str) or len(key) > 256 or type(numel) is not int or numel < 0:
        raise MalformedInputError("a storage record with a bad key or size")
    if legacy and pid[5] is not None:
        raise MalformedInputError("legacy storage views are not supported")
    return stype.dtype, key, numel


def _itemsize(dtype: torch.dtype) -> int:
    return int(torch.empty(0, dtype=dtype).element_size())


def _read_storage(f: Any, offset: int, nbytes: int) -> torch.UntypedStorage:
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8).untyped_storage()
    buf = bytearray(nbytes)  # zeroed: never uninitialised memory
    f.seek(offset)
    if f.readinto(buf) != nbytes:
        raise MalformedInputError("storage data is truncated")
    return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()


def _swap(storage: torch.UntypedStorage, itemsize: int) -> torch.UntypedStorage:
    """Little-endian bytes of a big-endian storage; itemsize is that of one real number."""
    if itemsize == 1 or not storage.nbytes():
        return storage
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return raw.view(-1, itemsize).flip(1).contiguous().untyped_storage()


def _one_dtype(dtypes: dict[str, torch.dtype], key: str, dtype: torch.dtype) -> None:
    """torch keeps a storage's first dtype for every later reference; reading each with its own
    would audit other values than torch loads. torch.save never names a storage twice differently."""
    if dtypes.setdefault(key, dtype) != dtype:
        raise MalformedInputError(
            f"storage {visible(key, 40)!r} is named with two dtypes ({str(dtypes[key]).removeprefix('torch.')} "
            f"and {str(dtype).removeprefix('torch.')})"
        )


def _load_zip(path: Path, shown: str, mmap: bool, limits: Limits, classes: Classes) -> Any:
    layout = check_zip(path, shown, limits)
    with open(path, "rb") as f:
        f.seek(layout.members[layout.pickle].offset)
        data = f.read(layout.members[layout.pickle].size)
        order = layout.members.get(layout.prefix + "byteorder")
        byteorder = "little"
        if order is not None:
            f.seek(order.offset)
            byteorder = f.read(min(order.size, 16)).decode("ascii", "replace")
    if byteorder not in ("little", "big"):
        raise MalformedInputError(f"{shown}: unknown byte order record", shown)
    whole: Any = None
    if mmap and byteorder == "little":
        whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=layout.size)
    loaded: dict[str, torch.UntypedStorage] = {}
    dtypes: dict[str, torch.dtype] = {}

    def storage(pid: object) -> Storage:
        dtype, key, numel = _storage_pid(pid, legacy=False)
        _one_dtype(dtypes, key, dtype)
        itemsize = _itemsize(dtype)
        name = f"{layout.prefix}data/{key}"
        member = layout.members.get(name)
        if member is None:
            raise MalformedInputError(f"storage record {visible(name, 80)!r} is missing")
        if key not in loaded:
            if member.size != numel * itemsize:
                raise MalformedInputError(
                    f"storage record {visible(name, 80)!r} holds {member.size} bytes, "
                    f"the tensor needs {numel * itemsize}"
                )
            if whole is not None:
                loaded[key] = whole[member.offset : member.offset + member.size]
            else:
                with open(path, "rb") as f:
                    raw = _read_storage(f, member.offset, member.size)
                # complex numbers are swapped per part, as torch does
                part = itemsize // 2 if dtype.is_complex else itemsize
                loaded[key] = _swap(raw, part) if byteorder == "big" else raw
        return Storage(loaded[key], dtype)

    try:
        with io.BytesIO(data) as pkl:
            root = unpickle(pkl, limits, storage, classes)
    except UnsafeInputError:
        raise
    except Exception:
        # Names are refused as the unpickler meets them; when it stops early, a name of code
        # further on still makes the file unsafe rather than broken.
        with io.BytesIO(data) as scan:
            refuse_dangerous(scan)
        raise
    return root


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: Path, shown: str, limits: Limits, classes: Classes) -> Any:
    try:
        return _read_legacy(path, limits, classes)
    except UnsafeInputError:
        raise
    except Exception:
        with open(path, "rb") as raw_file:  # as for zip files: code named anywhere is unsafe
            refuse_dangerous(Bounded(raw_file, path.stat().st_size), pickles=5)
        raise


def _read_legacy(path: Path, limits: Limits, classes: Classes) -> Any:
    size = path.stat().st_size
    with open(path, "rb") as raw_file:
        f = Bounded(raw_file, size)
        magic = unpickle(f, limits)
        if magic != _LEGACY_MAGIC:
            raise MalformedInputError("a pickle, but not a PyTorch checkpoint")
        protocol = unpickle(f, limits)
        if protocol != _LEGACY_PROTOCOL:
            raise MalformedInputError("unsupported legacy checkpoint protocol")
        info = unpickle(f, limits)
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise MalformedInputError("big-endian legacy checkpoints are not supported")
        storages: dict[str, Storage] = {}
        buffers: dict[str, bytearray] = {}
        claimed = 0

        def storage(pid: object) -> Storage:
            nonlocal claimed
            dtype, key, numel = _storage_pid(pid, legacy=True)
            if key not in storages:
                nbytes = numel * _itemsize(dtype)
                claimed += nbytes
                if claimed > size:  # the data must be in the file: never allocate more than it holds
                    raise MalformedInputError("storage records claim more bytes than the file holds")
                buf = buffers[key] = bytearray(nbytes)
                untyped = (torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if nbytes
                           else torch.empty(0, dtype=torch.uint8).untyped_storage())
                storages[key] = Storage(untyped, dtype)
            else:
                _one_dtype({key: storages[key].dtype}, key, dtype)
            return storages[key]

        main = raw_file.tell()
        unpickle(f, limits, storage)  # a first pass learns the storages; their data follows the pickles
        keys = unpickle(f, limits)
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages) or len(keys) != len(storages):
            raise MalformedInputError("the storage list does not match the storages used")
        for key in keys:
            st = storages[key]
            itemsize = _itemsize(st.dtype)
            count = raw_file.read(8)
            if len(count) != 8 or struct.unpack("<q", count)[0] * itemsize != st.nbytes:
                raise MalformedInputError(f"storage {visible(str(key), 40)!r} has the wrong size")
            if st.nbytes and raw_file.readinto(buffers[key]) != st.nbytes:
                raise MalformedInputError("storage data is truncated")
        raw_file.seek(main)
        root = unpickle(f, limits, storage, classes)  # now over filled storages
    return root


def tensor_info(key: str, t: torch.Tensor) -> TensorInfo:
    """Read through torch.Tensor's own descriptors, never the instance's attributes."""
    T: Any = torch.Tensor
    nested = bool(T.is_nested.__get__(t))
    layout = str(T.layout.__get__(t)).removeprefix("torch.")
    return TensorInfo(
        key=key,
        shape=tuple(int(d) for d in T.shape.__get__(t)) if not nested else (),
        dtype=str(T.dtype.__get__(t)).removeprefix("torch."),
        layout=layout,
        is_quantized=bool(T.is_quantized.__get__(t)),
        is_meta=bool(T.is_meta.__get__(t)),
        is_nested=nested,
        storage_bytes=_storage_bytes(t),
    )


def _storage_bytes(t: torch.Tensor) -> int | None:
    try:
        return int(torch.UntypedStorage.nbytes(torch.Tensor.untyped_storage(t)))
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, quantized
        return None
