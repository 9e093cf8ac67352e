"""Ops with no global Lipschitz constant, or not continuous: registered so the interpreter may run
them (constant folding, the measured lower end), never bounded."""

from __future__ import annotations

from typing import Any

import torch

from lipaudit.graph.model import Node
from lipaudit.graph.ops import meta
from lipaudit.graph.ops.base import Case, Const, Context, Draw, Effect, Uncovered, Var, small_shape
from lipaudit.graph.ops.registry import register

_WHY = {
    "layer_norm": "LayerNorm divides by an input-dependent standard deviation",
    "native_layer_norm": "LayerNorm divides by an input-dependent standard deviation",
    "group_norm": "GroupNorm divides by an input-dependent standard deviation",
    "native_group_norm": "GroupNorm divides by an input-dependent standard deviation",
    "rms_norm": "RMSNorm divides by an input-dependent norm",
    "instance_norm": "InstanceNorm divides by an input-dependent standard deviation",
    "softmax": "softmax over input-dependent logits",
    "_softmax": "softmax over input-dependent logits",
    "log_softmax": "log-softmax over input-dependent logits",
    "_log_softmax": "log-softmax over input-dependent logits",
    "scaled_dot_product_attention": "attention: products of input-dependent tensors",
    "exp": "exp has no global Lipschitz constant",
    "log": "log has no global Lipschitz constant",
    "sqrt": "sqrt has no global Lipschitz constant",
    "rsqrt": "rsqrt has no global Lipschitz constant",
    "reciprocal": "reciprocal has no global Lipschitz constant",
    "square": "square has no global Lipschitz constant",
    "pow": "a power of an input-dependent tensor",
    "embedding": "embedding lookup of input-dependent indices",
    "var": "variance has no global Lipschitz constant",
    "std": "standard deviation of the input is not covered",
    "var_mean": "variance has no global Lipschitz constant",
    "einsum": "einsum is not covered",
}
_DISCRETE = ("eq ne lt le gt ge sign floor ceil round trunc argmax argmin remainder fmod floor_divide bitwise_and "
             "bitwise_or logical_and logical_or logical_not logical_xor isnan isinf isfinite heaviside").split()


def _case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = small_shape(d)
    x = Var(s)
    if base == "pow":
        return Case({"self": x, "exponent": d.choice([2.0, 0.5, 1.0])}, overload="Tensor_Scalar")
    if base in ("eq", "ne", "lt", "le", "gt", "ge", "remainder", "fmod"):
        return Case({"self": x, "other": Const(d.tensor(s, 0.5, 2.0))}, overload="Tensor")
    if base in ("floor_divide", "heaviside"):
        key = "values" if base == "heaviside" else "other"
        return Case({"self": x, key: Const(d.tensor(s, 0.5, 2.0))})
    if base in ("bitwise_and", "bitwise_or", "logical_and", "logical_or", "logical_xor"):
        return Case({"self": Var(s, torch.bool), "other": Const(d.tensor(s) > 0)},
                    overload="Tensor" if base.startswith("bit") else "default")
    if base in ("argmax", "argmin"):
        return Case({"self": x})
    if base in ("layer_norm", "native_layer_norm"):
        return Case({"input": x, "normalized_shape": [s[-1]]} | ({"weight": None, "bias": None, "eps": 1e-5}
                                                                    if base.startswith("native") else {}))
    if base in ("group_norm", "native_group_norm"):
        shape = (1, 2, 3)
        if base == "group_norm":
            return Case({"input": Var(shape), "num_groups": 1})
        return Case({"input": Var(shape), "weight": None, "bias": None, "N": 1, "C": 2, "HxW": 3, "group": 1,
                     "eps": 1e-5})
    if base == "rms_norm":
        return Case({"input": x, "normalized_shape": [s[-1]]})
    if base == "instance_norm":
        return Case({"input": Var((1, 2, 3)), "weight": None, "bias": None, "running_mean": None,
                     "running_var": None, "use_input_stats": True, "momentum": 0.1, "eps": 1e-5,
                     "cudnn_enabled": False})
    if base in ("softmax", "log_softmax"):
        return Case({"self": x, "dim": -1}, overload="int")
    if base in ("_softmax", "_log_softmax"):
        return Case({"self": x, "dim": -1, "half_to_float": False})
    if base == "scaled_dot_product_attention":
        return Case({"query": Var((1, 2, 3)), "key": Var((1, 2, 3)), "value": Var((1, 2, 3))})
    if base == "embedding":
        return Case({"weight": Const(d.tensor((5, 2))), "indices": Const(d.tensor((3,)).abs().long())})
    if base in ("var", "std", "var_mean"):
        return Case({"self": x})
    if base == "einsum":
        return Case({"equation": "ij->ji", "tensors": [Var(s[:1] + s[:1])]})
    return Case({"self": x})


# ops whose output has their input's shape (a layer norm's statistics aside): shapes-only stand-ins
_ELEMENTWISE = ("layer_norm", "rms_norm", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp", "log", "sqrt",
                "rsqrt", "reciprocal", "square", "sign", "floor", "ceil", "round", "trunc", "isnan", "isinf",
                "isfinite", "logical_not")


def _norm_shape(op: str, a: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A layer (or RMS) norm's output, and native_layer_norm's per-row statistics."""
    x = a["input"]
    ns = [int(n) for n in a["normalized_shape"]]
    if not ns or x.dim() < len(ns) or list(x.shape[x.dim() - len(ns):]) != ns:
        raise ValueError("a normalized shape that is not the input's last sizes")
    for k in ("weight", "bias"):
        t = a.get(k)
        if isinstance(t, torch.Tensor) and list(t.shape) != ns:
            raise ValueError(f"a {k} of another shape than the normalized one")
    out = meta.empty(x.shape, x)
    if op != "native_layer_norm":
        return out
    stats = [*x.shape[: x.dim() - len(ns)], *([1] * len(ns))]
    return out, meta.empty(stats, x), meta.empty(stats, x)


def _elementwise_shape(op: str, a: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if op.rstrip("_") in ("layer_norm", "rms_norm"):
        return _norm_shape(op, a)
    x = a.get("self", a.get("input"))
    if not isinstance(x, torch.Tensor) or len(meta.tensors(a)) != 1:
        raise ValueError(f"{op} of other than one tensor")
    dim = a.get("dim")
    if isinstance(dim, int) and not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError("a softmax dimension out of range")
    return meta.empty(x.shape, x)


@register(*_ELEMENTWISE, sample=_case, extra={"meta": _elementwise_shape})
@register("native_layer_norm", sample=_case, extra={"meta": _norm_shape})
@register(*(n for n in (*_WHY, *_DISCRETE) if n not in (*_ELEMENTWISE, "native_layer_norm")), sample=_case)
def no_constant(ctx: Context, node: Node) -> Effect:
    op = node.op.rstrip("_") if node.op.rstrip("_") in _WHY or node.op.rstrip("_") in _DISCRETE else node.op
    if op in _WHY:
        raise Uncovered(_WHY[op])
    raise Uncovered(f"aten.{op} of input-dependent values is not continuous")
