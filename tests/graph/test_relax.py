"""The slope floor: attained by a slope-replaced network, never above the slope box's maximum (found
by enumerating its vertices), never above the certified upper end, reproducible from the seed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from lipaudit.graph import GraphSettings, inspect_archive, load_archive
from lipaudit.graph.relax import relaxable, slope_floor
from tests.graph.helpers import FIXTURES, export_to


def _box_max(w1: torch.Tensor, w2: torch.Tensor, lo: float, hi: float) -> float:
    """max over diagonal L with entries in [lo, hi] of ||W2 L W1||: the norm is convex in each entry,
    so the maximum sits at a vertex of the box."""
    best = 0.0
    for signs in itertools.product((lo, hi), repeat=w1.shape[0]):
        lam = torch.tensor(signs, dtype=torch.float64)
        best = max(best, float(torch.linalg.matrix_norm(w2 @ (lam[:, None] * w1), ord=2)))
    return best


@pytest.mark.parametrize(("act", "lo", "hi"), [(nn.ReLU(), 0.0, 1.0), (nn.LeakyReLU(0.2), 0.2, 1.0),
                                                (nn.Hardtanh(), 0.0, 1.0), (nn.Sigmoid(), 0.0, 0.25),
                                                (nn.PReLU(1, -0.5), -0.5, 1.0), (nn.PReLU(1, 2.5), 1.0, 2.5)])
def test_floor_reaches_the_slope_box_maximum(tmp_path: Path, act: nn.Module, lo: float, hi: float) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 4)).double().eval()
    x = torch.randn(1, 5, dtype=torch.float64)
    loaded = load_archive(str(export_to(tmp_path / "m.pt2", model, x)))
    fl = slope_floor(loaded.graph, loaded.evaluator(), [x], 400, seed=0)
    truth = _box_max(model[0].weight.detach(), model[2].weight.detach(), lo, hi)
    assert fl.value is not None and fl.relaxed == 1 and fl.kept == 0
    assert fl.value <= truth * (1 + 1e-9)
    assert fl.value >= truth * 0.98
    assert 0 < fl.work <= 400


def test_floor_is_reproducible_and_counts_work(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.ReLU6(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3)).eval()
    loaded = load_archive(str(export_to(tmp_path / "m.pt2", model, torch.randn(2, 4))))
    a = slope_floor(loaded.graph, loaded.evaluator(), None, 50, seed=5)
    b = slope_floor(loaded.graph, loaded.evaluator(), None, 50, seed=5)
    assert a.value == b.value and a.work == b.work <= 50
    assert a.relaxed == 2


class _Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_an_activation_read_as_a_function_is_kept(tmp_path: Path) -> None:
    """x * sigmoid(x) is bounded through the function, not its slopes: replacing the sigmoid by a
    slope would leave a quadratic, which no certificate covers."""
    model = nn.Sequential(nn.Linear(3, 5), _Swish(), nn.Linear(5, 2)).eval()
    loaded = load_archive(str(export_to(tmp_path / "s.pt2", model, torch.randn(1, 3))))
    ranges, kept = relaxable(loaded.graph, loaded.evaluator())
    assert not ranges and kept == 1
    fl = slope_floor(loaded.graph, loaded.evaluator(), None, 20, seed=0)
    assert fl.value is None and fl.work == 0


class _Inverted(nn.Module):
    """An inverted residual block with BatchNorm scales far from 1 and a zero-padded depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6(),
                                  nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12),
                                  nn.ReLU6(), nn.Conv2d(12, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g) * 3
            m.running_var = torch.rand(m.num_features, generator=g) * 4 + 0.01
            m.running_mean = torch.randn(m.num_features, generator=g)
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_never_above_the_certified_upper_end(tmp_path: Path, seed: int) -> None:
    """Every rule of the walk sees activations through their slope ranges, so the certified upper end
    covers every slope-replaced network: the floor, searched hard, stays below it. (The audit itself
    raises when it does not.)"""
    torch.manual_seed(seed)
    model = _trained_like(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _Inverted(), _Inverted(), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), seed)
    path = export_to(tmp_path / "inv.pt2", model, torch.randn(1, 2, 6, 6))
    r = inspect_archive(str(path), GraphSettings(measure=True, measure_work=300))
    assert r.slope_floor is not None and r.lipschitz_upper is not None and r.lipschitz_lower is not None
    assert r.lipschitz_lower <= r.lipschitz_upper
    assert r.slope_floor <= r.lipschitz_upper
    d = r.to_dict()
    assert d["bracket"]["slope_floor"] == r.slope_floor and d["floor"]["relaxed"] == 5
    floored = [b for b in r.blocks if "floor" in b]
    assert floored and all(0 < b["floor"] <= b["upper"] for b in floored)


def test_floor_of_a_fixture_sits_inside_the_bracket_ends() -> None:
    r = inspect_archive(str(FIXTURES / "resnet_small.pt2"), GraphSettings(measure_work=60))
    assert r.slope_floor is not None and r.lipschitz_upper is not None
    assert r.slope_floor <= r.lipschitz_upper


class _ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


def test_a_block_floor_reaches_its_slope_box_maximum(tmp_path: Path) -> None:
    """x + W2 relu(W1 x) is one block; its floor is max over the vertices of ||I + W2 L W1||."""
    torch.manual_seed(7)
    model = nn.Sequential(_ResidualMLP(), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    r = inspect_archive(str(export_to(tmp_path / "r.pt2", model, torch.randn(1, 4, dtype=torch.float64))),
                        GraphSettings(measure=True, measure_work=400))
    w1, w2 = model[0].a.weight.detach(), model[0].b.weight.detach()
    truth = 0.0
    for signs in itertools.product((0.0, 1.0), repeat=6):
        lam = torch.tensor(signs, dtype=torch.float64)
        truth = max(truth, float(torch.linalg.matrix_norm(torch.eye(4, dtype=torch.float64)
                                                          + w2 @ (lam[:, None] * w1), ord=2)))
    floored = [b for b in r.blocks if "floor" in b and b["residual"]]
    assert len(floored) == 1
    assert truth * 0.98 <= floored[0]["floor"] <= truth * (1 + 1e-9) <= floored[0]["upper"]
