"""Spectral norms as proven intervals: dense matrices, convolutions, diagonal maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative slack added to upper ends that come out of several float64 operations, so
# that rounding can never leave a certified bound a hair below the true value.
ROUNDING_MARGIN = 1e-10


@dataclass(frozen=True)
class Interval:
    """sigma lies in [lower, upper]; each end says how it was obtained."""

    lower: float
    upper: float
    lower_method: str
    upper_method: str
    certified: bool

    @property
    def method(self) -> str:
        if self.lower_method == self.upper_method:
            return self.lower_method
        return f"{self.lower_method}+{self.upper_method}"


def exact(value: float, method: str) -> Interval:
    return Interval(value, value, method, method, True)


def to_float64(t: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Upcast any float dtype (bf16, fp16, fp8 included) for the math."""
    return t.detach().to(device=device).to(torch.float64)
