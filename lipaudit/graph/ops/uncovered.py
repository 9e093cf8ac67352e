"""Ops with no global Lipschitz constant, or not continuous: registered so the interpreter may run
them (constant folding, the measured lower end), never bounded."""

from __future__ import annotations

import torch

from lipaudit.graph.model import Node
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


@register(*_WHY, *_DISCRETE, sample=_case)
def no_constant(ctx: Context, node: Node) -> Effect:
    op = node.op.rstrip("_") if node.op.rstrip("_") in _WHY or node.op.rstrip("_") in _DISCRETE else node.op
    if op in _WHY:
        raise Uncovered(_WHY[op])
    raise Uncovered(f"aten.{op} of input-dependent values is not continuous")
