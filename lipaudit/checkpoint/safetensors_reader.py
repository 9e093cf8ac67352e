"""Read safetensors files and sharded folders; the header is checked before the library sees it."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import TensorInfo
from lipaudit.checkpoint.sniff import regular_file_size
from lipaudit.errors import MalformedInputError, ResourceLimitError
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


def read_header(path: Path, shown: str, limits: Limits | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parsed header (name -> entry) and metadata, validated against the file size."""
    limits = limits or Limits()
    size = regular_file_size(path, shown)
    if size < 8:
        raise MalformedInputError(f"{shown}: too short for a safetensors file", shown)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise MalformedInputError(f"{shown}: safetensors header length exceeds the file", shown)
        if n > limits.header_bytes:
            raise ResourceLimitError(f"{shown}: safetensors header over {limits.header_bytes} bytes", shown)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedInputError(f"{shown}: bad safetensors header ({clean_message(e)})", shown) from None
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
            and entry.get("dtype") in _DTYPES
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        )
        if not ok:
            raise MalformedInputError(f"{shown}: bad safetensors entry {visible(name, 80)!r}", shown)
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_size:
            raise MalformedInputError(f"{shown}: tensor {visible(name, 80)!r} lies outside the file", shown)
        numel = 1
        for d in entry["shape"]:
            numel *= d
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
    with open(path, "rb") as f:
        base = 8 + struct.unpack("<Q", f.read(8))[0]
    return {
        k: Location(path, base + e["data_offsets"][0], base + e["data_offsets"][1], _DTYPES[e["dtype"]],
                    tuple(e["shape"]))
        for k, e in header.items()
    }


class SafetensorsFiles:
    """Tensors spread over one or more safetensors files, read one at a time with plain reads:
    no mapping, so memory follows the tensor being audited, not the file."""

    def __init__(self, where: dict[str, Location], shown: str) -> None:
        self.where = where
        self.shown = shown

    def path_of(self, key: str) -> Path:
        return self.where[key].path

    def load(self, key: str) -> torch.Tensor:
        loc = self.where[key]
        dtype = getattr(torch, loc.dtype)
        try:
            data = bytearray(loc.stop - loc.start)
            with open(loc.path, "rb") as f:
                f.seek(loc.start)
                got = f.readinto(data)
        except OSError as e:
            raise MalformedInputError(
                f"{self.shown}: cannot read tensor {visible(key, 80)!r} ({e.strerror})", self.shown
            ) from None
        if got != len(data):
            raise MalformedInputError(f"{self.shown}: tensor {visible(key, 80)!r} is truncated", self.shown)
        if not data:
            return torch.empty(loc.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(loc.shape)


def read_index(index: Path, shown: str, limits: Limits | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """Map each tensor to its shard; shards must be plain files beside the index."""
    limits = limits or Limits()
    size = regular_file_size(index, shown)
    if size > limits.header_bytes:
        raise ResourceLimitError(f"{shown}: index file over {limits.header_bytes} bytes", shown)
    try:
        data = json.loads(
            index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedInputError(f"{shown}: bad index JSON ({clean_message(e)})", shown) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise MalformedInputError(f"{shown}: index has no weight_map of names to files", shown)
    folder = index.parent
    shards: dict[str, Path] = {}
    for fname in dict.fromkeys(wm.values()):
        if (
            not fname
            or "/" in fname
            or "\\" in fname
            or fname in (".", "..")
            or ":" in fname
            or not fname.endswith(".safetensors")
        ):
            raise MalformedInputError(
                f"{shown}: shard {visible(fname, 80)!r} is not a safetensors file beside the index", shown
            )
        shard = folder / fname
        if shard.is_symlink() or not shard.is_file():
            what = "missing" if not shard.exists() else "not a regular file"
            what = "a symbolic link" if shard.is_symlink() else what
            raise MalformedInputError(f"{shown}: shard {visible(fname, 80)!r} is {what}", shown)
        shards[fname] = shard
    if len(wm) > limits.tensors:
        raise ResourceLimitError(f"{shown}: more than {limits.tensors} tensors", shown)
    return {k: shards[v] for k, v in wm.items()}, data


def find_index(folder: Path, shown: str) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(visible(p.name, 80) for p in indexes)
        raise MalformedInputError(f"{shown}: several index files ({names}); name one", shown)
    return indexes[0] if indexes else None
