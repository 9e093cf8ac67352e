"""Linear layers, convolutions and matrix products with a constant operand: linear operators the
walk measures (and folds with a following batch norm, or merges with the next dense map)."""

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
    Linear,
    LinearOp,
    Uncovered,
    Var,
    flag,
    integer,
    ints,
    lg,
    number,
    per_axis,
)
from lipaudit.graph.ops.registry import register


def _const_bias(ctx: Context, node: Node, name: str = "bias") -> None:
    b = node.arg(name)
    if b is not None and b.kind == "tensor" and not ctx.is_const(b.value):
        raise Uncovered(f"an input-dependent {name}")


# -- output shapes without torch's meta kernels (graph/interpret.py, check_shapes) ---------------


def _axes(v: Any, d: int, name: str) -> list[int]:
    return list(per_axis([int(t) for t in v], d, name))


def _conv_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    """The output of any convolution op: torch's size arithmetic and the checks it makes on sizes."""
    x, w, bias = a["input"], a["weight"], a.get("bias")
    d = w.dim() - 2
    if d < 1:
        raise ValueError("a convolution kernel with fewer than three axes")
    batched = x.dim() == d + 2
    if not batched and (x.dim() != d + 1 or op in ("convolution", "_convolution")):
        raise ValueError("a convolution input of the wrong rank")
    transposed = op.startswith("conv_transpose") or bool(a.get("transposed", False))
    groups = int(a.get("groups", 1))
    stride, dil = _axes(a.get("stride", [1]), d, "stride"), _axes(a.get("dilation", [1]), d, "dilation")
    if groups < 1 or min(stride) < 1 or min(dil) < 1 or w.shape[0] % groups:
        raise ValueError("non-positive stride, dilation or groups, or groups that do not divide the kernel")
    cin, spatial = x.shape[1 if batched else 0], list(x.shape[-d:])
    taps = [dl * (k - 1) + 1 for dl, k in zip(dil, w.shape[2:], strict=True)]
    pad = a.get("padding", [0])
    if transposed:
        if cin != w.shape[0]:
            raise ValueError("input channels do not match the kernel")
        cout = w.shape[1] * groups
        p = _axes(pad, d, "padding")
        extra = _axes(a.get("output_padding", [0]), d, "output_padding")
        if any(e < 0 or (e >= s and e >= dl) for e, s, dl in zip(extra, stride, dil, strict=True)):
            raise ValueError("output padding must be smaller than either stride or dilation")
        out = [(n - 1) * s - 2 * q + t + e for n, s, q, t, e in zip(spatial, stride, p, taps, extra, strict=True)]
    else:
        if cin != w.shape[1] * groups:
            raise ValueError("input channels do not match the kernel")
        cout = w.shape[0]
        if isinstance(pad, str) and pad not in ("same", "valid"):
            raise ValueError(f"unknown padding {pad!r}")
        if pad == "same" and max(stride) > 1:
            raise ValueError("padding 'same' with a stride")
        p = [0] * d if isinstance(pad, str) else _axes(pad, d, "padding")
        out = [(n + 2 * q - t) // s + 1 for n, q, t, s in zip(spatial, p, taps, stride, strict=True)]
        if pad == "same":
            out, p = list(spatial), [t - 1 for t in taps]  # padded on both sides as far as the taps need
        if min(p) < 0 or any(n + 2 * q < t for n, q, t in zip(spatial, p, taps, strict=True)):
            raise ValueError("a kernel wider than the padded input, or negative padding")
    if min(out) < 1:
        raise ValueError("an empty convolution output")
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (cout,):
        raise ValueError("a bias of another length than the output channels")
    return meta.empty(([x.shape[0]] if batched else []) + [cout] + out, x)


def _matmul_shape(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """torch.matmul's result shape (1-D operands get a unit axis that is dropped again)."""
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul of a scalar")
    sa = [1, *a.shape] if a.dim() == 1 else list(a.shape)
    sb = [*b.shape, 1] if b.dim() == 1 else list(b.shape)
    if sa[-1] != sb[-2]:
        raise ValueError("matmul of sizes that do not match")
    lead = meta.broadcast(sa[:-2], sb[:-2])
    return lead + ([sa[-2]] if a.dim() > 1 else []) + ([sb[-1]] if b.dim() > 1 else [])


def _product_shape(op: str, a: dict[str, Any]) -> torch.Tensor:
    """linear, mm, bmm, mv, matmul and their beta self + alpha product forms."""
    base = op.rstrip("_")
    if base == "linear":
        x, w = a["input"], a["weight"]
        if w.dim() not in (1, 2):
            raise ValueError("linear with a weight that is not a matrix or a vector")
        shape = _matmul_shape(x, w.T if w.dim() == 2 else w)
        bias = a.get("bias")
        if isinstance(bias, torch.Tensor):
            shape = meta.broadcast(shape, bias.shape)
        return meta.empty(shape, x)
    left, right = {"mm": ("self", "mat2"), "bmm": ("self", "mat2"), "mv": ("self", "vec"),
                   "matmul": ("self", "other"), "addmm": ("mat1", "mat2"), "baddbmm": ("batch1", "batch2"),
                   "addmv": ("mat", "vec")}[base]
    x, y = a[left], a[right]
    ranks = {"mm": (2, 2), "bmm": (3, 3), "mv": (2, 1), "addmm": (2, 2), "baddbmm": (3, 3), "addmv": (2, 1)}
    if base in ranks and (x.dim(), y.dim()) != ranks[base]:
        raise ValueError(f"{base} of operands of the wrong rank")
    if base in ("bmm", "baddbmm") and x.shape[0] != y.shape[0]:
        raise ValueError(f"{base} of batches of different sizes")
    shape = _matmul_shape(x, y)
    addend = a.get("self") if base in ("addmm", "baddbmm", "addmv") else None
    if isinstance(addend, torch.Tensor):
        # the addend broadcasts to the product; it cannot change the result's shape
        if meta.broadcast(addend.shape, shape) != shape:
            raise ValueError("an addend that does not broadcast to the product")
    return meta.empty(shape, x)


# -- convolutions -------------------------------------------------------------------------------


def _conv(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    nd = int(base[-2]) if base[-2].isdigit() else d.choice([1, 2, 1, 2, 3])
    transposed = "transpose" in base or (base in ("convolution", "_convolution") and d.bool())
    groups = d.choice([1, 2])
    cin, cout = groups * d.int(1, 2), groups * d.int(1, 2)
    k = [d.int(1, 3) for _ in range(nd)]
    stride = [d.int(1, 2) for _ in range(nd)]
    dil = [d.int(1, 2) for _ in range(nd)]
    pad = [d.int(0, 1) for _ in range(nd)]
    size = [d.int(3, 5) if nd < 3 else d.int(2, 3) for _ in range(nd)]
    size = [max(s, dl * (kk - 1) + 1) for s, dl, kk in zip(size, dil, k, strict=True)]
    w_shape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
    x = Var((d.int(1, 2), cin, *size))
    w = Const(d.tensor(w_shape))
    bias = d.choice([None, Const(d.tensor((cout,)))])
    outpad = [0] * nd
    if transposed and d.bool():
        outpad = [min(s, dl) - 1 for s, dl in zip(stride, dil, strict=True)]
    if base in ("convolution", "_convolution"):
        args: dict[str, object] = {"input": x, "weight": w, "bias": bias, "stride": stride, "padding": pad,
                                   "dilation": dil, "transposed": transposed, "output_padding": outpad,
                                   "groups": groups}
        if base == "_convolution":
            args.update(benchmark=False, deterministic=False, cudnn_enabled=False, allow_tf32=False)
        return Case(args)
    if transposed:
        return Case({"input": x, "weight": w, "bias": bias, "stride": stride, "padding": pad,
                     "output_padding": outpad, "groups": groups, "dilation": dil},
                    overload="default" if nd == 1 else "input")
    return Case({"input": x, "weight": w, "bias": bias, "stride": stride, "padding": pad, "dilation": dil,
                 "groups": groups})


@register("convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", sample=_conv, extra={"meta": _conv_shape})
def convolution(ctx: Context, node: Node) -> Effect:
    """Zero-padded strided, dilated, grouped convolutions: bounded on the infinite grid (any padding,
    any input size); a transposed convolution has the norm of the convolution it is the adjoint of."""
    x = node.arg("input", 0)
    w = node.arg("weight", 1)
    if x is None or w is None or x.kind != "tensor" or w.kind != "tensor":
        raise Uncovered("convolution without tensor operands")
    if not ctx.is_const(w.value):
        raise Uncovered("convolution with an input-dependent kernel")
    kernel = ctx.value(w.value).to(torch.float64)
    d = kernel.ndim - 2
    if d < 1:
        raise Uncovered("a convolution kernel with fewer than three axes")
    transposed = node.op.startswith("conv_transpose") or flag(node.arg("transposed"), False)
    stride = per_axis(ints(node.arg("stride"), [1]), d, "stride")
    dilation = per_axis(ints(node.arg("dilation"), [1]), d, "dilation")
    groups = integer(node.arg("groups"), 1)
    if groups < 1 or kernel.shape[0] % groups:
        raise Uncovered("groups do not divide the channels")
    _const_bias(ctx, node)
    op = LinearOp("conv", kernel, str(x.value), ctx.param_of(w.value), stride=stride, dilation=dilation,
                  groups=groups, transposed=transposed)
    return Linear(op, f"conv{d}d" if not transposed else f"conv_transpose{d}d")


# -- dense products -----------------------------------------------------------------------------


def _linear(d: Draw, name: str) -> Case:
    n_in, n_out = d.int(1, 4), d.int(1, 4)
    lead = tuple(d.int(1, 3) for _ in range(d.int(0, 2)))
    return Case({"input": Var((*lead, n_in)), "weight": Const(d.tensor((n_out, n_in))),
                 "bias": d.choice([None, Const(d.tensor((n_out,)))])})


@register("linear", sample=_linear, extra={"meta": _product_shape})
def linear(ctx: Context, node: Node) -> Effect:
    x, w = node.arg("input", 0), node.arg("weight", 1)
    if x is None or w is None or x.kind != "tensor" or w.kind != "tensor" or not ctx.is_const(w.value):
        raise Uncovered("linear with an input-dependent weight")
    _const_bias(ctx, node)
    weight = ctx.value(w.value).to(torch.float64)
    if weight.ndim != 2:
        raise Uncovered("linear with a weight that is not a matrix")
    return Linear(LinearOp("dense", weight, str(x.value), ctx.param_of(w.value), -1), "linear")


def product(ctx: Context, a: str, b: str, scale: float = 1.0) -> Effect:
    """a @ b with one constant operand (torch.matmul semantics, batch axes broadcast).

    The batch copies of the input operand matter: x of shape (n, d) times W of shape (H, d, e) is
    x times [W_1 ... W_H] side by side, whose norm is up to sqrt(H) max ||W_h||. In general the
    input's batch entries are independent blocks, and each is multiplied by the constant slices it
    meets: the bound is the largest norm of those slices placed side by side."""
    ca, cb = ctx.is_const(a), ctx.is_const(b)
    if not ca and not cb:
        raise Uncovered("product of two input-dependent tensors")
    left = cb  # x @ W, else W @ x
    x, wname = (a, b) if left else (b, a)
    w = ctx.value(wname).to(torch.float64)
    xd = ctx.dims(x)
    params = ctx.param_of(wname)
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise Uncovered("weights hold NaN or Inf")
    if w.ndim == 0 or len(xd) == 0:
        raise Uncovered("matmul of a scalar")
    if w.ndim == 1:
        iv = ctx.op_norm(LinearOp("dense", w.reshape(1, -1), x, params, -1, tag="vector"))
        return Gains(((x, lg(scale * iv.upper)),))
    if w.ndim == 2 and (len(xd) <= 2 or left):
        weight = w.T if left else w
        axis = -1 if left or len(xd) == 1 else -2
        op = LinearOp("dense", weight.contiguous(), x, params, axis)
        if scale == 1.0:
            return Linear(op, "linear")
        return Gains(((x, lg(scale * ctx.op_norm(op).upper)),))
    # batched: put the product in the form x @ W with W's slices (d, e)
    mats = w if left else w.transpose(-1, -2)
    w_batch = tuple(mats.shape[:-2])
    x_batch = tuple(ctx.fixed(x, list(range(len(xd) - 2)))) if len(xd) > 2 else ()
    try:
        out_batch = torch.broadcast_shapes(x_batch, w_batch)  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise Uncovered("batch axes that do not broadcast") from None
    nx, nw = math.prod(x_batch), math.prod(w_batch)
    ix = torch.arange(nx).reshape(x_batch).expand(out_batch).reshape(-1)
    iw = torch.arange(nw).reshape(w_batch).expand(out_batch).reshape(-1)
    order = torch.argsort(ix * nw + iw)
    groups = iw[order].reshape(nx, -1)  # the W slices each x entry meets, in order
    flat = mats.reshape(nw, mats.shape[-2], mats.shape[-1])
    best = 0.0
    for row in torch.unique(groups, dim=0).tolist():
        side = torch.cat([flat[j] for j in row], dim=1)  # (d, k e)
        tag = "slices " + ",".join(str(j) for j in row)
        iv = ctx.op_norm(LinearOp("dense", side.T.contiguous(), x, params, -1, tag=tag))
        best = max(best, iv.upper)
    return Gains(((x, lg(scale * best)),))


def _matmul(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    n, k, m = d.int(1, 3), d.int(1, 3), d.int(1, 3)
    a: tuple[int, ...]
    b: tuple[int, ...]
    if base == "mm":
        a, b = (n, k), (k, m)
    elif base == "bmm":
        h = d.int(1, 3)
        a, b = (h, n, k), (h, k, m)
    elif base == "mv":
        a, b = (n, k), (k,)
    else:
        lead_a = tuple(d.choice([1, 2, 3]) for _ in range(d.int(0, 2)))
        lead_b = tuple(d.choice([1, 2, 3]) for _ in range(d.int(0, 2)))
        if len(lead_a) == len(lead_b):
            lead_b = tuple(x if d.bool() else 1 for x in lead_a)
        a = d.choice([(*lead_a, n, k), (k,)])
        b = d.choice([(*lead_b, k, m), (k,)]) if len(a) > 1 else (*lead_b, k, m)
    const_left = d.bool()
    sa = Const(d.tensor(a)) if const_left else Var(a)
    sb = Var(b) if const_left else Const(d.tensor(b))
    key = "vec" if base == "mv" else ("mat2" if base in ("mm", "bmm") else "other")
    return Case({"self": sa, key: sb})


@register("matmul", "mm", "bmm", "mv", sample=_matmul, extra={"meta": _product_shape})
def matmul(ctx: Context, node: Node) -> Effect:
    ins = node.tensor_inputs()
    if len(ins) != 2:
        raise Uncovered("a matrix product without two tensor operands")
    return product(ctx, ins[0], ins[1])


def _dot(d: Draw, name: str) -> Case:
    k = d.int(1, 4)
    const_left = d.bool()
    sa = Const(d.tensor((k,))) if const_left else Var((k,))
    sb = Var((k,)) if const_left else Const(d.tensor((k,)))
    return Case({"self": sa, "tensor" if name.split(".")[0] == "dot" else "other": sb})


@register("dot", "vdot", sample=_dot)
def dot(ctx: Context, node: Node) -> Effect:
    """<a, b> with one constant vector (real tensors: vdot is dot): a 1 x k matrix."""
    ins = node.tensor_inputs()
    if len(ins) != 2:
        raise Uncovered(f"aten.{node.op} without two tensor operands")
    return product(ctx, ins[0], ins[1])


def _addmm(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    n, k, m = d.int(1, 3), d.int(1, 3), d.int(1, 3)
    shapes: tuple[tuple[int, ...], ...]
    if base == "addmm":
        shapes = ((n, k), (k, m), (n, m))
        keys = ("mat1", "mat2")
    elif base == "baddbmm":
        h = d.int(1, 3)
        shapes = ((h, n, k), (h, k, m), (h, n, m))
        keys = ("batch1", "batch2")
    else:
        shapes = ((n, k), (k,), (n,))
        keys = ("mat", "vec")
    left = d.bool()
    a = Var(shapes[0]) if left else Const(d.tensor(shapes[0]))
    b = Const(d.tensor(shapes[1])) if left else Var(shapes[1])
    return Case({"self": Const(d.tensor(shapes[2])), keys[0]: a, keys[1]: b,
                 "beta": d.choice([1.0, 0.5]), "alpha": d.choice([1.0, -2.0, 0.5])})


@register("addmm", "baddbmm", "addmv", sample=_addmm, extra={"meta": _product_shape})
def addmm(ctx: Context, node: Node) -> Effect:
    """beta self + alpha (m1 @ m2) with a constant addend: |alpha| times the product."""
    bias = node.arg("self", 0)
    if bias is not None and bias.kind == "tensor" and not ctx.is_const(bias.value):
        raise Uncovered(f"aten.{node.op} with an input-dependent addend")
    alpha = abs(number(node.arg("alpha"), 1.0))
    ins = [t for _, a in node.args[1:3] if a.kind == "tensor" for t in [str(a.value)]]
    if len(ins) != 2:
        raise Uncovered(f"aten.{node.op} without two tensor factors")
    return product(ctx, ins[0], ins[1], alpha)
