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

from lipaudit.graph import rules, tighten
from lipaudit.graph.interpret import Evaluator
from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.spectral import Interval

INPUT = "input"
Lip = dict[str, float]  # source -> log10 of the Lipschitz constant

# ops whose output is a permutation, a restriction or a copy-free view of one input: gain <= 1
_VIEWS = frozenset("""
view _unsafe_view reshape flatten unflatten squeeze unsqueeze permute transpose t contiguous clone alias detach
lift_fresh_copy _to_copy to type_as view_as reshape_as flip roll movedim swapaxes numpy_T mT pixel_shuffle
pixel_unshuffle channel_shuffle slice select narrow split split_with_sizes chunk unbind tensor_split diagonal
dropout feature_dropout alpha_dropout feature_alpha_dropout native_dropout constant_pad_nd amax amin max min
logsumexp
""".split())
# outputs that depend only on the input's shape
_CONSTANT_OUTPUT = frozenset("zeros_like ones_like full_like empty_like new_zeros new_ones new_full new_empty".split())
_DISCRETE = frozenset("""
eq ne lt le gt ge sign floor ceil round trunc argmax argmin remainder fmod floor_divide bitwise_and bitwise_or
logical_and logical_or logical_not logical_xor isnan isinf isfinite sort argsort topk nonzero bucketize heaviside
""".split())
_BN = frozenset({"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                 "_native_batch_norm_legit", "cudnn_batch_norm", "_native_batch_norm_legit_functional"})
_NO_GLOBAL = {
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
    "_scaled_dot_product_flash_attention": "attention: products of input-dependent tensors",
    "_scaled_dot_product_efficient_attention": "attention: products of input-dependent tensors",
    "_scaled_dot_product_flash_attention_for_cpu": "attention: products of input-dependent tensors",
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
    "einsum": "einsum is not covered",
}


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
class LinearOp:
    """A linear map attached to a node's output, kept for folding and merging."""

    kind: str  # dense | conv
    weight: torch.Tensor  # float64; dense: (out, in); conv: torch layout of a forward conv
    src: str
    params: tuple[str, ...]
    axis: int = -1
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False


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


class Uncovered(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ints(a: Arg | None, default: list[int]) -> list[int]:
    if a is None or a.kind == "none":
        return default
    if a.kind == "ints":
        return list(a.value)
    if a.kind == "int":
        return [int(a.value)]
    raise Uncovered("an integer-list argument is not fixed")


def _int(a: Arg | None, default: int) -> int:
    if a is None or a.kind == "none":
        return default
    if a.kind == "int":
        return int(a.value)
    raise Uncovered("an integer argument is not fixed")


def _num(a: Arg | None, default: float | None) -> float | None:
    if a is None or a.kind == "none":
        return default
    if a.kind in ("int", "float"):
        return float(a.value)
    if a.kind == "bool":
        return float(a.value)
    raise Uncovered("a scalar argument is not a fixed number")


def _bool(a: Arg | None, default: bool) -> bool:
    if a is None or a.kind == "none":
        return default
    if a.kind == "bool":
        return bool(a.value)
    raise Uncovered("a boolean argument is not fixed")


def _per_axis(v: list[int], d: int, name: str) -> tuple[int, ...]:
    if len(v) == 1:
        return tuple(v * d)
    if len(v) != d:
        raise Uncovered(f"{name} has {len(v)} entries for {d} spatial axes")
    return tuple(v)


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
        self.hooks: dict[str, list[tighten.BlockBound]] = {}  # exit tensor -> tighter block bounds
        self.blocks: list[dict[str, Any]] = []

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
            if node is None or node.op not in _VIEWS or len(node.tensor_inputs()) != 1:
                return ()
            name = node.tensor_inputs()[0]
        return ()

    def single_consumer(self, name: str) -> bool:
        return len(self.g.consumers.get(name, [])) == 1 and name not in self.g.outputs

    def mark(self, out: str, src: str) -> None:
        self.parent[out] = src

    # -- norms ------------------------------------------------------------------------
    def op_norm(self, op: LinearOp) -> Interval:
        ident: Any = op.params if op.params else op.weight.data_ptr()
        key = (op.kind, ident, tuple(op.weight.shape), op.stride, op.dilation, op.groups, op.axis, op.transposed)
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
                for o in outs:
                    for blk in self.hooks.get(o, []):
                        self.tighten_at(node, blk)
            except Uncovered as e:
                self.uncover(node, outs, e.reason)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
                # arguments of a shape no rule expects: left out, never guessed
                self.uncover(node, outs, f"arguments could not be analysed ({type(e).__name__})")

    def lin_norm(self, w: tighten.Lin) -> Interval:
        """A composite map's norm, uncached (its kernel has no name)."""
        d = w.d
        op = LinearOp("dense" if d == 0 else "conv", w.kernel, "", (), stride=w.stride, dilation=(1,) * d)
        if not bool(torch.isfinite(w.kernel).all()):
            raise ValueError("weights hold NaN or Inf")
        if self.norm is not None:
            return self.norm(op)
        if d == 0:
            return rules.dense_norm(w.kernel, self.rtol, self.seed)
        return rules.conv_norm(w.kernel, w.stride, (1,) * d, 1, self.conv_rtol)

    def tighten_at(self, node: Node, blk: tighten.BlockBound) -> None:
        """The exit's bound becomes the entry's times the block's, where that is lower."""
        here, entry = self.lip(blk.exit), self.lip(blk.entry)
        g = _lg(blk.upper)
        before = here.get(INPUT)
        lowered = {k: min(here.get(k, math.inf), v + g) for k, v in entry.items()}
        self.lips[blk.exit] = {k: v for k, v in here.items() if k not in lowered} | lowered
        after = self.lips[blk.exit].get(INPUT)
        used = before is not None and after is not None and after < before
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
        op = node.op
        out = outs[0]
        if node.namespace != "aten":
            if node.target == "_operator.getitem":
                src = node.tensor_inputs()
                if len(src) == 1:
                    self.unary(node, src[0], 0.0)
                    return
            raise Uncovered(f"{node.target} has no Lipschitz rule")
        x = node.arg("self", 0) or node.arg("input", 0)
        xin = x.value if x is not None and x.kind == "tensor" else None
        scalars = {n: a.value for n, a in node.args if a.kind in ("int", "float", "bool", "str")}

        if op in _BN or (op == "batch_norm"):
            self.batch_norm(node, out)
            return
        if op in _NO_GLOBAL:
            raise Uncovered(_NO_GLOBAL[op])
        train = node.arg("train") or node.arg("training")
        if op.endswith("dropout") and train is not None and _bool(train, False):
            raise Uncovered("dropout in training mode")
        if op in _CONSTANT_OUTPUT:
            for o in outs:
                self.lips[o] = {}
            return
        if op in _DISCRETE:
            raise Uncovered(f"aten.{op} of input-dependent values is not continuous")
        if op in ("max", "min") and len([t for t in node.tensor_inputs() if not self.is_const(t)]) > 1:
            self.op_maximum(node, outs)
            return
        dtype = node.arg("dtype")
        if dtype is not None and dtype.kind == "dtype" and int(dtype.value) not in (6, 7, 8, 13):
            raise Uncovered("conversion of input-dependent values to a non-float type")
        if op in _VIEWS:
            assert xin is not None
            for o in outs:
                self.lips[o] = dict(self.lip(xin))
                self.mark(o, xin)
            self.info(node, 0.0, out)
            return
        gain = rules.activation_gain(op, scalars)
        if gain is not None and xin is not None:
            if op in ("clamp", "clip") and any(a.kind == "tensor" and not self.is_const(a.value)
                                               for n, a in node.args[1:]):
                raise Uncovered("clamp to input-dependent bounds")
            self.unary(node, xin, _lg(gain))
            return
        handler = getattr(self, "op_" + op.lstrip("_"), None)
        if handler is None:
            raise Uncovered(f"aten.{op} has no Lipschitz rule")
        handler(node, outs)

    # -- linear layers ------------------------------------------------------------------
    def op_convolution(self, node: Node, outs: list[str]) -> None:
        x = node.arg("input", 0)
        w = node.arg("weight", 1)
        if x is None or w is None or x.kind != "tensor" or w.kind != "tensor":
            raise Uncovered("convolution without tensor operands")
        if not self.is_const(w.value):
            raise Uncovered("convolution with an input-dependent kernel")
        kernel = self.value(w.value).to(torch.float64)
        d = kernel.ndim - 2
        transposed = node.op.startswith("conv_transpose") or _bool(node.arg("transposed"), False)
        stride = _per_axis(_ints(node.arg("stride"), [1]), d, "stride")
        dilation = _per_axis(_ints(node.arg("dilation"), [1]), d, "dilation")
        groups = _int(node.arg("groups"), 1)
        if groups < 1 or kernel.shape[0] % groups:
            raise Uncovered("groups do not divide the channels")
        self._const_bias(node)
        params = self.param_of(w.value)
        op = LinearOp("conv", kernel, x.value, params, stride=stride, dilation=dilation, groups=groups,
                      transposed=transposed)
        self.apply_linear(node, op, outs[0], f"conv{d}d" if not transposed else f"conv_transpose{d}d")

    op_conv1d = op_conv2d = op_conv3d = op_conv_transpose1d = op_conv_transpose2d = op_conv_transpose3d = \
        op_convolution

    def _const_bias(self, node: Node) -> None:
        b = node.arg("bias")
        if b is not None and b.kind == "tensor" and not self.is_const(b.value):
            raise Uncovered("an input-dependent bias")

    def _dense(self, node: Node, outs: list[str], x: str, w: torch.Tensor, wname: str, axis: int) -> None:
        if w.ndim == 1:
            w = w.reshape(1, -1) if axis == -1 else w.reshape(-1, 1)
        if w.ndim != 2:
            iv_max = 0.0
            flat = w.reshape(-1, w.shape[-2], w.shape[-1])
            for m in flat:
                iv = rules.dense_norm(m.T.contiguous(), self.rtol, self.seed)
                iv_max = max(iv_max, iv.upper)
                self.certified &= iv.certified
            self.chain.append(_lg(iv_max))
            self.unary(node, x, _lg(iv_max))
            return
        params = self.param_of(wname)
        self.apply_linear(node, LinearOp("dense", w, x, params, axis), outs[0], "linear")

    def op_linear(self, node: Node, outs: list[str]) -> None:
        x, w = node.arg("input", 0), node.arg("weight", 1)
        if x is None or w is None or x.kind != "tensor" or w.kind != "tensor" or not self.is_const(w.value):
            raise Uncovered("linear with an input-dependent weight")
        self._const_bias(node)
        self._dense(node, outs, x.value, self.value(w.value), w.value, -1)

    def _matmul(self, node: Node, outs: list[str], a: Arg | None, b: Arg | None) -> None:
        if a is None or b is None or a.kind != "tensor" or b.kind != "tensor":
            raise Uncovered("matrix product without tensor operands")
        ca, cb = self.is_const(a.value), self.is_const(b.value)
        if not ca and not cb:
            raise Uncovered("product of two input-dependent tensors")
        if cb:
            m = self.value(b.value)
            if m.ndim <= 2:
                self._dense(node, outs, a.value, m.T if m.ndim == 2 else m, b.value, -1)
            else:
                self._dense(node, outs, a.value, m, b.value, -1)
            return
        m = self.value(a.value)
        xdim = len(self.dims(b.value))
        if m.ndim == 2 and xdim <= 2:
            self._dense(node, outs, b.value, m, a.value, 0)
        else:
            self._dense(node, outs, b.value, m.transpose(-1, -2) if m.ndim > 2 else m.unsqueeze(0).transpose(-1, -2),
                        a.value, 0)

    def op_mm(self, node: Node, outs: list[str]) -> None:
        self._matmul(node, outs, node.arg("self", 0), node.arg("mat2", 1))

    op_matmul = op_mm

    def op_bmm(self, node: Node, outs: list[str]) -> None:
        self._matmul(node, outs, node.arg("self", 0), node.arg("mat2", 1))

    def op_addmm(self, node: Node, outs: list[str]) -> None:
        bias = node.arg("self", 0)
        if bias is not None and bias.kind == "tensor" and not self.is_const(bias.value):
            raise Uncovered("addmm with an input-dependent addend")
        for name in ("beta", "alpha"):
            v = _num(node.arg(name), 1.0)
            if v != 1.0:
                raise Uncovered(f"addmm with {name} != 1")
        self._matmul(node, outs, node.arg("mat1", 1), node.arg("mat2", 2))

    # -- batch norm -----------------------------------------------------------------------
    def batch_norm(self, node: Node, out: str) -> None:
        op = node.op
        x = node.arg("input", 0)
        if x is None or x.kind != "tensor":
            raise Uncovered("batch norm without an input")
        training = node.arg("training")
        if op == "_native_batch_norm_legit_functional" or (
                training is not None and _bool(training, False)):
            raise Uncovered("batch norm in training mode (batch statistics)")
        names: dict[str, str | None] = {}
        for k in ("weight", "bias", "running_mean", "running_var"):
            a = node.arg(k)
            names[k] = a.value if a is not None and a.kind == "tensor" else None
            if names[k] is not None and not self.is_const(str(names[k])):
                raise Uncovered("batch norm with input-dependent statistics")
        var_name = names["running_var"]
        if var_name is None:
            raise Uncovered("batch norm without running statistics")
        var = self.value(var_name)
        eps = _num(node.arg("eps"), 1e-5) or 0.0
        denom = torch.sqrt(var.to(torch.float64) + eps)
        wname = names["weight"]
        gamma = self.value(wname).to(torch.float64) if wname is not None else torch.ones_like(denom)
        scale = gamma / denom
        if not bool(torch.isfinite(scale).all()):
            raise Uncovered("batch norm scale is not finite (running_var + eps <= 0)")
        params = tuple(self.g.params[n] for n in (wname, var_name) if n is not None and n in self.g.params)
        self.fold_bn(node, x.value, scale, out, params)

    # -- elementwise arithmetic -----------------------------------------------------------------
    def _binary_terms(self, node: Node, out: str, a: Arg | None, b: Arg | None, alpha: float) -> list[Lip]:
        terms = []
        for arg, c in ((a, 1.0), (b, alpha)):
            if arg is not None and arg.kind == "tensor" and not self.is_const(arg.value):
                terms.append(scaled(self.lip(arg.value), _lg(abs(c)) + self.ratio(arg.value, out)))
        return terms

    def op_add(self, node: Node, outs: list[str]) -> None:
        alpha = _num(node.arg("alpha"), 1.0) or 0.0
        out = outs[0]
        terms = self._binary_terms(node, out, node.arg("self", 0), node.arg("other", 1), alpha)
        self.lips[out] = combine(terms, quadrature=False)
        self._dominant(out, node, [node.arg("self", 0), node.arg("other", 1)])
        self.info(node, None, out)

    op_sub = op_add

    def op_rsub(self, node: Node, outs: list[str]) -> None:
        alpha = _num(node.arg("alpha"), 1.0) or 0.0
        out = outs[0]
        terms = self._binary_terms(node, out, node.arg("other", 1), node.arg("self", 0), alpha)
        self.lips[out] = combine(terms, quadrature=False)
        self._dominant(out, node, [node.arg("self", 0), node.arg("other", 1)])
        self.info(node, None, out)

    def _dominant(self, out: str, node: Node, args: list[Arg | None]) -> None:
        best, arg_best = -math.inf, None
        for a in args:
            if a is not None and a.kind == "tensor":
                v = self.lip(a.value).get(INPUT, -math.inf)
                if v > best:
                    best, arg_best = v, a.value
            elif a is not None and a.kind in ("tensors", "opt_tensors"):
                for t in a.value:
                    if t is not None and self.lip(t).get(INPUT, -math.inf) > best:
                        best, arg_best = self.lip(t)[INPUT], t
        self.parent[out] = arg_best

    def op_mul(self, node: Node, outs: list[str]) -> None:
        a, b = node.arg("self", 0), node.arg("other", 1)
        out = outs[0]
        if a is None or a.kind != "tensor":
            raise Uncovered("mul without a tensor operand")
        if b is None or b.kind != "tensor":
            c = abs(_num(b, 1.0) or 0.0)
            self.unary(node, a.value, _lg(c))
            return
        ca, cb = self.is_const(a.value), self.is_const(b.value)
        if not ca and not cb:
            g = self._product_pattern(a.value, b.value)
            if g is None:
                raise Uncovered("product of two input-dependent tensors")
            self.unary(node, a.value, _lg(g) + self.ratio(a.value, out), note="x * f(x) pattern")
            return
        x, c = (b.value, a.value) if ca else (a.value, b.value)
        cv = self.value(c)
        m = float(cv.abs().max()) if cv.numel() else 0.0
        if not math.isfinite(m):
            raise Uncovered("multiplication by a non-finite constant")
        self.unary(node, x, _lg(m) + self.ratio(x, out))

    def _product_pattern(self, a: str, b: str) -> float | None:
        """x * sigmoid(x) (SiLU) and x * clamp(x + 3, 0, 6) (hardswish times 6), as core aten writes them."""
        for x, y in ((a, b), (b, a)):
            p = self.g.producer.get(y)
            if p is None:
                continue
            if p.op == "sigmoid" and p.tensor_inputs() == [x]:
                return rules.SILU
            lo, hi = -math.inf, math.inf
            cur: Node | None = p
            while cur is not None and cur.op in ("clamp", "clamp_min", "clamp_max", "hardtanh"):
                mn = cur.arg("min", 1) if cur.op != "hardtanh" else cur.arg("min_val", 1)
                mx = cur.arg("max", 2) if cur.op != "hardtanh" else cur.arg("max_val", 2)
                if cur.op == "clamp_max":
                    mn, mx = None, cur.arg("max", 1)
                try:
                    lo = max(lo, _num(mn, -math.inf) or 0.0) if mn is not None and mn.kind != "none" else lo
                    hi = min(hi, _num(mx, math.inf) or 0.0) if mx is not None and mx.kind != "none" else hi
                except Uncovered:
                    return None
                src = cur.tensor_inputs()
                cur = self.g.producer.get(src[0]) if len(src) == 1 else None
            if (cur is not None and cur.op == "add" and cur.tensor_inputs() == [x] and lo == 0.0 and hi == 6.0
                    and _num(cur.arg("other", 1), None) == 3.0):
                return rules.HARDSWISH_PRODUCT
        return None

    def op_div(self, node: Node, outs: list[str]) -> None:
        a, b = node.arg("self", 0), node.arg("other", 1)
        if a is None or a.kind != "tensor":
            raise Uncovered("div without a tensor operand")
        mode = node.arg("rounding_mode")
        if mode is not None and mode.kind == "str":
            raise Uncovered("rounding division is not continuous")
        if b is None or b.kind != "tensor":
            c = _num(b, 1.0) or 0.0
            if c == 0.0:
                raise Uncovered("division by zero")
            self.unary(node, a.value, -_lg(abs(c)))
            return
        if not self.is_const(b.value):
            raise Uncovered("division by an input-dependent tensor")
        cv = self.value(b.value)
        m = float(cv.abs().min()) if cv.numel() else 1.0
        if m == 0.0 or not math.isfinite(m):
            raise Uncovered("division by a constant that holds zero")
        self.unary(node, a.value, -_lg(m) + self.ratio(a.value, outs[0]))

    op_true_divide = op_div

    def op_neg(self, node: Node, outs: list[str]) -> None:
        x = node.tensor_inputs()[0]
        self.unary(node, x, 0.0)

    def op_where(self, node: Node, outs: list[str]) -> None:
        cond = node.arg("condition", 0)
        if cond is None or cond.kind != "tensor" or not self.is_const(cond.value):
            raise Uncovered("selection by an input-dependent condition")
        self._select(node, outs[0], [node.arg("self", 1), node.arg("other", 2)])

    def _select(self, node: Node, out: str, args: list[Arg | None]) -> None:
        terms = [scaled(self.lip(a.value), self.ratio(a.value, out)) for a in args
                 if a is not None and a.kind == "tensor" and not self.is_const(a.value)]
        self.lips[out] = combine(terms, quadrature=True)
        self._dominant(out, node, args)
        self.info(node, None, out)

    def op_maximum(self, node: Node, outs: list[str]) -> None:
        self._select(node, outs[0], [node.arg("self", 0), node.arg("other", 1)])

    op_minimum = op_maximum

    def op_slice_scatter(self, node: Node, outs: list[str]) -> None:
        self._select(node, outs[0], [node.arg("self", 0), node.arg("src", 1)])

    op_select_scatter = op_slice_scatter

    def op_copy(self, node: Node, outs: list[str]) -> None:
        src = node.arg("src", 1)
        if src is None or src.kind != "tensor":
            raise Uncovered("copy without a source")
        self.unary(node, src.value, self.ratio(src.value, outs[0]))

    def op_cat(self, node: Node, outs: list[str]) -> None:
        ts = node.arg("tensors", 0)
        if ts is None or ts.kind != "tensors":
            raise Uncovered("cat without tensors")
        self.lips[outs[0]] = combine([self.lip(t) for t in ts.value if t is not None], quadrature=True)
        self._dominant(outs[0], node, [ts])
        self.info(node, None, outs[0])

    op_concat = op_concatenate = op_stack = op_hstack = op_vstack = op_cat

    def _copies(self, node: Node, outs: list[str]) -> None:
        x = node.tensor_inputs()[0]
        self.unary(node, x, self.ratio(x, outs[0]))

    op_expand = op_expand_as = op_broadcast_to = op_repeat = op_tile = op_repeat_interleave = _copies

    def op_index_select(self, node: Node, outs: list[str]) -> None:
        idx = node.arg("index", 2)
        x = node.arg("self", 0)
        if idx is None or idx.kind != "tensor" or not self.is_const(idx.value) or x is None or x.kind != "tensor":
            raise Uncovered("indexing with input-dependent indices")
        v = self.value(idx.value).reshape(-1).long()
        dim = _int(node.arg("dim", 1), 0)
        n = self.fixed(x.value, [dim])[0]
        counts = torch.bincount(v.remainder(n), minlength=1) if v.numel() else torch.ones(1)
        self.unary(node, x.value, 0.5 * _lg(float(counts.max())))

    def op_index(self, node: Node, outs: list[str]) -> None:
        x = node.arg("self", 0)
        idx = node.arg("indices", 1)
        if x is None or x.kind != "tensor" or idx is None or idx.kind not in ("tensors", "opt_tensors"):
            raise Uncovered("indexing without fixed indices")
        nd = len(self.dims(x.value))
        parts, dims = [], []
        for d, t in enumerate(idx.value):
            if t is None:
                continue
            size = self.fixed(x.value, [d])[0] if d < nd else 1
            if not self.is_const(t):
                raise Uncovered("indexing with input-dependent indices")
            v = self.value(t)
            if v.dtype == torch.bool:
                raise Uncovered("boolean mask indexing")
            parts.append(v.long().remainder(max(size, 1)))
            dims.append(max(size, 1))
        if not parts:
            self.unary(node, x.value, 0.0)
            return
        b = torch.broadcast_tensors(*parts)  # type: ignore[no-untyped-call]
        flat = torch.zeros_like(b[0])
        for size, t in zip(dims, b, strict=True):
            flat = flat * size + t
        _, counts = torch.unique(flat.reshape(-1), return_counts=True)
        self.unary(node, x.value, 0.5 * _lg(float(counts.max())) if counts.numel() else 0.0)

    # -- reductions ---------------------------------------------------------------------
    def _reduced(self, node: Node, x: str) -> int:
        dims = node.arg("dim", 1)
        nd = len(self.dims(x))
        if dims is None or dims.kind == "none" or (dims.kind == "ints" and not dims.value):
            return math.prod(self.fixed(x, list(range(nd))))
        ds = _ints(dims, [])
        return math.prod(self.fixed(x, [d % nd for d in ds])) if nd else 1

    def op_mean(self, node: Node, outs: list[str]) -> None:
        x = node.tensor_inputs()[0]
        n = self._reduced(node, x)
        self.unary(node, x, -0.5 * _lg(max(n, 1)))

    def op_sum(self, node: Node, outs: list[str]) -> None:
        x = node.tensor_inputs()[0]
        n = self._reduced(node, x)
        self.unary(node, x, 0.5 * _lg(max(n, 1)))

    # -- pooling, upsampling, padding -------------------------------------------------------
    def _spatial(self, node: Node, d: int) -> tuple[str, tuple[int, ...]]:
        x = node.tensor_inputs()[0]
        nd = len(self.dims(x))
        if nd < d:
            raise Uncovered("fewer axes than the pooling needs")
        return x, tuple(self.fixed(x, list(range(nd - d, nd))))

    def _dim(self, op: str) -> int:
        for d in (1, 2, 3):
            if op.endswith(f"{d}d") or op.endswith(f"{d}d_with_indices"):
                return d
        raise Uncovered(f"aten.{op}: unknown dimension")

    def op_avg_pool2d(self, node: Node, outs: list[str]) -> None:
        d = self._dim(node.op)
        x, sizes = self._spatial(node, d)
        k = _per_axis(_ints(node.arg("kernel_size", 1), []), d, "kernel_size")
        s_raw = _ints(node.arg("stride", 2), [])
        s = _per_axis(s_raw, d, "stride") if s_raw else k
        p = _per_axis(_ints(node.arg("padding", 3), [0]), d, "padding")
        ceil = _bool(node.arg("ceil_mode", 4), False)
        include = _bool(node.arg("count_include_pad", 5), True)
        override = _num(node.arg("divisor_override", 6), None) if d > 1 else None
        norm = 1.0
        for i in range(d):
            a = rules.avg_pool_matrix(sizes[i], k[i], s[i], p[i], ceil, include, override is not None)
            norm *= rules.matrix_upper(a)
        if override is not None:
            norm /= abs(override)
        self.unary(node, x, _lg(norm))

    op_avg_pool1d = op_avg_pool3d = op_avg_pool2d

    def op_adaptive_avg_pool2d(self, node: Node, outs: list[str]) -> None:
        d = self._dim(node.op)
        x, sizes = self._spatial(node, d)
        out = _per_axis(_ints(node.arg("output_size", 1), []), d, "output_size")
        norm = 1.0
        for i in range(d):
            norm *= rules.matrix_upper(rules.adaptive_matrix(sizes[i], out[i], True))
        self.unary(node, x, _lg(norm))

    op_adaptive_avg_pool1d = op_adaptive_avg_pool3d = op_adaptive_avg_pool2d

    def op_max_pool2d(self, node: Node, outs: list[str]) -> None:
        d = self._dim(node.op)
        x, sizes = self._spatial(node, d)
        k = _per_axis(_ints(node.arg("kernel_size", 1), []), d, "kernel_size")
        s_raw = _ints(node.arg("stride", 2), [])
        s = _per_axis(s_raw, d, "stride") if s_raw else k
        p = _per_axis(_ints(node.arg("padding", 3), [0]), d, "padding")
        dil = _per_axis(_ints(node.arg("dilation", 4), [1]), d, "dilation")
        ceil = _bool(node.arg("ceil_mode", 5), False)
        count = math.prod(rules.max_pool_count(sizes[i], k[i], s[i], p[i], dil[i], ceil) for i in range(d))
        self.unary(node, x, 0.5 * _lg(count), out=outs[0])

    op_max_pool1d = op_max_pool3d = op_max_pool2d_with_indices = op_max_pool3d_with_indices = op_max_pool2d

    def op_adaptive_max_pool2d(self, node: Node, outs: list[str]) -> None:
        d = self._dim(node.op)
        x, sizes = self._spatial(node, d)
        out = _per_axis(_ints(node.arg("output_size", 1), []), d, "output_size")
        count = 1
        for i in range(d):
            cols = rules.adaptive_matrix(sizes[i], out[i], False).indices()[1]
            count *= int(torch.bincount(cols, minlength=1).max())
        self.unary(node, x, 0.5 * _lg(count), out=outs[0])

    op_adaptive_max_pool1d = op_adaptive_max_pool3d = op_adaptive_max_pool2d

    def _upsample(self, node: Node, outs: list[str], kind: str) -> None:
        d = self._dim(node.op)
        x, sizes = self._spatial(node, d)
        no = len(self.dims(outs[0]))
        o_shape = self.fixed(outs[0], list(range(no - d, no)))
        scales_arg = node.arg("scale_factors") or node.arg("scales")
        scales: list[float | None] = [None] * d
        if scales_arg is not None and scales_arg.kind == "floats" and len(scales_arg.value) == d:
            scales = list(scales_arg.value)
        else:
            names = ["scales_d", "scales_h", "scales_w"][3 - d:] if d > 1 else ["scales"]
            for i, nm in enumerate(names):
                scales[i] = _num(node.arg(nm), None)
        align = _bool(node.arg("align_corners"), False)
        norm = 1.0
        for i in range(d):
            if kind == "linear":
                a = rules.linear_matrix(sizes[i], o_shape[i], align, scales[i])
            else:
                a = rules.nearest_matrix(sizes[i], o_shape[i], scales[i], kind == "exact")
            norm *= rules.matrix_upper(a)
        self.unary(node, x, _lg(norm))

    def op_upsample_nearest2d(self, node: Node, outs: list[str]) -> None:
        self._upsample(node, outs, "nearest")

    op_upsample_nearest1d = op_upsample_nearest3d = op_upsample_nearest2d

    def op_upsample_nearest_exact2d(self, node: Node, outs: list[str]) -> None:
        self._upsample(node, outs, "exact")

    op_upsample_nearest_exact1d = op_upsample_nearest_exact3d = op_upsample_nearest_exact2d

    def op_upsample_bilinear2d(self, node: Node, outs: list[str]) -> None:
        self._upsample(node, outs, "linear")

    op_upsample_linear1d = op_upsample_trilinear3d = op_upsample_bilinear2d

    def _pad(self, node: Node, outs: list[str], mode: str) -> None:
        x = node.tensor_inputs()[0]
        nd = len(self.dims(x))
        pads = _ints(node.arg("pad", 1) or node.arg("padding", 1), [])
        if len(pads) % 2 or len(pads) // 2 > nd:
            raise Uncovered("padding of an unexpected length")
        norm = 1.0
        for i in range(len(pads) // 2):
            axis = nd - 1 - i
            if mode == "constant":
                continue  # zero padding or cropping: norm at most 1 whatever the size
            a = rules.pad_matrix(self.fixed(x, [axis])[0], pads[2 * i], pads[2 * i + 1], mode)
            if a is None:
                raise Uncovered(f"{mode} padding wider than the input")
            norm *= rules.matrix_upper(a)
        self.unary(node, x, _lg(norm))

    def op_pad(self, node: Node, outs: list[str]) -> None:
        m = node.arg("mode", 2)
        mode = m.value if m is not None and m.kind == "str" else "constant"
        self._pad(node, outs, mode)

    def op_reflection_pad2d(self, node: Node, outs: list[str]) -> None:
        self._pad(node, outs, "reflect")

    op_reflection_pad1d = op_reflection_pad3d = op_reflection_pad2d

    def op_replication_pad2d(self, node: Node, outs: list[str]) -> None:
        self._pad(node, outs, "replicate")

    op_replication_pad1d = op_replication_pad3d = op_replication_pad2d

    def op_pad_circular(self, node: Node, outs: list[str]) -> None:
        self._pad(node, outs, "circular")

    def op_prelu(self, node: Node, outs: list[str]) -> None:
        w = node.arg("weight", 1)
        if w is None or w.kind != "tensor" or not self.is_const(w.value):
            raise Uncovered("prelu with an input-dependent slope")
        slope = float(self.value(w.value).abs().max())
        self.unary(node, node.tensor_inputs()[0], _lg(max(1.0, slope)))

    op_prelu_kernel = op_prelu


def bound_graph(graph: Graph, consts: Evaluator, rtol: float, conv_rtol: float, seed: int,
                factors: dict[str, float] | None = None,
                norms: dict[tuple[Any, ...], Interval] | None = None,
                norm: Callable[[LinearOp], Interval] | None = None, blocks: bool = True) -> Result:
    """The bound; factors rescale named weights (as normalize plans to), norms caches operator norms.

    `norm` measures one linear operator (a layer's weight, a BatchNorm-folded or merged kernel); by
    default it is computed here. The set of operators the walk asks for does not depend on the values
    returned, so a first walk with a recording `norm` lists every operator to measure up front.
    `blocks` bounds blocks as a whole where that is tighter (lipaudit/graph/tighten.py)."""
    t0 = time.perf_counter()
    b = Bounder(graph, consts, rtol, conv_rtol, seed, norm)
    if factors:
        b.factors = factors
    if norms is not None:
        b.norms = norms
    b.partial_in = {}
    if blocks and not factors:  # planned rescalings change the kernels the blocks were composed from
        found, ok = tighten.bound_blocks(graph, consts.value, b.lin_norm)
        b.certified &= ok
        for blk in found:
            b.hooks.setdefault(blk.exit, []).append(blk)
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
