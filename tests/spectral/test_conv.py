"""Convolution bounds: never below the operator norm of any padding, stride or size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipaudit.spectral.conv import conv_interval, reshape_sigma
from tests.conftest import true_norm
from tests.spectral.conv_reference import conv_matrix, op_norm, symbol_max_1d

RTOL = 1e-2


def _kernel(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_all_ones_kernel_has_norm_taps() -> None:
    k = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    iv = conv_interval(k, RTOL)
    assert iv.lower <= 9.0 * (1 + 1e-12)
    assert iv.upper >= 9.0
    assert iv.certified


def test_delta_kernel_is_the_identity() -> None:
    k = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    for c in range(4):
        k[c, c, 1, 1] = 1.0
    iv = conv_interval(k, RTOL)
    assert iv.lower <= 1.0 + 1e-12 <= iv.upper + 2e-12
    assert iv.upper >= 1.0


@pytest.mark.parametrize("h", [[1.0, -1.0], [1.0, 2.0, 1.0], [0.5, -0.3, 0.8, 0.1, -0.6]])
def test_separable_kernel_closed_form(h: list[float]) -> None:
    """K = A (x) h has S = ||A|| * max |h^(w)|."""
    a = _kernel((5, 3), seed=1)
    ht = torch.tensor(h, dtype=torch.float64)
    k = a[:, :, None] * ht[None, None, :]
    s = true_norm(a) * symbol_max_1d(ht)
    iv = conv_interval(k, RTOL)
    assert iv.lower <= s * (1 + 1e-9)
    assert iv.upper >= s * (1 - 1e-9)


@pytest.mark.parametrize("size", [4, 7, 10])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv2d_upper_above_every_dense_matrix(size: int, stride: int, padding: int) -> None:
    k = _kernel((3, 2, 3, 3), seed=size * 10 + stride)
    iv = conv_interval(k, RTOL)
    zero = op_norm(conv_matrix(k, (size, size), stride=stride, padding=padding))
    circ = op_norm(conv_matrix(k, (size, size), stride=stride, padding=1, circular=True))
    assert iv.upper >= zero
    assert iv.upper >= circ


@pytest.mark.parametrize("dilation", [1, 2])
def test_conv1d_and_dilation(dilation: int) -> None:
    k = _kernel((4, 3, 5), seed=3)
    iv = conv_interval(k, RTOL)
    for n in (5, 12, 30):
        assert iv.upper >= op_norm(conv_matrix(k, (n,), padding=4, dilation=dilation))


def test_conv3d() -> None:
    k = _kernel((2, 2, 3, 2, 3), seed=4)
    iv = conv_interval(k, RTOL)
    assert iv.upper >= op_norm(conv_matrix(k, (4, 5, 4), padding=1))


def test_conv_transpose_same_bound_as_adjoint() -> None:
    k = _kernel((3, 5, 3, 3), seed=5)  # ConvTranspose2d(3, 5, 3) layout: (in, out, kh, kw)
    iv = conv_interval(k, RTOL)
    for stride in (1, 2):
        assert iv.upper >= op_norm(conv_matrix(k, (5, 5), stride=stride, transposed=True))


def test_grouped_kernel_read_as_ungrouped_is_an_upper_bound() -> None:
    k = _kernel((6, 1, 3, 3), seed=6)  # depthwise, groups = 6
    iv = conv_interval(k, RTOL)
    assert iv.upper >= op_norm(conv_matrix(k, (6, 6), padding=1, groups=6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(dtype: torch.dtype) -> None:
    k = _kernel((4, 3, 3, 3), seed=7).to(dtype).double()
    iv = conv_interval(k, RTOL)
    assert iv.upper >= op_norm(conv_matrix(k, (6, 6), padding=1))


def test_one_by_one_conv_is_a_matrix() -> None:
    k = _kernel((7, 5, 1, 1), seed=8)
    iv = conv_interval(k, RTOL)
    assert math.isclose(iv.upper, true_norm(k), rel_tol=1e-9)
    assert math.isclose(iv.lower, true_norm(k), rel_tol=1e-9)
    assert math.isclose(reshape_sigma(k), true_norm(k), rel_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    c_out=st.integers(1, 4),
    c_in=st.integers(1, 4),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    size=st.integers(1, 7),
    padding=st.integers(0, 3),
    stride=st.integers(1, 3),
)
def test_upper_never_below_any_zero_padded_conv(
    c_out: int, c_in: int, kh: int, kw: int, seed: int, size: int, padding: int, stride: int
) -> None:
    k = _kernel((c_out, c_in, kh, kw), seed)
    if size + 2 * padding < max(kh, kw):
        return
    iv = conv_interval(k, RTOL)
    assert iv.lower <= iv.upper
    assert iv.upper >= op_norm(conv_matrix(k, (size, size), stride=stride, padding=padding))
