"""Tighter certified bounds for blocks of the graph: composite linear maps and the loop
transformation for slope-restricted activations (docs/mathematics.md, "Blocks").

A block is a path of single-consumer nodes from an entry tensor to an exit tensor whose nodes are
linear maps with constant weights (convolutions, dense layers, BatchNorm in eval mode), identities,
and elementwise activations whose secant slopes lie in [a, b]; optionally the exit adds the entry
back (a residual block). On it, with Lambda_j the diagonal matrix of secant slopes of activation j,
the difference of two outputs is (I +) W_n Lambda_{n-1} ... Lambda_1 W_1 applied to the difference
of the inputs, and Lambda_j = m_j I + r_j Psi_j with ||Psi_j|| <= 1. Unrolling gives

    L_k <= ||M_k0|| + sum_j r_j ||M_kj|| L_j,   M_kj = W_k m_{k-1} W_{k-1} ... m_{j+1} W_{j+1},

where every M_kj is one linear map: a convolution whose kernel is the full convolution of the
kernels (strides compose), or a matrix product. Each bound is taken as the minimum with the product
of the layers' norms, so no block is ever looser than before.

Zero padding: a padded convolution is the convolution on the infinite grid followed by the mask D
of its output window. D commutes with elementwise maps and is diagonal with entries in {0, 1}, so
it is absorbed into the next activation (slopes in the hull of [a, b] and {0}); a pointwise map
(1x1 stride-1 convolution, BatchNorm) commutes with it; between two maps that both spread, D is
kept as a slope-[0, 1] diagonal of its own. The final mask and the restriction to inputs that
vanish outside the window can only lower the norm.

An activation at either end of a chain gets the identity map beside it (W = I), and two in a row
are one (their slope ranges multiply). Each bound is a registered rule (RULES); a block takes the
least, and tests/graph/test_block_rules.py checks every rule on random exported blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.graph.ops import meta
from lipaudit.graph.ops.base import Uncovered
from lipaudit.graph.ops.registry import lookup
from lipaudit.spectral import Interval

# identity maps that may sit inside a block
_IDENTITY = frozenset("clone alias detach contiguous lift_fresh_copy dropout feature_dropout alpha_dropout".split())
_CONVS = frozenset("conv1d conv2d conv3d convolution _convolution".split())
_BNS = frozenset({"batch_norm", "_native_batch_norm_legit_no_training"})
_DENSE = frozenset({"linear"})
# composite kernels beyond this many entries are not formed (the product is used instead)
MAX_KERNEL = 2**24


@dataclass
class Lin:
    """A linear map on the infinite grid: y[n] = sum_u K[:, :, u] x[s n + u - pad] (d = kernel.ndim - 2
    spatial axes; d = 0 is a matrix). spreads: its zero-padded form differs from it outside the window."""

    kernel: torch.Tensor
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    params: tuple[str, ...]
    spreads: bool
    unit: bool = False  # the identity, put beside an activation at either end of a block
    key: str = ""  # how the map was built from the graph's nodes; equal keys are equal maps

    @property
    def d(self) -> int:
        return self.kernel.ndim - 2

    @property
    def pointwise(self) -> bool:
        return all(t == 1 for t in self.kernel.shape[2:]) and all(s == 1 for s in self.stride) and all(
            p == 0 for p in self.pad)


@dataclass
class Act:
    """An elementwise map with secant slopes in [a, b]."""

    a: float
    b: float
    node: str

    @property
    def m(self) -> float:
        return (self.a + self.b) / 2

    @property
    def r(self) -> float:
        return (self.b - self.a) / 2

    @property
    def gain(self) -> float:
        return max(abs(self.a), abs(self.b))


def _shapes_only(*ws: Lin) -> bool:
    """Maps on the meta device (the block cost model): their results are built from sizes, since
    torch's meta kernels for these steps import the compiler stack."""
    return any(w.kernel.is_meta for w in ws)


def compose(b: Lin, a: Lin) -> Lin:
    """b after a, as one map: strides multiply, taps of b are dilated by a's stride."""
    if _shapes_only(a, b):
        if b.kernel.shape[1] != a.kernel.shape[0] or b.d != a.d:
            raise RuntimeError("maps whose channels do not meet")
        taps = [(tb - 1) * s + ta for tb, ta, s in zip(b.kernel.shape[2:], a.kernel.shape[2:], a.stride, strict=True)]
        if b.pointwise:
            taps = list(a.kernel.shape[2:])
        return Lin(meta.empty([b.kernel.shape[0], a.kernel.shape[1], *taps], a.kernel),
                   tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True)),
                   tuple(sa * pb + pa for sa, pb, pa in zip(a.stride, b.pad, a.pad, strict=True)),
                   a.params + b.params, a.spreads or b.spreads, key=_key("", b, a))
    if a.d == 0:
        return Lin(b.kernel @ a.kernel, (), (), a.params + b.params, a.spreads or b.spreads,
                   key=_key("", b, a))
    d = a.d
    sa = a.stride
    kb = b.kernel
    if all(t == 1 for t in kb.shape[2:]) and all(p == 0 for p in b.pad) and all(s == 1 for s in b.stride):
        # a pointwise map after a (BatchNorm folded into a conv): a matrix product over channels,
        # or a row scaling when the matrix is diagonal; the same sums as the convolution below
        mat = kb.reshape(kb.shape[0], kb.shape[1])
        flat = a.kernel.reshape(a.kernel.shape[0], -1)
        diag = torch.diagonal(mat)
        if not mat.is_meta and mat.shape[0] == mat.shape[1] and bool(torch.equal(mat, torch.diag(diag))):
            out = diag[:, None] * flat
        else:
            out = mat @ flat
        return Lin(out.reshape(kb.shape[0], *a.kernel.shape[1:]), a.stride, a.pad, a.params + b.params,
                   a.spreads or b.spreads, key=_key("", b, a))
    if any(s > 1 for s in sa):
        taps = [(kb.shape[2 + i] - 1) * sa[i] + 1 for i in range(d)]
        wide = kb.new_zeros(kb.shape[0], kb.shape[1], *taps)
        wide[(slice(None), slice(None), *[slice(None, None, s) for s in sa])] = kb
        kb = wide
    # K[o, i, u] = sum_c sum_v kb[o, c, v] ka[c, i, u - v]: a full convolution over the taps,
    # with a's input channels as the batch
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    ka = a.kernel.transpose(0, 1)
    full = conv(ka, kb.flip(list(range(2, 2 + d))), padding=[t - 1 for t in kb.shape[2:]])
    kernel = full.transpose(0, 1).contiguous()
    stride = tuple(sa[i] * b.stride[i] for i in range(d))
    pad = tuple(sa[i] * b.pad[i] + a.pad[i] for i in range(d))
    return Lin(kernel, stride, pad, a.params + b.params, a.spreads or b.spreads, key=_key("", b, a))


def plus_identity(w: Lin, scale: float) -> Lin:
    """I + scale * w for a map from a space to itself."""
    k = w.kernel if _shapes_only(w) else w.kernel * scale
    if w.d == 0:
        if k.shape[0] != k.shape[1]:
            raise ValueError("a residual sum of different sizes")
        if _shapes_only(w):
            return Lin(k, (), (), w.params, w.spreads, key=_key(f"I+{scale!r}", w))
        return Lin(k + torch.eye(k.shape[0], dtype=k.dtype, device=k.device), (), (), w.params, w.spreads,
                   key=_key(f"I+{scale!r}", w))
    if k.shape[0] != k.shape[1] or any(s != 1 for s in w.stride):
        raise ValueError("a residual sum of different sizes")
    # the identity is the tap u = pad; widen the kernel so that tap exists
    lo = [min(0, p) for p in w.pad]
    hi = [max(k.shape[2 + i] - 1, w.pad[i]) for i in range(w.d)]
    taps = [hi[i] - lo[i] + 1 for i in range(w.d)]
    if _shapes_only(w):
        return Lin(meta.empty([k.shape[0], k.shape[1], *taps], k), w.stride,
                   tuple(p - q for p, q in zip(w.pad, lo, strict=True)), w.params, w.spreads,
                   key=_key(f"I+{scale!r}", w))
    out = k.new_zeros(k.shape[0], k.shape[1], *taps)
    out[(slice(None), slice(None), *[slice(-lo[i], -lo[i] + k.shape[2 + i]) for i in range(w.d)])] = k
    centre = tuple(w.pad[i] - lo[i] for i in range(w.d))
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    at: tuple[slice | int, ...] = (slice(None), slice(None), *centre)
    view = out[at]
    view += eye
    return Lin(out, w.stride, tuple(p - q for p, q in zip(w.pad, lo, strict=True)), w.params, w.spreads,
               key=_key(f"I+{scale!r}", w))


def scaled_lin(w: Lin, s: float) -> Lin:
    return Lin(w.kernel if _shapes_only(w) else w.kernel * s, w.stride, w.pad, w.params, w.spreads,
               key=_key(f"{s!r}*", w))


def _key(op: str, *parts: Lin) -> str:
    """A built map's key from its parts' ("" when a part has none: such maps are not memoised)."""
    if any(not p.key for p in parts):
        return ""
    return op + "".join(f"({p.key})" for p in parts)


@dataclass
class BlockBound:
    """One block: its product bound, its tightened bound and the rule that gave it."""

    entry: str
    exit: str
    nodes: tuple[str, ...]
    residual: bool
    product: float  # the product of the composed maps' norms and the activations' gains (+1 for a residual)
    upper: float  # min(product, composite/loop transformation)
    rule: str  # product | composite | loop transformation
    rescaled: bool = False  # channel scalings were moved across the activations (rebalance)

    def to_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "exit": self.exit, "nodes": list(self.nodes), "residual": self.residual,
                "product": self.product, "upper": self.upper, "rule": self.rule, "rescaled": self.rescaled}


Norm = Callable[[Lin], float]


def _split(items: list[Lin | Act]) -> tuple[list[Lin], list[Act]]:
    ws = [it for it in items if isinstance(it, Lin)]
    acts = [it for it in items if isinstance(it, Act)]
    if len(ws) != len(acts) + 1:
        raise ValueError("a block must alternate maps and activations")
    return ws, acts


def _row(ws: list[Lin], acts: list[Act], k: int, whole: Lin | None = None) -> dict[tuple[int, int], Lin]:
    """comp[(k, j)] for j = k - 1 down to 0, as far as they stay within MAX_KERNEL entries; whole,
    when given, is (n, 0)."""
    n = len(ws)
    row = {(k, k - 1): ws[k - 1]}
    for j in range(k - 2, -1, -1):
        if whole is not None and (k, j) == (n, 0):
            step = whole
        else:
            step = compose(row[(k, j + 1)], scaled_lin(ws[j], acts[j].m))
        if step.kernel.numel() > MAX_KERNEL:
            break
        row[(k, j)] = step
    return row


def composites(items: list[Lin | Act], whole: Lin | None = None) -> dict[tuple[int, int], Lin]:
    """comp[(k, j)] = W_k m_{k-1} W_{k-1} ... m_{j+1} W_{j+1}, maps numbered from 1 (whole: the
    chain's (n, 0), when known); a composite over MAX_KERNEL entries and those beyond it are left out."""
    ws, acts = _split(items)
    comp: dict[tuple[int, int], Lin] = {}
    for k in range(1, len(ws) + 1):
        comp |= _row(ws, acts, k, whole)
    return comp


def whole_map(items: list[Lin | Act]) -> Lin | None:
    """The chain's composite M_n0 alone (None over MAX_KERNEL entries)."""
    ws, acts = _split(items)
    return _row(ws, acts, len(ws)).get((len(ws), 0))


def chain_bound(items: list[Lin | Act], residual: bool, norm: Norm,
                whole: Lin | None = None) -> tuple[float, float, bool]:
    """(product, tightened upper, whether the loop transformation lowered it) for
    W_n Act_{n-1} ... Act_1 W_1 (+ I): items alternate maps and activations. whole, when given, is
    the same linear map as the chain's composite M_n0 (a rebalanced block's is its original's), used
    in its place so it is measured once."""
    ws, acts = _split(items)
    n = len(ws)
    own = [1.0 if w.unit else norm(w) for w in ws]
    product = math.prod(own) * math.prod(a.gain for a in acts) + (1.0 if residual else 0.0)
    comp = composites(items, whole=whole)
    known: dict[tuple[int, int], float] = {}

    def comp_norm(k: int, j: int) -> float:
        # an identity at either end scales a composite already measured: no second measurement
        if (k, j) not in known:
            if j == k - 1:
                known[(k, j)] = own[k - 1]
            elif ws[k - 1].unit:
                known[(k, j)] = abs(acts[k - 2].m) * comp_norm(k - 1, j)
            elif j == 0 and ws[0].unit and (k, 1) in comp:
                known[(k, j)] = abs(acts[0].m) * comp_norm(k, 1)
            else:
                known[(k, j)] = norm(comp[(k, j)])
        return known[(k, j)]
    lips = [1.0] + [0.0] * n  # lips[k]: bound on the output of map k; lips[0] is the input's
    loop = False
    for k in range(1, n + 1):
        last = residual and k == n
        prod_k = own[k - 1] * (acts[k - 2].gain * lips[k - 1] if k >= 2 else 1.0) + (1.0 if last else 0.0)
        best = prod_k
        if (k, 0) in comp and (k >= 2 or last):
            total = norm(plus_identity(comp[(k, 0)], 1.0)) if last else comp_norm(k, 0)
            for j in range(1, k):
                r = acts[j - 1].r
                if r != 0:
                    total += r * comp_norm(k, j) * lips[j]
            if total < best:
                best, loop = total, k >= 2
        lips[k] = best
    return product, min(product, lips[n]), loop


def rebalance(items: list[Lin | Act], sweeps: int = 4) -> list[Lin | Act] | None:
    """The same block with channel scalings moved across each activation: W_j -> D_j^-1 W_j D_{j-1}
    with positive diagonal D_j constant over space (D_0 = D_n = I). Diagonal maps commute with the
    slope diagonals, so the block is unchanged; the product and loop-transformation bounds are not.
    D_j balances the channel norms of W_j's rows and W_{j+1}'s columns. Beside an identity map
    D_j stays I: there a scaling cannot lower any term (||W D^-1|| ||D|| >= ||W||) and would turn the
    identity into a map to measure. None when no D_j is free."""
    ws = [it for it in items if isinstance(it, Lin)]
    free = [j for j in range(len(ws) - 1) if not ws[j].unit and not ws[j + 1].unit]
    if not free:
        return None
    ks = [w.kernel.clone() for w in ws]
    for _ in range(0 if _shapes_only(*ws) else sweeps):
        for j in free:
            a = ks[j].flatten(1).norm(dim=1)
            b = ks[j + 1].transpose(0, 1).flatten(1).norm(dim=1)
            ok = (a > 0) & (b > 0) & torch.isfinite(a) & torch.isfinite(b)
            d = torch.where(ok, torch.sqrt(a / torch.where(ok, b, torch.ones_like(b))), torch.ones_like(a))
            shape = [-1] + [1] * (ks[j].ndim - 1)
            ks[j] = ks[j] / d.reshape(shape)
            ks[j + 1] = ks[j + 1] * d.reshape([1, -1] + [1] * (ks[j + 1].ndim - 2))
    out: list[Lin | Act] = []
    i = 0
    for it in items:
        if isinstance(it, Lin):
            touched = i in free or i - 1 in free
            out.append(Lin(ks[i], it.stride, it.pad, it.params, it.spreads, it.unit,
                           _key(f"bal{sweeps}:{i}", *ws)) if touched else it)
            i += 1
        else:
            out.append(it)
    return out


# -- reading blocks off the graph ---------------------------------------------------------------


def _ints(a: Arg | None, default: list[int]) -> list[int] | None:
    if a is None or a.kind == "none":
        return default
    if a.kind == "ints":
        return [int(v) for v in a.value]
    if a.kind == "int":
        return [int(a.value)]
    return None


def _num(a: Arg | None, default: float) -> float | None:
    if a is None or a.kind == "none":
        return default
    if a.kind in ("int", "float"):
        return float(a.value)
    return None


def _flag(a: Arg | None) -> bool | None:
    if a is None or a.kind == "none":
        return False
    if a.kind == "bool":
        return bool(a.value)
    return None


def slopes(node: Node, value: Callable[[str], torch.Tensor | None]) -> tuple[float, float] | None:
    """The secant-slope range of an elementwise activation, as its op registration gives it (value:
    the graph's constants, for a range read off a weight)."""
    entry = lookup(node.op, node.overload) if node.namespace == "aten" else None
    if entry is None or entry.spec.slopes is None:
        return None
    try:
        return entry.spec.slopes(node, value)
    except Uncovered:
        return None  # an argument that is not a fixed number


@dataclass
class Reader:
    """Turns graph nodes into maps and activations; value(name) gives a constant tensor or None."""

    graph: Graph
    value: Callable[[str], torch.Tensor | None]
    fixed: set[str] = field(default_factory=set)  # tensors that do not depend on the input

    def __post_init__(self) -> None:
        # in graph order, so no tensor's constancy is found by recursion
        self.fixed = set(self.graph.params) | set(self.graph.constants)
        for node in self.graph.nodes:
            if all(t in self.fixed for t in node.tensor_inputs()) and node.namespace == "aten":
                self.fixed.update(o for o in node.outputs if o is not None)

    def fixed_value(self, name: str) -> torch.Tensor | None:
        return self.value(name) if name in self.fixed else None

    def const(self, a: Arg | None) -> torch.Tensor | None:
        v = self.fixed_value(str(a.value)) if a is not None and a.kind == "tensor" else None
        return None if v is None else v.to(torch.float64)

    def item(self, node: Node) -> Lin | Act | str | None:
        """A map, an activation, "id" for an identity, or None when the node cannot be in a block."""
        op = node.op
        if node.namespace != "aten":
            return None
        if op in _IDENTITY:
            train = node.arg("train") or node.arg("training")
            return None if train is not None and _flag(train) is not False else "id"
        if op in _CONVS:
            return self.conv(node)
        if op in _BNS:
            return self.bn(node)
        if op in _DENSE:
            return self.dense(node)
        s = slopes(node, self.fixed_value)
        if s is not None:
            return Act(s[0], s[1], node.name)
        return None

    def conv(self, node: Node) -> Lin | None:
        w = self.const(node.arg("weight", 1))
        if w is None or w.ndim < 3 or _flag(node.arg("transposed")) is not False:
            return None
        d = w.ndim - 2
        stride = _ints(node.arg("stride"), [1])
        pad = _ints(node.arg("padding"), [0])
        dil = _ints(node.arg("dilation"), [1])
        groups = _num(node.arg("groups"), 1.0)
        if stride is None or pad is None or dil is None or groups is None:
            return None
        if node.op in ("convolution", "_convolution"):
            out_pad = _ints(node.arg("output_padding"), [0])
            if out_pad is None or any(p != 0 for p in out_pad):
                return None
        stride, pad, dil = [v * d if len(v) == 1 else v for v in (stride, pad, dil)]
        g = int(groups)
        if len(stride) != d or len(pad) != d or len(dil) != d or g < 1 or w.shape[0] % g:
            return None
        if any(v < 1 for v in stride + dil) or any(p < 0 for p in pad):
            return None
        c_out, c_in_g = w.shape[0], w.shape[1]
        if g > 1:  # block-diagonal dense kernel
            wr = w.reshape(g, c_out // g, c_in_g, *w.shape[2:])
            eye = torch.eye(g, dtype=w.dtype)
            w = torch.einsum("gab...,gh->gahb...", wr, eye).reshape(c_out, g * c_in_g, *w.shape[2:])
        if any(v > 1 for v in dil):
            taps = [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(d)]
            wide = w.new_zeros(w.shape[0], w.shape[1], *taps)
            wide[(slice(None), slice(None), *[slice(None, None, v) for v in dil])] = w
            w = wide
        if w.numel() > MAX_KERNEL:
            return None
        lin = Lin(w, tuple(stride), tuple(pad), self.params(node), False, key=node.name)
        lin.spreads = not lin.pointwise and not (all(t == 1 for t in w.shape[2:]) and all(p == 0 for p in pad))
        return lin

    def bn(self, node: Node) -> Lin | None:
        if _flag(node.arg("training")) is not False:
            return None
        var = self.const(node.arg("running_var"))
        if var is None:
            return None
        eps = _num(node.arg("eps"), 1e-5)
        if eps is None:
            return None
        gamma = self.const(node.arg("weight"))
        denom = torch.sqrt(var + eps)
        scale = (gamma if gamma is not None else torch.ones_like(denom)) / denom
        if not bool(torch.isfinite(scale).all()):
            return None
        x = node.arg("input", 0)
        dims = self.graph.dims.get(x.value) if x is not None and x.kind == "tensor" else None
        if dims is None or len(dims) < 2 or dims[1] != scale.numel():
            return None
        d = len(dims) - 2
        k = torch.diag(scale).reshape(scale.numel(), scale.numel(), *([1] * d))
        return Lin(k, (1,) * d, (0,) * d, self.params(node), False, key=node.name)

    def dense(self, node: Node) -> Lin | None:
        w = self.const(node.arg("weight", 1))
        x = node.arg("input", 0)
        dims = self.graph.dims.get(x.value) if x is not None and x.kind == "tensor" else None
        if w is None or w.ndim != 2 or dims is None or len(dims) != 2:
            return None
        return Lin(w, (), (), self.params(node), False, key=node.name)

    def params(self, node: Node) -> tuple[str, ...]:
        return tuple(self.graph.params[t] for t in node.tensor_inputs() if t in self.graph.params)


def _main_output(node: Node) -> str | None:
    outs = node.outputs
    return outs[0] if outs else None


@dataclass
class Block:
    entry: str
    exit: str
    nodes: tuple[str, ...]
    items: list[Lin | Act]
    residual: bool
    composed: bool


def _fit(raw: list[Lin | Act]) -> tuple[list[Lin | Act], bool] | None:
    """Compose consecutive maps and absorb the masks of zero padding (module docstring); the flag
    says whether any maps were composed."""
    out: list[Lin | Act] = []
    composed = False
    spread = False  # a pending mask: the map since the last activation spreads
    for it in raw:
        if isinstance(it, Act):
            if out and isinstance(out[-1], Act):
                # two in a row are one activation: secant slopes multiply
                prev_act = out[-1]
                ends = [x * y for x in (prev_act.a, prev_act.b) for y in (it.a, it.b)]
                out[-1] = Act(min(ends), max(ends), prev_act.node)
                continue
            out.append(Act(min(it.a, 0.0), max(it.b, 0.0), it.node) if spread else it)
            spread = False
            continue
        prev = out[-1] if out else None
        if isinstance(prev, Lin):
            if prev.d != it.d:
                return None
            if spread and not it.pointwise:
                out += [Act(0.0, 1.0, "zero padding"), it]
                spread = it.spreads
                continue
            merged = compose(it, prev)
            if merged.kernel.numel() > MAX_KERNEL:
                return None
            out[-1] = merged
            composed = True
        else:
            out.append(it)
        spread = spread or it.spreads
    if not out:
        return None
    # an activation at either end gets an identity map beside it (W = I), so the chain still
    # alternates and the activation is bounded with the rest
    if isinstance(out[0], Act):
        first = next((it for it in out if isinstance(it, Lin)), None)
        if first is None:
            return None
        out.insert(0, identity(first.kernel.shape[1], first.d, first.kernel))
    if isinstance(out[-1], Act):
        last = next(it for it in reversed(out) if isinstance(it, Lin))
        out.append(identity(last.kernel.shape[0], last.d, last.kernel))
    return out, composed


def identity(n: int, d: int, like: torch.Tensor) -> Lin:
    """The identity on n channels with d spatial axes (pointwise)."""
    if like.is_meta:
        k = meta.empty([n, n, *([1] * d)], like)
    else:
        k = torch.eye(n, dtype=like.dtype, device=like.device).reshape(n, n, *([1] * d))
    return Lin(k, (1,) * d, (0,) * d, (), False, unit=True, key=f"I{n}")


def find_blocks(graph: Graph, reader: Reader) -> list[Block]:
    """Chains of single-consumer block nodes, and residual sums of an entry with a chain from it."""
    items: dict[str, Lin | Act | str | None] = {}

    def item_of(node: Node) -> Lin | Act | str | None:
        if node.name not in items:
            try:
                items[node.name] = reader.item(node)
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError):
                items[node.name] = None
        return items[node.name]

    def data_input(node: Node) -> str | None:
        ins = [t for t in node.tensor_inputs() if t not in reader.fixed]
        return ins[0] if len(ins) == 1 else None

    def back(tail: str) -> tuple[str, list[Node]]:
        """Walk from tail up through block nodes with single consumers: (entry, nodes in order)."""
        nodes: list[Node] = []
        cur = tail
        while True:
            node = graph.producer.get(cur)
            if node is None or _main_output(node) != cur or item_of(node) is None:
                break
            src = data_input(node)
            if src is None:
                break
            nodes.append(node)
            if len(graph.consumers.get(src, [])) != 1 or src in graph.outputs:
                cur = src
                break
            cur = src
        nodes.reverse()
        return cur, nodes

    def raw(nodes: list[Node]) -> list[Lin | Act]:
        out: list[Lin | Act] = []
        for n in nodes:
            it = item_of(n)
            if isinstance(it, (Lin, Act)):
                out.append(it)
        return out

    blocks: list[Block] = []
    seen_tails: set[str] = set()
    for node in graph.nodes:
        out = _main_output(node)
        if out is None:
            continue
        if node.namespace == "aten" and node.op in ("add", "add_") and _num(node.arg("alpha"), 1.0) == 1.0:
            a, b = node.arg("self", 0), node.arg("other", 1)
            if a is None or b is None or a.kind != "tensor" or b.kind != "tensor":
                continue
            dims = graph.dims.get(out)
            for x, y in ((a.value, b.value), (b.value, a.value)):
                if graph.dims.get(x) != dims or graph.dims.get(y) != dims:
                    continue
                entry, nodes = back(y)
                if entry != x or not nodes:
                    continue
                fit = _fit(raw(nodes))
                if fit is not None:
                    blocks.append(Block(x, out, (*[n.name for n in nodes], node.name), fit[0], True,
                                        fit[1]))
                break
        # plain chains end where the next node is not a block node or the tensor fans out
        if item_of(node) is None or out in seen_tails:
            continue
        cons = graph.consumers.get(out, [])
        if len(cons) == 1 and out not in graph.outputs and item_of(cons[0]) is not None and \
                data_input(cons[0]) == out:
            continue
        entry, nodes = back(out)
        seen_tails.add(out)
        fit = _fit(raw(nodes))
        if fit is not None and sum(isinstance(x, Lin) for x in raw(nodes)) >= 2:
            blocks.append(Block(entry, out, tuple(n.name for n in nodes), fit[0], False, fit[1]))
    # a residual block's bound is never above 1 + its branch's (triangle inequality), and the branch's
    # exit feeds only the sum: the branch alone would be measured for nothing
    branches = {(b.entry, b.nodes[:-1]) for b in blocks if b.residual}
    return [b for b in blocks if b.residual or (b.entry, b.nodes) not in branches]


def blocks(graph: Graph, value: Callable[[str], torch.Tensor | None]) -> list[Block]:
    """The graph's blocks, read without measuring anything."""
    return find_blocks(graph, Reader(graph, value))


def cost(blk: Block) -> float:
    """The work of the operators a block asks for (pool.shape_cost units), from shapes alone: the
    composites are formed, nothing is measured."""
    from lipaudit.pool import shape_cost

    shapes: list[tuple[int, ...]] = []

    def record(w: Lin) -> Interval:
        shapes.append(tuple(w.kernel.shape))
        return Interval(1.0, 1.0, "budget", "none", True)

    # on the meta device the composites get their shapes without being computed
    items = [replace(it, kernel=it.kernel.to("meta")) if isinstance(it, Lin) else it for it in blk.items]
    try:
        evaluate(replace(blk, items=items), record)
    except (RuntimeError, NotImplementedError, TypeError):  # a step with no meta kernel: not affordable
        return math.inf
    return math.fsum(shape_cost(s) for s in shapes)


def within(found: list[Block], budget: float) -> tuple[list[Block], list[Block]]:
    """(kept, left out): the cheapest blocks first while their total cost stays within budget, so a
    network of narrow blocks keeps them all and a wide one keeps what is affordable; decided by
    shapes alone, the same on any machine."""
    costs = [cost(b) for b in found]
    kept: set[int] = set()
    spent = 0.0
    for i in sorted(range(len(found)), key=lambda i: (costs[i], i)):
        if spent + costs[i] > budget:
            break
        spent += costs[i]
        kept.add(i)
    return [b for i, b in enumerate(found) if i in kept], [b for i, b in enumerate(found) if i not in kept]


def skipped(blk: Block, why: str) -> dict[str, Any]:
    """A block left at the product, as details.blocks lists it."""
    return {"entry": blk.entry, "exit": blk.exit, "nodes": list(blk.nodes), "residual": blk.residual,
            "rule": "product", "used": False, "skipped": why}


# -- block rules: each gives an upper bound on a block's Lipschitz constant ----------------------

BlockRule = Callable[[list[Lin | Act], bool, Norm], tuple[float, str]]
RULES: dict[str, BlockRule] = {}


def block_rule(name: str) -> Callable[[BlockRule], BlockRule]:
    """Registers a rule: (items, residual, norm) -> (upper bound, the label the report gives it).
    tests/graph/test_block_rules.py checks every registered rule against float64 Jacobians."""

    def deco(fn: BlockRule) -> BlockRule:
        if name in RULES:
            raise ValueError(f"block rule {name} registered twice")
        RULES[name] = fn
        return fn

    return deco


@block_rule("product")
def _product(items: list[Lin | Act], residual: bool, norm: Norm) -> tuple[float, str]:
    maps = math.prod(1.0 if it.unit else norm(it) for it in items if isinstance(it, Lin))
    gains = math.prod(it.gain for it in items if isinstance(it, Act))
    return maps * gains + (1.0 if residual else 0.0), "product"


@block_rule("loop transformation")
def _loop(items: list[Lin | Act], residual: bool, norm: Norm) -> tuple[float, str]:
    _, up, loop = chain_bound(items, residual, norm)
    return up, "loop transformation" if loop else "product"


@block_rule("rebalanced")
def _rebalanced(items: list[Lin | Act], residual: bool, norm: Norm) -> tuple[float, str]:
    scaled = rebalance(items)
    if scaled is None:
        return math.inf, "product"
    # D_0 = D_n = I: the whole chain's composite is the original's (the scalings cancel inside it)
    _, up, loop = chain_bound(scaled, residual, norm, whole_map(items))
    return up, "loop transformation" if loop else "product"


def evaluate(blk: Block, norm: Callable[[Lin], Interval]) -> tuple[BlockBound | None, bool]:
    """The block's bounds: the least over the registered rules (None when its maps do not fit
    together); the flag is False when a norm it used was not certified. The operators asked for
    depend only on the block, never on the values returned, so a caller may plan them in a first walk."""
    certified = True
    seen: dict[str, float] = {}  # rules share composites: each is measured once

    def upper(w: Lin) -> float:
        # a norm that cannot be had leaves the block at the product
        nonlocal certified
        if w.key and w.key in seen:
            return seen[w.key]
        try:
            iv = norm(w)
            certified = certified and iv.certified
            value = iv.upper
        except (Uncovered, ValueError, RuntimeError):
            value = math.inf
        if w.key:
            seen[w.key] = value
        return value

    try:
        found = {name: rule(blk.items, blk.residual, upper) for name, rule in RULES.items()}
    except ValueError:
        return None, certified
    product = found["product"][0]
    best = min(found, key=lambda name: found[name][0])  # ties go to the first registered
    up, label = found[best]
    rescaled = best == "rebalanced" and up < found["loop transformation"][0]
    if label == "product" and (blk.composed or blk.residual or rescaled):
        label = "composite"
    return BlockBound(blk.entry, blk.exit, blk.nodes, blk.residual, product, min(up, product), label,
                      rescaled), certified
