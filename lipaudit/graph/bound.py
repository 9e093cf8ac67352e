"""The network bound over the exported DAG: each tensor's Lipschitz constant as a function of the input.

Bounds are kept in log10, per source: the network input, and the output of each uncovered node
(treated as a free variable, so the covered parts downstream of it still get a bound). Sums add,
concatenations add in quadrature, linear maps multiply by their certified norm. A conv or linear
whose output feeds only a BatchNorm is folded into it, and consecutive dense maps are multiplied
out, so one norm of the combined operator replaces a product of norms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lipaudit.graph import ops, rules, tighten
from lipaudit.graph.interpret import Evaluator
from lipaudit.graph.model import FLOAT_CODES, Graph, Node
from lipaudit.graph.ops import Constant, Diagonal, Effect, Linear, LinearOp, Uncovered
from lipaudit.graph.ops.base import weight_digest
from lipaudit.graph.ops.registry import inplace_hazard
from lipaudit.settings import BLOCK_WORK
from lipaudit.spectral import Interval

__all__ = ["INPUT", "LinearOp", "Result", "Uncovered", "bound_graph"]

INPUT = "input"
Lip = dict[str, float]  # source -> log10 of the Lipschitz constant


def log_sum(xs: list[float]) -> float:
    xs = [x for x in xs if x != -math.inf]
    if not xs:
        return -math.inf
    top = max(xs)
    if top == math.inf:
        return math.inf
    return top + math.log10(math.fsum(10.0 ** (x - top) for x in xs))


def log_rss(xs: list[float]) -> float:
    """log10 sqrt(sum 10^(2x))."""
    return 0.5 * log_sum([2 * x for x in xs])


def _lg(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def scaled(a: Lip, g: float) -> Lip:
    return {k: v + g for k, v in a.items()}


def combine(terms: list[Lip], quadrature: bool) -> Lip:
    keys: dict[str, list[float]] = {}
    for t in terms:
        for k, v in t.items():
            keys.setdefault(k, []).append(v)
    return {k: (log_rss(v) if quadrature else log_sum(v)) for k, v in keys.items()}


@dataclass
class LayerNorm:
    """One weight layer's own norm and, when folded or merged, the combined operator's norm."""

    node: str
    op: str
    params: tuple[str, ...]
    interval: Interval
    fused_with: tuple[str, ...] = ()
    fused: Interval | None = None


@dataclass
class NodeInfo:
    node: str
    op: str
    gain: float | None  # log10 of the local factor when it is one number
    bound: float | None  # log10 w.r.t. the network input (None: not a function of the input alone)
    note: str = ""


@dataclass
class Result:
    lips: dict[str, Lip]
    layers: list[LayerNorm]
    nodes: list[NodeInfo]
    uncovered: list[tuple[str, str]]
    assumptions: list[str]
    outputs: Lip
    chain_log10: float | None
    path: list[str]
    certified_norms: bool
    seconds: float
    partial: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)


class Bounder:
    def __init__(self, graph: Graph, consts: Evaluator, rtol: float, conv_rtol: float, seed: int,
                 norm: Callable[[LinearOp], Interval] | None = None) -> None:
        self.g = graph
        self.norm = norm
        self.consts = consts
        self.rtol = rtol
        self.conv_rtol = conv_rtol
        self.seed = seed
        self.lips: dict[str, Lip] = {}
        self.ops: dict[str, LinearOp] = {}
        self.layers: list[LayerNorm] = []
        self.nodes: list[NodeInfo] = []
        self.uncovered: list[tuple[str, str]] = []
        self.assumptions: list[str] = []
        self.parent: dict[str, str | None] = {}  # dominant predecessor w.r.t. the input
        self.certified = True
        self.chain: list[float] = []
        self.norms: dict[tuple[Any, ...], Interval] = {}
        self.factors: dict[str, float] = {}  # state-dict name -> planned rescaling of that weight
        self.hooks: dict[str, list[tighten.Block]] = {}  # exit tensor -> blocks bounded as a whole
        self.blocks: list[dict[str, Any]] = []
        self.apply_blocks = True

    # -- helpers -----------------------------------------------------------------------
    def lip(self, name: str) -> Lip:
        return self.lips.get(name, {})

    def is_const(self, name: str) -> bool:
        return not self.lip(name) or all(v == -math.inf for v in self.lip(name).values())

    def dims(self, name: str) -> tuple[int | str, ...]:
        """Sizes, symbolic ones as their expression."""
        s = self.g.dims.get(name)
        if s is None:
            raise Uncovered(f"the shape of {name} is not known")
        return s

    def fixed(self, name: str, axes: list[int]) -> list[int]:
        d = self.dims(name)
        out = []
        for a in axes:
            v = d[a]
            if not isinstance(v, int):
                raise Uncovered(f"a size of {name} the bound depends on is dynamic")
            out.append(v)
        return out

    def ratio(self, src: str, out: str) -> float:
        """log10 sqrt(copies per element) when src is broadcast to out's shape."""
        a, b = list(self.dims(src)), list(self.dims(out))
        for d in [x for x in a if isinstance(x, str)]:
            if d not in b:
                raise Uncovered(f"broadcast of {src} over a dynamic size")
            b.remove(d)
            a.remove(d)
        if any(isinstance(x, str) for x in b):
            raise Uncovered(f"broadcast of {src} over a dynamic size")
        na = math.prod(int(x) for x in a)
        nb = math.prod(int(x) for x in b)
        if na == 0 or nb <= na:
            return 0.0
        return 0.5 * math.log10(nb / na)

    def value(self, name: str) -> torch.Tensor:
        v = self.consts.value(name)
        if v is None:
            raise Uncovered(f"constant operand {name} could not be evaluated")
        return v

    def param_of(self, name: str) -> tuple[str, ...]:
        """The state-dict name behind a weight operand, through views such as permute and t."""
        for _ in range(8):
            if name in self.g.params:
                return (self.g.params[name],)
            node = self.g.producer.get(name)
            entry = ops.lookup(node.op, node.overload) if node is not None else None
            if node is None or entry is None or not entry.spec.alias or len(node.tensor_inputs()) != 1:
                return ()
            name = node.tensor_inputs()[0]
        return ()

    def single_consumer(self, name: str) -> bool:
        return len(self.g.consumers.get(name, [])) == 1 and name not in self.g.outputs

    def mark(self, out: str, src: str) -> None:
        self.parent[out] = src

    # -- norms ------------------------------------------------------------------------
    def op_norm(self, op: LinearOp) -> Interval:
        # known by its content as well as its names: a merged operator may carry the same names as one of
        # its parts (a weight computed from a parameter has none), and a temporary's address can be reused
        ident: Any = (op.params, op.digest())
        key = (op.kind, ident, tuple(op.weight.shape), op.stride, op.dilation, op.groups, op.axis, op.transposed,
               op.tag)
        iv = self.norms.get(key)
        if iv is None:
            if not bool(torch.isfinite(op.weight).all()):
                raise Uncovered("weights hold NaN or Inf")
            if self.norm is not None:
                iv = self.norm(op)
            elif op.kind == "dense":
                iv = rules.dense_norm(op.weight, self.rtol, self.seed)
            else:
                iv = rules.conv_norm(op.weight, op.stride, op.dilation, op.groups, self.conv_rtol)
            self.norms[key] = iv
        if not iv.certified:
            self.certified = False
        f = math.prod(self.factors.get(p, 1.0) for p in op.params)
        if f != 1.0:
            iv = Interval(iv.lower * f, iv.upper * f * (1 + 1e-12), iv.lower_method, iv.upper_method, iv.certified)
        return iv

    def apply_linear(self, node: Node, op: LinearOp, out: str, kind: str) -> None:
        own = self.op_norm(op)
        best = scaled(self.lip(op.src), _lg(own.upper))
        self.chain.append(_lg(own.upper))
        rec = LayerNorm(node.name, kind, op.params, own)
        fused = self.fuse(op)
        if fused is not None:
            f_iv = self.op_norm(fused)
            alt = scaled(self.lip(fused.src), _lg(f_iv.upper))
            rec.fused, rec.fused_with = f_iv, fused.params
            best = {k: min(v, alt.get(k, math.inf)) for k, v in best.items()} | {
                k: v for k, v in alt.items() if k not in best}
            self.ops[out] = fused
            self.mark(out, fused.src)
        else:
            self.ops[out] = op
            self.mark(out, op.src)
        self.layers.append(rec)
        self.lips[out] = best
        self.info(node, _lg(own.upper), out)

    def fuse(self, op: LinearOp) -> LinearOp | None:
        """op after the linear map that produced its input, when that map feeds only op."""
        prev = self.ops.get(op.src)
        if prev is None or not self.single_consumer(op.src):
            return None
        if op.kind == "dense" and prev.kind == "dense" and op.axis == prev.axis:
            if op.weight.shape[1] != prev.weight.shape[0]:
                return None
            w = op.weight @ prev.weight
            return LinearOp("dense", w, prev.src, prev.params + op.params, op.axis)
        return None

    def fold_bn(self, node: Node, x: str, scale: torch.Tensor, out: str, params: tuple[str, ...]) -> None:
        """BatchNorm as a diagonal map, folded into the conv or linear before it when possible."""
        own = float(scale.abs().max()) if scale.numel() else 0.0
        self.chain.append(_lg(own))
        best = scaled(self.lip(x), _lg(own))
        self.mark(out, x)
        prev = self.ops.get(x)
        rec = LayerNorm(node.name, "batchnorm", params, Interval(own, own, "diag", "diag", True))
        if prev is not None and self.single_consumer(x):
            folded = None
            if prev.kind == "conv" and prev.weight.shape[0 if not prev.transposed else 1] * (
                    prev.groups if prev.transposed else 1) == scale.numel():
                w = prev.weight.clone()
                if prev.transposed:
                    g = prev.groups
                    w = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
                    w = w * scale.reshape(g, 1, -1, *([1] * (w.ndim - 3)))
                    w = w.reshape(prev.weight.shape)
                else:
                    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
                folded = LinearOp("conv", w, prev.src, prev.params + params, stride=prev.stride,
                                  dilation=prev.dilation, groups=prev.groups, transposed=prev.transposed)
            elif (prev.kind == "dense" and prev.axis == -1 and len(self.dims(x)) == 2
                  and prev.weight.shape[0] == scale.numel()):
                folded = LinearOp("dense", prev.weight * scale.reshape(-1, 1), prev.src, prev.params + params)
            if folded is not None:
                f_iv = self.op_norm(folded)
                alt = scaled(self.lip(folded.src), _lg(f_iv.upper))
                rec.fused, rec.fused_with = f_iv, folded.params
                best = {k: min(v, alt.get(k, math.inf)) for k, v in best.items()} | {
                    k: v for k, v in alt.items() if k not in best}
                self.ops[out] = folded
                self.mark(out, folded.src)
        self.layers.append(rec)
        self.lips[out] = best
        self.info(node, _lg(own), out)

    def info(self, node: Node, gain: float | None, out: str, note: str = "") -> None:
        b = self.lip(out).get(INPUT)
        self.nodes.append(NodeInfo(node.name, node.op or node.target, gain, b, note))

    def unary(self, node: Node, x: str, gain: float, out: str | None = None, note: str = "") -> None:
        out = out or node.outputs[0] or node.name
        self.lips[out] = scaled(self.lip(x), gain)
        self.mark(out, x)
        self.info(node, gain, out, note)

    # -- the walk ---------------------------------------------------------------------
    def run(self) -> None:
        for name in self.g.inputs:
            self.lips[name] = {INPUT: 0.0}
        for node in self.g.nodes:
            outs = [o for o in node.outputs if o is not None]
            if not outs:
                continue
            deps = [t for t in node.tensor_inputs() if not self.is_const(t)]
            if not deps:
                for o in outs:
                    self.lips[o] = {}
                continue
            try:
                self.visit(node, outs)
            except Uncovered as e:
                self.uncover(node, outs, e.reason)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
                # arguments of a shape no rule expects: left out, never guessed
                self.uncover(node, outs, f"arguments could not be analysed ({type(e).__name__})")
            # after the node's own rule, whatever it found, so a planned walk asks for the same operators
            for o in outs:
                for blk in self.hooks.get(o, []):
                    self.tighten_at(node, blk)

    def lin_norm(self, w: tighten.Lin) -> Interval:
        """A block's composite map's norm, uncached here (its kernel has no parameter name; the tag
        is its bytes' digest for callers that cache)."""
        d = w.d
        if not bool(torch.isfinite(w.kernel).all()):
            raise ValueError("weights hold NaN or Inf")
        digest = weight_digest(w.kernel)
        op = LinearOp("dense" if d == 0 else "conv", w.kernel, "", (), stride=w.stride, dilation=(1,) * d,
                      tag="block:" + digest[:32])
        op.known_digest = digest
        if self.norm is not None:
            return self.norm(op)
        if d == 0:
            return rules.dense_norm(w.kernel, self.rtol, self.seed)
        return rules.conv_norm(w.kernel, w.stride, (1,) * d, 1, self.conv_rtol)

    def tighten_at(self, node: Node, block: tighten.Block) -> None:
        """The exit's bound becomes the entry's times the block's, where that is lower. Measured
        here, after the nodes' own operators, so those keep their names in a planned walk."""
        blk, ok = tighten.evaluate(block, self.lin_norm)
        if blk is None or not self.apply_blocks:
            return
        here, entry = self.lip(blk.exit), self.lip(blk.entry)
        g = _lg(blk.upper)
        before = here.get(INPUT)
        lowered = {k: min(here.get(k, math.inf), v + g) for k, v in entry.items()}
        self.lips[blk.exit] = {k: v for k, v in here.items() if k not in lowered} | lowered
        after = self.lips[blk.exit].get(INPUT)
        used = before is not None and after is not None and after < before
        if used and not ok:
            self.certified = False
        if used:
            self.mark(blk.exit, blk.entry)
            for info in reversed(self.nodes):
                if info.node == node.name:
                    info.bound = after
                    info.note = (info.note + "; " if info.note else "") + f"block bound: {blk.rule}"
                    break
        e = entry.get(INPUT)
        self.blocks.append(blk.to_dict() | {
            "log10_before": None if before is None or e is None else before - e,
            "log10_upper": g, "used": used,
        })

    def uncover(self, node: Node, outs: list[str], reason: str) -> None:
        self.uncovered.append((node.name, reason))
        ins = [self.lip(t) for t in node.tensor_inputs()]
        here = combine(ins, quadrature=False) if ins else {}
        self.nodes.append(NodeInfo(node.name, node.op or node.target, None, None, reason))
        self.partial_in[node.name] = here
        for o in outs:
            self.lips[o] = {node.name: 0.0}
            self.parent[o] = None

    partial_in: dict[str, Lip]

    def visit(self, node: Node, outs: list[str]) -> None:
        """One node through its registered rule."""
        if node.namespace != "aten":
            if node.target == "_operator.getitem":
                src = node.tensor_inputs()
                if len(src) == 1:
                    self.unary(node, src[0], 0.0)
                    return
            raise Uncovered(f"{node.target} has no Lipschitz rule")
        entry = ops.lookup(node.op, node.overload)
        if entry is None:
            raise Uncovered(f"aten.{node.op} has no Lipschitz rule")
        if entry.inplace_of is not None:
            why = inplace_hazard(self.g, node)
            if why:
                raise Uncovered(why)
        effect = entry.spec.rule(self, node)
        if not isinstance(effect, Constant):
            dtype = node.arg("dtype")
            if dtype is not None and dtype.kind == "dtype" and int(dtype.value) not in FLOAT_CODES:
                raise Uncovered("conversion of input-dependent values to a non-float type")
        self.apply(node, outs, effect)

    def apply(self, node: Node, outs: list[str], effect: Effect) -> None:
        if isinstance(effect, Constant):
            for o in outs:
                self.lips[o] = {}
            return
        if isinstance(effect, Linear):
            self.apply_linear(node, effect.op, outs[0], effect.kind)
            self._free(node, outs[1:])
            return
        if isinstance(effect, Diagonal):
            self.fold_bn(node, effect.x, effect.scale, outs[0], effect.params)
            self._free(node, outs[1:])
            return
        lip = combine([scaled(self.lip(t), g) for t, g in effect.terms], quadrature=effect.quadrature)
        targets = outs[:1] if effect.first_only else outs
        for o in targets:
            self.lips[o] = dict(lip)
        self._free(node, outs[len(targets):])
        best, src = -math.inf, None
        for t, g in effect.terms:
            v = self.lip(t).get(INPUT, -math.inf) + g
            if src is None or v > best:
                best, src = v, t
        for o in targets:
            self.parent[o] = src
        gain = effect.terms[0][1] if len(effect.terms) == 1 else None
        self.info(node, gain, outs[0], effect.note)

    def _free(self, node: Node, outs: list[str]) -> None:
        """Outputs that are not values of a covered map (indices, saved statistics): free variables,
        never taken for constants."""
        for o in outs:
            self.lips[o] = {f"{node.name}:{o}": 0.0}
            self.parent[o] = None


def _layer_work(graph: Graph) -> float:
    """The unit of the block budget: the work of the graph's weights as layers (pool.shape_cost), and
    at least that of five 512x512x3x3 convolutions, so that a network of cheap (depthwise) layers
    still affords the composites of its blocks."""
    from lipaudit.pool import shape_cost

    shapes = [graph.shapes.get(t) for t in graph.params]
    own = math.fsum(shape_cost(s) for s in shapes if s is not None and len(s) >= 2)
    return max(own, 5 * shape_cost((512, 512, 3, 3)))


def bound_graph(graph: Graph, consts: Evaluator, rtol: float, conv_rtol: float, seed: int,
                factors: dict[str, float] | None = None,
                norms: dict[tuple[Any, ...], Interval] | None = None,
                norm: Callable[[LinearOp], Interval] | None = None, blocks: bool = True,
                block_work: float = BLOCK_WORK, found: dict[Any, Any] | None = None) -> Result:
    """The bound; factors rescale named weights (as normalize plans to), norms caches operator norms.

    `norm` measures one linear operator (a layer's weight, a BatchNorm-folded or merged kernel); by
    default it is computed here. The set of operators the walk asks for does not depend on the values
    returned, so a first walk with a recording `norm` lists every operator to measure up front.
    `blocks` bounds blocks as a whole where that is tighter (lipaudit/graph/tighten.py), cheapest first
    while their work stays within `block_work` times the layers' own (from shapes alone). `found`, when
    given, keeps the blocks and that choice for the next walk over the same graph and weights."""
    t0 = time.perf_counter()
    b = Bounder(graph, consts, rtol, conv_rtol, seed, norm)
    if factors:
        b.factors = factors
    if norms is not None:
        b.norms = norms
    b.partial_in = {}
    # planned rescalings change the kernels the blocks were composed from: their bounds are then not
    # used, but still asked for, so a planned walk sees the same operators with and without factors
    b.apply_blocks = not factors
    if blocks:
        cache = found if found is not None else {}
        if block_work not in cache:
            every = tighten.blocks(graph, consts.value)
            cache[block_work] = tighten.within(every, block_work * _layer_work(graph))
        kept, left = cache[block_work]
        for blk in kept:
            b.hooks.setdefault(blk.exit, []).append(blk)
        b.blocks.extend(tighten.skipped(blk, "over the block work budget (--block-work)") for blk in left)
    b.run()
    outs = [o for o in graph.outputs if graph.dtypes.get(o, 7) in (6, 7, 8, 13)]
    for o in graph.outputs:
        if o not in outs and not b.is_const(o):
            b.uncovered.append((o, "a non-float output that depends on the input"))
            b.lips[o] = {o: 0.0}
            outs.append(o)
    total = combine([b.lip(o) for o in outs], quadrature=True)
    # the dominant path: from the output with the largest bound back to the input
    path: list[str] = []
    if outs and any(INPUT in b.lip(o) for o in outs):
        cur: str | None = max(outs, key=lambda o: b.lip(o).get(INPUT, -math.inf))
        seen = set()
        while cur is not None and cur not in seen:
            seen.add(cur)
            node = graph.producer.get(cur)
            path.append(node.name if node is not None else cur)
            cur = b.parent.get(cur)
        path.reverse()
    partial = []
    for src, v in total.items():
        if src != INPUT:
            partial.append({"from": src, "to": "output", "log10_upper": v})
    for name, lip in b.partial_in.items():
        for src, v in lip.items():
            partial.append({"from": src, "to": name, "log10_upper": v})
    chain = math.fsum(b.chain) if b.chain else 0.0
    return Result(
        lips=b.lips, layers=b.layers, nodes=b.nodes, uncovered=b.uncovered, assumptions=b.assumptions,
        outputs=total, chain_log10=chain if math.isfinite(chain) or chain == -math.inf else None, path=path,
        certified_norms=b.certified, seconds=time.perf_counter() - t0, partial=partial, blocks=b.blocks,
    )
