"""Dense norms against LAPACK float64; brackets must always contain the truth."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipaudit.spectral.dense import (
    GRAM_EIGH_WIDTH,
    certified_bracket,
    cholesky_certifies,
    dense_interval,
    exact_norm,
    lanczos_lower,
    svd_error,
)
from tests.conftest import true_norm


def _matrix(m: int, n: int, seed: int, scale: float = 1.0, decay: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    if decay:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s = torch.exp(-decay * torch.arange(len(s), dtype=torch.float64))
        w = u @ torch.diag(s) @ vh
    return w * scale


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 3), (64, 64), (200, 30), (30, 200)])
def test_exact_matches_lapack(shape: tuple[int, int]) -> None:
    w = _matrix(*shape, seed=1)
    iv = exact_norm(w)
    truth = true_norm(w)
    assert iv.lower <= truth <= iv.upper
    assert math.isclose(iv.upper, truth, rel_tol=1e-10) and math.isclose(iv.lower, truth, rel_tol=1e-10)
    assert iv.certified


def test_gram_eigh_for_wide_matrices_matches_svd() -> None:
    w = _matrix(GRAM_EIGH_WIDTH + 40, GRAM_EIGH_WIDTH + 10, seed=2, decay=0.01)
    iv = exact_norm(w)
    assert iv.method == "gram-eigh"
    assert iv.lower <= true_norm(w) <= iv.upper
    assert math.isclose(iv.upper, true_norm(w), rel_tol=1e-9)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
@pytest.mark.parametrize("decay", [0.0, 0.05, 1.0])
def test_bracket_contains_truth(scale: float, decay: float) -> None:
    w = _matrix(120, 80, seed=3, scale=scale, decay=decay)
    truth = true_norm(w)
    iv = certified_bracket(w, rtol=1e-3, seed=0)
    assert iv.certified
    assert iv.lower <= truth * (1 + 1e-12)
    assert iv.upper >= truth
    assert iv.upper <= iv.lower * 1.05


@pytest.mark.parametrize("shape", [(50, 50), (80, 20), (20, 80)])
def test_lanczos_is_a_lower_bound_even_unconverged(shape: tuple[int, int]) -> None:
    w = _matrix(*shape, seed=4)
    for steps in (1, 2, 5, 40):
        lower, _ = lanczos_lower(w, steps, seed=0)
        assert lower <= true_norm(w) * (1 + 1e-12)
    assert lower >= true_norm(w) * (1 - 1e-9)


def test_cholesky_refuses_a_threshold_below_the_norm() -> None:
    w = _matrix(40, 60, seed=5, decay=0.1)
    truth = true_norm(w)
    assert cholesky_certifies(w, truth * (1 - 1e-6)) is None
    up = cholesky_certifies(w, truth * (1 + 1e-6))
    assert up is not None and truth <= up <= truth * (1 + 2e-6)


def test_zero_matrix_has_norm_zero() -> None:
    iv = dense_interval(torch.zeros(4, 5, dtype=torch.float64), "fast", 1e-3, 0)
    assert (iv.lower, iv.upper, iv.certified) == (0.0, 0.0, True)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-20, 20),
    rank=st.integers(1, 40),
    method=st.sampled_from(["exact", "fast", "auto"]),
)
def test_upper_never_below_truth(m: int, n: int, seed: int, log_scale: float, rank: int, method: str) -> None:
    g = torch.Generator().manual_seed(seed)
    r = min(rank, m, n)
    w = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    w = w * 10.0**log_scale
    truth = true_norm(w)
    iv = dense_interval(w, method, 1e-4, seed % 1000)
    assert iv.upper >= truth
    assert iv.lower <= truth
    if method != "fast":
        assert math.isclose(iv.upper, truth, rel_tol=1e-10)


def _with_singular_values(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def _adversarial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    out = [torch.randn(m, n, generator=g, dtype=torch.float64) for m, n in ((3, 3), (50, 50), (200, 7), (7, 200))]
    out.append(torch.randn(1, 3000, generator=g, dtype=torch.float64))  # huge aspect ratio
    out.append(torch.randn(3000, 2, generator=g, dtype=torch.float64))
    a = torch.randn(40, 1, generator=g, dtype=torch.float64)
    out.append(a @ torch.randn(1, 30, generator=g, dtype=torch.float64))  # rank 1
    clustered = 1 + 1e-12 * torch.arange(20, dtype=torch.float64)
    out.append(_with_singular_values(60, 20, clustered.flip(0), 13))
    out.append(_with_singular_values(30, 30, torch.ones(30, dtype=torch.float64), 14))  # orthogonal
    out.append(torch.ones(64, 64, dtype=torch.float64))
    out.append(torch.eye(9, dtype=torch.float64) * 3 + 1e-9 * torch.randn(9, 9, generator=g, dtype=torch.float64))
    out.append(_matrix(GRAM_EIGH_WIDTH + 20, GRAM_EIGH_WIDTH + 5, seed=15))  # the eigensolver route
    return out


@pytest.mark.parametrize("i", range(12))
def test_exact_ends_bracket_numpy(i: int) -> None:
    """Item 12: each end proven, against numpy's LAPACK, on random and adversarial matrices."""
    w = _adversarial()[i]
    iv = exact_norm(w)
    truth = true_norm(w)
    assert iv.lower <= truth <= iv.upper
    # the margin is the documented one, not more
    assert iv.upper <= truth * (1 + 2 * svd_error(*w.shape))


def test_rank_one_exact_against_closed_form() -> None:
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    iv = exact_norm(torch.outer(a, b))  # sigma = |a| |b| = 15
    assert iv.lower <= 15.0 <= iv.upper


MAGNITUDES = [10.0**e for e in range(-300, 301, 25)] + [2.0**-1074 * 2**60, 1.7e308 / 64]


@pytest.mark.parametrize("scale", MAGNITUDES)
@pytest.mark.parametrize("method", ["exact", "fast"])
def test_extreme_magnitudes(scale: float, method: str) -> None:
    """Item 3 and --method fast near 1e150: scaled by a power of two before any product."""
    w = _matrix(12, 9, seed=16)
    base = true_norm(w)
    iv = dense_interval(w * scale, method, 1e-4, 0)
    truth = true_norm(w * scale) if math.isfinite(true_norm(w * scale)) else base * scale
    assert math.isfinite(iv.upper) and math.isfinite(iv.lower)
    assert iv.upper > 0
    assert iv.lower <= truth * (1 + 1e-12) and iv.upper >= truth * (1 - 1e-12)
    assert iv.upper / scale >= base * (1 - 1e-12)
    assert iv.lower / scale <= base * (1 + 1e-12)
