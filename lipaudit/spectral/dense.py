"""Largest singular value of a dense matrix: exact, or a certified bracket without an SVD."""

from __future__ import annotations

import math

import torch

from lipaudit.spectral import (
    ROUNDING_MARGIN,
    Interval,
    exact,
    lanczos_top_vector,
    scaled,
    unscale_interval,
    unscale_lower,
    unscale_upper,
)

_EPS = float(torch.finfo(torch.float64).eps)

# --method auto computes the exact value up to this many flops (m * n * min(m, n)); beyond
# it, a certified bracket to --rtol is cheaper.
EXACT_FLOPS_LIMIT = 2.0**37
# Above this width, the eigenvalues of the smaller Gram matrix are about 3x faster than an
# SVD and as accurate for the largest singular value (relative error ~ m n eps / 2 at worst).
GRAM_EIGH_WIDTH = 512
# The same for numbers that are only shown or go through svd_error's margin (reshaped kernels,
# 1x1 convolutions): a 512 x 4608 reshaped kernel takes 0.75 s by SVD, 0.1 s by its Gram matrix.
GRAM_EIGH_WIDTH_CONV = 64


def svd_error(m: int, n: int) -> float:
    """Relative bound on the error of LAPACK's largest singular value of an m x n float64 matrix.

    LAPACK documents |computed - sigma_1| <= p(m, n) eps sigma_1 with p modestly growing; we take
    p = (m + n) min(m, n) + 16, the worst-case count of a Householder reduction (docs/mathematics.md)."""
    return ((m + n) * min(m, n) + 16) * _EPS


def svd_norm(w: torch.Tensor) -> float:
    """LAPACK in float64 (no margin: the number to show, not to certify; within svd_error of sigma,
    so taps_bound can add that margin): an SVD, or the Gram eigensolve for wide matrices."""
    if w.numel() == 0:
        return 0.0
    ws, e = scaled(w)
    s, _ = _top_singular(ws, GRAM_EIGH_WIDTH_CONV)
    return unscale_upper(s, e) if e else s


def _top_singular(w: torch.Tensor, width: int = GRAM_EIGH_WIDTH) -> tuple[float, str]:
    m, n = w.shape
    if min(m, n) <= width:
        return float(torch.linalg.svdvals(w)[0]), "svd"
    gram = w.T @ w if n <= m else w @ w.T
    top = float(torch.linalg.eigvalsh(gram)[-1])
    return math.sqrt(max(top, 0.0)), "gram-eigh"


def exact_norm(w: torch.Tensor, width: int = GRAM_EIGH_WIDTH) -> Interval:
    """sigma_max by LAPACK in float64 (an SVD, or the symmetric eigensolver on the smaller Gram
    matrix for matrices wider than `width`), widened by svd_error on both sides so both ends are proven."""
    m, n = w.shape
    if w.numel() == 0:
        return exact(0.0, "zero")
    ws, e = scaled(w)
    if not bool(torch.any(ws != 0)):
        return exact(0.0, "zero")
    s, method = _top_singular(ws, width)
    err = svd_error(m, n)
    lower = s * (1 - err) * (1 - _EPS)
    # + 2^-1000: entries that underflowed to subnormals when scaling down move sigma by far less
    upper = (s * (1 + err) + 2.0**-1000) * (1 + _EPS)
    return Interval(unscale_lower(lower, e), unscale_upper(upper, e), method, method, True)


def _gamma(k: int) -> float:
    return k * _EPS / (1 - k * _EPS)


def cholesky_certifies(w: torch.Tensor, sigma: float) -> float | None:
    """A proven upper bound near sigma if tI - W^T W is positive definite (t = sigma^2), else None.

    The slack covers the rounding of the Gram product and of the Cholesky factorisation
    (Higham, Accuracy and Stability of Numerical Algorithms, Thms 3.5 and 10.7).
    """
    m, n = w.shape
    if m < n:
        w = w.T
        m, n = n, m
    t = sigma * sigma
    gram = w.T @ w
    shifted = -gram
    shifted.diagonal().add_(t)
    _, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        return None
    fro2 = float(torch.linalg.vector_norm(w)) ** 2
    slack = _gamma(m) * fro2 + _EPS * (t + fro2) + 1.01 * _gamma(n + 1) * n * (t + _EPS * fro2)
    return math.sqrt(t + slack) * (1 + ROUNDING_MARGIN)


def lanczos_lower(
    w: torch.Tensor, steps: int, seed: int, start: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """||W x|| for the top Ritz vector x of W^T W: a lower bound, and x to restart from."""
    small = w if w.shape[1] <= w.shape[0] else w.T  # the Gram of the smaller side

    def gram(v: torch.Tensor) -> torch.Tensor:
        return small.T @ (small @ v)

    x = lanczos_top_vector(gram, small.shape[1], steps, seed, w.device, start)
    return rayleigh_lower(small, x), x


def rayleigh_lower(w: torch.Tensor, x: torch.Tensor) -> float:
    """||W x|| / ||x|| minus the rounding of the product: never above sigma_max(W).

    |fl(W x) - W x| <= gamma_n |W| |x| entrywise, and || |W| |x| || <= ||W||_F ||x||."""
    n = w.shape[1]
    xn = float(torch.linalg.vector_norm(x))
    if xn == 0.0:
        return 0.0
    wx = float(torch.linalg.vector_norm(w @ x))
    fro = float(torch.linalg.vector_norm(w))
    num = wx * (1 - 4 * _EPS) - _gamma(n + 4) * fro * xn * (1 + 4 * _EPS)
    return max(0.0, num / (xn * (1 + 4 * _EPS)))


def certified_bracket(w: torch.Tensor, rtol: float, seed: int) -> Interval:
    """Lanczos lower end, Cholesky-certified upper end within about rtol of it."""
    if w.numel() == 0 or not bool(torch.any(w != 0)):
        return exact(0.0, "zero")
    ws, e = scaled(w)
    return unscale_interval(_bracket(ws, rtol, seed), e)


def _bracket(w: torch.Tensor, rtol: float, seed: int) -> Interval:
    lower, x = lanczos_lower(w, 32, seed)
    gap = rtol
    for steps in (64, 128, 256):
        upper = cholesky_certifies(w, lower * (1 + gap))
        if upper is not None:
            return Interval(lower, upper, "lanczos", "cholesky", True)
        more, x = lanczos_lower(w, steps, seed, start=x)
        lower = max(lower, more)
        gap *= 2
    return exact_norm(w)


def dense_interval(w: torch.Tensor, method: str, rtol: float, seed: int) -> Interval:
    """w is a float64 matrix; method is exact, fast or auto. The matrix is scaled by a power of two
    first, so no Gram product or factorisation can overflow or underflow."""
    if w.numel() == 0 or not bool(torch.any(w != 0)):
        return exact(0.0, "zero")
    m, n = w.shape
    if method == "exact" or (method == "auto" and m * n * min(m, n) <= EXACT_FLOPS_LIMIT):
        return exact_norm(w)
    ws, e = scaled(w)
    return unscale_interval(_bracket(ws, rtol, seed), e)
