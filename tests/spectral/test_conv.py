"""Convolution bounds: never below the operator norm of any padding, stride or size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lipaudit.spectral.conv import conv_bound, conv_interval, grid_bound, reshape_sigma, zero_padded_lower
from tests.conftest import true_norm
from tests.spectral.conv_reference import conv_matrix, op_norm, symbol_max_1d

RTOL = 1e-2


def _kernel(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tight(iv, truth: float, rtol: float = RTOL) -> None:  # type: ignore[no-untyped-def]
    """The bracket holds the truth and is no wider than rtol allows."""
    assert iv.certified
    assert iv.lower <= truth * (1 + 1e-9)
    assert iv.upper >= truth
    assert iv.upper <= truth * (1 + rtol)


@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (1, 1, 5), (1, 1, 3, 3, 3), (1, 1, 2, 7), (1, 1, 512)])
def test_all_ones_kernel_has_norm_taps(shape: tuple[int, ...]) -> None:
    k = torch.ones(*shape, dtype=torch.float64)
    _tight(conv_interval(k, RTOL, groups=1), float(math.prod(shape[2:])))


@pytest.mark.parametrize("width", [1, 16, 256])
@pytest.mark.parametrize("spatial", [(3,), (3, 3), (3, 3, 3), (5, 5)])
def test_all_ones_channels(width: int, spatial: tuple[int, ...]) -> None:
    """All-ones (c, c, k...) kernel: S = c * prod k, reached at w = 0."""
    if width == 256 and len(spatial) == 3:
        width = 64
    k = torch.ones(width, width, *spatial, dtype=torch.float64)
    _tight(conv_interval(k, RTOL, groups=1), float(width * math.prod(spatial)))


@pytest.mark.parametrize("spatial", [(3,), (3, 3), (3, 3, 3), (4, 4)])
@pytest.mark.parametrize("width", [8, 256])
def test_delta_kernels_are_orthogonal_maps(spatial: tuple[int, ...], width: int) -> None:
    """A delta kernel carrying an orthogonal channel mix Q has norm exactly 1 everywhere."""
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    k = torch.zeros(width, width, *spatial, dtype=torch.float64)
    k[(slice(None), slice(None), *(s // 2 for s in spatial))] = q
    _tight(conv_interval(k, RTOL, groups=1), 1.0)


@pytest.mark.parametrize("h", [[1.0, -1.0], [1.0, 2.0, 1.0], [0.5, -0.3, 0.8, 0.1, -0.6]])
@pytest.mark.parametrize("width", [(5, 3), (64, 256)])
def test_separable_kernel_closed_form(h: list[float], width: tuple[int, int]) -> None:
    """K = A (x) h has S = ||A|| * max |h^(w)|."""
    a = _kernel(width, seed=1)
    ht = torch.tensor(h, dtype=torch.float64)
    k = a[:, :, None] * ht[None, None, :]
    _tight(conv_interval(k, RTOL, groups=1), true_norm(a) * symbol_max_1d(ht))


def test_separable_2d_and_3d_closed_form() -> None:
    """K = A (x) g (x) h: S = ||A|| max|g^| max|h^| (and one more factor in 3-D)."""
    a = _kernel((6, 4), seed=2)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    h = torch.tensor([0.3, 1.0, 0.2, -0.4], dtype=torch.float64)
    k2 = a[:, :, None, None] * g[None, None, :, None] * h[None, None, None, :]
    _tight(conv_interval(k2, RTOL, groups=1), true_norm(a) * symbol_max_1d(g) * symbol_max_1d(h))
    k3 = k2[..., None] * g[None, None, None, None, :]
    _tight(conv_interval(k3, RTOL, groups=1), true_norm(a) * symbol_max_1d(g) ** 2 * symbol_max_1d(h))


def test_long_1d_kernel() -> None:
    """512 taps: a smooth window times a channel mix, against a 2^20-point FFT of the window."""
    a = _kernel((8, 8), seed=3)
    h = torch.hann_window(512, dtype=torch.float64) * torch.cos(torch.arange(512, dtype=torch.float64) * 0.3)
    k = a[:, :, None] * h[None, None, :]
    truth = true_norm(a) * float(torch.fft.rfft(h, n=2**20).abs().max())
    _tight(conv_interval(k, RTOL, groups=1), truth)


@pytest.mark.parametrize("rtol", [1e-1, 1e-2, 1e-3])
def test_random_kernels_within_rtol_of_a_fine_grid(rtol: float) -> None:
    """Random kernels have the flattest frequency response: the hardest case for the search."""
    k = _kernel((12, 9, 3, 3), seed=4)
    iv = conv_interval(k, rtol, groups=1)
    spec = torch.fft.rfftn(k, s=(256, 256), dim=(2, 3)).permute(2, 3, 0, 1)
    fine = float(torch.linalg.matrix_norm(spec, ord=2).max())  # a lower bound of S
    assert iv.lower <= fine * (1 + 1e-4)  # S is within ~3e-4 of the 256-grid maximum
    assert iv.upper >= fine
    assert iv.upper <= iv.lower * (1 + rtol)


@pytest.mark.parametrize("size", [4, 7, 10])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv2d_upper_above_every_dense_matrix(size: int, stride: int, padding: int) -> None:
    k = _kernel((3, 2, 3, 3), seed=size * 10 + stride)
    iv = conv_interval(k, RTOL, groups=1)
    zero = op_norm(conv_matrix(k, (size, size), stride=stride, padding=padding))
    circ = op_norm(conv_matrix(k, (size, size), stride=stride, padding=1, circular=True))
    assert iv.upper >= zero
    assert iv.upper >= circ


@pytest.mark.parametrize("dilation", [1, 2])
def test_conv1d_and_dilation(dilation: int) -> None:
    k = _kernel((4, 3, 5), seed=3)
    iv = conv_interval(k, RTOL, groups=1)
    for n in (5, 12, 30):
        assert iv.upper >= op_norm(conv_matrix(k, (n,), padding=4, dilation=dilation))


def test_conv3d() -> None:
    k = _kernel((2, 2, 3, 2, 3), seed=4)
    iv = conv_interval(k, RTOL, groups=1)
    assert iv.upper >= op_norm(conv_matrix(k, (4, 5, 4), padding=1))


def test_conv_transpose_same_bound_as_adjoint() -> None:
    k = _kernel((3, 5, 3, 3), seed=5)  # ConvTranspose2d(3, 5, 3) layout: (in, out, kh, kw)
    iv = conv_interval(k, RTOL, groups=1)
    for stride in (1, 2):
        assert iv.upper >= op_norm(conv_matrix(k, (5, 5), stride=stride, transposed=True))


def test_grouped_kernel_read_as_ungrouped_is_an_upper_bound() -> None:
    k = _kernel((6, 1, 3, 3), seed=6)  # depthwise, groups = 6
    iv = conv_interval(k, RTOL, groups=1)
    assert iv.upper >= op_norm(conv_matrix(k, (6, 6), padding=1, groups=6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(dtype: torch.dtype) -> None:
    k = _kernel((4, 3, 3, 3), seed=7).to(dtype).double()
    iv = conv_interval(k, RTOL, groups=1)
    assert iv.upper >= op_norm(conv_matrix(k, (6, 6), padding=1))


@pytest.mark.parametrize("size", [(5, 5), (6, 4), (1, 7)])
def test_circular_norm_at_an_input_size_is_exact(size: tuple[int, int]) -> None:
    k = _kernel((3, 4, 3, 3), seed=9)
    truth = op_norm(conv_matrix(k, size, padding=1, circular=True))
    iv = grid_bound(k, size, 1e-6)
    assert iv.lower <= truth * (1 + 1e-9) and iv.upper >= truth
    assert iv.upper <= truth * (1 + 1e-6)


@pytest.mark.parametrize(("shape", "size"), [((3, 2, 3, 3), (6, 6)), ((2, 3, 5), (9,)), ((2, 2, 3, 3, 3), (4, 4, 3)),
                                             ((3, 3, 2, 2), (5, 5))])
def test_zero_padding_bracket_at_an_input_size(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    k = _kernel(shape, seed=10)
    truth = op_norm(conv_matrix(k, size, padding="same"))
    lower = zero_padded_lower(k, size, groups=1)
    upper = grid_bound(k, tuple(n + s - 1 for n, s in zip(size, shape[2:], strict=True)), 1e-6).upper
    assert lower <= truth * (1 + 1e-9) <= upper * (1 + 1e-9)
    assert lower >= 0.98 * truth


def test_zero_borders_are_trimmed() -> None:
    """A 1x1 kernel padded into 5x5 is still a matrix: exact."""
    a = _kernel((4, 3), seed=11)
    k = torch.zeros(4, 3, 5, 5, dtype=torch.float64)
    k[:, :, 3, 1] = a
    res = conv_bound(k, RTOL)
    assert res.interval.lower == pytest.approx(true_norm(a), rel=1e-12)
    assert res.interval.upper == pytest.approx(true_norm(a), rel=1e-9)
    assert res.points == 1


def test_all_zero_kernel() -> None:
    iv = conv_interval(torch.zeros(3, 3, 3, 3, dtype=torch.float64), RTOL, groups=1)
    assert (iv.lower, iv.upper) == (0.0, 0.0)


def test_one_by_one_conv_is_a_matrix() -> None:
    k = _kernel((7, 5, 1, 1), seed=8)
    iv = conv_interval(k, RTOL, groups=1)
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
    assume(size + 2 * padding >= max(kh, kw))
    iv = conv_interval(k, RTOL, groups=1)
    assert iv.lower <= iv.upper
    assert iv.upper >= op_norm(conv_matrix(k, (size, size), stride=stride, padding=padding))


@pytest.mark.parametrize("rtol", [1e-5, 1e-6, 1e-8])
@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 3, 3, 3), (2, 2, 2, 2, 2)])
def test_tiny_rtol(rtol: float, shape: tuple[int, ...]) -> None:
    """Small tolerances shrink the grid's spare margin with them (once a math domain error below
    rtol 1.02e-5); the bracket still holds the symbol's largest value on a fine grid."""
    k = _kernel(shape, 3)
    iv = conv_bound(k, rtol).interval
    assert iv.certified and iv.upper <= iv.lower * (1 + rtol)
    d = len(shape) - 2
    spec = torch.fft.fftn(k, s=(32,) * d, dim=tuple(range(2, 2 + d))).movedim(0, -1).movedim(0, -1)
    fine = float(torch.linalg.matrix_norm(spec, ord=2).max())
    assert fine <= iv.upper
