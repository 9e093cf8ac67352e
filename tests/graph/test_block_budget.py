"""Block bounds run within a work budget decided from shapes alone: cheapest first, the rest left
at the product and listed as skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipaudit.graph import load_archive, tighten
from lipaudit.graph.bound import _layer_work, bound_graph

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "resnet_small.pt2"


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_archive(str(FIXTURE))


def test_costs_come_from_shapes_and_cheapest_blocks_go_first(loaded) -> None:  # type: ignore[no-untyped-def]
    found = tighten.blocks(loaded.graph, loaded.evaluator().value)
    assert len(found) >= 2
    costs = [tighten.cost(b) for b in found]
    assert all(c > 0 for c in costs)
    assert costs == [tighten.cost(b) for b in found]  # no state, no measurement
    cheapest = min(costs)
    kept, left = tighten.within(found, cheapest)
    assert [tighten.cost(b) for b in kept] == [cheapest] * len(kept) and len(kept) >= 1
    assert len(kept) + len(left) == len(found)
    everything, none_left = tighten.within(found, sum(costs))
    assert len(everything) == len(found) and not none_left
    nothing, all_left = tighten.within(found, 0.0)
    assert not nothing and len(all_left) == len(found)


def test_no_budget_is_the_walk_without_blocks(loaded) -> None:  # type: ignore[no-untyped-def]
    ev = loaded.evaluator()
    plain = bound_graph(loaded.graph, ev, 1e-4, 1e-2, 0, blocks=False)
    zero = bound_graph(loaded.graph, ev, 1e-4, 1e-2, 0, block_work=0.0)
    full = bound_graph(loaded.graph, ev, 1e-4, 1e-2, 0, block_work=1e9)
    assert zero.outputs == plain.outputs
    assert zero.blocks and all(b.get("skipped") for b in zero.blocks)
    assert not any(b.get("skipped") for b in full.blocks)
    assert full.outputs["input"] <= plain.outputs["input"] + 1e-12
    assert _layer_work(loaded.graph) > 0
