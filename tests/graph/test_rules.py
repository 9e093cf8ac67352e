"""Per-op constants against numerical references: activations on fine grids, size-aware maps
against the dense matrices of torch's own ops, strided and grouped convs against their matrices."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lipaudit.graph import rules
from lipaudit.graph.ops import Case, Uncovered, Var
from tests.graph.test_ops_registry import Built


def _dense(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> np.ndarray:
    """The matrix of a linear map: push every basis vector through it."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return fn(eye).reshape(n, -1).T.numpy()


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.svd(a, compute_uv=False)[0]) if a.size else 0.0


def _gain(op: str, scalars: dict[str, object]) -> float:
    """The registered rule's factor for aten.op on a vector, through the walk."""
    built = Built(op, Case({"self": Var((3,), torch.float64), **scalars}))
    x = built.draw_point(torch.Generator().manual_seed(0))
    g, node, outs = built.graph([t.detach() for t in built.call(x)])
    return float(10.0 ** built.factors(g, node, outs, {})["o0"]["t0"])


@pytest.mark.parametrize(
    ("op", "scalars", "fn"),
    [
        ("gelu", {}, F.gelu),
        ("gelu", {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
        ("silu", {}, F.silu),
        ("mish", {}, F.mish),
        ("sigmoid", {}, torch.sigmoid),
        ("tanh", {}, torch.tanh),
        ("hardswish", {}, F.hardswish),
        ("hardsigmoid", {}, F.hardsigmoid),
        ("elu", {"alpha": 1.0}, F.elu),
        ("elu", {"alpha": 0.5}, lambda t: F.elu(t, 0.5)),
        ("elu", {"alpha": -0.7, "scale": 1.5, "input_scale": 2.0},
         lambda t: torch.ops.aten.elu(t, -0.7, 1.5, 2.0)),
        ("celu", {"alpha": 0.3}, lambda t: F.celu(t, 0.3)),
        ("selu", {}, F.selu),
        ("leaky_relu", {"negative_slope": 0.2}, lambda t: F.leaky_relu(t, 0.2)),
        ("relu", {}, F.relu),
        ("softplus", {"threshold": math.inf}, lambda t: F.softplus(t, threshold=math.inf)),
        ("softplus", {"beta": 3.0, "threshold": math.inf}, lambda t: F.softplus(t, 3.0, math.inf)),
        ("erf", {}, torch.erf),
    ],
)
def test_activation_constants_are_the_sup_of_the_slope(op: str, scalars: dict[str, object],
                                                       fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    y = fn(x)
    slopes = ((y[1:] - y[:-1]) / (x[1:] - x[:-1])).abs()  # secant slopes: each is at most the constant
    gain = _gain(op, scalars)
    top = float(slopes.max())
    assert top <= gain * (1 + 1e-9)  # secants in float64 carry ~1e-12 of rounding
    assert gain <= top * (1 + 1e-4)  # and tight


@pytest.mark.parametrize(("op", "scalars", "why"), [
    ("celu", {"alpha": -0.5}, "unbounded"),
    ("elu", {"input_scale": -1.0}, "unbounded"),
    ("softplus", {}, "jumps"),
    ("softplus", {"beta": 2.0, "threshold": 1.0}, "jumps"),
    ("threshold", {"threshold": 0.5, "value": 0.0}, "jumps"),
    ("hardshrink", {"lambd": 0.5}, "jumps"),
])
def test_parameters_that_break_continuity_or_bounds_are_uncovered(op: str, scalars: dict[str, object],
                                                                   why: str) -> None:
    with pytest.raises(Uncovered, match=why):
        _gain(op, scalars)


def test_default_softplus_really_jumps() -> None:
    """threshold=20: log1p(exp(20)) and 20 differ by 2e-9, which float64 sees."""
    x = torch.tensor([20.0 - 1e-12, 20.0 + 1e-12], dtype=torch.float64)
    y = F.softplus(x)
    assert float((y[0] - y[1]).abs()) / 2e-12 > 100


def test_hardswish_product_constant() -> None:
    x = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64)
    y = x * torch.clamp(x + 3, 0, 6)
    slopes = ((y[1:] - y[:-1]) / (x[1:] - x[:-1])).abs()
    assert float(slopes.max()) <= 9.0 <= float(slopes.max()) * (1 + 1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
       ceil=st.booleans(), include=st.booleans())
def test_avg_pool_axis_matches_torch(n: int, k: int, s: int, p: int, ceil: bool, include: bool) -> None:
    from hypothesis import assume

    assume(p <= k // 2 and rules.pool_output(n, k, s, p, 1, ceil) >= 1)
    ref = _dense(lambda t: F.avg_pool1d(t.unsqueeze(1), k, s, p, ceil, include).squeeze(1), (n,))
    ours = rules.avg_pool_matrix(n, k, s, p, ceil, include, False).to_dense().numpy()
    assert np.allclose(ours, ref, atol=1e-12)


def test_avg_pool_2d_is_the_kronecker_product() -> None:
    shape = (5, 6)
    for include, ceil in [(True, False), (False, True), (False, False)]:
        def pool(t: torch.Tensor, ceil: bool = ceil, include: bool = include) -> torch.Tensor:
            return F.avg_pool2d(t.unsqueeze(1), 3, 2, 1, ceil, include).squeeze(1)

        ref = _norm(_dense(pool, shape))
        ours = (rules.matrix_upper(rules.avg_pool_matrix(5, 3, 2, 1, ceil, include, False))
                * rules.matrix_upper(rules.avg_pool_matrix(6, 3, 2, 1, ceil, include, False)))
        assert ref <= ours <= ref * (1 + 1e-9)


def test_global_average_pool_is_one_over_sqrt_hw() -> None:
    a = rules.adaptive_matrix(7, 1, True)
    b = rules.adaptive_matrix(5, 1, True)
    assert rules.matrix_upper(a) * rules.matrix_upper(b) == pytest.approx(1 / math.sqrt(35), rel=1e-9)


@pytest.mark.parametrize(("n", "k", "s", "p", "d"), [(9, 3, 2, 1, 1), (8, 2, 2, 0, 1), (10, 3, 1, 1, 1),
                                                      (11, 3, 2, 1, 2), (7, 5, 2, 2, 1)])
def test_max_pool_count_matches_windows(n: int, k: int, s: int, p: int, d: int) -> None:
    # each window's members, by pooling an index image
    idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n) + 1
    count = np.zeros(n)
    out = rules.pool_output(n, k, s, p, d, False)
    for j in range(out):
        for t in range(k):
            i = j * s + t * d - p
            if 0 <= i < n:
                count[i] += 1
    assert rules.max_pool_count(n, k, s, p, d, False) == max(1, int(count.max()))
    assert F.max_pool1d(idx, k, s, p, d).shape[-1] == out
    assert rules.max_pool_count(n, k, s, p, 1, False) <= math.ceil(k / s) or d > 1


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "linear-ac", "linear"])
@pytest.mark.parametrize(("n", "out"), [(4, 8), (5, 12), (6, 3), (3, 7)])
def test_upsampling_axis_matches_torch(mode: str, n: int, out: int) -> None:
    if mode.startswith("linear"):
        ac = mode == "linear-ac"
        ref = _dense(lambda t: F.interpolate(t.unsqueeze(1), size=out, mode="linear", align_corners=ac).squeeze(1),
                     (n,))
        ours = rules.linear_matrix(n, out, ac, None).to_dense().numpy()
    else:
        ref = _dense(lambda t: F.interpolate(t.unsqueeze(1), size=out, mode=mode).squeeze(1), (n,))
        ours = rules.nearest_matrix(n, out, None, mode == "nearest-exact").to_dense().numpy()
    assert np.allclose(ours, ref, atol=1e-12)


def test_upsampling_with_scale_factor_matches_torch() -> None:
    ref = _dense(lambda t: F.interpolate(t.unsqueeze(1), scale_factor=2.5, mode="linear").squeeze(1), (4,))
    assert np.allclose(rules.linear_matrix(4, 10, False, 2.5).to_dense().numpy(), ref, atol=1e-12)
    ref = _dense(lambda t: F.interpolate(t.unsqueeze(1), scale_factor=1.7, mode="nearest").squeeze(1), (5,))
    assert np.allclose(rules.nearest_matrix(5, 8, 1.7, False).to_dense().numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("n", "left", "right"), [(5, 2, 1), (4, 3, 0), (6, 1, 3), (4, -1, 2)])
def test_padding_axis_matches_torch(mode: str, n: int, left: int, right: int) -> None:
    if mode == "reflect" and max(left, right) >= n:
        pytest.skip("torch refuses it too")
    if mode != "constant" and min(left, right) < 0:
        pytest.skip("negative non-constant padding")
    ref = _dense(lambda t: F.pad(t.unsqueeze(1), (left, right), mode=mode).squeeze(1), (n,))
    ours = rules.pad_matrix(n, left, right, mode)
    assert ours is not None and np.allclose(ours.to_dense().numpy(), ref, atol=1e-12)


def _strided_conv_norm(k: torch.Tensor, n: int, stride: int, dilation: int, groups: int, pad: int) -> float:
    c_in = k.shape[1] * groups
    a = _dense(lambda t: F.conv2d(t, k, stride=stride, padding=pad, dilation=dilation, groups=groups),
               (c_in, n, n))
    return _norm(a)


def test_stride_two_average_is_one_half() -> None:
    k = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)
    iv = rules.conv_norm(k, (2, 2), (1, 1), 1, 1e-3)
    assert iv.certified and iv.upper == pytest.approx(0.5, rel=1e-3) and iv.upper >= 0.5
    assert rules.conv_norm(k, (1, 1), (1, 1), 1, 1e-3).upper == pytest.approx(1.0, rel=1e-3)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), k=st.integers(1, 4), pad=st.integers(0, 3))
def test_strided_grouped_conv_upper_end_holds(seed: int, stride: int, dilation: int, groups: int, k: int,
                                              pad: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(4, 4 // groups, k, k, generator=gen, dtype=torch.float64)
    iv = rules.conv_norm(kernel, (stride, stride), (dilation, dilation), groups, 1e-3)
    for n in (6, 9):
        if (n + 2 * pad - dilation * (k - 1) - 1) < 0:
            continue
        assert _strided_conv_norm(kernel, n, stride, dilation, groups, pad) <= iv.upper
    # the polyphase bound is at or below the stride-agnostic S(K)
    assert iv.upper <= rules.conv_norm(kernel, (1, 1), (1, 1), groups, 1e-3).upper * (1 + 2e-3)


def test_large_input_strided_conv_is_close_to_the_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    iv = rules.conv_norm(kernel, (2, 2), (1, 1), 1, 1e-3)
    true = _strided_conv_norm(kernel, 16, 2, 1, 1, 1)
    assert true <= iv.upper <= true * 1.15


def test_long_axes_use_a_sparse_certified_bound() -> None:
    """A million-sample axis: no dense matrix, and the Schur bound still holds (here it is exact)."""
    n = 1_000_000
    a = rules.avg_pool_matrix(n, 4, 4, 0, False, True, False)
    assert a.is_sparse and rules.matrix_upper(a) == pytest.approx(0.5, rel=1e-9)
    up = rules.nearest_matrix(n, 2 * n, 2.0, False)
    assert rules.matrix_upper(up) == pytest.approx(math.sqrt(2), rel=1e-9)
    small = rules.avg_pool_matrix(50, 3, 2, 1, True, False, False)
    dense = float(np.linalg.svd(small.to_dense().numpy(), compute_uv=False)[0])
    sch = small.coalesce()
    col = np.bincount(sch.indices()[1].numpy(), weights=sch.values().numpy())
    row = np.bincount(sch.indices()[0].numpy(), weights=sch.values().numpy())
    assert dense <= math.sqrt(col.max() * row.max()) + 1e-12
