"""The measured lower end: attained values, reproducible from the seed, counted work, memory limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lipaudit.checkpoint.limits import Limits
from lipaudit.errors import ResourceLimitError
from lipaudit.graph import load_archive
from lipaudit.graph.lower import check_memory, measure, start_points
from tests.graph.helpers import export_to, jacobian_norm


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).eval()


def test_linear_network_reaches_its_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(7, 5).eval()
    loaded = load_archive(str(export_to(tmp_path / "l.pt2", model, torch.randn(1, 7))))
    m = measure(loaded.graph, loaded.evaluator(), None, 60, seed=0)
    truth = float(torch.linalg.matrix_norm(model.weight.detach().double(), ord=2))
    assert m.lower is not None
    assert m.lower == pytest.approx(truth, rel=1e-6)
    assert m.lower <= truth * (1 + 1e-9)
    assert 0 < m.work <= 60


def test_same_seed_same_number_and_work_is_counted(tmp_path: Path) -> None:
    model = _mlp(1)
    loaded = load_archive(str(export_to(tmp_path / "m.pt2", model, torch.randn(2, 6))))
    a = measure(loaded.graph, loaded.evaluator(), None, 50, seed=3)
    b = measure(loaded.graph, loaded.evaluator(), None, 50, seed=3)
    assert a.lower == b.lower and a.work == b.work and a.best_start == b.best_start
    assert a.work <= 50 and a.budget == 50
    small = measure(loaded.graph, loaded.evaluator(), None, 6, seed=3)
    assert small.work <= 6 and small.steps <= 3


def test_lower_is_attained_at_the_reported_start(tmp_path: Path) -> None:
    """The value is ||J(x) v|| at a point the seed reproduces: never above sup_x ||J(x)||, which for
    tanh networks is below ||W2|| ||W1||; and at least the Jacobian norm at the sample inputs' start."""
    model = _mlp(2)
    x = torch.randn(1, 6)
    loaded = load_archive(str(export_to(tmp_path / "t.pt2", model, x)))
    m = measure(loaded.graph, loaded.evaluator(), [x], 200, seed=0)
    assert m.lower is not None and m.best_start is not None
    bound = float(torch.linalg.matrix_norm(model[0].weight.detach().double(), ord=2)) * float(
        torch.linalg.matrix_norm(model[2].weight.detach().double(), ord=2))
    assert m.lower <= bound * (1 + 1e-9)
    assert m.lower >= jacobian_norm(model, x) * 0.99
    gen = torch.Generator().manual_seed(0)
    pts = start_points([(1, 6)], [x], 6, gen)
    assert torch.equal(pts[0][0][0], x.double())
    assert {s for _, s in pts} >= {1.0, 4.0}


def test_huge_declared_input_is_refused_before_allocating(tmp_path: Path) -> None:
    model = _mlp(3)
    loaded = load_archive(str(export_to(tmp_path / "h.pt2", model, torch.randn(4, 6))))
    with pytest.raises(ResourceLimitError):
        check_memory(loaded.graph, Limits(tensor_bytes=64))
    with pytest.raises(ResourceLimitError):
        measure(loaded.graph, loaded.evaluator(), None, 10, seed=0, limits=Limits(total_bytes=256))
    check_memory(loaded.graph, Limits())


def test_the_ascent_climbs_on_a_piecewise_linear_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kinks rounded off the ascent has a direction; with them sharp (beta huge) it only
    wanders. Both values are attained by the exact network."""
    import lipaudit.graph.lower as lower

    loaded = load_archive(str(Path(__file__).resolve().parents[2] / "fixtures" / "mlp_act.pt2"))
    samples, _ = loaded.archive.sample_inputs()
    got = {}
    for betas in ((1e12,), lower.BETAS):
        monkeypatch.setattr(lower, "BETAS", betas)
        got[betas] = measure(loaded.graph, loaded.evaluator(), samples, 200, 0).lower
    sharp, smooth = got[(1e12,)], got[lower.BETAS]
    assert sharp is not None and smooth is not None
    assert smooth >= 1.2 * sharp
