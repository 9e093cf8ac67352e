"""Operator norms of convolution kernels, valid for every padding, stride and input size.

S(K) = sup over frequencies w of sigma_max(K^(w)), with K^(w) = sum_p K[:, :, p] e^{-i w.p},
is the norm of the convolution on the infinite grid; zero or circular padding, strides,
dilation and transposition can only lower it (DESIGN §2.2).
"""

from __future__ import annotations

import math

import torch

from lipaudit.spectral import ROUNDING_MARGIN, Interval
from lipaudit.spectral.dense import svd_norm


def kernel_matrix(k: torch.Tensor) -> torch.Tensor:
    """(c_out, c_in * prod k): the matrix torch.nn.utils.spectral_norm divides by."""
    return k.reshape(k.shape[0], -1)


def reshape_sigma(k: torch.Tensor) -> float:
    return svd_norm(kernel_matrix(k))


def symbol_grid(k: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """K^ at w = 2 pi j / N on a grid (last axis halved by conjugate symmetry), as (..., c_out, c_in)."""
    d = k.ndim - 2
    dims = tuple(range(2, 2 + d))
    spec = torch.fft.rfftn(k, s=sizes, dim=dims)
    out: torch.Tensor = spec.permute(*range(2, 2 + d), 0, 1).reshape(-1, k.shape[0], k.shape[1])
    return out


def grid_max(k: torch.Tensor, sizes: tuple[int, ...]) -> float:
    """Largest sigma_max(K^(w)) over the grid: a lower bound of S(K)."""
    mats = symbol_grid(k, sizes)
    return float(torch.linalg.matrix_norm(mats, ord=2).max())


def default_grid(k: torch.Tensor) -> tuple[int, ...]:
    return tuple(1 if n == 1 else max(2 * n, 16) for n in k.shape[2:])


def conv_interval(k: torch.Tensor, rtol: float) -> Interval:
    """Grid maximum below; sqrt(prod k) * reshape_sigma above (each input pixel meets at most
    prod k output positions)."""
    taps = math.prod(k.shape[2:])
    upper = math.sqrt(taps) * reshape_sigma(k) * (1 + ROUNDING_MARGIN)
    lower = min(grid_max(k, default_grid(k)), upper)
    return Interval(lower, upper, "freq-grid", "sqrt-taps-reshape", True)
