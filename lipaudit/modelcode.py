"""--model MODULE:CALLABLE: the user's own architecture, exported, so the bound follows its graph.

This is the one place lipaudit runs code that is not its own, and only code the user named on the
command line or in their config (docs/security.md): the module is imported from the user's
environment (the current folder first, as `uvicorn app:main` does), the callable is called with no
arguments, the checkpoint's tensors are loaded into the module strictly, and torch.export traces
it at the given input shape. Nothing read from a checkpoint can name code. The export is written
to a temporary .pt2 and bounded exactly like an exported archive, on the checkpoint's own weights.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipaudit.errors import UsageError
from lipaudit.text import visible

if TYPE_CHECKING:
    import torch

    from lipaudit.checkpoint import Checkpoint

# Keys named one by one in a mismatch error; the rest are counted.
_NAMED = 8


@dataclass(frozen=True)
class ModelSpec:
    target: str  # MODULE:CALLABLE as given
    input_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.target, "input_shape": list(self.input_shape)}


def parse_shape(text: str) -> tuple[int, ...]:
    """1x3x64x64 -> (1, 3, 64, 64)."""
    try:
        dims = tuple(int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-shape {visible(str(text))}: expected sizes like 1x3x64x64") from None
    if not dims or len(dims) > 6 or min(dims) < 1 or max(dims) > 65536:
        raise UsageError(f"--input-shape {visible(str(text))}: 1 to 6 sizes between 1 and 65536")
    return dims


def _fail(what: str, e: BaseException, debug: bool) -> UsageError:
    if debug:
        raise e
    detail = visible(str(e).strip().splitlines()[0] if str(e).strip() else "", 300)
    return UsageError(f"--model: {what} ({type(e).__name__}{': ' + detail if detail else ''})")


def build(target: str, debug: bool = False) -> torch.nn.Module:
    """Import MODULE, call CALLABLE() and check it returns a torch module."""
    import torch

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {visible(target)}: expected MODULE:CALLABLE (like mypkg.nets:make_model)")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as e:  # user code: SystemExit and KeyboardInterrupt included, never a traceback
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _fail(f"cannot import {visible(module_name)}", e, debug) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model {visible(target)}: {visible(module_name)} has no {visible(attr)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {visible(target)}: {visible(attr)} is not callable")
    try:
        model = obj()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _fail(f"{visible(target)}() failed", e, debug) from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {visible(target)}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_strictly(model: torch.nn.Module, ckpt: Checkpoint, target: str, debug: bool = False) -> None:
    """The checkpoint's selected tensors into the module; any missing or unexpected key is an error."""
    from lipaudit.kinds import strip_prefixes

    state = {}
    for info in ckpt.infos:
        state[strip_prefixes(info.key)] = ckpt.load(info.key)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else ""
                parts.append(f"{label} keys: " + ", ".join(visible(k, 80) for k in keys[:_NAMED]) + more)
        raise UsageError(f"{ckpt.path}: does not match --model {visible(target)} ({'; '.join(parts)})", ckpt.path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:  # shapes that do not fit the module
        raise _fail(f"{ckpt.path} does not load into {visible(target)}", e, debug) from None
    model.eval()


@contextmanager
def exported(spec: ModelSpec, ckpt: Checkpoint, debug: bool = False) -> Iterator[Path]:
    """The user's module with the checkpoint's weights, exported to a temporary .pt2."""
    import torch

    model = build(spec.target, debug)
    load_strictly(model, ckpt, spec.target, debug)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    example = torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,))
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _fail(f"torch.export of {visible(spec.target)} at {'x'.join(map(str, spec.input_shape))} failed",
                    e, debug) from None
    with tempfile.TemporaryDirectory(prefix="lipaudit-model-") as folder:
        path = Path(folder) / "model.pt2"
        torch.export.save(program, str(path))
        yield path
