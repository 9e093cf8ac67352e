"""Regressions from an independent red team: a merged operator that shares names with one of its
parts, and straight-through estimators in the measured lower end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipaudit.graph import GraphSettings, inspect_archive
from tests.graph.helpers import export_to

COMPUTED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "scaled": lambda w: w * 5,
    "transposed": lambda w: w.T * 3,
    "row_sums": lambda w: w.sum(0, keepdim=True).expand(8, 8),
}


class ComputedWeight(nn.Module):
    """Linear, then F.linear with a weight computed from a parameter: the two dense maps are merged,
    and the merged operator carries only the first layer's name."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8, bias=False)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.pre(x), self.f(self.w))


@pytest.mark.parametrize("name", sorted(COMPUTED))
def test_a_merged_operator_is_not_taken_for_its_first_part(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    f = COMPUTED[name]
    model = ComputedWeight(f).eval()
    path = export_to(tmp_path / f"{name}.pt2", model, torch.randn(1, 8))
    # the network is linear: its constant is the norm of the product
    product = (f(model.w.detach().double()) @ model.pre.weight.detach().double()).numpy()
    true = float(np.linalg.svd(product, compute_uv=False)[0])
    r = inspect_archive(str(path), GraphSettings(measure_work=40))
    assert r.certified and r.lipschitz_upper is not None
    assert r.lipschitz_upper >= true * (1 - 1e-9)
    assert r.lipschitz_lower is not None and r.lipschitz_lower <= r.lipschitz_upper


class StraightThrough(nn.Module):
    """The value is h, but autograd sees 100 h: the lower end must measure the function."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return 100 * h - (99 * h).detach()


def test_detach_does_not_inflate_the_measured_lower_end(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = StraightThrough().eval()
    path = export_to(tmp_path / "ste.pt2", model, torch.randn(2, 6))
    true = float(np.linalg.svd(model.lin.weight.detach().double().numpy(), compute_uv=False)[0])
    r = inspect_archive(str(path), GraphSettings(measure_work=40))
    assert r.lipschitz_upper is not None and r.lipschitz_upper >= true
    assert r.lipschitz_lower is not None and r.lipschitz_lower <= true * (1 + 1e-9)
    assert r.lipschitz_lower >= 0.5 * true  # the measurement still finds the real slope


class _Scaled(nn.Module):
    def __init__(self, c: float, divide: bool) -> None:
        super().__init__()
        self.c, self.divide = c, divide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.c if self.divide else x * self.c


@pytest.mark.parametrize(("c", "divide"), [(1e-300, True), (1e-39, True), (1e39, False)])
def test_a_scalar_out_of_float32_range_is_uncovered(tmp_path: Path, c: float, divide: bool) -> None:
    """x / 1e-300 in float32 divides by 0 (torch rounds the number to float32), and x / 1e-39 or
    x * 1e39 overflow for any input above 0.4: a float32 graph gets no bound, not 1e300."""
    x = torch.randn(1, 4)
    assert not bool(torch.isfinite(_Scaled(c, divide)(x)).all())
    r = inspect_archive(str(export_to(tmp_path / "s.pt2", _Scaled(c, divide), x)), GraphSettings(measure=False))
    assert not r.certified and r.lipschitz_upper is None


def test_a_scalar_in_range_keeps_its_bound(tmp_path: Path) -> None:
    x = torch.randn(1, 4)
    r = inspect_archive(str(export_to(tmp_path / "s.pt2", _Scaled(0.1, True), x)), GraphSettings(measure=False))
    assert r.certified and r.lipschitz_upper is not None and 10.0 <= r.lipschitz_upper <= 10.0 * (1 + 1e-6)
