"""Pooling, upsampling and padding: size-aware norms from the exported shapes (graph/rules.py
builds each axis' matrix; a separable map's norm is the product of its axes' norms)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lipaudit.graph import rules
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
    flag,
    ints,
    lg,
    num,
    out,
    per_axis,
)
from lipaudit.graph.ops.registry import register


def _dim(op: str) -> int:
    for d in (1, 2, 3):
        if op.endswith(f"{d}d") or op.endswith(f"{d}d_with_indices"):
            return d
    raise Uncovered(f"aten.{op}: unknown dimension")


def _spatial(ctx: Context, node: Node, d: int) -> tuple[str, tuple[int, ...]]:
    x = first(node)
    nd = len(ctx.dims(x))
    if nd < d:
        raise Uncovered("fewer axes than the pooling needs")
    return x, tuple(ctx.fixed(x, list(range(nd - d, nd))))


def _pool(d: Draw, name: str) -> Case:
    base = name.split(".")[0].lstrip("_")
    nd = _dim(base)
    k = [d.int(1, 3) for _ in range(nd)]
    size = [d.int(max(kk, 2), 5) if nd < 3 else d.int(kk, 3) for kk in k]
    x = Var((d.int(1, 2), d.int(1, 2), *size))
    if base.startswith("adaptive"):
        return Case({"self": x, "output_size": [d.int(1, s) for s in size]})
    s = [d.int(1, 3) for _ in range(nd)]
    p = [d.int(0, kk // 2) for kk in k]
    ceil = d.bool()
    if base.startswith("avg"):
        args: dict[str, object] = {"self": x, "kernel_size": k, "stride": s, "padding": p, "ceil_mode": ceil,
                                   "count_include_pad": d.bool()}
        if nd > 1 and d.int(0, 3) == 0:
            args["divisor_override"] = d.int(1, 5)
        return Case(args)
    dil = [d.int(1, 2) for _ in range(nd)]
    dil = [dl if dl * (kk - 1) + 1 <= sz else 1 for dl, kk, sz in zip(dil, k, size, strict=True)]
    return Case({"self": x, "kernel_size": k, "stride": s, "padding": p, "dilation": dil, "ceil_mode": ceil},
                focus=(0.0,))


def _pooled(n: int, k: int, s: int, p: int, dil: int, ceil: bool) -> int:
    """torch's pooling output size (pooling_output_shape), with its checks."""
    if k < 1 or s < 1 or dil < 1 or p < 0:
        raise ValueError("non-positive kernel, stride or dilation, or negative padding")
    span = dil * (k - 1) + 1
    if 2 * p > span:
        raise ValueError("padding over half the kernel")
    o = (n + 2 * p - span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    if o < 1:
        raise ValueError("an empty pooling output")
    return o


def _pool_shape(op: str, a: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The output (and indices) of any pooling op, from torch's size arithmetic."""
    d = _dim(op.lstrip("_"))
    x = a["self"]
    if x.dim() not in (d + 1, d + 2):
        raise ValueError("a pooling input of the wrong rank")
    lead, sizes = list(x.shape[:-d]), list(x.shape[-d:])
    if op.lstrip("_").startswith("adaptive"):
        o = [int(v) for v in a["output_size"]]
        if len(o) == 1:
            o = o * d
        if len(o) != d or min(o) < 0:
            raise ValueError("an output size of the wrong length")
    else:
        k = per_axis([int(v) for v in a["kernel_size"]], d, "kernel_size")
        s_raw = [int(v) for v in a.get("stride") or []]
        s = per_axis(s_raw, d, "stride") if s_raw else k
        p = per_axis([int(v) for v in a.get("padding", [0])], d, "padding")
        dil = per_axis([int(v) for v in a.get("dilation", [1])], d, "dilation")
        ceil = bool(a.get("ceil_mode", False))
        o = [_pooled(*t, ceil) for t in zip(sizes, k, s, p, dil, strict=True)]
    out = meta.empty(lead + o, x)
    if op.endswith("with_indices") or op.startswith("adaptive_max_pool"):
        return out, meta.empty(lead + o, x)
    return out


@register("avg_pool1d", "avg_pool2d", "avg_pool3d", sample=_pool, extra={"meta": _pool_shape})
def avg_pool(ctx: Context, node: Node) -> Effect:
    d = _dim(node.op)
    x, sizes = _spatial(ctx, node, d)
    k = per_axis(ints(node.arg("kernel_size", 1), []), d, "kernel_size")
    s_raw = ints(node.arg("stride", 2), [])
    s = per_axis(s_raw, d, "stride") if s_raw else k
    p = per_axis(ints(node.arg("padding", 3), [0]), d, "padding")
    ceil = flag(node.arg("ceil_mode", 4), False)
    include = flag(node.arg("count_include_pad", 5), True)
    override = num(node.arg("divisor_override", 6), None) if d > 1 else None
    if override is not None and override == 0:
        raise Uncovered("avg_pool with divisor_override 0")
    norm = 1.0
    for i in range(d):
        norm *= rules.matrix_upper(rules.avg_pool_matrix(sizes[i], k[i], s[i], p[i], ceil, include,
                                                         override is not None))
    if override is not None:
        norm /= abs(override)
    return Gains(((x, lg(norm)),))


@register("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
          "_adaptive_avg_pool3d", sample=_pool, extra={"meta": _pool_shape})
def adaptive_avg_pool(ctx: Context, node: Node) -> Effect:
    d = _dim(node.op)
    x, sizes = _spatial(ctx, node, d)
    o = per_axis(ints(node.arg("output_size", 1), []), d, "output_size")
    norm = 1.0
    for i in range(d):
        norm *= rules.matrix_upper(rules.adaptive_matrix(sizes[i], o[i], True))
    return Gains(((x, lg(norm)),))


@register("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
          sample=_pool, extra={"meta": _pool_shape})
def max_pool(ctx: Context, node: Node) -> Effect:
    """Each output moves at most as far as one input of its window: sqrt(most windows per input)."""
    d = _dim(node.op)
    x, sizes = _spatial(ctx, node, d)
    k = per_axis(ints(node.arg("kernel_size", 1), []), d, "kernel_size")
    s_raw = ints(node.arg("stride", 2), [])
    s = per_axis(s_raw, d, "stride") if s_raw else k
    p = per_axis(ints(node.arg("padding", 3), [0]), d, "padding")
    dil = per_axis(ints(node.arg("dilation", 4), [1]), d, "dilation")
    ceil = flag(node.arg("ceil_mode", 5), False)
    count = math.prod(rules.max_pool_count(sizes[i], k[i], s[i], p[i], dil[i], ceil) for i in range(d))
    return Gains(((x, 0.5 * lg(count)),), first_only=True)


@register("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", sample=_pool,
          extra={"meta": _pool_shape})
def adaptive_max_pool(ctx: Context, node: Node) -> Effect:
    d = _dim(node.op)
    x, sizes = _spatial(ctx, node, d)
    o = per_axis(ints(node.arg("output_size", 1), []), d, "output_size")
    count = 1
    for i in range(d):
        cols = rules.adaptive_matrix(sizes[i], o[i], False).indices()[1]
        count *= int(torch.bincount(cols, minlength=1).max())
    return Gains(((x, 0.5 * lg(count)),), first_only=True)


# -- upsampling ---------------------------------------------------------------------------------


def _upsample(d: Draw, name: str) -> Case:
    base = name.split(".")[0].lstrip("_")
    nd = _dim(base)
    size = [d.int(1, 4) for _ in range(nd)]
    x = Var((1, d.int(1, 2), *size))
    linear = "linear" in base or "cubic" in base
    if d.bool():
        scales = [d.choice([1.5, 2.0, 0.5, 3.0]) for _ in range(nd)]
        args: dict[str, object] = {"input": x, "output_size": None}
        if linear:
            args["align_corners"] = d.bool()
        args["scale_factors"] = scales
        return Case(args, overload="vec")
    outs = [d.int(1, 7) for _ in range(nd)]
    args = {"input": x, "output_size": outs}
    if linear:
        args["align_corners"] = d.bool()
    args["scale_factors"] = None
    return Case(args, overload="vec")


def _scales(node: Node, d: int) -> list[float | None]:
    scales_arg = node.arg("scale_factors") or node.arg("scales")
    if scales_arg is not None and scales_arg.kind == "floats" and len(scales_arg.value) == d:
        return list(scales_arg.value)
    names = ["scales_d", "scales_h", "scales_w"][3 - d :] if d > 1 else ["scales"]
    return [num(node.arg(nm), None) for nm in names]


def _resample(ctx: Context, node: Node, kind: str) -> Effect:
    d = _dim(node.op)
    x, sizes = _spatial(ctx, node, d)
    o = out(node)
    no = len(ctx.dims(o))
    o_shape = ctx.fixed(o, list(range(no - d, no)))
    scales = _scales(node, d)
    align = flag(node.arg("align_corners"), False)
    norm = 1.0
    for i in range(d):
        if kind == "linear":
            a = rules.linear_matrix(sizes[i], o_shape[i], align, scales[i])
        elif kind == "cubic":
            a = rules.cubic_matrix(sizes[i], o_shape[i], align, scales[i])
        else:
            a = rules.nearest_matrix(sizes[i], o_shape[i], scales[i], kind == "exact")
        norm *= rules.matrix_upper(a)
    return Gains(((x, lg(norm)),))


def _resample_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    """An upsampling's output: the given sizes, else each size times its scale, rounded down."""
    d = _dim(op.lstrip("_"))
    x = a.get("input", a.get("self"))
    if not isinstance(x, torch.Tensor) or x.dim() != d + 2:
        raise ValueError("an upsampling input of the wrong rank")
    sizes = a.get("output_size")
    scales = a.get("scale_factors")
    if sizes is not None and scales is None:
        o = [int(v) for v in sizes]
    elif sizes is None and scales is not None:
        o = [int(n * float(f)) for n, f in zip(x.shape[2:], scales, strict=True)]
    else:
        raise ValueError("an upsampling with both or neither of sizes and scales")
    if len(o) != d or min(o) < 1 or min(x.shape[2:]) < 1:
        raise ValueError("an upsampling to an empty or misshapen output")
    return meta.empty([*x.shape[:2], *o], x)


@register("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", sample=_upsample,
          extra={"meta": _resample_shape})
def upsample_nearest(ctx: Context, node: Node) -> Effect:
    return _resample(ctx, node, "nearest")


@register("_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", sample=_upsample,
          extra={"meta": _resample_shape})
def upsample_nearest_exact(ctx: Context, node: Node) -> Effect:
    return _resample(ctx, node, "exact")


@register("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", sample=_upsample,
          extra={"meta": _resample_shape})
def upsample_linear(ctx: Context, node: Node) -> Effect:
    return _resample(ctx, node, "linear")


@register("upsample_bicubic2d", sample=_upsample, extra={"meta": _resample_shape})
def upsample_bicubic(ctx: Context, node: Node) -> Effect:
    return _resample(ctx, node, "cubic")


# -- padding ------------------------------------------------------------------------------------


def _pad(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    if base in ("reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
                "replication_pad2d", "replication_pad3d"):
        nd = _dim(base)
        size = [d.int(2, 4) for _ in range(nd)]
        hi = 1 if base.startswith("reflection") else 2
        return Case({"self": Var((1, d.int(1, 2), *size)), "padding": [d.int(0, hi) for _ in range(2 * nd)]})
    nd = d.int(1, 2)
    size = [d.int(2, 4) for _ in range(nd)]
    x = Var((1, 2, *size))
    if base == "_pad_circular":
        return Case({"self": x, "pad": [d.int(0, 2) for _ in range(2 * nd)]})
    if base == "constant_pad_nd":
        return Case({"input": x, "pad": [d.int(-1, 2) for _ in range(2 * nd)], "value": d.choice([0.0, 1.5])})
    mode = d.choice(["constant", "reflect", "replicate", "circular"])
    pads = [d.int(0, 1) for _ in range(2 * nd)] if mode != "constant" else [d.int(-1, 2) for _ in range(2 * nd)]
    return Case({"input": x, "pad": pads, "mode": mode, "value": None if mode != "constant" else 0.5})


def _padded(ctx: Context, node: Node, mode: str) -> Effect:
    x = first(node)
    nd = len(ctx.dims(x))
    a = node.arg("pad", 1) or node.arg("padding", 1)
    pads = ints(a, [])
    if len(pads) % 2 or len(pads) // 2 > nd:
        raise Uncovered("padding of an unexpected length")
    norm = 1.0
    for i in range(len(pads) // 2):
        if mode == "constant":
            continue  # a constant border or cropping: norm at most 1 whatever the size
        m = rules.pad_matrix(ctx.fixed(x, [nd - 1 - i])[0], pads[2 * i], pads[2 * i + 1], mode)
        if m is None:
            raise Uncovered(f"{mode} padding wider than the input")
        norm *= rules.matrix_upper(m)
    return Gains(((x, lg(norm)),))


@register("pad", "constant_pad_nd", sample=_pad)
def pad(ctx: Context, node: Node) -> Effect:
    m = node.arg("mode", 2)
    mode = str(m.value) if m is not None and m.kind == "str" and node.op == "pad" else "constant"
    return _padded(ctx, node, mode)


@register("reflection_pad1d", "reflection_pad2d", "reflection_pad3d", sample=_pad)
def reflection_pad(ctx: Context, node: Node) -> Effect:
    return _padded(ctx, node, "reflect")


@register("replication_pad1d", "replication_pad2d", "replication_pad3d", sample=_pad)
def replication_pad(ctx: Context, node: Node) -> Effect:
    return _padded(ctx, node, "replicate")


@register("_pad_circular", sample=_pad)
def circular_pad(ctx: Context, node: Node) -> Effect:
    return _padded(ctx, node, "circular")
