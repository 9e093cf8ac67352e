"""The op-rule registry: one entry per aten op name (or name.overload), filled by `register`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.graph.model import Graph, Node
from lipaudit.graph.ops.base import Rule, Sample, Slopes, Spec


@dataclass(frozen=True)
class Entry:
    name: str  # aten op name, or name.overload
    spec: Spec
    inplace_of: str | None = None  # an in-place variant runs (and is bounded) as this op

    @property
    def runs_as(self) -> str:
        return self.inplace_of or self.name.split(".")[0]


REGISTRY: dict[str, Entry] = {}


def _has(op: str) -> bool:
    try:
        getattr(torch.ops.aten, op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _add(entry: Entry) -> None:
    if entry.name in REGISTRY:
        raise RuntimeError(f"aten.{entry.name} registered twice ({REGISTRY[entry.name].spec.family}, "
                           f"{entry.spec.family})")
    REGISTRY[entry.name] = entry


def register(*names: str, sample: Sample | None, run: bool = True, alias: bool = False,
             inplace: bool = True, extra: dict[str, Any] | None = None,
             slopes: Slopes | None = None) -> Callable[[Rule], Rule]:
    """Register a rule for aten ops `names` ("op" for every overload, "op.overload" for one), with
    the generator of its test cases and, for an elementwise activation, its secant-slope range.
    Each in-place variant torch has (`relu_` for `relu`) is registered with the same rule;
    a name registered twice is an error at import."""

    def deco(fn: Rule) -> Rule:
        family = fn.__module__.rsplit(".", 1)[-1]
        spec = Spec(tuple(names), fn, sample, family, run, alias, inplace, dict(extra or {}), slopes)
        for n in names:
            _add(Entry(n, spec))
            base, dot, overload = n.partition(".")
            if inplace and not base.endswith("_") and _has(base + "_"):
                _add(Entry(base + "_" + dot + overload, spec, inplace_of=base))
        return fn

    return deco


def lookup(op: str, overload: str = "default") -> Entry | None:
    """The rule of aten op.overload; None for unregistered ops and for `out=` overloads."""
    if _writes_out(overload):
        return None
    return REGISTRY.get(f"{op}.{overload}") or REGISTRY.get(op)


def inplace_hazard(graph: Graph, node: Node) -> str | None:
    """Why an in-place node cannot be treated as its out-of-place op, or None.

    The walk and the interpreter give the node's result its own name and leave the operand as it
    was. That is exact when nothing reads the operand (or any tensor sharing its memory) after the
    node: the operand is a fresh result, not a graph input, parameter, view or output, and every
    other reader of it comes earlier."""
    a = node.arg("self", 0) or node.arg("input", 0)
    if a is None or a.kind != "tensor":
        return "an in-place op without a tensor operand"
    names: list[str] = []
    cur = str(a.value)
    for _ in range(10_000):
        names.append(cur)
        if cur in graph.inputs or cur in graph.params or cur in graph.constants:
            return "an in-place update of a graph input, parameter or buffer"
        if cur in graph.outputs:
            return "an in-place update of a tensor the graph returns"
        p = graph.producer.get(cur)
        if p is None:
            return "an in-place update of a tensor of unknown origin"
        if p.namespace != "aten" and p.target == "_operator.getitem":
            src = p.tensor_inputs()
            p = graph.producer.get(src[0]) if len(src) == 1 else None
            if p is None:
                return "an in-place update of a tensor of unknown origin"
        e = lookup(p.op, p.overload) if p.namespace == "aten" else None
        if e is None:
            return "an in-place update of a tensor made by an op with no rule"
        if e.inplace_of is not None:
            b = p.arg("self", 0) or p.arg("input", 0)
            if b is None or b.kind != "tensor":
                return "an in-place update of a tensor of unknown origin"
            cur = str(b.value)  # the same memory as the operand of that earlier in-place op
            continue
        if e.spec.alias:
            return "an in-place update of a view (it changes the tensor it views)"
        break
    pos = graph.order.get(node.name, -1)
    for n in names:
        for c in graph.consumers.get(n, []):
            if c is node:
                continue
            if graph.order.get(c.name, len(graph.nodes)) > pos:
                return "the tensor updated in place is read after the update"
            ce = lookup(c.op, c.overload) if c.namespace == "aten" else None
            if ce is None or ce.spec.alias:
                return "a view of the tensor updated in place may be read after the update"
    return None


def _writes_out(overload: str) -> bool:
    return overload == "out" or overload.endswith("_out")


def runs_as(entry: Entry, overload: str) -> tuple[str, str] | None:
    """(op, overload) that a node of this entry runs as: never an `out=` overload (it writes into an
    argument); an in-place overload maps to the out-of-place one with the same arguments."""
    if _writes_out(overload):
        return None
    packet = getattr(torch.ops.aten, entry.runs_as)
    names = packet.overloads()
    if overload in names:
        return entry.runs_as, overload
    if entry.inplace_of is None:
        return None
    own = getattr(torch.ops.aten, entry.name.split(".")[0])
    if overload not in own.overloads():
        return None
    want = [a.name for a in getattr(own, overload)._schema.arguments]
    for o in names:
        if not _writes_out(o) and [a.name for a in getattr(packet, o)._schema.arguments] == want:
            return entry.runs_as, o
    return None
