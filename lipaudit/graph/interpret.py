"""Run an exported graph on an allowlisted set of aten ops, in float64, for constant folding and
as the function whose Jacobian the measured lower end differentiates (lipaudit/graph/lower.py)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.pt2 import DTYPES
from lipaudit.errors import ResourceLimitError
from lipaudit.graph import ops
from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.graph.ops.registry import inplace_hazard, runs_as
from lipaudit.graph.ops.smooth import smoothed
from lipaudit.text import clean_message, visible


def _flag(node: Node, key: str) -> bool:
    """A registry flag of the node's op: `made` (its size comes from its arguments alone),
    `uninitialised` (uninitialised memory, filled with zeros here) or `identity` (the value passes
    unchanged and so does its derivative)."""
    entry = ops.lookup(node.op, node.overload) if node.namespace == "aten" else None
    return bool(entry is not None and entry.spec.extra.get(key))


class CannotRun(Exception):
    """A node the interpreter will not or cannot run."""


def _dtype(code: int) -> torch.dtype:
    dt = DTYPES.get(code)
    if dt is None:
        raise CannotRun(f"dtype code {code}")
    return torch.float64 if dt.is_floating_point else dt


def allowed() -> frozenset[str]:
    """The aten names the interpreter may run: the registry's (an in-place name runs as its
    out-of-place op, so nothing it is given is ever changed in place)."""
    return frozenset(name for name, e in ops.REGISTRY.items() if e.spec.run)


def resolve(node: Node, graph: Graph | None = None) -> Callable[..., Any]:
    """The aten overload for a registered op name; nothing else is ever looked up."""
    entry = ops.lookup(node.op, node.overload) if node.namespace == "aten" else None
    if entry is None or not entry.spec.run:
        raise CannotRun(f"{node.target} is not on the interpreter's allowlist")
    if entry.inplace_of is not None and graph is not None:
        why = inplace_hazard(graph, node)
        if why:
            raise CannotRun(f"{node.target}: {why}")
    target = runs_as(entry, node.overload)
    if target is None:
        raise CannotRun(f"{node.target}: unknown overload")
    fn: Callable[..., Any] = getattr(getattr(torch.ops.aten, target[0]), target[1])
    return fn


# float64 in the interpreter, whatever the graph declares
_ITEM = 8


def _declared_bytes(graph: Graph, name: str) -> int | None:
    shape = graph.shapes.get(name) or graph.hints.get(name)
    if shape is None:
        return None
    return math.prod(shape) * _ITEM


class Budget:
    """Sizes the interpreter refuses before allocating: one tensor over `tensor_bytes`, a tensor made
    from sizes alone (a factory: no data in the archive backs it) over `made_bytes`, or all tensors of
    one pass over `total_bytes`. A refusal is a resource limit (exit 5)."""

    def __init__(self, limits: Limits | None = None) -> None:
        lim = limits or Limits()
        self.tensor_bytes = lim.tensor_bytes
        self.made_bytes = lim.expanded_bytes
        self.total_bytes = lim.total_bytes
        self.used = 0

    def check(self, what: str, size: int, made: bool) -> None:
        cap = self.made_bytes if made else self.tensor_bytes
        if size > cap:
            raise ResourceLimitError(f"graph tensor {visible(what, 80)!r} would take {size} bytes, over the "
                                     f"limit of {cap}")
        self.used += size
        if self.used > self.total_bytes:
            raise ResourceLimitError(f"running the graph would take over {self.total_bytes} bytes")


def _meta_arg(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to("meta") if not v.is_meta else v
    if isinstance(v, list):
        return [_meta_arg(t) for t in v]
    return v


def _output_bytes(node: Node, graph: Graph | None, fn: Callable[..., Any], args: list[Any],
                  kwargs: dict[str, Any]) -> list[tuple[str, int]]:
    """Each output's size in bytes: by running the op on shapes only (declared shapes can lie), else
    as declared."""
    names = [n for n in node.outputs if n is not None]
    kw = dict(kwargs)
    if _flag(node, "made"):
        kw["device"] = "meta"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*[_meta_arg(a) for a in args], **{k: _meta_arg(v) for k, v in kw.items()})
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [(n, v.numel() * _ITEM) for n, v in zip(names, outs, strict=False) if isinstance(v, torch.Tensor)]
    except Exception:  # no meta kernel, or arguments it refuses: run_node reports the real error
        pass
    if graph is None:
        return []
    return [(n, int(b)) for n in names if (b := _declared_bytes(graph, n)) is not None]


def _value(a: Arg, env: dict[str, torch.Tensor]) -> Any:
    if a.kind == "tensor":
        if a.value not in env:
            raise CannotRun(f"tensor {a.value} has no value")
        return env[a.value]
    if a.kind in ("tensors", "opt_tensors"):
        out: list[torch.Tensor | None] = []
        for v in a.value:
            if v is None:
                out.append(None)
            elif v in env:
                out.append(env[v])
            else:
                raise CannotRun(f"tensor {v} has no value")
        return out
    if a.kind in ("int", "ints", "float", "floats", "bool", "bools", "str", "none"):
        return a.value
    if a.kind == "dtype":
        return _dtype(int(a.value))
    if a.kind == "ignore":
        return None
    raise CannotRun("an argument of an unsupported kind")


def run_node(node: Node, env: dict[str, torch.Tensor], graph: Graph | None = None,
             budget: Budget | None = None, smooth: float | None = None,
             relax: dict[str, torch.Tensor] | None = None) -> None:
    """Evaluate one node into env (float dtypes become float64), after checking the sizes of its
    outputs against the budget. smooth: run kinked activations as their stand-ins rounded at
    scale 1 / smooth (graph/ops/smooth.py; for steering a search, never for a value reported).
    relax: run the activation nodes it names as `slope * input` (graph/relax.py)."""
    fn = resolve(node, graph)
    if relax is not None and node.name in relax:
        fn = partial(_times, relax[node.name])
    elif smooth is not None:
        entry = ops.lookup(node.op, node.overload)
        rounded = smoothed(entry.runs_as) if entry is not None else None
        if rounded is not None:
            fn = partial(rounded, smooth)
    train = node.arg("training") or node.arg("train")
    if train is not None and train.kind == "bool" and train.value:
        raise CannotRun("training-mode op")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for (name, a), pos in zip(node.args, node.positional, strict=True):
        v = _value(a, env)
        if pos and not kwargs:
            args.append(v)
        else:
            kwargs[name] = v
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for v in args for t in (v if isinstance(v, list) else [v]))
    shapes_only = stand_in(node) if on_meta or budget is not None else None
    if on_meta and shapes_only is not None:
        fn = shapes_only
    if budget is not None:
        for name, size in _output_bytes(node, graph, shapes_only or fn, args, kwargs):
            budget.check(name, size, _flag(node, "made"))
    try:
        if _flag(node, "identity") and args:
            out = args[0].view_as(args[0])
        elif node.op.rstrip("_") == "copy" and len(args) >= 2:
            # aten.copy has neither forward- nor reverse-mode derivatives; this is the same value
            out = args[1].to(args[0].dtype).expand_as(args[0]).clone()
        else:
            out = fn(*args, **kwargs)
    except Exception as e:  # a graph whose values do not fit its ops
        raise CannotRun(f"{node.target}: {type(e).__name__}: {clean_message(e, 100)}") from None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    names = node.outputs
    if len(outs) < len([n for n in names if n is not None]):
        raise CannotRun(f"{node.target}: fewer outputs than the graph names")
    for n, v in zip(names, outs, strict=False):
        if n is None or not isinstance(v, torch.Tensor):
            continue
        if _flag(node, "uninitialised"):
            v = torch.zeros_like(v)
        if v.is_floating_point() and v.dtype != torch.float64:
            v = v.to(torch.float64)
        env[n] = v


def stand_in(node: Node) -> Callable[..., Any] | None:
    """The rule's shapes-only stand-in for torch's meta kernel (graph/ops/meta.py), called as
    fn(op, arguments by schema name, defaults filled in)."""
    entry = ops.lookup(node.op, node.overload) if node.namespace == "aten" else None
    fn = entry.spec.extra.get("meta") if entry is not None else None
    if not callable(fn):
        return None
    try:
        schema = getattr(getattr(torch.ops.aten, node.op), node.overload)._schema
    except (AttributeError, RuntimeError):
        return None
    return partial(_by_name, fn, node.op, schema)


def _by_name(fn: Callable[[str, dict[str, Any]], Any], op: str, schema: Any, *args: Any, **kwargs: Any) -> Any:
    params = schema.arguments
    if len(args) > len(params):
        raise TypeError(f"{op}: too many arguments")
    named = {p.name: v for p, v in zip(params, args, strict=False)}
    named.update(kwargs)
    for p in params:
        if p.name not in named and p.has_default_value():
            named[p.name] = p.default_value
    return fn(op, named)


def _times(slope: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    x = args[0] if args else next(iter(kwargs.values()))
    out: torch.Tensor = slope * x
    return out


class Evaluator:
    """Values of the graph's constant tensors (parameters, buffers, lifted constants, and nodes
    computed from them only), on demand and memoised."""

    def __init__(self, graph: Graph, load: Callable[[str], torch.Tensor], limits: Limits | None = None) -> None:
        self.graph = graph
        self.load = load
        self.budget = Budget(limits)
        self.env: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}

    def value(self, name: str) -> torch.Tensor | None:
        if name in self.env:
            return self.env[name]
        if name in self.failed:
            return None
        try:
            if name in self.graph.params or name in self.graph.constants:
                t = self.load(name)
                self.env[name] = t.to(torch.float64) if t.is_floating_point() else t
                return self.env[name]
            node = self.graph.producer.get(name)
            if node is None:
                raise CannotRun("not a constant")
            for dep in node.tensor_inputs():
                if self.value(dep) is None:
                    raise CannotRun(f"input {dep} has no value")
            run_node(node, self.env, self.graph, self.budget)
        except CannotRun as e:
            self.failed[name] = str(e)
            return None
        return self.env.get(name)


def check_shapes(graph: Graph, meta: Callable[[str], torch.Tensor],
                 limits: Limits | None = None) -> tuple[list[str], list[str]]:
    """Run the graph on meta tensors (shapes only, no data) and compare every tensor's shape with the
    one the archive declares: the size-aware rules trust those. Returns (mismatched, unverified) names.
    A declared input, or a node's output, over the budget is a resource limit (exit 5)."""
    env: dict[str, torch.Tensor] = {}
    budget = Budget(limits)
    for name in list(graph.params) + list(graph.constants):
        env[name] = meta(name)
    for name in graph.inputs:
        shape = graph.shapes.get(name) or graph.hints.get(name)
        if shape is None:
            continue
        budget.check(name, math.prod(shape) * _ITEM, False)
        try:
            env[name] = torch.empty(shape, dtype=_dtype(graph.dtypes.get(name, 7)), device="meta")
        except CannotRun:
            continue
    mismatched: list[str] = []
    unverified: list[str] = []
    for node in graph.nodes:
        outs = [o for o in node.outputs if o is not None]
        if not outs:
            continue
        try:
            run_node(node, env, graph, budget)
        except CannotRun:
            unverified.append(node.name)
            continue
        for o in outs:
            if o in env and not env[o].is_meta:  # factories make cpu tensors; keep everything shapes-only
                env[o] = env[o].to("meta")
            if o not in graph.consumers and o not in graph.outputs:
                continue  # unused outputs (batch norm's saved statistics) are declared loosely
            declared = graph.shapes.get(o) or graph.hints.get(o)
            got = env.get(o)
            if got is None:
                continue
            if declared is not None and tuple(got.shape) != declared:
                mismatched.append(o)
    return mismatched, unverified


def network_function(graph: Graph, consts: Evaluator,
                     limits: Limits | None = None) -> Callable[..., torch.Tensor]:
    """f(inputs, smooth=None, relax=None) = all float outputs, flattened and concatenated (smooth,
    relax: see run_node). Every node must be runnable, and a
    pass over the graph within the budget (checked on shapes before anything is allocated)."""
    for n in graph.nodes:
        if n.outputs and any(o is not None for o in n.outputs):
            resolve(n, graph)
    budget = Budget(limits)
    shapes: dict[str, torch.Tensor] = {}
    for name in list(graph.params) + list(graph.constants):
        v = consts.value(name)
        if v is not None:
            shapes[name] = v.to("meta")
    for name in graph.inputs:
        shape = graph.shapes.get(name) or graph.hints.get(name)
        if shape is not None:
            budget.check(name, math.prod(shape) * _ITEM, False)
            shapes[name] = torch.empty(shape, dtype=torch.float64, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in graph.nodes:
            if any(o is not None for o in n.outputs):
                try:
                    run_node(n, shapes, graph, budget)
                except CannotRun:  # no shapes-only kernel: the declared sizes are checked instead
                    for o in n.outputs:
                        size = _declared_bytes(graph, o) if o is not None else None
                        if size is not None:
                            budget.check(o or "", size, False)
                    continue
                for o in n.outputs:
                    if o is not None and o in shapes and not shapes[o].is_meta:
                        shapes[o] = shapes[o].to("meta")

    def f(inputs: list[torch.Tensor], smooth: float | None = None,
          relax: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        for name in list(graph.params) + list(graph.constants):
            v = consts.value(name)
            if v is not None:
                env[name] = v
        for name, x in zip(graph.inputs, inputs, strict=True):
            env[name] = x
        for n in graph.nodes:
            if any(o is not None for o in n.outputs):
                run_node(n, env, graph, smooth=smooth, relax=relax)
        outs = [env[o].reshape(-1) for o in graph.outputs if o in env and env[o].is_floating_point()]
        if not outs:
            raise CannotRun("the graph has no float output")
        return torch.cat(outs)

    return f
