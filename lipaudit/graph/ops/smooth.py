"""Smooth stand-ins for kinked activations, used only to steer the measured lower end's ascent.

A piecewise-linear network's Jacobian is constant on each linear piece, so the gradient of
||J(x) v|| with respect to x is zero almost everywhere and plain gradient ascent cannot move. The
ascent follows the gradient of the same network with each kink rounded off at scale 1 / beta
(softplus in place of max(x, 0)); every value the measurement reports still comes from the exact
network. These are not bounds: nothing here is used by the certified upper end.

Each function takes beta first, then the aten op's own arguments, by the schema's names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _sp(x: torch.Tensor, beta: float) -> torch.Tensor:
    # softplus without torch's linear cut-over, which would bring a kink back
    return torch.logaddexp(x * beta, torch.zeros((), dtype=x.dtype)) / beta


def _clamped(x: torch.Tensor, lo: Any, hi: Any, beta: float) -> torch.Tensor:
    """lo + sp(x - lo) - sp(x - hi): lo far left, hi far right, x in between."""
    if lo is None and hi is None:
        return x
    out: torch.Tensor
    if lo is None:
        out = hi - _sp(hi - x, beta)
    elif hi is None:
        out = lo + _sp(x - lo, beta)
    else:
        out = lo + _sp(x - lo, beta) - _sp(x - hi, beta)
    return out


def relu(beta: float, self: torch.Tensor) -> torch.Tensor:
    return _sp(self, beta)


def relu6(beta: float, self: torch.Tensor) -> torch.Tensor:
    return _clamped(self, 0.0, 6.0, beta)


def hardtanh(beta: float, self: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    return _clamped(self, min_val, max_val, beta)


def clamp(beta: float, self: torch.Tensor, min: Any = None, max: Any = None) -> torch.Tensor:
    return _clamped(self, min, max, beta)


def clamp_min(beta: float, self: torch.Tensor, min: Any) -> torch.Tensor:
    return _clamped(self, min, None, beta)


def clamp_max(beta: float, self: torch.Tensor, max: Any) -> torch.Tensor:
    return _clamped(self, None, max, beta)


def leaky_relu(beta: float, self: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return negative_slope * self + (1 - negative_slope) * _sp(self, beta)


def abs(beta: float, self: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(self * self + 1.0 / (beta * beta))


def hardsigmoid(beta: float, self: torch.Tensor) -> torch.Tensor:
    return _clamped(self / 6 + 0.5, 0.0, 1.0, 6 * beta)  # kinks at x = -3 and 3, rounded at 1 / beta in x


def hardswish(beta: float, self: torch.Tensor) -> torch.Tensor:
    return self * hardsigmoid(beta, self)


SMOOTH: dict[str, Callable[..., torch.Tensor]] = {
    "relu": relu, "relu6": relu6, "hardtanh": hardtanh, "clamp": clamp, "clip": clamp, "clamp_min": clamp_min,
    "clamp_max": clamp_max, "leaky_relu": leaky_relu, "abs": abs, "hardsigmoid": hardsigmoid,
    "hardswish": hardswish,
}


def smoothed(op: str) -> Callable[..., torch.Tensor] | None:
    """The stand-in for aten `op` (its in-place variant runs as the same), or None."""
    return SMOOTH.get(op)


__all__ = ["SMOOTH", "smoothed"]
