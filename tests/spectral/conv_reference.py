"""Independent references for convolution norms: explicit dense matrices and closed forms."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_matrix(
    k: torch.Tensor,
    size: tuple[int, ...],
    *,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    groups: int = 1,
    circular: bool = False,
    transposed: bool = False,
) -> torch.Tensor:
    """The operator as a matrix: push every basis vector of the input through torch's conv."""
    k = k.double()
    d = k.ndim - 2
    c_in = k.shape[0] if transposed else k.shape[1] * groups
    n = c_in
    for s in size:
        n *= s
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *size)
    if transposed:
        out = _CONV_T[d](basis, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    elif circular:
        assert isinstance(padding, int)
        pad = [padding] * (2 * d)
        out = _CONV[d](F.pad(basis, pad, mode="circular"), k, stride=stride, dilation=dilation, groups=groups)
    else:
        with warnings.catch_warnings():  # torch notes that even 'same' kernels copy the input
            warnings.simplefilter("ignore", UserWarning)
            out = _CONV[d](basis, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return out.reshape(n, -1).T


def op_norm(m: torch.Tensor) -> float:
    """Largest singular value by numpy's LAPACK: a different build from the one torch uses."""
    return float(np.linalg.norm(m.numpy(), 2))


def symbol_max_1d(h: torch.Tensor, points: int = 200_000) -> float:
    """max over w of |sum_p h[p] e^{-i w p}| on a very fine grid (for smooth closed-form checks)."""
    w = torch.linspace(0, 2 * torch.pi, points, dtype=torch.float64)
    p = torch.arange(len(h), dtype=torch.float64)
    vals = (h.double()[None, :] * torch.exp(-1j * w[:, None] * p[None, :])).sum(1)
    return float(vals.abs().max())


def module_matrix(module: torch.nn.Module, c_in: int, size: tuple[int, ...]) -> torch.Tensor:
    """The operator of a real torch module (bias removed) as a float64 matrix."""
    m = module.double()
    n = c_in
    for s in size:
        n *= s
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bias = getattr(m, "bias", None)
        out = m(basis) - (m(torch.zeros(1, c_in, *size, dtype=torch.float64)) if bias is not None else 0)
    return out.reshape(n, -1).T
