"""The graph strategy's Network record, as the report shows it."""

from __future__ import annotations

import json

import pytest

# the strategy interface (lipaudit.bound, lipaudit.kinds, lipaudit.settings) lands with the CLI wiring
pytest.importorskip("lipaudit.kinds", reason="network-bound strategy interface not in this tree yet")
pytest.importorskip("lipaudit.bound.chain", reason="network-bound strategy interface not in this tree yet")

from lipaudit.bound.graph import GraphStrategy
from lipaudit.kinds import Plan
from lipaudit.settings import Settings
from tests.graph.helpers import FIXTURES


def test_certified_graph_network() -> None:
    b = GraphStrategy(str(FIXTURES / "residual.pt2"), measure_work=40).bound([], Plan(), Settings())
    net = b.network
    assert net.method == "graph" and net.certified and net.upper == pytest.approx(1.5, rel=1e-6)
    assert net.lipschitz_lower is not None and net.lipschitz_lower <= net.upper
    assert not b.findings
    json.dumps(net.to_dict(), allow_nan=False)


def test_attention_network_names_its_uncovered_nodes() -> None:
    b = GraphStrategy(str(FIXTURES / "attention_core.pt2"), measure=False).bound([], Plan(), Settings())
    net = b.network
    assert not net.certified and net.upper is None and net.not_certified_because
    assert {code for code in (f.code for f in b.findings)} == {"LIP016"}
    assert any("LayerNorm" in r for _, r in net.uncovered)
