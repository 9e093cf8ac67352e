"""The graph strategy: the network bound over a torch.export graph's real wiring.

The graph is a bound strategy over the audit's layers, not a second engine. The walk is run
twice: first with a recording `norm`, which lists every linear operator the bound needs (each
layer's weight as the graph uses it, with its true groups and stride; BatchNorm-folded and merged
kernels), then, once the audit has measured each distinct operator in its pool with the layer
kinds (under the same --method, --rtol, --groups, --layer-time-budget and --device), with a `norm`
that looks the measurements up. A layer of the table whose weight the graph uses as one operator
is reported from that operator's measurement, so no weight is measured twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from lipaudit.bound import Bound, Operator
from lipaudit.findings import finding
from lipaudit.report import Finding, Layer, Network
from lipaudit.spectral import Interval

if TYPE_CHECKING:
    from lipaudit.checkpoint.pt2 import Pt2Archive
    from lipaudit.graph import GraphBound, GraphSettings, Loaded
    from lipaudit.graph.bound import LinearOp, Result
    from lipaudit.kinds import Plan
    from lipaudit.kinds.base import LayerKind, Measured
    from lipaudit.settings import Settings

# The interval a recording walk hands back: the walk only lists operators, its numbers are dropped.
_PLACEHOLDER = Interval(1.0, 1.0, "planned", "planned", True)


def op_key(op: LinearOp) -> tuple[Any, ...]:
    """One operator, whatever walk asked for it: its kind, geometry and the bytes of its kernel."""
    return (op.kind, tuple(op.weight.shape), op.stride, op.dilation, op.groups, op.transposed, op.digest())


def _kind_for(op: LinearOp) -> LayerKind:
    from lipaudit.kinds import KINDS
    from lipaudit.kinds.conv import Conv
    from lipaudit.kinds.dense import Dense

    if op.kind == "dense":
        return next(k for k in KINDS if type(k) is Dense)
    d = op.weight.ndim - 2
    return next(k for k in KINDS if isinstance(k, Conv) and k.dims == d)


def _kernel(op: LinearOp) -> torch.Tensor:
    """The operator as a layer kind measures it: a strided conv as its stride-1 polyphase kernel
    (same norm on the infinite grid), a dense map as its matrix."""
    from lipaudit.graph.rules import polyphase

    if op.kind == "dense":
        return op.weight
    return polyphase(op.weight, op.stride, op.dilation) if any(s != 1 for s in op.stride) else op.weight


def _describe(op: LinearOp) -> str:
    parts = []
    if op.kind == "conv":
        if any(s != 1 for s in op.stride):
            parts.append(f"stride {'x'.join(map(str, op.stride))} (measured as its polyphase kernel)")
        parts.append(f"groups {op.groups}")
        if op.transposed:
            parts.append("transposed")
    return ", ".join(parts)


@dataclass
class _Planned:
    """The operators of one graph, in the order the walk asks for them."""

    keys: list[tuple[Any, ...]] = field(default_factory=list)  # one per norm call, in call order
    ops: dict[tuple[Any, ...], LinearOp] = field(default_factory=dict)  # distinct operators


class GraphStrategy:
    """Bound the network of an archive (`arch`, already open, or `archive`, a path); with `keys` and
    `load`, on a state dict's own weights matched to the graph by name (--graph, --model)."""

    name = "graph"

    def __init__(self, archive: str | None = None, keys: list[str] | None = None,
                 load: Callable[[str], torch.Tensor] | None = None, shown: str = "",
                 measure: bool = True, measure_work: int = 200, arch: Pt2Archive | None = None,
                 source: dict[str, Any] | None = None) -> None:
        self.archive = archive
        self.arch = arch
        self.keys = keys
        self.load = load
        self.shown = shown or archive or (arch.shown if arch is not None else "")
        self.measure = measure
        self.measure_work = measure_work
        self.source = source or {}  # where the graph came from (--model), for the report
        self.result: GraphBound | None = None
        self._loaded: Loaded | None = None
        self._unverified: list[str] | None = None
        self._blocks: dict[Any, Any] = {}  # the blocks both walks bound, found once
        self._planned: _Planned | None = None
        self._measured: dict[tuple[Any, ...], Interval] = {}
        self._vkey: dict[tuple[Any, ...], str] = {}
        self._findings: list[Finding] = []

    # -- the graph, opened once -------------------------------------------------------------
    def graph_settings(self, settings: Settings) -> GraphSettings:
        from lipaudit.graph import GraphSettings

        return GraphSettings.from_settings(settings, measure=self.measure, measure_work=self.measure_work)

    def loaded(self, settings: Settings) -> Loaded:
        from lipaudit.checkpoint.pt2 import open_pt2
        from lipaudit.graph import graph_of, on_state_dict

        if self._loaded is None:
            arch = self.arch if self.arch is not None else open_pt2(str(self.archive), settings.limits)
            loaded = graph_of(arch, settings.limits)
            if self.keys is not None and self.load is not None:
                loaded = on_state_dict(loaded, self.keys, self.load, self.shown)
            self._loaded = loaded
        return self._loaded

    # -- walk 1: list the operators ---------------------------------------------------------
    def plan(self, settings: Settings) -> _Planned:
        from lipaudit.graph import bound_loaded, verify_shapes

        if self._planned is not None:
            return self._planned
        loaded = self.loaded(settings)
        self._unverified = verify_shapes(loaded)
        planned = _Planned()

        def record(op: LinearOp) -> Interval:
            key = op_key(op)
            planned.keys.append(key)
            planned.ops.setdefault(key, op)
            return _PLACEHOLDER

        bound_loaded(loaded, self.graph_settings(settings), norm=record, unverified=self._unverified,
                     blocks=self._blocks)
        self._planned = planned
        return planned

    def operators(self, plan: Plan, settings: Settings) -> list[Operator]:
        """Every distinct operator of the graph, as a layer the kinds measure. An operator that is
        one table layer's own weight (first use, same shape, no parametrization) reports that layer."""
        from lipaudit.kinds.base import LayerSpec

        planned = self.plan(settings)
        loaded = self.loaded(settings)
        by_tensor = {s.tensor: s for s in plan.layers if s.parametrization is None}
        to_key = loaded.keys or {}
        taken: set[str] = set()
        out: list[Operator] = []
        for i, (key, op) in enumerate(planned.ops.items()):
            weight = _kernel(op)
            vkey = f"graph-operator-{i}"
            self._vkey[key] = vkey
            kind = _kind_for(op)
            table: str | None = None
            if len(op.params) == 1:
                sd_key = to_key.get(op.params[0], op.params[0])
                spec = by_tensor.get(sd_key)
                if (spec is not None and sd_key not in taken and tuple(spec.shape) == tuple(op.weight.shape)
                        and type(spec.kind) is type(kind)):
                    table = sd_key
                    taken.add(sd_key)
            what = "+".join(op.params) or "a computed weight"
            notes = (f"as the graph uses it: {_describe(op)}",) if _describe(op) else ()
            vspec = LayerSpec(tensor=vkey, module=vkey, kind=kind, shape=tuple(weight.shape), dtype="float64",
                              uses=(vkey,), notes=notes, name=what)
            groups = ((vkey, op.groups),) if op.kind == "conv" else ()
            # the graph knows the grouping: it wins over a pattern the user gave for the table
            vsettings = replace(settings, groups=groups + settings.groups, input_sizes=(),
                                heatmaps=0)

            def load(_: str, w: torch.Tensor = weight) -> torch.Tensor:
                return w

            out.append(Operator(vspec, load, vsettings, table))
        return out

    def use(self, measured: dict[str, Measured], tables: frozenset[str] = frozenset()) -> None:
        """The pool's measurements, by operator key; what measuring an operator that is not a table
        layer found (a budget hit) is reported by the bound."""
        for key, vkey in self._vkey.items():
            m = measured.get(vkey)
            if m is None:
                continue
            if vkey not in tables:
                op = self._planned.ops[key] if self._planned is not None else None
                what = "+".join(op.params) if op is not None and op.params else vkey
                self._findings.extend(replace(f, tensor=None, message=f"graph operator {what}: {f.message}")
                                      for f in m.findings if f.code == "LIP015")
            if m.sigma.upper is None or m.sigma.lower is None:
                continue
            s = m.sigma
            self._measured[key] = Interval(s.lower, s.upper, s.lower_method or s.method,  # type: ignore[arg-type]
                                           s.upper_method or s.method, s.certified)

    # -- walk 2: the bound ------------------------------------------------------------------
    def walk(self, settings: Settings, factors: dict[str, float] | None = None) -> Result:
        """The bound from the measured operators; `factors` scale named graph parameters (normalize
        plans with them: the operators stay the same, their norms scale)."""
        from lipaudit.graph import bound_loaded
        from lipaudit.graph.bound import Uncovered

        planned = self.plan(settings)
        calls = iter(planned.keys)
        measured = self._measured
        if not measured and planned.ops:
            # called without the audit's pool (a unit test, a library caller): measure here, serially
            from lipaudit.kinds import Plan
            from lipaudit.kinds.base import Context

            self.use({op.spec.tensor: op.spec.kind.measure(op.spec, Context(op.load, op.settings))
                      for op in self.operators(Plan(), settings)})

        def lookup(op: LinearOp) -> Interval:
            want = next(calls, None)
            key = op_key(op)
            if want != key:
                raise AssertionError("the graph walk asked for a different operator than it planned")
            iv = measured.get(key)
            if iv is None:
                raise Uncovered("the operator's norm could not be measured")
            return iv

        return bound_loaded(self.loaded(settings), self.graph_settings(settings), factors, {}, norm=lookup,
                            unverified=self._unverified, blocks=self._blocks)

    def run(self, settings: Settings) -> GraphBound:
        from lipaudit.graph import measured_ends, summarise

        res = self.walk(settings)
        loaded, gs = self.loaded(settings), self.graph_settings(settings)
        return summarise(res, *measured_ends(loaded, gs, res))

    def key_of(self, param: str) -> str:
        """The checkpoint key of a graph parameter (the same name in a .pt2; matched for --graph/--model)."""
        keys = self._loaded.keys if self._loaded is not None else None
        return (keys or {}).get(param, param)

    def with_weights(self, values: dict[str, torch.Tensor], settings: Settings) -> GraphStrategy:
        """The same graph with some checkpoint tensors replaced (what normalize is about to write)."""
        from lipaudit.graph import Loaded

        loaded = self.loaded(settings)
        by_name = {name: values[self.key_of(fqn)] for name, fqn in loaded.graph.params.items()
                   if self.key_of(fqn) in values}

        def load(name: str) -> torch.Tensor:
            return by_name[name] if name in by_name else loaded.load(name)

        other = GraphStrategy(self.archive, shown=self.shown, measure=False, arch=loaded.archive, source=self.source)
        other._loaded = Loaded(loaded.archive, loaded.graph, load, loaded.keys, loaded.limits)
        return other

    def bound(self, layers: list[Layer], plan: Plan, settings: Settings) -> Bound:
        g = self.result = self.run(settings)
        why: list[str] = []
        findings: list[Finding] = list(self._findings)
        if g.uncovered:
            why.append(f"{len(g.uncovered)} graph nodes have no global Lipschitz bound")
            for node, reason in g.uncovered[:20]:
                findings.append(finding("LIP016", node, f"graph node not covered: {reason}"))
        elif not g.certified:
            why.append("a factor is an estimate")
            findings.append(finding("LIP009", None, "some factors of the graph bound are estimates, not proofs"))
        counted = len(g.layers)
        details = g.to_dict()
        if self.source:
            details["source"] = self.source
        if g.log10_upper is not None and g.chain_log10 is not None:
            diff = g.log10_upper - g.chain_log10
            details["summary"] = (
                f"graph bound {'below' if diff < 0 else 'above'} the chain product by {abs(diff):.2f} decades"
                if math.isfinite(diff) else "")
        details["operators_measured"] = len(self._vkey)
        network = Network(
            log10_upper=g.log10_upper, certified=g.certified and not why, layers_counted=counted,
            layers_not_covered=0, assumptions=g.assumptions, method=self.name,
            lipschitz_lower=g.lipschitz_lower, not_certified_because=tuple(why), uncovered=g.uncovered,
            details=details,
        )
        return Bound(network, tuple(findings))
