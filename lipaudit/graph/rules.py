"""Norms of the linear maps op rules build: size-aware pooling, upsampling and padding axes, strided convs."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from lipaudit.spectral import ROUNDING_MARGIN, Interval
from lipaudit.spectral.conv import conv_interval
from lipaudit.spectral.dense import dense_interval

# 1-D operators with more entries than this are bounded by sqrt(||A||_1 ||A||_inf) instead of an SVD.
_DENSE_ENTRIES = 2**22


# -- exact norms of small matrices ---------------------------------------------------------


def _coo(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    idx = torch.stack([rows.reshape(-1).long(), cols.reshape(-1).long()])
    return torch.sparse_coo_tensor(idx, vals.reshape(-1).to(torch.float64), shape, check_invariants=True).coalesce()


def matrix_upper(a: torch.Tensor) -> float:
    """A certified upper end of ||A||_2 for a 1-D operator (sparse or dense float64): an SVD when
    small, else sqrt(||A||_1 ||A||_inf)."""
    m, n = a.shape
    if m == 0 or n == 0:
        return 0.0
    if m * n <= _DENSE_ENTRIES:
        d = a.to_dense() if a.is_sparse else a
        return float(torch.linalg.svdvals(d)[0]) * (1 + ROUNDING_MARGIN)
    if not a.is_sparse:
        a = a.to_sparse()
    a = a.coalesce()
    idx, vals = a.indices(), a.values().abs()
    col = torch.zeros(n, dtype=torch.float64).index_add_(0, idx[1], vals)
    row = torch.zeros(m, dtype=torch.float64).index_add_(0, idx[0], vals)
    return math.sqrt(float(col.max()) * float(row.max())) * (1 + ROUNDING_MARGIN)


def pool_output(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape."""
    num = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def avg_pool_matrix(n: int, k: int, s: int, p: int, ceil_mode: bool, include_pad: bool,
                    override: bool) -> torch.Tensor:
    """One axis of aten avg_pool, sparse: entry 1/divisor (1 with a divisor override, divided afterwards)."""
    out = pool_output(n, k, s, p, 1, ceil_mode)
    j = torch.arange(max(out, 0))
    start = j * s - p
    end = torch.clamp(start + k, max=n + p)
    lo, hi = start.clamp(min=0), end.clamp(max=n)
    div = torch.ones(len(j), dtype=torch.float64) if override else (
        (end - start) if include_pad else (hi - lo)).clamp(min=1).to(torch.float64)
    cols = start[:, None] + torch.arange(k)[None, :]
    valid = (cols >= lo[:, None]) & (cols < hi[:, None])
    rows = j[:, None].expand_as(cols)
    vals = (1.0 / div)[:, None].expand(cols.shape)
    return _coo(rows[valid], cols[valid], vals[valid], (len(j), n))


def adaptive_matrix(n: int, out: int, average: bool) -> torch.Tensor:
    j = torch.arange(out)
    lo = (j * n) // out
    hi = -((-(j + 1) * n) // out)
    width = int((hi - lo).max()) if out else 0
    cols = lo[:, None] + torch.arange(width)[None, :]
    valid = cols < hi[:, None]
    vals = (1.0 / (hi - lo).to(torch.float64))[:, None].expand(cols.shape) if average else torch.ones(
        cols.shape, dtype=torch.float64)
    rows = j[:, None].expand_as(cols)
    return _coo(rows[valid], cols[valid], vals[valid], (out, n))


def max_pool_count(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """The most windows that contain one input position along an axis."""
    out = pool_output(n, k, s, p, d, ceil_mode)
    counts = torch.zeros(n + 2 * p + d * k + s * out + 1, dtype=torch.long)
    for t in range(k):
        idx = torch.arange(out) * s + t * d - p
        idx = idx[(idx >= 0) & (idx < n)]
        counts.index_add_(0, idx, torch.ones_like(idx))
    return max(1, int(counts.max()))


def nearest_matrix(n: int, out: int, scale: float | None, exact: bool) -> torch.Tensor:
    """aten upsample_nearest (or _nearest_exact) along one axis."""
    ratio = 1.0 / scale if scale is not None and scale > 0 else n / out
    dst = torch.arange(out, dtype=torch.float64)
    src = torch.floor((dst + 0.5) * ratio) if exact else torch.floor(dst * ratio)
    src = src.clamp(max=n - 1).long()
    return _coo(torch.arange(out), src, torch.ones(out, dtype=torch.float64), (out, n))


def linear_matrix(n: int, out: int, align_corners: bool, scale: float | None) -> torch.Tensor:
    """aten upsample_linear/bilinear/trilinear along one axis."""
    if align_corners:
        ratio = (n - 1) / (out - 1) if out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else n / out
    dst = torch.arange(out, dtype=torch.float64)
    src = ratio * dst if align_corners else (ratio * (dst + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n - 1)
    i1 = torch.where(i0 < n - 1, i0 + 1, i0)
    l1 = (src - i0.to(torch.float64)).clamp(0.0, 1.0)
    rows = torch.arange(out)
    return _coo(torch.cat([rows, rows]), torch.cat([i0, i1]), torch.cat([1.0 - l1, l1]), (out, n))


def pad_matrix(n: int, left: int, right: int, mode: str) -> torch.Tensor | None:
    """F.pad along one axis; None when torch would refuse the sizes."""
    out = max(n + left + right, 0)
    j = torch.arange(out) - left
    if mode == "constant":
        keep = (j >= 0) & (j < n)
        return _coo(torch.arange(out)[keep], j[keep], torch.ones(int(keep.sum()), dtype=torch.float64), (out, n))
    if mode == "reflect":
        if max(left, right) >= n:
            return None
        period = 2 * (n - 1) if n > 1 else 1
        m = j.remainder(period)
        src = torch.where(m < n, m, period - m)
    elif mode == "replicate":
        src = j.clamp(0, n - 1)
    elif mode == "circular":
        if max(left, right) > n:
            return None
        src = j.remainder(n)
    else:
        return None
    return _coo(torch.arange(out), src, torch.ones(out, dtype=torch.float64), (out, n))


# -- convolutions --------------------------------------------------------------------------


def polyphase(k: torch.Tensor, stride: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """The stride-1 kernel on the input's polyphase components: a strided conv with kernel k has
    the same operator norm on the infinite grid as the stride-1 conv with this kernel."""
    d = k.ndim - 2
    if all(s == 1 for s in stride):
        return k  # dilation alone only re-parametrises the frequency
    o, i = k.shape[0], k.shape[1]
    taps = [k.shape[2 + a] for a in range(d)]
    new_taps = [((taps[a] - 1) * dilation[a]) // stride[a] + 1 for a in range(d)]
    phases = math.prod(stride)
    out = torch.zeros(o, i * phases, *new_taps, dtype=k.dtype)
    for p in torch.cartesian_prod(*[torch.arange(t) for t in taps]).reshape(-1, d).tolist():
        q = [p[a] * dilation[a] for a in range(d)]
        r = [q[a] % stride[a] for a in range(d)]
        t = [q[a] // stride[a] for a in range(d)]
        phase = 0
        for a in range(d):
            phase = phase * stride[a] + r[a]
        idx = (slice(None), slice(phase * i, (phase + 1) * i), *t)
        out[idx] = k[(slice(None), slice(None), *p)]
    return out


_GROUPS_PARAM = "groups" in inspect.signature(conv_interval).parameters


def conv_norm(k: torch.Tensor, stride: tuple[int, ...], dilation: tuple[int, ...], groups: int,
              rtol: float, deadline: float | None = None) -> Interval:
    """Certified bracket of the norm of a zero-padded strided grouped conv (any padding, any input
    size) with float64 kernel k (c_out, c_in / groups, taps...): the max over groups of S(polyphase)."""
    o = k.shape[0]
    if _GROUPS_PARAM:
        # the groups are known from the graph; the polyphase kernel keeps each group's rows
        call: Callable[..., Interval] = conv_interval
        return call(polyphase(k, stride, dilation), rtol, groups=max(1, groups))
    if groups <= 1:
        return conv_interval(polyphase(k, stride, dilation), rtol)
    per = o // groups
    best: Interval | None = None
    lower = 0.0
    certified = True
    for g in range(groups):
        iv = conv_interval(polyphase(k[g * per : (g + 1) * per], stride, dilation), rtol)
        lower = max(lower, iv.lower)
        certified = certified and iv.certified
        if best is None or iv.upper > best.upper:
            best = iv
    assert best is not None
    return Interval(lower, best.upper, best.lower_method, best.upper_method, certified)


def dense_norm(w: torch.Tensor, rtol: float, seed: int) -> Interval:
    return dense_interval(w, "auto", rtol, seed)


def cubic_matrix(n: int, out: int, align_corners: bool, scale: float | None) -> torch.Tensor:
    """aten upsample_bicubic2d along one axis (it is separable), by pushing the basis through it."""
    if n * out > _DENSE_ENTRIES:
        raise ValueError("axis too long for a dense bicubic matrix")
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)
    y: torch.Tensor = torch.ops.aten.upsample_bicubic2d.default(eye, [out, 1], align_corners, scale, None)
    return y.reshape(n, out).T.contiguous()
