"""Graph op rules: one registry for the bound, the interpreter's allowlist and the covered-op set.

A rule is registered once, for the aten op names it covers, with the generator of its test cases
(tests/graph/test_ops_registry.py runs every registered rule against float64 autograd Jacobians and
secant slopes). In-place variants (`relu_`) are registered with their out-of-place rule."""

from __future__ import annotations

from lipaudit.graph.ops import (  # noqa: F401 - importing a family registers its rules
    activations,
    batchnorm,
    elementwise,
    factories,
    linear,
    pooling,
    reductions,
    shapes,
    uncovered,
)
from lipaudit.graph.ops.base import (
    Case,
    Const,
    Constant,
    Context,
    Diagonal,
    Draw,
    Effect,
    Gains,
    Linear,
    LinearOp,
    Uncovered,
    Var,
)
from lipaudit.graph.ops.registry import REGISTRY, Entry, lookup, register

__all__ = [
    "REGISTRY", "Case", "Const", "Constant", "Context", "Diagonal", "Draw", "Effect", "Entry", "Gains", "Linear",
    "LinearOp", "Uncovered", "Var", "covered", "lookup", "register",
]


def covered() -> frozenset[str]:
    """Every registered aten name (ops with a rule; some rules only say why a node is uncovered)."""
    return frozenset(REGISTRY)
