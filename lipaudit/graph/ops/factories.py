"""Tensors made from sizes alone: constants, whatever the input's values."""

from __future__ import annotations

from lipaudit.graph.model import Node
from lipaudit.graph.ops.base import Case, Constant, Context, Draw, Effect, Var, small_shape
from lipaudit.graph.ops.registry import register


def _case(d: Draw, name: str) -> Case:
    base = name.split(".")[0]
    s = small_shape(d)
    x = Var(s)
    if base in ("zeros_like", "ones_like", "empty_like"):
        return Case({"self": x})
    if base == "full_like":
        return Case({"self": x, "fill_value": 1.5})
    if base in ("new_zeros", "new_ones", "new_empty"):
        return Case({"self": x, "size": list(s)})
    if base == "new_full":
        return Case({"self": x, "size": list(s), "fill_value": 2.0})
    if base in ("zeros", "ones", "empty"):
        return Case({"size": list(s)}, overload="memory_format" if base == "empty" else "default")
    if base == "full":
        return Case({"size": list(s), "fill_value": 0.5})
    if base == "arange":
        return Case({"end": d.int(1, 5)})
    if base == "scalar_tensor":
        return Case({"s": 1.5})
    return Case({"size": list(s)})


@register("zeros_like", "ones_like", "full_like", sample=_case, inplace=False)
def like(ctx: Context, node: Node) -> Effect:
    """The shape of an existing tensor, filled with a constant."""
    return Constant()


@register("empty_like", sample=_case, inplace=False, extra={"uninitialised": True})
def empty_like(ctx: Context, node: Node) -> Effect:
    return Constant()


@register("new_zeros", "new_ones", "new_full", "zeros", "ones", "full", "arange", "scalar_tensor", sample=_case,
          inplace=False, extra={"made": True})
def made(ctx: Context, node: Node) -> Effect:
    """Sizes from the arguments alone: nothing in the archive backs the memory (interpret.Budget)."""
    return Constant()


@register("new_empty", "empty", sample=_case, inplace=False, extra={"made": True, "uninitialised": True})
def made_empty(ctx: Context, node: Node) -> Effect:
    """Uninitialised memory: the interpreter fills it with zeros."""
    return Constant()
