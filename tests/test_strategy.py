"""The graph strategy over the audit's layers, without the CLI: each operator measured once, in the
pool, and the certified bound held against float64 Jacobians of the real module."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from lipaudit.audit import run_audit
from lipaudit.bound.graph import GraphStrategy
from lipaudit.checkpoint import open_checkpoint
from lipaudit.settings import Settings
from tests.graph.helpers import export_to, jacobian_norm
from tests.models.small import make


def _digest(w: torch.Tensor) -> str:
    return hashlib.blake2b(w.detach().double().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_to(tmp_path_factory.mktemp("graph") / "small.pt2", make(), torch.randn(1, 3, 16, 16))


def _audit(path: Path, settings: Settings) -> tuple[Any, GraphStrategy]:
    ckpt = open_checkpoint(str(path), None, limits=settings.limits)
    by = GraphStrategy(arch=ckpt.handle.arch, archive=str(path), measure=False)  # type: ignore[attr-defined]
    return run_audit(ckpt, settings, None, by), by


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_operator_is_measured_once(archive: Path, monkeypatch: pytest.MonkeyPatch, jobs: int) -> None:
    import lipaudit.kinds.dense as dense
    import lipaudit.spectral.conv as conv

    seen: list[str] = []

    def counting(real: Any) -> Any:
        def f(w: torch.Tensor, *a: Any, **k: Any) -> Any:
            seen.append(_digest(w))
            return real(w, *a, **k)
        return f

    monkeypatch.setattr(conv, "conv_interval", counting(conv.conv_interval))
    monkeypatch.setattr(conv, "grouping_pair", counting(conv.grouping_pair))
    monkeypatch.setattr(dense, "dense_interval", counting(dense.dense_interval))
    audit, by = _audit(archive, Settings(jobs=jobs))
    assert len(seen) == len(set(seen)), "an operator was measured twice"
    planned = by.plan(Settings())
    # every distinct operator once: 3 convs, 3 of them folded with BatchNorm, and the head, besides
    # the composite maps of the blocks bounded as a whole (lipaudit/graph/tighten.py)
    layers = [op for op in planned.ops.values() if not op.tag.startswith("block:")]
    assert len(layers) == 7
    assert len(seen) == len(planned.ops)
    net = audit.report.network
    assert net.method == "graph" and net.certified and net.details is not None
    assert net.details["operators_measured"] == len(planned.ops)


def test_table_rows_use_what_the_graph_knows(archive: Path) -> None:
    audit, _ = _audit(archive, Settings(jobs=1))
    rows = {x.name: x for x in audit.report.layers}
    stem, grouped = rows["stem"], rows["block.conv1"]
    assert any("stride 2" in n for n in stem.notes)
    assert grouped.grouping is not None and grouped.grouping["groups"] == 2 and grouped.grouping["known"]
    assert not [f for f in audit.report.findings if f.code == "LIP018"]  # the graph told every grouping
    # the strided stem's norm as the graph uses it is at most the stride-1 kernel's
    w = make().stem.weight.detach().double()
    from lipaudit.spectral.conv import conv_interval

    assert stem.sigma.upper is not None and stem.sigma.upper <= conv_interval(w, 1e-2).upper * (1 + 1e-2)


def test_the_bound_holds_against_the_jacobian(archive: Path) -> None:
    audit, by = _audit(archive, Settings(jobs=2))
    net = audit.report.network
    assert net.certified and net.upper is not None
    model = make()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
        assert jacobian_norm(model, x) <= net.upper
    assert by.result is not None and by.result.chain_log10 is not None
    assert by.result.log10_upper is not None and by.result.log10_upper <= by.result.chain_log10 + 1e-9


def test_settings_reach_the_graph_operators(archive: Path) -> None:
    """--rtol reaches the graph's operators: a looser bracket gives a larger (still certified) bound."""
    tight, _ = _audit(archive, Settings(jobs=1, conv_rtol=1e-3))
    loose, _ = _audit(archive, Settings(jobs=1, conv_rtol=0.3))
    a, b = tight.report.network.upper, loose.report.network.upper
    assert a is not None and b is not None and a <= b * (1 + 1e-9)


def test_the_time_budget_reaches_the_graph_operators(archive: Path) -> None:
    """--layer-time-budget applies to the graph's own operators (BatchNorm-folded kernels) too: past
    it a looser bound stands, still sound but not certified (the time budget is a safety net, never a
    silently looser number), and LIP015 names the operator."""
    full, _ = _audit(archive, Settings(jobs=1))
    cut, _ = _audit(archive, Settings(jobs=1, layer_time_s=1e-9))
    messages = [f.message for f in cut.report.findings if f.code == "LIP015"]
    assert any(m.startswith("graph operator stem.weight+bn.weight") for m in messages)
    a, b = full.report.network.upper, cut.report.network.upper
    assert full.report.network.certified and not cut.report.network.certified
    assert a is not None and b is not None and a <= b * (1 + 1e-9)
