"""Spectral norms as proven intervals: dense matrices, convolutions, diagonal maps."""

from __future__ import annotations

from collections.abc import Callable
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


def lanczos_top_vector(
    gram: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    seed: int,
    device: str | torch.device = "cpu",
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top Ritz vector of the symmetric PSD operator gram (A^T A) after a few Lanczos steps.

    Full reorthogonalisation; the caller turns it into a lower bound by evaluating ||A x||, so
    rounding in the recurrence can only make the bound less tight, never wrong."""
    steps = max(1, min(steps, n))
    if start is None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randn(n, generator=g, dtype=torch.float64)
    v = start.to(device=device, dtype=torch.float64)
    basis = torch.zeros(n, steps, dtype=torch.float64, device=device)
    basis[:, 0] = v / torch.linalg.vector_norm(v)
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(steps):
        z = gram(basis[:, j])
        alpha.append(float(basis[:, j] @ z))
        q = basis[:, : j + 1]
        z = z - q @ (q.T @ z)
        z = z - q @ (q.T @ z)  # twice is enough
        b = float(torch.linalg.vector_norm(z))
        if j == steps - 1 or b <= 1e-12 * max(abs(a) for a in alpha):
            break
        beta.append(b)
        basis[:, j + 1] = z / b
    k = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(beta[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    _, vecs = torch.linalg.eigh(t)
    x = basis[:, :k] @ vecs[:, -1].to(device)
    unit: torch.Tensor = x / torch.linalg.vector_norm(x)
    return unit
