"""The pieces every op rule shares: what a rule returns, how it reads arguments, and the context
(the graph walk) it may ask about shapes, constant values and operator norms."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.spectral import Interval


class Uncovered(Exception):
    """The node has no certified factor; the reason is shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    tag: str = ""  # tells apart operators cut from the same parameters (slices of a batched weight)
    # not an argument: a copy with another weight (dataclasses.replace) must not inherit it
    known_digest: str = field(default="", init=False, repr=False, compare=False)

    def digest(self) -> str:
        """weight_digest(self.weight), computed once per operator."""
        if not self.known_digest:
            self.known_digest = weight_digest(self.weight)
        return self.known_digest


def weight_digest(w: torch.Tensor) -> str:
    """A weight's float64 bytes, hashed: the identity of an operator however a walk built it."""
    raw = w.detach().to(torch.float64).contiguous().cpu().numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


# -- what a rule returns ------------------------------------------------------------------------


@dataclass(frozen=True)
class Gains:
    """out = f(inputs) with f Lipschitz in input i with constant 10**log10 (broadcast copies
    included). Terms add (the triangle inequality) or, when each output element reads at most one
    term's element (concatenation, selection, max), add in quadrature."""

    terms: tuple[tuple[str, float], ...]
    quadrature: bool = False
    first_only: bool = False  # the other outputs are indices or saved statistics, not values
    note: str = ""


@dataclass(frozen=True)
class Linear:
    """A linear operator the walk measures (through its `norm`), folds and merges."""

    op: LinearOp
    kind: str  # linear, conv2d, conv_transpose2d, ...


@dataclass(frozen=True)
class Diagonal:
    """A per-channel scale on channel axis 1 (eval-mode batch norm), folded into the map before it."""

    x: str
    scale: torch.Tensor
    params: tuple[str, ...]


@dataclass(frozen=True)
class Constant:
    """The outputs do not depend on the values of the tensor inputs (only on their shapes)."""


Effect = Gains | Linear | Diagonal | Constant


class Context(Protocol):
    """What a rule may ask the walk."""

    g: Graph

    def is_const(self, name: str) -> bool: ...
    def dims(self, name: str) -> tuple[int | str, ...]: ...
    def fixed(self, name: str, axes: list[int]) -> list[int]: ...
    def ratio(self, src: str, out: str) -> float: ...
    def value(self, name: str) -> torch.Tensor: ...
    def param_of(self, name: str) -> tuple[str, ...]: ...
    def op_norm(self, op: LinearOp) -> Interval: ...


Rule = Callable[[Context, Node], Effect]


# -- test cases each rule declares --------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """An input-dependent tensor operand of a test case."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Const:
    """A constant tensor operand (a parameter or a folded constant) of a test case."""

    value: torch.Tensor


@dataclass(frozen=True)
class Case:
    """One call of an aten op for the registry's property test: arguments by schema name (tensors as
    Var or Const, lists of them for list arguments), and values near which inputs are drawn so that
    secants cross the places where the op may jump."""

    args: dict[str, Any]
    overload: str = "default"
    focus: tuple[float, ...] = ()
    scale: float = 2.0


_Int = int
_Float = float
_Bool = bool


class Draw(Protocol):
    """Random choices for a case (the test backs it with hypothesis)."""

    def int(self, lo: _Int, hi: _Int) -> _Int: ...
    def float(self, lo: _Float, hi: _Float) -> _Float: ...
    def bool(self) -> _Bool: ...
    def choice(self, options: Sequence[Any]) -> Any: ...
    def tensor(self, shape: tuple[_Int, ...], lo: _Float = -2.0, hi: _Float = 2.0) -> torch.Tensor: ...


Sample = Callable[[Draw, str], Case]
# A constant tensor of the graph by name, or None when it depends on the input.
Value = Callable[[str], "torch.Tensor | None"]
# The secant-slope range [a, b] of an elementwise activation node (its constant operands read through
# Value), or None where its arguments leave it open; used by the block bounds (graph/tighten.py).
Slopes = Callable[[Node, Value], "tuple[float, float] | None"]


# -- reading arguments ---------------------------------------------------------------------------


def ints(a: Arg | None, default: list[int]) -> list[int]:
    if a is None or a.kind == "none":
        return default
    if a.kind == "ints":
        return list(a.value)
    if a.kind == "int":
        return [int(a.value)]
    raise Uncovered("an integer-list argument is not fixed")


def integer(a: Arg | None, default: int) -> int:
    if a is None or a.kind == "none":
        return default
    if a.kind == "int":
        return int(a.value)
    raise Uncovered("an integer argument is not fixed")


def num(a: Arg | None, default: float | None) -> float | None:
    if a is None or a.kind == "none":
        return default
    if a.kind in ("int", "float", "bool"):
        return float(a.value)
    raise Uncovered("a scalar argument is not a fixed number")


def number(a: Arg | None, default: float) -> float:
    v = num(a, default)
    return default if v is None else v


def flag(a: Arg | None, default: bool) -> bool:
    if a is None or a.kind == "none":
        return default
    if a.kind == "bool":
        return bool(a.value)
    raise Uncovered("a boolean argument is not fixed")


def per_axis(v: list[int], d: int, name: str) -> tuple[int, ...]:
    if len(v) == 1:
        return tuple(v * d)
    if len(v) != d:
        raise Uncovered(f"{name} has {len(v)} entries for {d} spatial axes")
    return tuple(v)


def lg(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def tensor_arg(node: Node, name: str, index: int) -> str:
    a = node.arg(name, index)
    if a is None or a.kind != "tensor":
        raise Uncovered(f"aten.{node.op} without a tensor {name}")
    return str(a.value)


def first(node: Node) -> str:
    """The node's first tensor operand (self / input)."""
    a = node.arg("self", 0) or node.arg("input", 0)
    if a is None or a.kind != "tensor":
        ins = node.tensor_inputs()
        if not ins:
            raise Uncovered(f"aten.{node.op} without a tensor operand")
        return ins[0]
    return str(a.value)


def out(node: Node) -> str:
    return next((o for o in node.outputs if o is not None), node.name)


def varying(ctx: Context, names: Sequence[str | None]) -> list[str]:
    return [n for n in names if n is not None and not ctx.is_const(n)]


def unary(ctx: Context, node: Node, gain: float, x: str | None = None, first_only: bool = False,
          note: str = "") -> Gains:
    """An elementwise (or copying) map of one operand: gain plus the broadcast copies of it."""
    x = x if x is not None else first(node)
    return Gains(((x, lg(gain) + ctx.ratio(x, out(node))),), first_only=first_only, note=note)


@dataclass
class Spec:
    """A registration: the names, the rule and its test cases."""

    names: tuple[str, ...]
    rule: Rule
    sample: Sample | None
    family: str
    run: bool = True  # the interpreter may run it
    alias: bool = False  # the output may share memory with the first operand (views)
    inplace: bool = True  # register name_ for each name that torch has
    extra: dict[str, Any] = field(default_factory=dict)
    slopes: Slopes | None = None  # elementwise activations only


def small_shape(d: Draw, ndim: tuple[int, int] = (1, 3), hi: int = 4) -> tuple[int, ...]:
    return tuple(d.int(1, hi) for _ in range(d.int(*ndim)))


def broadcastable(d: Draw, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts with `shape`: some axes set to 1, maybe fewer axes, maybe wider."""
    out = [1 if d.bool() else s for s in shape]
    if out and d.bool():
        out = out[d.int(0, len(out)) :]
    elif d.int(0, 3) == 0:
        out = [d.int(1, 3)] + [1] * len(shape)
    return tuple(out)
