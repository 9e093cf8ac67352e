"""Reductions: sums over n elements (sqrt(n)), means (1/sqrt(n)), and maxima, minima and
logsumexp (1: each output is 1-Lipschitz in the disjoint group of elements it reduces)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lipaudit.graph.model import Node
from lipaudit.graph.ops import meta
from lipaudit.graph.ops.base import (
    Case,
    Context,
    Draw,
    Effect,
    Gains,
    Uncovered,
    Var,
    first,
    ints,
    lg,
    small_shape,
)
from lipaudit.graph.ops.elementwise import maximum
from lipaudit.graph.ops.registry import register


def _reduce_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = small_shape(d)
    dims = sorted({d.int(0, len(s) - 1) for _ in range(d.int(1, len(s)))})
    if base in ("max", "min"):
        k = d.int(0, 2)
        if k == 0:
            return Case({"self": Var(s)}, focus=(0.0,))
        if k == 1:
            return Case({"self": Var(s), "dim": dims[0], "keepdim": d.bool()}, overload="dim", focus=(0.0,))
        return Case({"self": Var(s), "other": Var(s)}, overload="other", focus=(0.0,))
    if base == "logsumexp":
        return Case({"self": Var(s), "dim": dims, "keepdim": d.bool()})
    if base in ("amax", "amin"):
        return Case({"self": Var(s), "dim": dims, "keepdim": d.bool()}, focus=(0.0,))
    if d.int(0, 3) == 0:
        return Case({"self": Var(s)})
    return Case({"self": Var(s), "dim": dims, "keepdim": d.bool()}, overload="dim_IntList" if base == "sum"
                else "dim")


def _count(ctx: Context, node: Node, x: str) -> int:
    a = node.arg("dim", 1)
    nd = len(ctx.dims(x))
    if a is None or a.kind == "none" or (a.kind == "ints" and not a.value):
        return math.prod(ctx.fixed(x, list(range(nd))))
    ds = ints(a, [])
    if not nd:
        return 1
    return math.prod(ctx.fixed(x, sorted({d % nd for d in ds})))


def _reduce_shape(op: str, a: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A reduction's output: the reduced axes dropped (kept as 1 with keepdim); max and min over one
    axis also give indices, and of two tensors are elementwise."""
    x = a["self"]
    if isinstance(a.get("other"), torch.Tensor):
        return meta.elementwise(op, a)
    raw = a.get("dim")
    if raw is None or (isinstance(raw, list) and not raw):
        if op == "logsumexp" and raw is not None:
            raise ValueError("logsumexp over no axes")
        dims = set(range(x.dim()))
    else:
        listed = [int(raw)] if isinstance(raw, int) else [int(v) for v in raw]
        rank = max(x.dim(), 1)
        if any(not -rank <= v < rank for v in listed):
            raise ValueError("a reduced axis out of range")
        dims = {v % rank for v in listed} if x.dim() else set()
    keep = bool(a.get("keepdim", False))
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keep or i not in dims]
    out = meta.empty(shape, x)
    if op in ("max", "min") and isinstance(raw, int):
        return out, meta.empty(shape, x)
    return out


@register("sum", sample=_reduce_case, extra={"meta": _reduce_shape})
def total(ctx: Context, node: Node) -> Effect:
    x = first(node)
    return Gains(((x, 0.5 * lg(max(_count(ctx, node, x), 1))),))


@register("mean", sample=_reduce_case, extra={"meta": _reduce_shape})
def mean(ctx: Context, node: Node) -> Effect:
    x = first(node)
    return Gains(((x, -0.5 * lg(max(_count(ctx, node, x), 1))),))


@register("amax", "amin", "logsumexp", "max", "min", sample=_reduce_case, extra={"meta": _reduce_shape})
def extreme(ctx: Context, node: Node) -> Effect:
    if node.op in ("max", "min") and len(node.tensor_inputs()) > 1:
        return maximum(ctx, node)
    x = first(node)
    if node.op == "logsumexp" and not ctx.dims(x):
        raise Uncovered("logsumexp of a scalar")
    return Gains(((x, 0.0),), first_only=True)
