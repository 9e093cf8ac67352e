"""Spectral norms as proven intervals: dense matrices, convolutions, diagonal maps."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# Relative slack added to upper ends that come out of several float64 operations, so
# that rounding can never leave a certified bound a hair below the true value.
ROUNDING_MARGIN = 1e-10
# How a bound cut short by the wall-clock safety net starts its `loose` line: such a bound is sound
# but depends on the machine's load, so it is reported as not certified and gates fail on it.
TIME_BUDGET = "not certified: time budget"


@dataclass(frozen=True)
class Interval:
    """sigma lies in [lower, upper]; each end says how it was obtained."""

    lower: float
    upper: float
    lower_method: str
    upper_method: str
    certified: bool
    # Set when a budget cut the work short: one line saying the bound is loose and by at most how much.
    loose: str | None = None
    # True when lower and upper hold for different groupings of a kernel whose grouping is unknown.
    grouping_assumed: bool = False

    @property
    def method(self) -> str:
        if self.lower_method == self.upper_method:
            return self.lower_method
        return f"{self.lower_method}+{self.upper_method}"


def exact(value: float, method: str) -> Interval:
    return Interval(value, value, method, method, True)


def pow2_exponent(t: torch.Tensor) -> int:
    """e with max |t| in [2^(e-1), 2^e): dividing by 2^e is exact and brings the entries near 1."""
    top = float(t.detach().abs().max()) if t.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    return math.frexp(top)[1]


def scaled(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t / 2^e with max |entry| in [1/2, 1), and e (see docs/mathematics.md, "Scaling")."""
    e = pow2_exponent(t)
    out, rest = t, -e
    while rest:  # steps of at most 2^900 so the factor itself stays a normal float
        step = max(-900, min(900, rest))
        out = out * 2.0**step
        rest -= step
    return out, e


def unscale(x: float, e: int) -> float:
    """x * 2^e, inf on overflow (an honest upper end), exact otherwise unless the result is subnormal."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def unscale_lower(x: float, e: int) -> float:
    """x * 2^e rounded down: a result that lands in the subnormal range may lose bits, and one past
    the largest float (a finite norm of finite weights) is that largest float, not infinity."""
    y = unscale(x, e)
    if y == math.inf and math.isfinite(x):
        return sys.float_info.max
    return math.nextafter(y, 0.0) if 0.0 < y < 2.0**-1021 else y


def unscale_upper(x: float, e: int) -> float:
    y = unscale(x, e)
    return math.nextafter(y, math.inf) if 0.0 < y < 2.0**-1021 else y


def unscale_interval(iv: Interval, e: int) -> Interval:
    if e == 0:
        return iv
    return replace(iv, lower=unscale_lower(iv.lower, e), upper=unscale_upper(iv.upper, e))


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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Top Ritz vector of the Hermitian PSD operator gram (A^H A) after a few Lanczos steps, real
    or complex (dtype float64 or complex128).

    Full reorthogonalisation; the caller turns it into a lower bound by evaluating ||A x||, so
    rounding in the recurrence can only make the bound less tight, never wrong."""
    steps = max(1, min(steps, n))
    if start is None:
        g = torch.Generator().manual_seed(seed)
        if dtype.is_complex:
            start = torch.view_as_complex(torch.randn(n, 2, generator=g, dtype=torch.float64))
        else:
            start = torch.randn(n, generator=g, dtype=torch.float64)
    v = start.to(device=device, dtype=dtype)
    basis = torch.zeros(n, steps, dtype=dtype, device=device)
    basis[:, 0] = v / torch.linalg.vector_norm(v)
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(steps):
        z = gram(basis[:, j])
        alpha.append(float(torch.vdot(basis[:, j], z).real))
        q = basis[:, : j + 1]
        z = z - q @ (q.mH @ z)
        z = z - q @ (q.mH @ z)  # twice is enough
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
    x = basis[:, :k] @ vecs[:, -1].to(device=device, dtype=dtype)
    unit: torch.Tensor = x / torch.linalg.vector_norm(x)
    return unit
