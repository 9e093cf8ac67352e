"""Read PyTorch zip and legacy checkpoints with the allowlist unpickler only."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import TensorInfo
from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError
from lipaudit.text import clean_message, visible

_GLOBAL = re.compile(r"GLOBAL ([A-Za-z0-9_.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
# Opcodes that import or call something: refusing one of them is refusing code, not garbage.
_CODE_OPCODES = {ord(c) for c in "ciRob"} | {0x81, 0x92, 0x93}


def check_zip(path: Path, shown: str, limits: Limits) -> None:
    """Refuse TorchScript archives, zips that torch and zipfile would read differently, and
    members that would inflate or claim more than the file holds."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise MalformedInputError(f"{shown}: broken zip archive ({clean_message(e)})", shown) from None
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        raise MalformedInputError(f"{shown}: zip archive has duplicate member names", shown)
    if any("/code/" in n or n.endswith(("/constants.pkl", "/bytecode.pkl")) for n in names):
        raise UnsafeInputError(f"{shown}: a TorchScript archive (it carries code); refused", shown)
    if len(members) > limits.tensors + 16:
        raise ResourceLimitError(f"{shown}: {len(members)} zip members, over the limit of {limits.tensors}", shown)
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses; inflating is how a 260 KB file asks for 256 MB
            raise ResourceLimitError(
                f"{shown}: compressed zip member {visible(m.filename, 80)!r} "
                f"({m.compress_size} bytes inflating to {m.file_size}): refused", shown,
            )
        if m.file_size > size or m.header_offset + m.file_size > size:
            raise MalformedInputError(f"{shown}: zip member {visible(m.filename, 80)!r} is larger than the file", shown)
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise MalformedInputError(f"{shown}: zip archive without data.pkl: not a torch checkpoint", shown)
    sizes = {m.filename: m.file_size for m in members}
    prefix = pkl[0][: -len("data.pkl")]
    try:
        with zipfile.ZipFile(path) as z:
            records = _storage_records(z.read(pkl[0]))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
        raise MalformedInputError(f"{shown}: broken zip archive ({clean_message(e)})", shown) from None
    for key, nbytes in records:
        name = f"{prefix}data/{key}"
        if name not in sizes:
            raise MalformedInputError(f"{shown}: storage record {visible(name, 80)!r} is missing", shown)
        if nbytes is not None and sizes[name] != nbytes:
            raise MalformedInputError(
                f"{shown}: storage record {visible(name, 80)!r} holds {sizes[name]} bytes, the tensor needs {nbytes}",
                shown,
            )


# bytes per element of the storage classes torch pickles by name
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1,
}


def _storage_records(data: bytes) -> list[tuple[str, int | None]]:
    """(record key, expected bytes) of each storage named in data.pkl, read without unpickling:
    the opcodes are only listed, and the tuples before BINPERSID rebuilt from strings and ints."""
    import pickletools

    out: list[tuple[str, int | None]] = []
    memo: dict[int, object] = {}
    frames: list[list[object]] = [[]]
    last: object = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8", "BININT", "BININT1",
                        "BININT2", "LONG1", "LONG4", "INT", "LONG"):
                last = arg
                frames[-1].append(arg)
            elif name == "GLOBAL":
                last = str(arg).split(" ")[-1]
                frames[-1].append(last)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(str(arg))] = last
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                last = memo.get(int(str(arg)))
                frames[-1].append(last)
            elif name == "MARK":
                frames.append([])
            elif name == "TUPLE" and len(frames) > 1:
                last = tuple(frames.pop())
                frames[-1].append(last)
            elif name in ("SETITEMS", "APPENDS", "LIST", "DICT", "POP_MARK", "OBJ", "INST", "FROZENSET",
                          "ADDITEMS") and len(frames) > 1:
                frames.pop()
                last = None
            elif name == "BINPERSID":
                pid = last
                if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
                    size = _STORAGE_ITEMSIZE.get(str(pid[1]))
                    numel = pid[4] if isinstance(pid[4], int) else None
                    out.append((str(pid[2]), None if size is None or numel is None else size * numel))
            else:
                last = None
    except (ValueError, EOFError, TypeError):
        return out  # torch will judge the rest
    return out


def load_torch(path: Path, shown: str, zip_format: bool, mmap: bool, limits: Limits | None = None) -> Any:
    """torch.load with weights_only=True spelled out; never a fallback."""
    if zip_format:
        check_zip(path, shown, limits or Limits())
    # This variable flips an *unspecified* weights_only; we pass it explicitly, but torch
    # still raises if both force variables are set, so take it out of the way.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        # Invalid sparse indices fail here instead of crashing the process later.
        invariants = torch.sparse.check_sparse_tensor_invariants()  # type: ignore[no-untyped-call]
        with warnings.catch_warnings(), invariants:
            warnings.simplefilter("ignore")
            if str(path).endswith(".safetensors"):
                # torch.load hands such paths to safetensors by name; a file object keeps
                # the decision with the content.
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _GLOBAL.search(text)
        if m:
            raise UnsafeInputError(
                f"{shown}: refused: the pickle asks for {clean_message(m.group(1))}, "
                "which is not an allowed tensor type",
                shown,
            ) from None
        op = _OPERAND.search(text)
        if op and int(op.group(1)) == 0x95:  # FRAME: pickle protocol 4 or later
            raise MalformedInputError(
                f"{shown}: unsupported: pickle protocol 4+ framing, which torch's weights-only loader cannot "
                "read (re-save with torch.save's default protocol)", shown,
            ) from None
        if (op and int(op.group(1)) in _CODE_OPCODES) or "Can only build" in text or "Can only create" in text:
            raise UnsafeInputError(
                f"{shown}: refused: the pickle builds objects outside the allowlist", shown
            ) from None
        raise MalformedInputError(f"{shown}: malformed torch checkpoint", shown) from None
    except MemoryError:
        raise ResourceLimitError(f"{shown}: not enough memory to load the checkpoint", shown) from None
    except RecursionError:
        raise ResourceLimitError(f"{shown}: containers nested too deeply", shown) from None
    except Exception as e:  # torch raises many types on garbage; all mean a broken file
        reason = clean_message(e)
        detail = f" ({reason})" if reason else ""
        raise MalformedInputError(f"{shown}: malformed or truncated torch checkpoint{detail}", shown) from None


def tensor_info(key: str, t: torch.Tensor) -> TensorInfo:
    layout = str(t.layout).removeprefix("torch.")
    return TensorInfo(
        key=key,
        shape=tuple(int(d) for d in t.shape) if not t.is_nested else (),
        dtype=str(t.dtype).removeprefix("torch."),
        layout=layout,
        is_quantized=bool(t.is_quantized),
        is_meta=bool(t.is_meta),
        is_nested=bool(t.is_nested),
        storage_bytes=_storage_bytes(t),
    )


def _storage_bytes(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, quantized
        return None
