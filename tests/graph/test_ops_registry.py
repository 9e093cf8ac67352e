"""Every registered op rule against the real aten op in float64: the factor a rule gives for each
tensor input (and the walk's combination of them) is never below the exact Jacobian norm at random
points, nor below a secant slope across the places where the op may jump.

Cases come from the generator each rule declares next to its registration, so a rule registered
tomorrow is tested here with nothing written by hand. LIPAUDIT_LONG=1 runs 50 examples per name (or
LIPAUDIT_LONG_EXAMPLES) instead of 4."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from lipaudit.checkpoint.pt2 import DTYPES
from lipaudit.graph import ops
from lipaudit.graph.bound import Bounder
from lipaudit.graph.interpret import CannotRun, Evaluator, allowed, check_shapes, run_node, stand_in
from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.graph.ops import Case, Const, Uncovered, Var

LONG = os.environ.get("LIPAUDIT_LONG") == "1"
EXAMPLES = int(os.environ.get("LIPAUDIT_LONG_EXAMPLES", "50")) if LONG else 4
CODES = {v: k for k, v in DTYPES.items()}
TALLY: Counter[str] = Counter()  # outcomes, printed by the long run


class HypothesisDraw:
    """The Draw a rule's generator sees, backed by hypothesis."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))

    def int(self, lo: int, hi: int) -> int:
        return int(self.data.draw(st.integers(lo, max(lo, hi))))

    def float(self, lo: float, hi: float) -> float:
        return float(self.data.draw(st.floats(lo, hi, allow_nan=False)))

    def bool(self) -> bool:
        return bool(self.data.draw(st.booleans()))

    def choice(self, options: Sequence[Any]) -> Any:
        return self.data.draw(st.sampled_from(list(options)))

    def tensor(self, shape: tuple[int, ...], lo: float = -2.0, hi: float = 2.0) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=torch.float64) * (hi - lo) + lo


class Built:
    """One node from a case: its graph, the constant values, and the real op as a function of the
    input-dependent operands (float64 in, float64 outputs)."""

    def __init__(self, name: str, case: Case) -> None:
        entry = ops.lookup(name.split(".")[0], case.overload)
        assert entry is not None
        self.entry = entry
        base = name.split(".")[0]
        self.base = base
        packet = getattr(torch.ops.aten, base)
        overload = case.overload
        if overload not in packet.overloads():
            # an in-place op spells its overloads its own way: the one taking the case's arguments
            fits = [o for o in packet.overloads() if not o.endswith("out") and set(case.args) - {"input", "self"}
                    <= {a.name for a in getattr(packet, o)._schema.arguments}]
            if entry.inplace_of is None or not fits:
                raise LookupError(f"{base} has no overload {case.overload}")
            overload = fits[0]
        self.overload = overload
        self.fn = getattr(packet, overload)
        schema = self.fn._schema.arguments
        names = [a.name for a in schema]
        if names and names[0] not in case.args:
            # self / input: in-place and out-of-place variants name the first operand differently
            for other in ("input", "self"):
                if other in case.args and other not in names:
                    case = Case({names[0] if k == other else k: v for k, v in case.args.items()}, case.overload,
                                case.focus, case.scale)
        unknown = set(case.args) - set(names)
        assert not unknown, f"the case names arguments aten.{base}.{case.overload} lacks: {unknown}"
        self.vars: dict[str, Var] = {}
        self.consts: dict[str, torch.Tensor] = {}
        self.args: list[tuple[str, Arg]] = []
        self.positional: list[bool] = []
        self.layout: list[tuple[str, bool, Any]] = []  # (schema name, kwarg only, value or tensor names)
        for a in schema:
            if a.name not in case.args:
                continue
            v = case.args[a.name]
            arg, raw = self._arg(v, str(a.type))
            self.args.append((a.name, arg))
            self.positional.append(not a.kwarg_only)
            self.layout.append((a.name, a.kwarg_only, raw))
        self.case = case

    def _tensor(self, v: Var | Const) -> str:
        n = f"t{len(self.vars) + len(self.consts)}"
        if isinstance(v, Var):
            self.vars[n] = v
        else:
            self.consts[n] = v.value
        return n

    def _arg(self, v: Any, typ: str) -> tuple[Arg, Any]:
        if isinstance(v, (Var, Const)):
            n = self._tensor(v)
            return Arg("tensor", n), ("tensor", n)
        if isinstance(v, list) and v and all(isinstance(t, (Var, Const)) or t is None for t in v):
            ns = [self._tensor(t) if t is not None else None for t in v]
            return Arg("opt_tensors" if "?" in typ else "tensors", ns), ("tensors", ns)
        if v is None:
            return Arg("none", None), ("value", None)
        if isinstance(v, bool):
            return Arg("bool", v), ("value", v)
        if isinstance(v, int):
            return Arg("int", v), ("value", v)
        if isinstance(v, float):
            return Arg("float", v), ("value", v)
        if isinstance(v, str):
            return Arg("str", v), ("value", v)
        if isinstance(v, torch.dtype):
            return Arg("dtype", CODES[v]), ("value", v)
        if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return Arg("ints", list(v)), ("value", list(v))
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            return Arg("floats", [float(x) for x in v]), ("value", [float(x) for x in v])
        raise AssertionError(f"a case value of an unexpected kind: {v!r}")

    def call(self, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The real op; an in-place op runs on a copy of its operand."""
        def get(n: str) -> torch.Tensor:
            if n in values:
                return values[n]
            return self.consts[n]

        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for i, (name, kw_only, (kind, raw)) in enumerate(self.layout):
            if kind == "tensor":
                v: Any = get(raw)
                if i == 0 and self.entry.inplace_of is not None:
                    v = v.clone()
            elif kind == "tensors":
                v = [get(t) if t is not None else None for t in raw]
            else:
                v = raw
            if kw_only:
                kwargs[name] = v
            else:
                args.append(v)
        out = self.fn(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [t for t in outs if isinstance(t, torch.Tensor)]

    def draw_point(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        pts = {}
        for n, v in self.vars.items():
            x = torch.randn(v.shape, generator=gen, dtype=torch.float64) * self.case.scale
            if self.case.focus:
                f = torch.tensor(self.case.focus, dtype=torch.float64)
                pick = torch.randint(0, len(f), v.shape, generator=gen)
                near = f[pick] + torch.randn(v.shape, generator=gen, dtype=torch.float64) * 1e-3
                x = torch.where(torch.rand(v.shape, generator=gen) < 0.5, near, x)
            pts[n] = x.to(v.dtype).to(torch.float64) if v.dtype.is_floating_point else x.to(v.dtype)
        return pts

    def graph(self, outputs: list[torch.Tensor]) -> tuple[Graph, Node, list[str]]:
        outs = [f"o{i}" for i in range(len(outputs))]
        shapes: dict[str, tuple[int, ...] | None] = {}
        dtypes: dict[str, int] = {}
        for n, v in self.vars.items():
            shapes[n], dtypes[n] = tuple(v.shape), CODES[v.dtype]
        for n, c in self.consts.items():
            shapes[n], dtypes[n] = tuple(c.shape), CODES.get(c.dtype, 7)
        for n, t in zip(outs, outputs, strict=True):
            shapes[n], dtypes[n] = tuple(t.shape), CODES.get(t.dtype, 7)
        node = Node(outs[0], f"torch.ops.aten.{self.base}.{self.overload}", "aten", self.base,
                    self.overload, tuple(self.args), tuple(self.positional), tuple(outs))
        g = Graph([node], shapes, dtypes, {n: n for n in self.consts}, {n: "parameter" for n in self.consts}, {},
                  list(self.vars), outs, dims={k: v for k, v in shapes.items() if v is not None},
                  hints={k: v for k, v in shapes.items() if v is not None})
        g.index()
        return g, node, outs

    def factors(self, g: Graph, node: Node, outs: list[str], sources: dict[str, float]) -> dict[str, dict[str, float]]:
        """The walk's log10 bound of each output w.r.t. each source; raises Uncovered."""
        def load(n: str) -> torch.Tensor:
            return self.consts[n]

        b = Bounder(g, Evaluator(g, load), 1e-6, 1e-3, 0)
        b.partial_in = {}
        for n in self.vars:
            b.lips[n] = {n: 0.0} if not sources else {"s": sources[n]}
        b.visit(node, outs)
        return {o: b.lip(o) for o in outs}


def _jacobian_norm(fn: Callable[..., torch.Tensor], xs: tuple[torch.Tensor, ...]) -> float | None:
    try:
        jac = torch.autograd.functional.jacobian(fn, xs)
    except (RuntimeError, NotImplementedError):
        return None  # no derivative formula: the secants still check the factor
    m = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1) if isinstance(jac, tuple) else jac
    m = m.reshape(m.shape[0], -1) if m.ndim != 2 else m
    if m.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(m).all()):
        return math.inf
    return float(torch.linalg.svdvals(m)[0])


def _norm(v: torch.Tensor) -> float:
    """||v||_2 without overflow (a factor near 1e300 makes squares infinite)."""
    m = float(v.abs().max()) if v.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return float(torch.linalg.vector_norm(v / m)) * m


def _within(value: float, log10_bound: float, slack: float) -> bool:
    if value <= 0 or (not math.isfinite(log10_bound) and log10_bound < 0):
        return value <= 1e-12
    return value <= 10.0**log10_bound * (1 + slack) + 1e-12


def _built(name: str, case: Case, seed: int) -> tuple[Built, torch.Generator, dict[str, torch.Tensor],
                                                     list[torch.Tensor], Graph, Node, list[str]]:
    """The case's node, a seeded generator, a first point, the op's outputs there and its graph."""
    built = Built(name, case)
    gen = torch.Generator().manual_seed(seed)
    x0 = built.draw_point(gen)
    outputs = [t.detach() for t in built.call(x0)]
    return (built, gen, x0, outputs, *built.graph(outputs))


def _run_cases(name: str, check_one: Callable[[str, Case, int], str], tally: str) -> None:
    """check_one on the cases the registration's generator draws; arguments torch refuses are
    rejected, and at least one case must run."""
    entry = ops.REGISTRY[name]
    sample = entry.spec.sample
    assert sample is not None, f"aten.{name} has no case generator"
    ran: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = sample(HypothesisDraw(data), entry.runs_as)  # an in-place name gets its out-of-place cases
        try:
            outcome = check_one(name, case, data.draw(st.integers(0, 2**31 - 1)))
        except (RuntimeError, LookupError, IndexError, ValueError) as e:
            if isinstance(e, AssertionError):
                raise
            ran["invalid"] += 1
            reject()  # arguments torch itself refuses (an in-place op cannot broadcast its operand)
        ran[outcome] += 1

    run()
    TALLY.update({f"{tally}:{k}": v for k, v in ran.items()})
    assert sum(v for k, v in ran.items() if k != "invalid") > 0, f"aten.{name}: no case torch accepts"


def check(name: str, case: Case, seed: int) -> str:
    """'covered', 'uncovered' or 'constant'; fails on a factor below the truth."""
    built, gen, x0, outputs, g, node, outs = _built(name, case, seed)
    case = built.case
    try:
        own = built.factors(g, node, outs, {})
    except Uncovered:
        return "uncovered"
    if not built.vars:
        return "constant"
    float_outs = [i for i, t in enumerate(outputs) if t.is_floating_point()]
    names = [n for n, v in built.vars.items() if v.dtype.is_floating_point]
    if not names:
        return "constant"
    # random linear maps from one source to every operand: the walk's combination is checked too
    sizes = {n: math.prod(built.vars[n].shape) for n in names}
    m = max(sizes.values())
    maps = {n: torch.randn(sizes[n], m, generator=gen, dtype=torch.float64) for n in names}
    map_norm = {n: math.log10(float(torch.linalg.svdvals(a)[0])) for n, a in maps.items()}
    tied = built.factors(g, node, outs, map_norm)
    covered = False
    for point in range(3):
        x = x0 if point == 0 else built.draw_point(gen)
        for i in float_outs:
            o = outs[i]
            for n in names:
                bound = own[o].get(n)
                if bound is None:
                    continue  # the output does not depend on n
                covered = True

                def f(t: torch.Tensor, n: str = n, i: int = i, x: dict[str, torch.Tensor] = x) -> torch.Tensor:
                    return built.call({**x, n: t})[i].to(torch.float64).reshape(-1)

                jn = _jacobian_norm(f, (x[n],))
                assert jn is None or _within(jn, bound, 1e-9), (
                    f"{name}: ||J|| = {jn} > factor {10**bound} for input {n} at {case}")
                for eps in (1e-5, 1e-3, 1e-1, 1.0):
                    u = torch.randn(x[n].shape, generator=gen, dtype=torch.float64)
                    y = (x[n] + eps * case.scale * u / max(float(u.norm()), 1e-300)).to(
                        built.vars[n].dtype).to(torch.float64)
                    dist = float((y - x[n]).norm())
                    if dist == 0:
                        continue
                    slope = _norm(f(y) - f(x[n])) / dist
                    assert _within(slope, bound, 1e-6), (
                        f"{name}: secant slope {slope} > factor {10**bound} for input {n} at {case}")
            s_bound = tied[o].get("s")
            if s_bound is None:
                continue

            def h(s: torch.Tensor, i: int = i, x: dict[str, torch.Tensor] = x) -> torch.Tensor:
                vals = {n: x[n] + (maps[n] @ s).reshape(x[n].shape) for n in names}
                return built.call(vals)[i].to(torch.float64).reshape(-1)

            s0 = torch.zeros(m, dtype=torch.float64)
            jn = _jacobian_norm(h, (s0,))
            assert jn is None or _within(jn, s_bound, 1e-9), (
                f"{name}: joint ||J|| = {jn} > walk bound {10**s_bound} at {case}")
    return "covered" if covered else "constant"


def _names() -> list[str]:
    return sorted(ops.REGISTRY)


def test_every_rule_declares_cases() -> None:
    missing = sorted(n for n, e in ops.REGISTRY.items() if e.spec.sample is None)
    assert not missing, f"rules without a case generator: {missing}"


def test_the_interpreter_runs_exactly_the_registry() -> None:
    assert allowed() == frozenset(n for n, e in ops.REGISTRY.items() if e.spec.run)
    for name in allowed():
        entry = ops.REGISTRY[name]
        packet = getattr(torch.ops.aten, entry.runs_as)  # every name is a real aten op
        if "." in name:
            assert name.split(".")[1] in packet.overloads()


def test_a_second_registration_is_refused() -> None:
    with pytest.raises(RuntimeError, match="registered twice"):
        ops.register("relu", sample=None)(lambda ctx, node: ops.Constant())


@pytest.mark.parametrize("name", _names())
def test_rule_against_jacobians_and_secants(name: str) -> None:
    _run_cases(name, check, ops.REGISTRY[name].spec.family)


def _slope_names() -> list[str]:
    return sorted(n for n, e in ops.REGISTRY.items() if e.spec.slopes is not None)


def test_block_activations_register_their_slopes() -> None:
    """The activations the block bounds rely on (graph/tighten.py) each carry a range."""
    have = {n.rstrip("_") for n in _slope_names()}
    assert {"relu", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "mish", "celu",
            "softplus", "softshrink", "threshold"} <= have


def check_slopes(name: str, case: Case, seed: int) -> str:
    """'checked' or 'open'; fails when a derivative or a secant slope of the real op, elementwise,
    leaves the range the registration gives."""
    built, gen, x0, _, _, node, _ = _built(name, case, seed)
    case = built.case
    spec = built.entry.spec
    assert spec.slopes is not None
    try:
        rng = spec.slopes(node, built.consts.get)
    except Uncovered:
        return "open"
    if rng is None:
        return "open"
    a, b = rng
    assert a <= b, f"{name}: empty range {rng} at {case}"
    (n,) = [v for v in built.vars if built.vars[v].dtype.is_floating_point][:1] or [None]
    assert n is not None, f"{name}: an activation without a float operand at {case}"
    tol = 1e-9 * max(1.0, abs(a), abs(b))

    def f(t: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return built.call({**x, n: t})[0].to(torch.float64)

    for point in range(3):
        x = x0 if point == 0 else built.draw_point(gen)
        t = x[n].clone().requires_grad_(True)
        y = f(t, x)
        assert y.shape == t.shape, f"{name}: not elementwise at {case}"
        (d,) = torch.autograd.grad(y.sum(), t)
        assert bool(((d >= a - tol) & (d <= b + tol)).all()), (
            f"{name}: f' in [{float(d.min())}, {float(d.max())}] leaves {rng} at {case}")
        for eps in (1e-5, 1e-2, 1.0, 10.0):
            step = eps * case.scale * torch.randn(t.shape, generator=gen, dtype=torch.float64)
            x1 = x[n] + step
            h = x1 - x[n]
            keep = h != 0
            if not bool(keep.any()):
                continue
            fy, fx = f(x1, x).detach(), y.detach()
            secant = (fy - fx)[keep] / h[keep]
            slack = tol + 4e-16 * (fy.abs() + fx.abs())[keep] / h[keep].abs()
            assert bool(((secant >= a - slack) & (secant <= b + slack)).all()), (
                f"{name}: secant slope in [{float(secant.min())}, {float(secant.max())}] leaves {rng} at {case}")
    return "checked"


@pytest.mark.parametrize("name", _slope_names())
def test_slope_range_against_derivatives_and_secants(name: str) -> None:
    _run_cases(name, check_slopes, "slopes")


def test_long_run_tally() -> None:
    """The outcome counts per family, written to $LIPAUDIT_TALLY (a JSON file) when it is set."""
    path = os.environ.get("LIPAUDIT_TALLY")
    if path:
        import json

        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(TALLY.items())), f, indent=1)



def _stand_in_names() -> list[str]:
    return sorted(n for n, e in ops.REGISTRY.items() if callable(e.spec.extra.get("meta")) and e.spec.run)


def test_common_network_ops_have_stand_ins() -> None:
    """Shapes-only stand-ins for the ops of common CNNs and MLPs: without them, checking an archive's
    shapes imports the compiler stack (graph/ops/meta.py)."""
    have = {ops.REGISTRY[n].runs_as for n in _stand_in_names()}
    assert {"convolution", "conv2d", "linear", "addmm", "mm", "matmul", "batch_norm", "relu", "hardtanh", "silu",
            "add", "mul", "cat", "max_pool2d", "adaptive_avg_pool2d", "mean", "upsample_nearest2d",
            "_native_batch_norm_legit_no_training", "layer_norm", "native_layer_norm", "softmax", "_softmax"} <= have


def check_stand_in(name: str, case: Case, seed: int) -> str:
    """The shapes check (interpret.check_shapes, which runs the stand-in on meta tensors) finds every
    output shape the real op gives, and no node it cannot run."""
    built, _, x0, outputs, g, node, _ = _built(name, case, seed)
    mismatched, unverified = check_shapes(g, lambda n: built.consts[n].to("meta"))
    if unverified:
        with pytest.raises(CannotRun):  # only a node the interpreter never runs (training mode)
            run_node(node, {**built.consts, **x0}, g)
        return "refused"
    assert not mismatched, (name, case, [tuple(t.shape) for t in outputs], mismatched)
    return "checked"


@pytest.mark.parametrize("name", _stand_in_names())
def test_stand_in_gives_the_op_shapes(name: str) -> None:
    _run_cases(name, check_stand_in, "stand-ins")


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64, device="meta")


@pytest.mark.parametrize(("op", "overload", "args"), [
    ("conv2d", "default", {"input": _meta(1, 3, 5, 5), "weight": _meta(4, 2, 3, 3), "stride": [1],
                           "padding": [0], "dilation": [1], "groups": 1}),  # channels
    ("conv2d", "default", {"input": _meta(1, 2, 2, 2), "weight": _meta(4, 2, 3, 3), "stride": [1],
                           "padding": [0], "dilation": [1], "groups": 1}),  # a kernel wider than the input
    ("conv_transpose2d", "input", {"input": _meta(1, 2, 3, 3), "weight": _meta(2, 4, 3, 3), "stride": [1],
                                   "padding": [0], "output_padding": [1], "groups": 1, "dilation": [1]}),
    ("max_pool2d", "default", {"self": _meta(1, 1, 4, 4), "kernel_size": [2], "stride": [], "padding": [2],
                               "dilation": [1], "ceil_mode": False}),  # padding over half the kernel
    ("cat", "default", {"tensors": [_meta(2, 3), _meta(2, 4)], "dim": 0}),
    ("mm", "default", {"self": _meta(2, 3), "mat2": _meta(4, 2)}),
    ("add", "Tensor", {"self": _meta(2, 3), "other": _meta(4), "alpha": 1}),
])
def test_stand_in_refuses_what_the_op_refuses(op: str, overload: str, args: dict[str, Any]) -> None:
    """Where the CPU op raises, the stand-in raises too, so the shapes check never vouches for it."""
    def real(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros(v.shape, dtype=torch.float64)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [real(t) for t in v]
        return v

    with pytest.raises((RuntimeError, ValueError, IndexError)):
        getattr(getattr(torch.ops.aten, op), overload)(**{k: real(v) for k, v in args.items()})
    with pytest.raises(ValueError):
        ops.lookup(op, overload).spec.extra["meta"](op, args)  # type: ignore[union-attr]


def test_batch_norm_stand_in_refuses_statistics_of_another_length() -> None:
    """Stricter than the CPU kernel, which reads past a short statistic without a check."""
    args = {"input": _meta(2, 3, 4), "weight": _meta(4), "bias": None, "running_mean": _meta(3),
            "running_var": _meta(3), "momentum": 0.1, "eps": 1e-5}
    op = "_native_batch_norm_legit_no_training"
    with pytest.raises(ValueError):
        ops.lookup(op).spec.extra["meta"](op, args)  # type: ignore[union-attr]


@pytest.mark.parametrize(("op", "overload", "args"), [
    ("conv2d", "padding", {"input": _meta(1, 2, 5, 6), "weight": _meta(3, 2, 2, 4), "padding": "same",
                           "dilation": [2, 1]}),
    ("conv2d", "padding", {"input": _meta(1, 2, 9, 7), "weight": _meta(3, 2, 3, 2), "padding": "valid",
                           "stride": [2, 3]}),
    ("conv1d", "default", {"input": _meta(2, 7), "weight": _meta(4, 2, 3), "padding": [1]}),  # unbatched
    ("conv_transpose1d", "default", {"input": _meta(2, 5), "weight": _meta(2, 3, 4), "stride": [3],
                                     "output_padding": [2]}),
    ("max_pool2d", "default", {"self": _meta(1, 1, 7, 6), "kernel_size": [3, 2], "stride": [2],
                               "padding": [1], "ceil_mode": True}),
    ("max_pool1d", "default", {"self": _meta(3, 8), "kernel_size": [3], "dilation": [2]}),
    ("hstack", "default", {"tensors": [_meta(2, 3), _meta(2, 1)]}),
    ("vstack", "default", {"tensors": [_meta(3), _meta(2, 3)]}),
    ("sum", "dim_IntList", {"self": _meta(2, 3, 4), "dim": []}),
    ("mean", "dim", {"self": _meta(2, 3, 4), "dim": [-1, 0], "keepdim": True}),
    ("max", "dim", {"self": _meta(2, 3, 4), "dim": 1}),
    ("upsample_nearest2d", "vec", {"input": _meta(1, 2, 3, 5), "output_size": None,
                                   "scale_factors": [1.5, 2.5]}),
    ("linear", "default", {"input": _meta(5), "weight": _meta(3, 5), "bias": _meta(3)}),
    ("matmul", "default", {"self": _meta(4), "other": _meta(2, 4, 3)}),
    ("addmm", "default", {"self": _meta(3), "mat1": _meta(2, 4), "mat2": _meta(4, 3)}),
])
def test_stand_in_edge_cases(op: str, overload: str, args: dict[str, Any]) -> None:
    """Argument forms the case generators do not draw: string padding, unbatched inputs, ceil mode,
    reductions over every axis, scale factors, vector operands."""
    real = {k: ([torch.zeros(t.shape, dtype=torch.float64) for t in v] if isinstance(v, list) and v
                and isinstance(v[0], torch.Tensor) else torch.zeros(v.shape, dtype=torch.float64)
                if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want = getattr(getattr(torch.ops.aten, op), overload)(**real)
    node = Node("o", f"torch.ops.aten.{op}.{overload}", "aten", op, overload, (), (), ("o",))
    shapes = stand_in(node)
    assert shapes is not None
    got = shapes(**args)
    wants = list(want) if isinstance(want, (tuple, list)) else [want]
    gots = list(got) if isinstance(got, (tuple, list)) else [got]
    assert [tuple(t.shape) for t in gots] == [tuple(t.shape) for t in wants]
