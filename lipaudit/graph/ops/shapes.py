"""Views, copies, concatenation, indexing, casts and dropout: maps that move, drop or copy
elements (a factor of sqrt(most copies of one element)), or round them (casts to a narrower float)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lipaudit.graph.model import Node
from lipaudit.graph.ops import meta
from lipaudit.graph.ops.base import (
    Case,
    Const,
    Context,
    Draw,
    Effect,
    Gains,
    Uncovered,
    Var,
    first,
    flag,
    integer,
    lg,
    small_shape,
    unary,
)
from lipaudit.graph.ops.registry import register


def _x(d: Draw, lo: int = 1) -> tuple[int, ...]:
    return small_shape(d, (lo, 3))


def _dim(d: Draw, shape: tuple[int, ...]) -> int:
    return d.int(-len(shape), len(shape) - 1)


def _perm(d: Draw, n: int) -> list[int]:
    keys = [d.float(0.0, 1.0) for _ in range(n)]
    return sorted(range(n), key=lambda i: keys[i])


def _view_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0].rstrip("_")
    s = _x(d)
    x = Var(s)
    n = math.prod(s)
    cases: dict[str, Callable[[], Case]] = {
        "view": lambda: Case({"self": x, "size": [n]}),
        "_unsafe_view": lambda: Case({"self": x, "size": [-1]}),
        "reshape": lambda: Case({"self": x, "shape": [1, n]}),
        "flatten": lambda: Case({"self": x, "start_dim": 0, "end_dim": -1}, overload="using_ints"),
        "unflatten": lambda: Case({"self": x, "dim": 0, "sizes": [1, s[0]]}, overload="int"),
        "squeeze": lambda: Case({"self": Var((*s, 1)), "dim": -1}, overload="dim"),
        "unsqueeze": lambda: Case({"self": x, "dim": _dim(d, s)}),
        "permute": lambda: Case({"self": x, "dims": _perm(d, len(s))}),
        "transpose": lambda: Case({"self": x, "dim0": _dim(d, s), "dim1": _dim(d, s)}, overload="int"),
        "t": lambda: Case({"self": Var(s[:2])}),
        "view_as": lambda: Case({"self": x, "other": Const(torch.zeros(n))}),
        "reshape_as": lambda: Case({"self": x, "other": Const(torch.zeros(1, n))}),
        "flip": lambda: Case({"self": x, "dims": [_dim(d, s)]}),
        "roll": lambda: Case({"self": x, "shifts": [d.int(-3, 3)], "dims": [_dim(d, s)]}),
        "movedim": lambda: Case({"self": x, "source": _dim(d, s), "destination": _dim(d, s)}, overload="int"),
        "swapaxes": lambda: Case({"self": x, "axis0": _dim(d, s), "axis1": _dim(d, s)}),
        "numpy_T": lambda: Case({"self": x}),
        "mT": lambda: Case({"self": Var((*s, 2))}),
        "pixel_shuffle": lambda: Case({"self": Var((1, 4 * s[0], 2, 3)), "upscale_factor": 2}),
        "pixel_unshuffle": lambda: Case({"self": Var((1, s[0], 4, 2)), "downscale_factor": 2}),
        "channel_shuffle": lambda: Case({"self": Var((1, 2 * s[0], 2)), "groups": 2}),
        "slice": lambda: Case({"self": x, "dim": 0, "start": d.int(0, s[0] - 1), "end": s[0], "step": d.int(1, 2)},
                              overload="Tensor"),
        "select": lambda: Case({"self": x, "dim": 0, "index": d.int(0, s[0] - 1)}, overload="int"),
        "narrow": lambda: Case({"self": x, "dim": 0, "start": 0, "length": d.int(1, s[0])}),
        "split": lambda: Case({"self": x, "split_size": d.int(1, 2), "dim": 0}, overload="Tensor"),
        "split_with_sizes": lambda: Case({"self": Var((3, *s)), "split_sizes": [1, 2], "dim": 0}),
        "chunk": lambda: Case({"self": x, "chunks": d.int(1, 3), "dim": 0}),
        "unbind": lambda: Case({"self": x, "dim": 0}, overload="int"),
        "tensor_split": lambda: Case({"self": x, "sections": d.int(1, 3), "dim": 0}, overload="sections"),
        "diagonal": lambda: Case({"self": Var((3, 3, *s[:1])), "offset": d.int(-1, 1), "dim1": 0, "dim2": 1}),
    }
    if base in cases:
        return cases[base]()
    return Case({"self": x})  # contiguous, clone, alias, detach, lift_fresh_copy


_VIEWS = ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose",
          "t", "view_as", "reshape_as", "movedim", "swapaxes", "numpy_T", "mT", "slice", "select", "narrow", "split",
          "split_with_sizes", "chunk", "unbind", "tensor_split", "diagonal", "alias", "contiguous")
_MOVES = ("clone", "lift_fresh_copy", "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle")


@register(*_VIEWS, sample=_view_case, alias=True)
def view(ctx: Context, node: Node) -> Effect:
    """Reindexing, restriction or a split: no element is copied twice."""
    return Gains(((first(node), 0.0),))


# detach is the identity on values; the measured lower end differentiates the network's function, so
# the interpreter runs it as a view that keeps the gradient (a straight-through `h - h.detach()` is 0)
@register("detach", sample=_view_case, alias=True, extra={"identity": True})
def detach(ctx: Context, node: Node) -> Effect:
    return Gains(((first(node), 0.0),))


@register(*_MOVES, sample=_view_case)
def move(ctx: Context, node: Node) -> Effect:
    """A permutation of the elements (new memory)."""
    return Gains(((first(node), 0.0),))


def _copies_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = _x(d)
    if base in ("expand", "broadcast_to"):
        return Case({"self": Var((1, *s)), "size": [d.int(1, 3), *s]})
    if base == "expand_as":
        return Case({"self": Var((1, *s)), "other": Const(torch.zeros(d.int(1, 3), *s))})
    if base == "repeat":
        return Case({"self": Var(s), "repeats": [d.int(1, 3) for _ in s]})
    if base == "tile":
        return Case({"self": Var(s), "dims": [d.int(1, 3) for _ in range(d.int(1, len(s)))]})
    dim = d.int(0, len(s) - 1)
    if d.bool():
        return Case({"self": Var(s), "repeats": d.int(1, 3), "dim": dim}, overload="self_int")
    reps = torch.tensor([d.int(0, 3) for _ in range(s[dim])])
    return Case({"self": Var(s), "repeats": Const(reps), "dim": dim}, overload="self_Tensor")


@register("expand", "expand_as", "broadcast_to", "repeat", "tile", "repeat_interleave", sample=_copies_case)
def copies(ctx: Context, node: Node) -> Effect:
    """Each element copied k times: sqrt(k). Uniform copies are read from the sizes; repeat_interleave
    with a tensor of counts copies unevenly, so its largest count is used."""
    x = first(node)
    if node.op == "repeat_interleave":
        reps = node.arg("repeats", 1)
        if reps is not None and reps.kind == "tensor":
            if not ctx.is_const(reps.value):
                raise Uncovered("repeat counts that depend on the input")
            v = ctx.value(reps.value)
            return Gains(((x, 0.5 * lg(float(v.max())) if v.numel() else -math.inf),))
    return unary(ctx, node, 1.0, x)


def _cat_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = list(_x(d, 2 if base in ("hstack", "vstack") else 1))
    parts: list[object] = []
    for _ in range(d.int(1, 3)):
        t = list(s)
        if base not in ("stack",):
            t[0] = d.int(1, 3)
        parts.append(Var(tuple(t)) if d.int(0, 3) else Const(d.tensor(tuple(t))))
    if base in ("hstack", "vstack"):
        return Case({"tensors": [Var(tuple(s)) for _ in range(d.int(1, 3))]})
    return Case({"tensors": parts, "dim": 0})


def _cat_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    """cat, stack and their spellings: torch's size rules (cat skips legacy empty 1-D tensors)."""
    ts = [t for t in a["tensors"] if isinstance(t, torch.Tensor)]
    if not ts or len(ts) != len(a["tensors"]):
        raise ValueError(f"{op} of no tensors, or of a missing one")
    if op in ("hstack", "vstack"):
        ts = [t.reshape(1, -1) if op == "vstack" and t.dim() < 2 else t for t in ts]
        dim = 0 if op == "vstack" or ts[0].dim() == 1 else 1
        op = "cat"
    else:
        dim = int(a.get("dim", 0))
    if op == "stack":
        rank = ts[0].dim() + 1
        if any(t.shape != ts[0].shape for t in ts):
            raise ValueError("stack of tensors of different shapes")
        dim = dim + rank if dim < 0 else dim
        if not 0 <= dim < rank:
            raise ValueError("a stack dimension out of range")
        shape = list(ts[0].shape)
        return meta.empty([*shape[:dim], len(ts), *shape[dim:]], ts[0])
    kept = [t for t in ts if not (t.dim() == 1 and t.shape[0] == 0)] or ts[:1]
    rank = kept[0].dim()
    dim = dim + rank if dim < 0 else dim
    if rank == 0 or not 0 <= dim < rank:
        raise ValueError("a cat dimension out of range")
    first = list(kept[0].shape)
    for t in kept[1:]:
        if t.dim() != rank or any(n != m for i, (n, m) in enumerate(zip(t.shape, first, strict=True)) if i != dim):
            raise ValueError("cat of tensors whose other sizes differ")
    first[dim] = sum(int(t.shape[dim]) for t in kept)
    return meta.empty(first, kept[0])


@register("cat", "concat", "concatenate", "stack", "hstack", "vstack", sample=_cat_case, extra={"meta": _cat_shape})
def cat(ctx: Context, node: Node) -> Effect:
    """Disjoint blocks of the output: squares add."""
    ts = node.arg("tensors", 0)
    if ts is None or ts.kind != "tensors":
        raise Uncovered("cat without tensors")
    return Gains(tuple((t, 0.0) for t in ts.value if t is not None and not ctx.is_const(t)), quadrature=True)


def _index_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = _x(d)
    dim = d.int(0, len(s) - 1)
    if base == "index_select":
        return Case({"self": Var(s), "dim": dim, "index": Const(torch.tensor([d.int(0, s[dim] - 1)
                                                                              for _ in range(d.int(1, 5))]))})
    if base == "gather":
        shape = tuple(d.int(1, n) for n in s)
        idx = torch.stack([torch.tensor(d.int(0, s[dim] - 1)) for _ in range(math.prod(shape))]).reshape(shape)
        return Case({"self": Var(s), "dim": dim, "index": Const(idx)})
    k = d.int(1, 4)
    picks: list[Const] = [Const(torch.tensor([d.int(-s[0], s[0] - 1) for _ in range(k)]))]
    if len(s) > 1 and d.bool():
        picks.append(Const(torch.tensor([d.int(0, s[1] - 1) for _ in range(k)])))
    return Case({"self": Var(s), "indices": picks}, overload="Tensor")


def _counts_bound(counts: torch.Tensor) -> float:
    return 0.5 * lg(float(counts.max())) if counts.numel() else -math.inf


@register("index_select", "index", "gather", sample=_index_case)
def index(ctx: Context, node: Node) -> Effect:
    """Picks elements by constant indices: sqrt(most picks of one element)."""
    x = first(node)
    nd = len(ctx.dims(x))
    if node.op == "index_select" or node.op == "gather":
        idx = node.arg("index", 2)
        if idx is None or idx.kind != "tensor" or not ctx.is_const(idx.value):
            raise Uncovered("indexing with input-dependent indices")
        dim = integer(node.arg("dim", 1), 0) % max(nd, 1)
        v = ctx.value(idx.value).long()
        n = ctx.fixed(x, [dim])[0] if nd else 1
        if node.op == "index_select":
            return Gains(((x, _counts_bound(torch.bincount(v.reshape(-1).remainder(max(n, 1)), minlength=1))),))
        # gather: out[..i..] = x[..index[..i..]..] along dim, the other axes as they are
        sizes = ctx.fixed(x, list(range(nd)))
        flat = torch.zeros(math.prod(sizes), dtype=torch.long)
        grids = torch.meshgrid(*[torch.arange(k) for k in v.shape], indexing="ij")
        pos = [g for g in grids]
        pos[dim] = v.remainder(max(n, 1))
        lin = torch.zeros_like(v)
        for a, g in enumerate(pos):
            lin = lin * sizes[a] + g
        flat.index_add_(0, lin.reshape(-1), torch.ones(lin.numel(), dtype=torch.long))
        return Gains(((x, _counts_bound(flat)),))
    idx = node.arg("indices", 1)
    if idx is None or idx.kind not in ("tensors", "opt_tensors"):
        raise Uncovered("indexing without fixed indices")
    parts, dims = [], []
    for d, t in enumerate(idx.value):
        if t is None:
            continue
        size = ctx.fixed(x, [d])[0] if d < nd else 1
        if not ctx.is_const(t):
            raise Uncovered("indexing with input-dependent indices")
        v = ctx.value(t)
        if v.dtype == torch.bool:
            raise Uncovered("boolean mask indexing")
        parts.append(v.long().remainder(max(size, 1)))
        dims.append(max(size, 1))
    if not parts:
        return Gains(((x, 0.0),))
    b = torch.broadcast_tensors(*parts)  # type: ignore[no-untyped-call]
    flat_i = torch.zeros_like(b[0])
    for size, t in zip(dims, b, strict=True):
        flat_i = flat_i * size + t
    _, counts = torch.unique(flat_i.reshape(-1), return_counts=True)
    return Gains(((x, _counts_bound(counts)),))


# -- casts ---------------------------------------------------------------------------------------

# (exponent bits, mantissa bits) of the float dtype codes of the export schema
_FLOAT_BITS = {6: (5, 10), 7: (8, 23), 8: (11, 52), 13: (8, 7)}


def exact_cast(src: int, dst: int) -> str | None:
    """None when every value of dtype src is exactly a value of dtype dst; else why not."""
    if dst not in _FLOAT_BITS:
        return "conversion of input-dependent values to a non-float type"
    if src not in _FLOAT_BITS:
        return "conversion of non-float values"
    (es, ms), (ed, md) = _FLOAT_BITS[src], _FLOAT_BITS[dst]
    if ed >= es and md >= ms:
        return None
    return "a cast to a narrower float type rounds (a step function)"


_CODES = {torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 13}


def _cast_case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    src = d.choice([torch.float16, torch.float32, torch.float64, torch.bfloat16])
    dst = d.choice([torch.float16, torch.float32, torch.float64, torch.bfloat16])
    x = Var(_x(d), src)
    if base == "type_as":
        return Case({"self": x, "other": Const(torch.zeros(1, dtype=dst))})
    if base == "to":
        if d.bool():
            return Case({"self": x, "other": Const(torch.zeros(1, dtype=dst))}, overload="other")
        return Case({"self": x, "dtype": dst}, overload="dtype")
    return Case({"self": x, "dtype": dst if d.int(0, 3) else None})


@register("_to_copy", "type_as", sample=_cast_case)
def cast(ctx: Context, node: Node) -> Effect:
    return _cast(ctx, node)


@register("to", sample=_cast_case, alias=True)
def to(ctx: Context, node: Node) -> Effect:
    return _cast(ctx, node)


def _cast(ctx: Context, node: Node) -> Effect:
    x = first(node)
    src = ctx.g.dtypes.get(x, 7)
    dst = src
    dt = node.arg("dtype")
    if dt is not None and dt.kind == "dtype":
        dst = int(dt.value)
    elif (other := node.arg("other", 1)) is not None and other.kind == "tensor":  # type_as, to.other
        dst = ctx.g.dtypes.get(str(other.value), src)
    elif dt is not None and dt.kind not in ("none",):
        raise Uncovered("a cast to an unknown dtype")
    why = exact_cast(src, dst)
    if why:
        raise Uncovered(why)
    return Gains(((x, 0.0),))


# -- dropout -------------------------------------------------------------------------------------


def _dropout_case(d: Draw, name: str) -> Case:
    return Case({"input": Var(_x(d)), "p": d.choice([0.0, 0.5]), "train": False})


@register("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
          sample=_dropout_case)
def dropout(ctx: Context, node: Node) -> Effect:
    train = node.arg("train", 2)
    if train is not None and train.kind != "none" and flag(train, False):
        raise Uncovered("dropout in training mode")
    return Gains(((first(node), 0.0),), first_only=True)
