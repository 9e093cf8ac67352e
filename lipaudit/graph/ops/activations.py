"""Elementwise activations: sup |f'| from the node's own parameters; discontinuous or unbounded
cases are uncovered. Activations the block bounds use also register their secant-slope range
[a, b] (graph/tighten.py). Each constant and range is checked by tests/graph/test_ops_registry.py."""

from __future__ import annotations

import math
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
    Value,
    Var,
    broadcastable,
    first,
    lg,
    num,
    number,
    out,
    small_shape,
    unary,
)
from lipaudit.graph.ops.registry import register

# sup |f'| of each activation, rounded up (docs/mathematics.md, "Activation constants").
GELU = 1.12891  # at x = sqrt(2): Phi(x) + x phi(x) = 1.1289041...
GELU_TANH = 1.12900  # 1.1289931...
SILU = 1.09984  # at x ~ 2.3994: 1.0998393...
MISH = 1.08850  # 1.0884982...
MISH_MIN = -0.11253  # inf f' at x ~ -2.2564: -0.1125261...
ERF = 1.12838  # 2 / sqrt(pi) = 1.1283792...
SELU = 1.75810  # scale * alpha = 1.7580993...
HARDSWISH = 1.5  # slope of x (x + 3) / 6 at x = 3
# torch computes hardsigmoid's slope as the float32 number nearest 1/6, a little above it; the
# bound covers what torch differentiates too, so a measured lower end never passes it.
HARDSIGMOID = 0.1666666717


def _x(d: Draw) -> Var:
    return Var(small_shape(d))


def _plain(d: Draw, name: str) -> Case:
    if name in ("gelu",):
        return Case({"self": _x(d), "approximate": d.choice(["none", "tanh"])})
    return Case({"self": _x(d)}, focus=(0.0, 3.0, -3.0, 6.0, 2.4))


_ONE = {"relu", "relu6", "abs", "neg", "positive", "tanh", "log_sigmoid", "sin", "cos",
        "atan"}
_CONST = {"sigmoid": 0.25, "hardsigmoid": HARDSIGMOID, "silu": SILU, "mish": MISH, "erf": ERF, "selu": SELU,
          "hardswish": HARDSWISH}


# Nondecreasing activations the block bounds use: their secant slopes lie in [0, sup f'].
_MONOTONE = {"relu", "relu6", "tanh", "log_sigmoid", "atan", "sigmoid", "hardsigmoid", "erf", "selu"}


def _op(node: Node) -> str:
    return node.op.rstrip("_")  # an in-place variant has the range of its op


def _fixed_range(node: Node, value: Value) -> tuple[float, float] | None:
    op = _op(node)
    if op in _MONOTONE:
        return (0.0, 1.0 if op in _ONE else _CONST[op])
    if op == "hardswish":
        return (-0.5, HARDSWISH)
    if op == "mish":
        return (MISH_MIN, MISH)  # x (x + 3) / 6 on [-3, 3]: slope (2x + 3) / 6; 0 below, 1 above
    if op == "silu":
        c = SILU
    elif op == "gelu":
        mode = node.arg("approximate")
        if mode is not None and mode.kind not in ("str", "none"):
            return None
        c = GELU_TANH if mode is not None and mode.value == "tanh" else GELU
    else:
        return None
    # silu and both forms of gelu: f(x) - f(-x) = x, so f'(x) + f'(-x) = 1 and the slopes lie in
    # [1 - c, c] with c = sup f'
    return (1.0 - c, c)


@register(*sorted(_ONE | set(_CONST) | {"gelu"}), sample=_plain, slopes=_fixed_range, extra={"meta": meta.same_shape})
def fixed_slope(ctx: Context, node: Node) -> Effect:
    op = _op(node)
    if op == "gelu":
        a = node.arg("approximate")
        mode = a.value if a is not None and a.kind == "str" else "none"
        return unary(ctx, node, GELU_TANH if mode == "tanh" else GELU)
    return unary(ctx, node, 1.0 if op in _ONE else _CONST[op])


def _leaky(d: Draw, name: str) -> Case:
    return Case({"self": _x(d), "negative_slope": d.choice([0.01, 0.2, -0.5, 3.0, -2.0])}, focus=(0.0,))


def _leaky_range(node: Node, value: Value) -> tuple[float, float]:
    s = number(node.arg("negative_slope", 1), 0.01)
    return (min(s, 1.0), max(s, 1.0))


@register("leaky_relu", sample=_leaky, slopes=_leaky_range, extra={"meta": meta.same_shape})
def leaky_relu(ctx: Context, node: Node) -> Effect:
    return unary(ctx, node, max(1.0, abs(number(node.arg("negative_slope", 1), 0.01))))


def _elu(d: Draw, name: str) -> Case:
    alpha = d.choice([1.0, 0.5, -0.7, 2.0, 0.0])
    if name.startswith("celu"):
        return Case({"self": _x(d), "alpha": d.choice([1.0, 0.5, 2.0, -0.5])}, focus=(0.0, -4.0))
    return Case({"self": _x(d), "alpha": alpha, "scale": d.choice([1.0, -1.5, 0.5]),
                 "input_scale": d.choice([1.0, 2.0, -1.0, 0.3])}, focus=(0.0, -4.0))


def _elu_range(node: Node, value: Value) -> tuple[float, float] | None:
    alpha = number(node.arg("alpha", 1), 1.0)
    scale = number(node.arg("scale", 2), 1.0)
    inscale = number(node.arg("input_scale", 3), 1.0)
    if alpha < 0 or scale < 0 or inscale < 0:
        return None
    # scale above 0 (input_scale applies below 0 only); scale alpha inscale exp(inscale x) below, in (0, its value at 0]
    return (0.0, scale * max(1.0, alpha * inscale))


@register("elu", sample=_elu, slopes=_elu_range, extra={"meta": meta.same_shape})
def elu(ctx: Context, node: Node) -> Effect:
    """scale * x above 0, scale * alpha * (exp(input_scale x) - 1) below: the slope below is
    |scale alpha input_scale| exp(input_scale x), largest at 0 when input_scale >= 0, unbounded else."""
    alpha = number(node.arg("alpha", 1), 1.0)
    scale = number(node.arg("scale", 2), 1.0)
    input_scale = number(node.arg("input_scale", 3), 1.0)
    if input_scale < 0 and alpha != 0 and scale != 0:
        raise Uncovered(f"elu with input_scale {input_scale:g} < 0: slope unbounded for x < 0")
    return unary(ctx, node, abs(scale) * max(1.0, abs(alpha * input_scale)))


def _celu_range(node: Node, value: Value) -> tuple[float, float] | None:
    return (0.0, 1.0) if number(node.arg("alpha", 1), 1.0) > 0 else None


@register("celu", sample=_elu, slopes=_celu_range, extra={"meta": meta.same_shape})
def celu(ctx: Context, node: Node) -> Effect:
    """max(0, x) + min(0, alpha (exp(x / alpha) - 1)): slope exp(x / alpha) below 0, at most 1 for
    alpha > 0; for alpha < 0 it grows without bound as x -> -inf."""
    alpha = number(node.arg("alpha", 1), 1.0)
    if alpha <= 0:
        raise Uncovered(f"celu with alpha {alpha:g} <= 0: slope unbounded")
    return unary(ctx, node, 1.0)


def _softplus(d: Draw, name: str) -> Case:
    beta = d.choice([1.0, 2.0, 0.5, -1.0])
    t = d.choice([20.0, 1.0, 5.0, math.inf])
    focus = (t / beta,) if math.isfinite(t) else (0.0,)
    return Case({"self": _x(d), "beta": beta, "threshold": t}, focus=focus, scale=abs(focus[0]) + 2.0)


def _softplus_range(node: Node, value: Value) -> tuple[float, float] | None:
    """The slope is sigmoid(beta x), in (0, 1) for either sign of beta, where no threshold cuts in."""
    beta = number(node.arg("beta", 1), 1.0)
    t = number(node.arg("threshold", 2), 20.0)
    return (0.0, 1.0) if beta != 0 and math.isfinite(beta) and math.isinf(t) and t > 0 else None


@register("softplus", sample=_softplus, slopes=_softplus_range, extra={"meta": meta.same_shape})
def softplus(ctx: Context, node: Node) -> Effect:
    """log(1 + exp(beta x)) / beta switches to x where beta x > threshold; the two differ there by
    log1p(exp(-threshold)) / |beta|, which is zero for no finite threshold: a jump, not Lipschitz."""
    beta = number(node.arg("beta", 1), 1.0)
    t = number(node.arg("threshold", 2), 20.0)
    if beta == 0 or not math.isfinite(beta):
        raise Uncovered(f"softplus with beta {beta:g}")
    if not (math.isinf(t) and t > 0):
        jump = math.log1p(math.exp(-t)) / abs(beta) if t > -700 else math.inf
        raise Uncovered(f"softplus(beta={beta:g}, threshold={t:g}) jumps by {jump:.2g} at x = {t / beta:g}: "
                        "not continuous")
    return unary(ctx, node, 1.0)


def _threshold(d: Draw, name: str) -> Case:
    t = d.choice([0.0, 0.5, -1.0])
    return Case({"self": _x(d), "threshold": t, "value": d.choice([t, 0.0, 2.0])}, focus=(t,))


def _threshold_range(node: Node, value: Value) -> tuple[float, float] | None:
    same = number(node.arg("threshold", 1), 0.0) == number(node.arg("value", 2), 0.0)
    return (0.0, 1.0) if same else None  # then max(x, t)


@register("threshold", sample=_threshold, slopes=_threshold_range, extra={"meta": meta.same_shape})
def threshold(ctx: Context, node: Node) -> Effect:
    """x above the threshold, value elsewhere: continuous (and then max(x, t)) only when value == t."""
    t = number(node.arg("threshold", 1), 0.0)
    v = number(node.arg("value", 2), 0.0)
    if t != v:
        raise Uncovered(f"threshold({t:g}, value={v:g}) jumps at {t:g}")
    return unary(ctx, node, 1.0)


def _shrink(d: Draw, name: str) -> Case:
    lam = d.choice([0.5, 0.0, 1.5])
    return Case({"self": _x(d), "lambd": lam}, focus=(lam, -lam))


@register("hardshrink", sample=_shrink, extra={"meta": meta.same_shape})
def hardshrink(ctx: Context, node: Node) -> Effect:
    lam = number(node.arg("lambd", 1), 0.5)
    if lam != 0:
        raise Uncovered(f"hardshrink({lam:g}) jumps by {abs(lam):g}")
    return unary(ctx, node, 1.0)


def _softshrink_range(node: Node, value: Value) -> tuple[float, float] | None:
    return (0.0, 1.0) if number(node.arg("lambd", 1), 0.5) >= 0 else None  # slope 0 inside, 1 outside


@register("softshrink", sample=_shrink, slopes=_softshrink_range, extra={"meta": meta.same_shape})
def softshrink(ctx: Context, node: Node) -> Effect:
    lam = number(node.arg("lambd", 1), 0.5)
    if lam < 0:
        raise Uncovered(f"softshrink with lambd {lam:g} < 0")
    return unary(ctx, node, 1.0)


def _hardtanh(d: Draw, name: str) -> Case:
    lo = d.choice([-1.0, 0.0, 2.0])
    return Case({"self": _x(d), "min_val": lo, "max_val": lo + d.choice([2.0, 6.0, 0.0])}, focus=(lo,))


def _hardtanh_range(node: Node, value: Value) -> tuple[float, float]:
    lo = number(node.arg("min_val", 1), -1.0)
    hi = number(node.arg("max_val", 2), 1.0)
    return (0.0, 1.0) if lo < hi else (0.0, 0.0)  # lo >= hi: constant


@register("hardtanh", sample=_hardtanh, slopes=_hardtanh_range, extra={"meta": meta.same_shape})
def hardtanh(ctx: Context, node: Node) -> Effect:
    return unary(ctx, node, 1.0)


def _clamp(d: Draw, name: str) -> Case:
    shape = small_shape(d)
    x = Var(shape)
    base = name.split(".")[0].rstrip("_")

    def bound() -> object:
        kind = d.int(0, 3)
        if kind == 0:
            return d.float(-1.0, 1.0)
        s = broadcastable(d, shape)
        if kind == 1:
            return Const(d.tensor(s, -1.0, 1.0))
        if kind == 2:
            return Var(s)
        return None

    if base == "clamp_min":
        return Case({"self": x, "min": bound() or 0.0}, overload="Tensor" if d.bool() else "default")
    if base == "clamp_max":
        return Case({"self": x, "max": bound() or 0.0}, overload="Tensor" if d.bool() else "default")
    lo, hi = bound(), bound()
    tensors = any(isinstance(b, (Const, Var)) for b in (lo, hi))
    if tensors:
        lo = lo if isinstance(lo, (Const, Var)) or lo is None else Const(torch.tensor(float(lo)))  # type: ignore[arg-type]
        hi = hi if isinstance(hi, (Const, Var)) or hi is None else Const(torch.tensor(float(hi)))  # type: ignore[arg-type]
    if lo is None and hi is None:
        lo = -0.5
    return Case({"self": x, "min": lo, "max": hi}, overload="Tensor" if tensors else "default")


def _clamp_range(node: Node, value: Value) -> tuple[float, float] | None:
    if any(a.kind == "tensor" for _, a in node.args[1:]):
        return None  # bounds that move with the input
    lo = num(node.arg("min", 1), -math.inf)
    hi = num(node.arg("max", 2), math.inf)
    if _op(node) == "clamp_min":
        hi = math.inf
    elif _op(node) == "clamp_max":
        lo, hi = -math.inf, num(node.arg("max", 1), math.inf)
    if lo is None or hi is None:
        return None
    return (0.0, 1.0) if lo < hi else (0.0, 0.0)


@register("clamp", "clip", "clamp_min", "clamp_max", sample=_clamp, slopes=_clamp_range,
          extra={"meta": meta.elementwise})
def clamp(ctx: Context, node: Node) -> Effect:
    """min(max(x, lo), hi) moves each output element by at most the largest move of the x, lo or hi
    element it reads: squares add, and each operand counts as often as broadcasting copies it."""
    o = out(node)
    terms = [(t, ctx.ratio(t, o)) for t in node.tensor_inputs() if not ctx.is_const(t)]
    for t in node.tensor_inputs():
        if ctx.is_const(t):
            v = ctx.value(t)
            if v.is_floating_point() and bool(torch.isnan(v).any()):
                raise Uncovered("clamp to NaN bounds")
    return Gains(tuple(terms), quadrature=True)


def _prelu(d: Draw, name: str) -> Case:
    shape = (d.int(1, 3), d.int(1, 4), d.int(1, 3))
    w = d.tensor((d.choice([1, shape[1]]),), -3.0, 3.0)
    if name.startswith("_prelu_kernel"):
        w = w.reshape(-1, 1)
    return Case({"self": Var(shape), "weight": Const(w)}, focus=(0.0,))


def _prelu_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    if op == "_prelu_kernel":
        return meta.elementwise(op, a)  # its weight is already shaped to broadcast
    x, w = a["self"], a["weight"]
    channels = x.shape[1] if x.dim() > 1 else 1
    if w.numel() not in (1, channels):
        raise ValueError("a PReLU weight of another length than the channels")
    return meta.empty(x.shape, x)


def _prelu_range(node: Node, value: Value) -> tuple[float, float] | None:
    """x on one side of 0 and w x on the other, per channel: secant slopes between min(1, w) and
    max(1, w)."""
    w = node.arg("weight", 1)
    v = value(str(w.value)) if w is not None and w.kind == "tensor" else None
    if v is None or not v.numel() or not bool(torch.isfinite(v).all()):
        return None
    v = v.to(torch.float64)
    return (min(1.0, float(v.min())), max(1.0, float(v.max())))


@register("prelu", "_prelu_kernel", sample=_prelu, slopes=_prelu_range, extra={"meta": _prelu_shape})
def prelu(ctx: Context, node: Node) -> Effect:
    w = node.arg("weight", 1)
    if w is None or w.kind != "tensor" or not ctx.is_const(w.value):
        raise Uncovered("prelu with an input-dependent slope")
    v = ctx.value(w.value)
    slope = float(v.abs().max()) if v.numel() else 0.0
    if not math.isfinite(slope):
        raise Uncovered("prelu with a non-finite slope")
    x = first(node)
    return Gains(((x, lg(max(1.0, slope)) + ctx.ratio(x, out(node))),))
