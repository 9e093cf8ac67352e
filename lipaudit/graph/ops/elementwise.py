"""Sums, differences, products and quotients with constants, selections and scatters."""

from __future__ import annotations

import math

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
    broadcastable,
    lg,
    num,
    number,
    out,
    small_shape,
)
from lipaudit.graph.ops.registry import register


def _operand(d: Draw, shape: tuple[int, ...], scalar: bool = True) -> object:
    k = d.int(0, 3 if scalar else 2)
    s = broadcastable(d, shape)
    if k == 0:
        return Var(s)
    if k == 1:
        return Const(d.tensor(s, -3.0, 3.0))
    if k == 2:
        return Var(shape)
    return d.float(-3.0, 3.0)


def _binary(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    other = _operand(d, shape)
    overload = "Scalar" if isinstance(other, float) else "Tensor"
    args: dict[str, object] = {"self": Var(shape), "other": other}
    if name.split(".")[0].rstrip("_") in ("add", "sub", "rsub") and d.bool():
        args["alpha"] = d.choice([2.0, -0.5, 0.0])
    return Case(args, overload=overload)


@register("add", "sub", "rsub", sample=_binary, extra={"meta": meta.elementwise})
def add(ctx: Context, node: Node) -> Effect:
    """self + alpha other (rsub: other - alpha self): the triangle inequality over the terms."""
    alpha = abs(number(node.arg("alpha", 2), 1.0))
    scaled = 1 if node.op.rstrip("_") != "rsub" else 0  # the operand alpha multiplies
    terms = []
    for i, key in enumerate(("self", "other")):
        a = node.arg(key, i)
        if a is not None and a.kind == "tensor" and not ctx.is_const(a.value):
            c = alpha if i == scaled else 1.0
            terms.append((str(a.value), lg(c) + ctx.ratio(a.value, out(node))))
    return Gains(tuple(terms))


def _mul(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    other = _operand(d, shape)
    if name.split(".")[0].rstrip("_") in ("div", "true_divide"):
        if isinstance(other, Const):
            v = other.value
            other = Const(torch.where(v.abs() < 0.3, torch.full_like(v, 0.5), v))
        mode = d.choice([None, None, "floor", "trunc"])
        if mode is not None and not name.startswith("true_divide"):
            return Case({"self": Var(shape), "other": other, "rounding_mode": mode},
                        overload="Scalar_mode" if isinstance(other, float) else "Tensor_mode")
    return Case({"self": Var(shape), "other": other}, overload="Scalar" if isinstance(other, float) else "Tensor")


_FLOAT_TYPES = {6: torch.float16, 7: torch.float32, 8: torch.float64, 13: torch.bfloat16}


def _scalar_scale(ctx: Context, node: Node, c: float, inverse: bool) -> float:
    """|c| (1 / |c| when inverse) for a number that multiplies (divides) the tensor: torch rounds it
    to the output's float type first, where a tiny divisor is 0 and a huge factor is inf. The
    larger of the exact and the rounded scale, whichever way torch applies it."""
    dt = _FLOAT_TYPES.get(ctx.g.dtypes.get(out(node), 7), torch.float64)
    r = abs(float(torch.tensor(c, dtype=torch.float64).to(dt)))
    top = torch.finfo(dt).max
    if not math.isfinite(c) or r > top or (inverse and (r == 0.0 or 1.0 / r > top)):
        raise Uncovered(f"{'division' if inverse else 'multiplication'} by {c:g}, which is zero or out of range "
                        f"in {str(dt).removeprefix('torch.')}")
    return max(1.0 / abs(c), 1.0 / r) if inverse else max(abs(c), r)


def _const_scale(ctx: Context, c: str, inverse: bool) -> float:
    v = ctx.value(c)
    if not v.is_floating_point():
        v = v.to(torch.float64)
    if not v.numel():
        return 0.0
    m = float(v.abs().min() if inverse else v.abs().max())
    if not math.isfinite(m) or (inverse and m == 0.0):
        raise Uncovered("division by a constant that holds zero" if inverse else "a non-finite constant factor")
    return 1.0 / m if inverse else m


@register("mul", sample=_mul, extra={"meta": meta.elementwise})
def mul(ctx: Context, node: Node) -> Effect:
    a, b = node.arg("self", 0), node.arg("other", 1)
    o = out(node)
    if a is None or a.kind != "tensor":
        raise Uncovered("mul without a tensor operand")
    if b is None or b.kind != "tensor":
        c = number(b, 1.0)
        if c == 0.0:
            return Gains(((str(a.value), lg(0.0)),))
        return Gains(((str(a.value), lg(_scalar_scale(ctx, node, c, False))),))
    ca, cb = ctx.is_const(a.value), ctx.is_const(b.value)
    if not ca and not cb:
        found = product_pattern(ctx, a.value, b.value)
        if found is None:
            raise Uncovered("product of two input-dependent tensors")
        x, g = found
        return Gains(((x, lg(g) + ctx.ratio(x, o)),), note="x * f(x) pattern")
    x, c = (b.value, a.value) if ca else (a.value, b.value)
    return Gains(((str(x), lg(_const_scale(ctx, c, False)) + ctx.ratio(x, o)),))


# ops whose rule may read an operand as a function of the other (product_pattern)
PRODUCTS = frozenset({"mul", "div", "true_divide"})


def product_pattern(ctx: Context, a: str, b: str) -> tuple[str, float] | None:
    """x * sigmoid(x) (SiLU) and x * clamp(x + 3, 0, 6) (hardswish times 6), as core aten writes
    them: the operand x and the constant of the product as a function of x."""
    from lipaudit.graph.ops.activations import SILU

    for x, y in ((a, b), (b, a)):
        p = ctx.g.producer.get(y)
        if p is None:
            continue
        if p.op == "sigmoid" and p.tensor_inputs() == [x]:
            return x, SILU
        lo, hi = -math.inf, math.inf
        cur: Node | None = p
        while cur is not None and cur.op in ("clamp", "clamp_min", "clamp_max", "hardtanh"):
            if len(cur.tensor_inputs()) != 1:
                return None
            mn = cur.arg("min", 1) if cur.op != "hardtanh" else cur.arg("min_val", 1)
            mx = cur.arg("max", 2) if cur.op != "hardtanh" else cur.arg("max_val", 2)
            if cur.op == "clamp_max":
                mn, mx = None, cur.arg("max", 1)
            try:
                lo = max(lo, number(mn, -math.inf)) if mn is not None and mn.kind != "none" else lo
                hi = min(hi, number(mx, math.inf)) if mx is not None and mx.kind != "none" else hi
            except Uncovered:
                return None
            cur = ctx.g.producer.get(cur.tensor_inputs()[0])
        if (cur is not None and cur.op == "add" and cur.tensor_inputs() == [x] and lo == 0.0 and hi == 6.0
                and num(cur.arg("other", 1), None) == 3.0 and num(cur.arg("alpha", 2), 1.0) == 1.0):
            return x, 9.0  # x * clamp(x + 3, 0, 6): slope 2x + 3 at x = 3
    return None


@register("div", "true_divide", sample=_mul, extra={"meta": meta.elementwise})
def div(ctx: Context, node: Node) -> Effect:
    a, b = node.arg("self", 0), node.arg("other", 1)
    if a is None or a.kind != "tensor":
        raise Uncovered("div without a tensor operand")
    mode = node.arg("rounding_mode")
    if mode is not None and mode.kind == "str":
        raise Uncovered("rounding division is not continuous")
    if b is None or b.kind != "tensor":
        return Gains(((str(a.value), lg(_scalar_scale(ctx, node, number(b, 1.0), True))),))
    if not ctx.is_const(b.value):
        raise Uncovered("division by an input-dependent tensor")
    return Gains(((str(a.value), lg(_const_scale(ctx, b.value, True)) + ctx.ratio(a.value, out(node))),))


def _where(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    cond = Const(d.tensor(broadcastable(d, shape)) > 0)
    return Case({"condition": cond, "self": _operand(d, shape, False), "other": _operand(d, shape, False)},
                overload="self")


@register("where", sample=_where, extra={"meta": meta.elementwise})
def where(ctx: Context, node: Node) -> Effect:
    cond = node.arg("condition", 0)
    if cond is None or cond.kind != "tensor" or not ctx.is_const(cond.value):
        raise Uncovered("selection by an input-dependent condition")
    o = out(node)
    terms = []
    for i, key in ((1, "self"), (2, "other")):
        a = node.arg(key, i)
        if a is not None and a.kind == "tensor" and not ctx.is_const(a.value):
            terms.append((str(a.value), ctx.ratio(a.value, o)))
    return Gains(tuple(terms), quadrature=True)


def _pair(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    return Case({"self": Var(shape), "other": _operand(d, shape, False)}, focus=(0.0,))


@register("maximum", "minimum", "fmax", "fmin", sample=_pair, extra={"meta": meta.elementwise})
def maximum(ctx: Context, node: Node) -> Effect:
    """Each output element is one of the two it reads, so it moves at most as far as the larger
    move of the two: squares add."""
    o = out(node)
    return Gains(tuple((t, ctx.ratio(t, o)) for t in node.tensor_inputs() if not ctx.is_const(t)), quadrature=True)


def _scatter(d: Draw, name: str) -> Case:
    shape = small_shape(d, (1, 3), 4)
    dim = d.int(0, len(shape) - 1)
    n = shape[dim]
    if name.startswith("select_scatter"):
        i = d.int(0, n - 1)
        src_shape = shape[:dim] + shape[dim + 1 :]
        return Case({"self": d.choice([Var(shape), Const(d.tensor(shape))]), "src": Var(src_shape), "dim": dim,
                     "index": i})
    start = d.int(0, n - 1)
    end = d.int(start + 1, n)
    step = d.int(1, 2)
    m = len(range(start, end, step))
    src_shape = (*shape[:dim], m, *shape[dim + 1:])
    return Case({"self": Var(shape), "src": d.choice([Var(src_shape), Const(d.tensor(src_shape))]), "dim": dim,
                 "start": start, "end": end, "step": step})


@register("slice_scatter", "select_scatter", sample=_scatter)
def scatter(ctx: Context, node: Node) -> Effect:
    """src replaces a slice of self: every output element comes from exactly one of them."""
    return Gains(tuple((t, 0.0) for t in node.tensor_inputs() if not ctx.is_const(t)), quadrature=True)


def _copy(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    src_shape = broadcastable(d, shape)
    if len(src_shape) > len(shape) or any(a != b and a != 1 for a, b in zip(src_shape[::-1], shape[::-1],
                                                                           strict=False)):
        src_shape = shape
    return Case({"self": Const(torch.zeros(shape)), "src": Var(src_shape)})


@register("copy", sample=_copy)
def copy(ctx: Context, node: Node) -> Effect:
    """self's values replaced by src broadcast to self's shape (and cast to self's dtype)."""
    dst, src = node.arg("self", 0), node.arg("src", 1)
    if src is None or src.kind != "tensor" or dst is None or dst.kind != "tensor":
        raise Uncovered("copy without tensors")
    from lipaudit.graph.ops.shapes import exact_cast

    why = exact_cast(ctx.g.dtypes.get(src.value, 7), ctx.g.dtypes.get(dst.value, 7))
    if why:
        raise Uncovered(why)
    return Gains(((str(src.value), ctx.ratio(src.value, out(node))),))
