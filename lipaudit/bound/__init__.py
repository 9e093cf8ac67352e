"""Network-bound strategies: how the per-layer bounds combine into one for the network.

A strategy takes the audited layers (and whatever else it knows about the network: a graph) and
returns the network record with its assumptions and findings. `chain` multiplies the layers of a
state dict in order; a graph strategy walks a real architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lipaudit.report import Finding, Layer, Network

if TYPE_CHECKING:
    from lipaudit.kinds import Plan
    from lipaudit.settings import Settings


@dataclass(frozen=True)
class Bound:
    network: Network
    findings: tuple[Finding, ...]


class Strategy(Protocol):
    name: str

    def bound(self, layers: list[Layer], plan: Plan, settings: Settings) -> Bound: ...


def log10_product(uppers: list[float | None]) -> float | None:
    """The product of non-negative factors in log10: None if one is unknown, -inf if one is 0."""
    import math

    if any(u is None for u in uppers):
        return None
    if any(u == 0 for u in uppers):
        return -math.inf
    return math.fsum(math.log10(u) for u in uppers if u is not None)


def strategy(name: str, **where: object) -> Strategy:
    """The registry: chain needs nothing; graph needs the archive (`archive=PATH`, and for a state
    dict on that architecture `keys`, `load`, `shown`)."""
    from lipaudit.bound.chain import Chain
    from lipaudit.bound.graph import GraphStrategy

    if name == "chain":
        return Chain()
    if name == "graph":
        return GraphStrategy(**where)  # type: ignore[arg-type]
    raise KeyError(name)
