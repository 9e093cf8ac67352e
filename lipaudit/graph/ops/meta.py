"""Output shapes without torch's meta kernels: on the meta device most aten ops run Python
decompositions whose first call imports the compiler stack and sympy (about 1 s a process).
graph/interpret.py calls a rule's stand-in (registered as extra={"meta": fn}) as
fn(op, arguments by schema name) whenever it runs a node on shapes alone."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch


def empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A meta tensor of this shape (empty_like and new_empty on meta import sympy)."""
    return torch.empty([int(n) for n in shape], dtype=like.dtype, device="meta")


def broadcast(*shapes: Sequence[int]) -> list[int]:
    """torch's broadcast of sizes (torch.broadcast_shapes imports sympy)."""
    out: list[int] = []
    for dims in itertools.zip_longest(*(list(s)[::-1] for s in shapes), fillvalue=1):
        sizes = {int(n) for n in dims} - {1}
        if len(sizes) > 1:
            raise ValueError("sizes that do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return out[::-1]


def tensors(a: dict[str, Any]) -> list[torch.Tensor]:
    return [v for v in a.values() if isinstance(v, torch.Tensor)]


def same_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    """An elementwise op of one tensor and numbers."""
    x = a.get("self", a.get("input"))
    if not isinstance(x, torch.Tensor) or len(tensors(a)) != 1:
        raise ValueError(f"{op} of other than one tensor")
    return empty(x.shape, x)


def elementwise(op: str, a: dict[str, Any]) -> torch.Tensor:
    """An elementwise op of several tensors: their broadcast shape (an in-place op keeps its own)."""
    ts = tensors(a)
    if not ts:
        raise ValueError(f"{op} without a tensor operand")
    shape = broadcast(*(t.shape for t in ts))
    if op.endswith("_") and shape != list(ts[0].shape):
        raise ValueError(f"in-place {op} would change its operand's shape")
    return empty(shape, ts[0])
