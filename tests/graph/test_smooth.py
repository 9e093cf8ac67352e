"""The ascent's smooth stand-ins: one per kinked activation, each a registered op, each tending to
the op as beta grows, each with a gradient where the op has none."""

from __future__ import annotations

import pytest
import torch

from lipaudit.graph.ops import lookup
from lipaudit.graph.ops.smooth import SMOOTH

A = torch.ops.aten
X = torch.linspace(-9.0, 9.0, 1001, dtype=torch.float64)
CASES = {
    "relu": ((), A.relu.default),
    "relu6": ((), A.relu6.default),
    "hardtanh": ((-0.5, 2.0), A.hardtanh.default),
    "clamp": ((-1.0, 3.0), A.clamp.default),
    "clip": ((None, 3.0), A.clip.default),
    "clamp_min": ((0.5,), A.clamp_min.default),
    "clamp_max": ((0.5,), A.clamp_max.default),
    "leaky_relu": ((0.2,), A.leaky_relu.default),
    "abs": ((), A.abs.default),
    "hardsigmoid": ((), A.hardsigmoid.default),
    "hardswish": ((), A.hardswish.default),
}


def test_every_stand_in_has_a_case_and_a_rule() -> None:
    assert set(SMOOTH) == set(CASES)
    for name in SMOOTH:
        assert lookup(name) is not None, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_stand_in_tends_to_the_op(name: str) -> None:
    args, op = CASES[name]
    exact = op(X, *args)
    errors = [float((SMOOTH[name](beta, X, *args) - exact).abs().max()) for beta in (10.0, 100.0, 1000.0)]
    assert errors[2] < 1e-2
    assert errors[0] >= errors[1] >= errors[2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_stand_in_has_curvature_at_the_kinks(name: str) -> None:
    args, _ = CASES[name]
    x = torch.tensor([0.0, 0.5, -0.5, 3.0, 6.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = SMOOTH[name](2.0, x, *args)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert bool(torch.isfinite(h).all()) and float(h.abs().max()) > 1e-3
