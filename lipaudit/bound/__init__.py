"""Network-bound strategies: how the per-layer bounds combine into one for the network.

A strategy takes the audited layers (and whatever else it knows about the network: a graph) and
returns the network record with its assumptions and findings. `chain` multiplies the layers of a
state dict in order; a graph strategy walks a real architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lipaudit.report import Finding, Layer, Network

if TYPE_CHECKING:
    import torch

    from lipaudit.kinds import Plan
    from lipaudit.kinds.base import LayerSpec, Measured
    from lipaudit.settings import Settings


@dataclass(frozen=True)
class Bound:
    network: Network
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class Operator:
    """A linear map a strategy needs measured, as a layer the kinds measure: the audit measures it
    in its pool with the other layers, under `settings` (the audit's, with what the strategy knows,
    such as a conv's groups). `table` names the table layer it also reports, if any."""

    spec: LayerSpec
    load: Callable[[str], torch.Tensor]
    settings: Settings
    table: str | None = None


class Strategy(Protocol):
    name: str

    def bound(self, layers: list[Layer], plan: Plan, settings: Settings) -> Bound: ...


@runtime_checkable
class Measuring(Strategy, Protocol):
    """A strategy with operators of its own to measure before it bounds (the graph)."""

    def operators(self, plan: Plan, settings: Settings) -> list[Operator]: ...

    def use(self, measured: dict[str, Measured], tables: frozenset[str] = frozenset()) -> None: ...


def log10_product(uppers: list[float | None]) -> float | None:
    """The product of non-negative factors in log10: None if one is unknown, -inf if one is 0."""
    import math

    if any(u is None for u in uppers):
        return None
    if any(u == 0 for u in uppers):
        return -math.inf
    return math.fsum(math.log10(u) for u in uppers if u is not None)


def strategy(name: str, **where: object) -> Strategy:
    """The registry: chain needs nothing; graph needs the archive (`archive=PATH` or `arch=` an open
    one, and for a state dict on that architecture `keys`, `load`, `shown`)."""
    from lipaudit.bound.chain import Chain
    from lipaudit.bound.graph import GraphStrategy

    if name == "chain":
        return Chain()
    if name == "graph":
        return GraphStrategy(**where)  # type: ignore[arg-type]
    raise KeyError(name)
