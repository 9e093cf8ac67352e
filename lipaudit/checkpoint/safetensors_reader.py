"""Read safetensors files and sharded folders; the header is checked before the library sees it."""

from __future__ import annotations

import json
import os
import stat
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import TensorInfo
from lipaudit.checkpoint.unpickler import checked_shape
from lipaudit.errors import LipauditError, MalformedInputError, ResourceLimitError, UsageError
from lipaudit.text import clean_message, visible

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4,
          "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate name {visible(k, 80)!r}")
        out[k] = v
    return out


def open_regular(path: Path, shown: str) -> int:
    """A descriptor on the regular file at path (links followed); FIFOs, devices and folders are
    refused without blocking on them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MalformedInputError(f"{shown}: missing (or a link to nothing)", shown) from None
    except OSError as e:
        raise MalformedInputError(f"{shown}: cannot read ({e.strerror})", shown) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MalformedInputError(f"{shown}: not a regular file", shown)
    return fd


def _pread(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, min(n - len(out), 1 << 26), offset + len(out))
        if not got:
            break
        out += got
    return bytes(out)


def parse_json(raw: bytes, what: str, shown: str) -> Any:
    """Strict JSON: no NaN constants, no duplicate names, nesting refused instead of recursing."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedInputError(f"{shown}: bad {what} ({clean_message(e)})", shown) from None
    except RecursionError:
        raise MalformedInputError(f"{shown}: bad {what} (nested too deeply)", shown) from None


def read_header(path: Path, shown: str, limits: Limits | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parsed header (name -> entry) and metadata, validated against the file size."""
    fd = open_regular(path, shown)
    try:
        return header_of(fd, shown, limits or Limits())
    finally:
        os.close(fd)


def header_of(fd: int, shown: str, limits: Limits) -> tuple[dict[str, Any], dict[str, str]]:
    size = os.fstat(fd).st_size
    if size < 8:
        raise MalformedInputError(f"{shown}: too short for a safetensors file", shown)
    (n,) = struct.unpack("<Q", _pread(fd, 8, 0))
    if n > size - 8:
        raise MalformedInputError(f"{shown}: safetensors header length exceeds the file", shown)
    if n > limits.header_bytes:
        raise ResourceLimitError(f"{shown}: safetensors header over {limits.header_bytes} bytes", shown)
    raw = _pread(fd, n, 8)
    if len(raw) != n:
        raise MalformedInputError(f"{shown}: safetensors header is truncated", shown)
    header = parse_json(raw, "safetensors header", shown)
    if not isinstance(header, dict):
        raise MalformedInputError(f"{shown}: safetensors header is not an object", shown)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedInputError(f"{shown}: safetensors metadata must map strings to strings", shown)
    if len(header) > limits.tensors:
        raise ResourceLimitError(f"{shown}: more than {limits.tensors} tensors", shown)
    data_size = size - 8 - n
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str) and entry["dtype"] in _DTYPES
            and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])
        )
        if not ok:
            raise MalformedInputError(f"{shown}: bad safetensors entry {visible(name, 80)!r}", shown)
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_size:
            raise MalformedInputError(f"{shown}: tensor {visible(name, 80)!r} lies outside the file", shown)
        try:
            # Even an empty tensor may not declare a dimension torch cannot hold (2^64 and up).
            numel = checked_shape(tuple(entry["shape"]))
        except LipauditError:
            raise MalformedInputError(
                f"{shown}: tensor {visible(name, 80)!r} has a shape out of range", shown
            ) from None
        if numel * _SIZES.get(entry["dtype"], 1) != end - start:
            raise MalformedInputError(
                f"{shown}: tensor {visible(name, 80)!r} has {end - start} bytes for its shape", shown
            )
    # The data must be covered exactly once, in some order: no gaps, overlaps or trailing bytes.
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    end = 0
    for start, stop in spans:
        if start != end:
            raise MalformedInputError(f"{shown}: tensor data has {'an overlap' if start < end else 'a gap'}", shown)
        end = stop
    if end != data_size:
        raise MalformedInputError(f"{shown}: {data_size - end} bytes after the last tensor", shown)
    return header, meta


def infos_from_header(header: dict[str, Any]) -> list[TensorInfo]:
    return [
        TensorInfo(key=k, shape=tuple(e["shape"]), dtype=_DTYPES[e["dtype"]])
        for k, e in header.items()
    ]


@dataclass(frozen=True)
class Location:
    path: Path
    start: int  # absolute offset in the file
    stop: int
    dtype: str
    shape: tuple[int, ...]


def locations(path: Path, header: dict[str, Any]) -> dict[str, Location]:
    fd = open_regular(path, visible(str(path)))
    try:
        base = 8 + struct.unpack("<Q", _pread(fd, 8, 0))[0]
    finally:
        os.close(fd)
    return {
        k: Location(path, base + e["data_offsets"][0], base + e["data_offsets"][1], _DTYPES[e["dtype"]],
                    tuple(e["shape"]))
        for k, e in header.items()
    }


def read_into(fd: int, buf: bytearray, offset: int) -> int:
    """Fill buf from the file at offset; returns how many bytes were there."""
    done = 0
    with memoryview(buf) as view:
        while done < len(buf):
            got = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
            if got <= 0:
                break
            done += got
    return done


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


class SafetensorsFiles:
    """Tensors spread over one or more safetensors files, read one at a time with plain reads:
    no mapping, so memory follows the tensor being audited, not the file. Each file is opened
    once, up front: a file replaced or removed during the run is still read as it was."""

    def __init__(self, where: dict[str, Location], shown: str) -> None:
        self.where = where
        self.shown = shown
        self.fds: dict[Path, int] = {}
        self._closer = weakref.finalize(self, _close_all, self.fds)
        for loc in where.values():
            if loc.path not in self.fds:
                self.fds[loc.path] = open_regular(loc.path, shown)

    def close(self) -> None:
        self._closer()

    def path_of(self, key: str) -> Path:
        return self.where[key].path

    def load(self, key: str) -> torch.Tensor:
        loc = self.where[key]
        dtype = getattr(torch, loc.dtype)
        n = loc.stop - loc.start
        data = bytearray(n)
        try:
            got = read_into(self.fds[loc.path], data, loc.start)
        except OSError as e:
            raise MalformedInputError(
                f"{self.shown}: cannot read tensor {visible(key, 80)!r} ({e.strerror})", self.shown
            ) from None
        if got != n:
            raise MalformedInputError(f"{self.shown}: tensor {visible(key, 80)!r} is truncated", self.shown)
        if not data:
            return torch.empty(loc.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(loc.shape)


def read_index(index: Path, shown: str, limits: Limits | None = None,
               suffixes: tuple[str, ...] = (".safetensors",)) -> tuple[dict[str, Path], dict[str, Any]]:
    """Map each tensor to its shard. Shard names must be plain file names beside the index; a
    shard may be a link (a Hugging Face cache snapshot links into ../../blobs/) if it ends at a
    regular file."""
    limits = limits or Limits()
    fd = open_regular(index, shown)
    try:
        size = os.fstat(fd).st_size
        if size > limits.header_bytes:
            raise ResourceLimitError(f"{shown}: index file over {limits.header_bytes} bytes", shown)
        raw = _pread(fd, size, 0)
    finally:
        os.close(fd)
    data = parse_json(raw, "index JSON", shown)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise MalformedInputError(f"{shown}: index has no weight_map of names to files", shown)
    if len(wm) > limits.tensors:
        raise ResourceLimitError(f"{shown}: more than {limits.tensors} tensors", shown)
    folder = index.parent
    shards: dict[str, Path] = {}
    kind = " or ".join(suffixes)
    for fname in dict.fromkeys(wm.values()):
        if (
            not fname
            or "/" in fname
            or "\\" in fname
            or fname in (".", "..")
            or ":" in fname
            or "\x00" in fname
            or not fname.endswith(suffixes)
        ):
            raise MalformedInputError(
                f"{shown}: shard {visible(fname, 80)!r} is not a plain {kind} file name beside the index", shown
            )
        shard = folder / fname
        try:
            st = os.stat(shard)  # follows links: what counts is where they end
        except FileNotFoundError:
            what = "a link to nothing" if shard.is_symlink() else "missing"
            raise MalformedInputError(f"{shown}: shard {visible(fname, 80)!r} is {what}", shown) from None
        except OSError as e:
            raise MalformedInputError(f"{shown}: shard {visible(fname, 80)!r}: {e.strerror}", shown) from None
        if not stat.S_ISREG(st.st_mode):
            raise MalformedInputError(f"{shown}: shard {visible(fname, 80)!r} is not a regular file", shown)
        shards[fname] = shard
    return {k: shards[v] for k, v in wm.items()}, data


def find_index(folder: Path, shown: str, pattern: str = "*.safetensors.index.json") -> Path | None:
    indexes = sorted(folder.glob(pattern))
    if len(indexes) > 1:
        names = ", ".join(visible(p.name, 80) for p in indexes)
        raise UsageError(f"{shown}: several index files ({names}); name one", shown)
    return indexes[0] if indexes else None
