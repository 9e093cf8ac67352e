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

from lipaudit.checkpoint.model import TensorInfo
from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError
from lipaudit.text import clean_message

_GLOBAL = re.compile(r"GLOBAL ([A-Za-z0-9_.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
# Opcodes that import or call something: refusing one of them is refusing code, not garbage.
_CODE_OPCODES = {ord(c) for c in "ciRob"} | {0x81, 0x92, 0x93}


def check_zip(path: Path, shown: str) -> None:
    """Refuse TorchScript archives and zips that torch and zipfile would read differently."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise MalformedInputError(f"{shown}: broken zip archive ({clean_message(e)})", shown) from None
    if len(set(names)) != len(names):
        raise MalformedInputError(f"{shown}: zip archive has duplicate member names", shown)
    if any("/code/" in n or n.endswith(("/constants.pkl", "/bytecode.pkl")) for n in names):
        raise UnsafeInputError(f"{shown}: a TorchScript archive (it carries code); refused", shown)
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise MalformedInputError(f"{shown}: zip archive without data.pkl: not a torch checkpoint", shown)


def load_torch(path: Path, shown: str, zip_format: bool, mmap: bool) -> Any:
    """torch.load with weights_only=True spelled out; never a fallback."""
    if zip_format:
        check_zip(path, shown)
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
    )
