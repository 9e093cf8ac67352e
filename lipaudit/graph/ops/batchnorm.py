"""Batch norm in eval mode: a per-channel scale gamma / sqrt(running_var + eps)."""

from __future__ import annotations

from typing import Any

import torch

from lipaudit.graph.model import Node
from lipaudit.graph.ops import meta
from lipaudit.graph.ops.base import Case, Const, Context, Diagonal, Draw, Effect, Uncovered, Var, flag, num
from lipaudit.graph.ops.registry import register


def _bn(d: Draw, name: str) -> Case:
    c = d.int(1, 3)
    shape = (d.int(1, 2), c, *[d.int(1, 3) for _ in range(d.int(0, 2))])
    stats = {"input": Var(shape), "weight": d.choice([None, Const(d.tensor((c,), -3.0, 3.0))]),
             "bias": d.choice([None, Const(d.tensor((c,)))]), "running_mean": Const(d.tensor((c,))),
             "running_var": Const(d.tensor((c,), 0.05, 2.0))}
    base = name.split(".")[0]
    if base == "_native_batch_norm_legit_no_training":
        return Case({**stats, "momentum": 0.1, "eps": 1e-5})
    if base == "batch_norm":
        return Case({**stats, "training": False, "momentum": 0.1, "eps": 1e-5, "cudnn_enabled": False})
    if base == "_native_batch_norm_legit_functional":
        return Case({**stats, "training": True, "momentum": 0.1, "eps": 1e-5})
    return Case({**stats, "training": False, "momentum": 0.1, "eps": 1e-5})


def _shapes_only(op: str, a: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The outputs' shapes without torch's meta kernel. The statistics must be per channel, as the
    real op checks."""
    x = a["input"]
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("batch norm of a tensor with fewer than 2 dimensions")
    c = x.shape[1]
    for k in ("weight", "bias", "running_mean", "running_var"):
        t = a.get(k)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != (c,):
            raise ValueError("batch norm statistics of another length than the channels")
    out = meta.empty(x.shape, x)
    if op == "batch_norm":
        return out
    # eval mode saves no statistics: the CPU kernel returns them empty
    return out, meta.empty((0,), x), meta.empty((0,), x)


@register("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
          "_native_batch_norm_legit_functional", sample=_bn, extra={"meta": _shapes_only})
def batch_norm(ctx: Context, node: Node) -> Effect:
    x = node.arg("input", 0)
    if x is None or x.kind != "tensor":
        raise Uncovered("batch norm without an input")
    training = node.arg("training")
    if node.op == "_native_batch_norm_legit_functional" or (training is not None and flag(training, False)):
        raise Uncovered("batch norm in training mode (batch statistics)")
    names: dict[str, str | None] = {}
    for k in ("weight", "bias", "running_mean", "running_var"):
        a = node.arg(k)
        names[k] = str(a.value) if a is not None and a.kind == "tensor" else None
        if names[k] is not None and not ctx.is_const(str(names[k])):
            raise Uncovered("batch norm with input-dependent statistics")
    var_name = names["running_var"]
    if var_name is None:
        raise Uncovered("batch norm without running statistics")
    var = ctx.value(var_name).to(torch.float64)
    eps = num(node.arg("eps"), 1e-5) or 0.0
    denom = torch.sqrt(var + eps)
    wname = names["weight"]
    gamma = ctx.value(wname).to(torch.float64) if wname is not None else torch.ones_like(denom)
    scale = gamma / denom
    if not bool(torch.isfinite(scale).all()):
        raise Uncovered("batch norm scale is not finite (running_var + eps <= 0)")
    params = tuple(ctx.g.params[n] for n in (wname, var_name) if n is not None and n in ctx.g.params)
    return Diagonal(str(x.value), scale.reshape(-1), params)
