"""The graph strategy: the network bound over a torch.export archive's real wiring."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lipaudit.bound import Bound
from lipaudit.findings import finding
from lipaudit.report import Finding, Layer, Network

if TYPE_CHECKING:
    from lipaudit.graph import GraphBound
    from lipaudit.kinds import Plan
    from lipaudit.settings import Settings


class GraphStrategy:
    """Bound the network of `archive` (a .pt2 path); with `keys`/`load`, on a state dict's own
    weights matched to the graph by name (--graph)."""

    name = "graph"

    def __init__(self, archive: str, keys: list[str] | None = None,
                 load: Callable[[str], torch.Tensor] | None = None, shown: str = "",
                 measure: bool = True, measure_seconds: float = 20.0) -> None:
        self.archive = archive
        self.keys = keys
        self.load = load
        self.shown = shown or archive
        self.measure = measure
        self.measure_seconds = measure_seconds
        self.result: GraphBound | None = None

    def run(self, settings: Settings) -> GraphBound:
        from lipaudit.graph import GraphSettings, inspect_archive, inspect_state_dict

        gs = GraphSettings.from_settings(settings, measure=self.measure, measure_seconds=self.measure_seconds)
        if self.keys is not None and self.load is not None:
            return inspect_state_dict(self.archive, self.keys, self.load, self.shown, gs)
        return inspect_archive(self.archive, gs)

    def bound(self, layers: list[Layer], plan: Plan, settings: Settings) -> Bound:
        g = self.result = self.run(settings)
        why: list[str] = []
        findings: list[Finding] = []
        if g.uncovered:
            why.append(f"{len(g.uncovered)} graph nodes have no global Lipschitz bound")
            for node, reason in g.uncovered[:20]:
                findings.append(finding("LIP016", node, f"graph node not covered: {reason}"))
        elif not g.certified:
            why.append("a factor is an estimate")
            findings.append(finding("LIP009", None, "some factors of the graph bound are estimates, not proofs"))
        counted = len(g.layers)
        details = g.to_dict()
        if g.log10_upper is not None and g.chain_log10 is not None:
            diff = g.log10_upper - g.chain_log10
            details["summary"] = (
                f"graph bound {'below' if diff < 0 else 'above'} the chain product by {abs(diff):.2f} decades"
                if math.isfinite(diff) else "")
        network = Network(
            log10_upper=g.log10_upper, certified=g.certified and not why, layers_counted=counted,
            layers_not_covered=0, assumptions=g.assumptions, method=self.name,
            lipschitz_lower=g.lipschitz_lower, not_certified_because=tuple(why), uncovered=g.uncovered,
            details=details,
        )
        return Bound(network, tuple(findings))
