"""Search limits count work, not seconds: the same checkpoint gives the same bits under any load,
any --jobs and any order of layers; the wall-clock budget is a safety net that says so when it fires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lipaudit.audit import audit
from lipaudit.checkpoint import open_checkpoint
from lipaudit.pool import MEASURE_THREADS, fixed_threads, run_all, single_threaded
from lipaudit.settings import Settings
from lipaudit.spectral import TIME_BUDGET
from lipaudit.spectral.conv import conv_bound
from tests.spectral.conv_reference import conv_matrix, op_norm


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (24, 3, 3, 3), "b.weight": (32, 24, 3, 3), "c.weight": (32, 32, 1, 1),
              "d.weight": (16, 32, 5, 5), "e.weight": (10, 16 * 4)}
    return {k: torch.randn(*s, generator=g) / (s[1] * 3) for k, s in shapes.items()}


def _intervals(path: Path, **kw: Any) -> dict[str, tuple[float | None, float | None, bool]]:
    report = audit(open_checkpoint(str(path)), Settings(**kw))
    out = {x.tensor: (x.sigma.lower, x.sigma.upper, x.sigma.certified) for x in report.layers}
    # (whether the product is a proof hangs on the chain the stored order suggests, not on the search)
    out["network"] = (report.network.lipschitz_lower, report.network.upper, True)
    return out


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    sd = _state(3)
    forward, backward = tmp_path / "f.pt", tmp_path / "b.pt"
    torch.save(sd, forward)
    torch.save(dict(reversed(list(sd.items()))), backward)
    return forward, backward


def test_same_bits_for_any_jobs_order_and_load(saved: tuple[Path, Path]) -> None:
    forward, backward = saved
    one = _intervals(forward, jobs=1)
    assert all(c for _, _, c in one.values())
    assert _intervals(forward, jobs=2) == one
    assert _intervals(backward, jobs=2) == one
    burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = _intervals(backward, jobs=1)
    finally:
        burn.kill()
        burn.wait()
    assert busy == one


def test_time_budget_is_a_safety_net_that_fails_gates(saved: tuple[Path, Path]) -> None:
    forward, _ = saved
    report = audit(open_checkpoint(str(forward)), Settings(jobs=1, layer_time_s=1e-9, fail_layer_above=1e9))
    timed = [x for x in report.layers if not x.sigma.certified]
    assert timed and all(any(n.startswith(TIME_BUDGET) for n in x.notes) for x in timed)
    lip015 = {f.tensor for f in report.findings if f.code == "LIP015"}
    assert {x.tensor for x in timed} <= lip015
    gate = [f for f in report.findings if f.code == "LIP017" and f.tensor in {x.tensor for x in timed}]
    assert gate and all(TIME_BUDGET in f.message for f in gate)
    # still sound: never below the truth
    sd = _state(3)
    for x in timed:
        if sd[x.tensor].ndim == 4 and x.sigma.upper is not None:
            truth = op_norm(conv_matrix(sd[x.tensor].double(), (5, 5), padding=1))
            assert x.sigma.upper >= truth


def test_point_limit_is_work_not_time() -> None:
    """A tiny point budget stops the search at the same place every time, with a sound bound."""
    k = torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    runs = [conv_bound(k, 1e-3, max_points=50) for _ in range(2)]
    assert runs[0] == runs[1]
    iv = runs[0].interval
    assert iv.loose is not None and iv.certified and not iv.loose.startswith(TIME_BUDGET)
    assert iv.upper >= op_norm(conv_matrix(k, (6, 6), padding=1))
    assert runs[0].points <= 50


def test_pool_keeps_order_and_one_thread() -> None:
    seen: list[int] = []

    def work(x: int) -> tuple[int, int]:
        return x * x, torch.get_num_threads()

    before = torch.get_num_threads()
    out = run_all(list(range(7)), work, 3, cost=lambda x: x, started=lambda i, _: seen.append(i))
    assert [r for r, _ in out] == [x * x for x in range(7)]
    assert {t for _, t in out} == {1}
    assert seen == [6, 5, 4, 3, 2, 1, 0]  # the dearest first
    assert torch.get_num_threads() == before
    with single_threaded(), single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_serial_path_is_single_threaded_too() -> None:
    before = torch.get_num_threads()
    out = run_all([0, 1], lambda _: torch.get_num_threads(), 1)
    assert out == [1, 1] and torch.get_num_threads() == before


def test_fixed_threads_whatever_the_process_has() -> None:
    """The measured lower end's thread count is a constant, not the machine's; inside single_threaded
    (files side by side) it stays at one."""
    before = torch.get_num_threads()
    try:
        for start in (1, 3):
            torch.set_num_threads(start)
            with fixed_threads():
                assert torch.get_num_threads() == MEASURE_THREADS
            assert torch.get_num_threads() == start
        with single_threaded(), fixed_threads():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_graph_measurements_run_on_the_fixed_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """lower end and slope floor of a .pt2, with the process on 1 and on 3 threads: the searches see
    MEASURE_THREADS both times and give the same bits."""
    import lipaudit.graph as graph
    from tests.graph.helpers import FIXTURES

    seen: list[int] = []
    real_lower, real_floor = graph.lower_end, graph.floor_end

    def lower(*a: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real_lower(*a)

    def floor(*a: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real_floor(*a)

    monkeypatch.setattr(graph, "lower_end", lower)
    monkeypatch.setattr(graph, "floor_end", floor)
    before = torch.get_num_threads()
    got = []
    try:
        for start in (1, 3):
            torch.set_num_threads(start)
            r = graph.inspect_archive(str(FIXTURES / "resnet_small.pt2"),
                                      graph.GraphSettings(measure_work=12, floor_work=12))
            got.append((r.lipschitz_upper, r.lipschitz_lower, r.slope_floor))
    finally:
        torch.set_num_threads(before)
    assert seen == [MEASURE_THREADS] * 4
    assert got[0] == got[1] and got[0][1] is not None
