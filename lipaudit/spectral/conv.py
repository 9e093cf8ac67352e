"""Operator norms of convolution kernels, valid for every padding, stride and input size.

S(K) = sup over w of sigma_max(K^(w)), with K^(w) = sum_p K[:, :, p] e^{-i w.p}, is the norm of
the convolution on the infinite grid; zero or circular padding, strides, dilation and
transposition can only lower it (DESIGN §2.2).

The certificate: cover the frequency torus with boxes C (centre c, half-widths h). With
tau_C = sum_i ((k_i - 1) / 2) h_i < sqrt(2), every w in C has
    sigma_max(K^(w)) <= S <= sigma_max(K^(c)) / (1 - tau_C^2 / 2)
(Bernstein's inequality along the segment from the maximiser to c). Branch and bound keeps
the boxes whose bound could still exceed lower * (1 + rtol) and splits them. A box is closed
by a Cholesky factorisation of t^2 I - P(c), P = K^H K, which proves sigma_max(K^(c)) < t
without an eigensolver.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from lipaudit.spectral import ROUNDING_MARGIN, Interval, exact, lanczos_top_vector
from lipaudit.spectral.dense import exact_norm, svd_norm

_EPS = float(torch.finfo(torch.float64).eps)
# Boxes per batch are sized so a batch of Gram matrices stays near this many bytes.
_BATCH_BYTES = 64 * 2**20
# Bound on the work for one kernel, in Gram evaluations; beyond it the simple bound stands.
MAX_POINTS = 1_000_000
# Exact eigenvalue evaluations per batch at the last level before its open cells are split.
_MAX_EXACT = 32
# Aim below the requested rtol so rounding slack cannot push the result past it.
_TARGET = 0.9


def kernel_matrix(k: torch.Tensor) -> torch.Tensor:
    """(c_out, c_in * prod k): the matrix torch.nn.utils.spectral_norm divides by."""
    return k.reshape(k.shape[0], -1)


def reshape_sigma(k: torch.Tensor) -> float:
    return svd_norm(kernel_matrix(k))


def taps_bound(k: torch.Tensor, reshape: float | None = None) -> float:
    """sqrt(k_1 ... k_d) * reshape_sigma: each input pixel meets at most prod k output positions."""
    r = reshape_sigma(k) if reshape is None else reshape
    return math.sqrt(math.prod(k.shape[2:])) * r * (1 + ROUNDING_MARGIN)


class GramSymbol:
    """P(w) = K^(w)^H K^(w) on the smaller channel side, for batches of frequencies."""

    def __init__(self, k: torch.Tensor) -> None:
        if k.shape[0] < k.shape[1]:
            k = k.transpose(0, 1)  # K^(w)^T has the same singular values
        self.m, self.n = int(k.shape[0]), int(k.shape[1])
        self.ks = tuple(int(s) for s in k.shape[2:])
        self.device = k.device
        taps = math.prod(self.ks)
        span = math.prod(2 * s - 1 for s in self.ks)
        # Autocorrelation A_q = sum_p K_p^T K_{p+q} makes each P(w) cost span * n^2 instead of
        # taps * m * n + m * n^2; worth it unless the kernel is long and narrow.
        self.autocorr = span * self.n < taps * self.m + self.m * self.n and span * self.n * self.n * 8 < 2**29
        norms = torch.linalg.vector_norm(k.reshape(self.m, self.n, taps), dim=(0, 1))
        tap_sum = float(norms.sum())
        flat = k.reshape(self.m, self.n, taps)
        if self.autocorr:
            self.shifts, self.table = self._autocorrelation(k)
            self.traces = self.table[:, :: self.n + 1].sum(dim=1)
            work = self.m * taps + span
        else:
            self.shifts = self._positions(self.ks)
            self.table = flat.permute(2, 0, 1).reshape(taps, -1).to(torch.complex128)
            self.tap_gram = torch.einsum("mnp,mnq->pq", flat, flat).to(torch.complex128)
            work = taps + self.m
        # Rounding of P(w), in spectral norm (Higham, Thm 3.5; complex factor 4; 2 more because
        # only the lower triangle is read and mirrored).
        self.p_error = 8 * (work + 8) * _EPS * tap_sum * tap_sum

    @staticmethod
    def _positions(ks: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(list(itertools.product(*(range(s) for s in ks))), dtype=torch.float64)

    def _autocorrelation(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shifts, mats = [], []
        every = (slice(None), slice(None))
        for q in itertools.product(*(range(-(s - 1), s) for s in self.ks)):
            pairs = list(zip(q, self.ks, strict=True))
            src = k[(*every, *(slice(max(0, -qi), s - max(0, qi)) for qi, s in pairs))]
            dst = k[(*every, *(slice(max(0, qi), s - max(0, -qi)) for qi, s in pairs))]
            a = src.transpose(0, 1).reshape(self.n, -1) @ dst.transpose(0, 1).reshape(self.n, -1).T
            shifts.append(q)
            mats.append(a.reshape(-1))
        return torch.tensor(shifts, dtype=torch.float64), torch.stack(mats).to(torch.complex128)

    def batch_size(self) -> int:
        return max(1, _BATCH_BYTES // (16 * self.n * self.n))

    def trace(self, w: torch.Tensor) -> torch.Tensor:
        """trace P(w) = ||K^(w)||_F^2 >= lambda_max(P(w)), for a fraction of the cost of P(w)."""
        phases = torch.exp(-1j * (w.to(self.device) @ self.shifts.to(self.device).T))
        if self.autocorr:
            return (phases @ self.traces.to(self.device)).real.cpu()
        return torch.einsum("bp,pq,bq->b", phases.conj(), self.tap_gram.to(self.device), phases).real.cpu()

    def negated(self, w: torch.Tensor) -> torch.Tensor:
        """w: (B, d) frequencies -> -P(w), (B, n, n). LAPACK reads only the lower triangle, so
        the Hermitian halves need not be averaged."""
        phases = torch.exp(-1j * (w.to(self.device) @ self.shifts.to(self.device).T))
        if self.autocorr:
            return ((-phases) @ self.table.to(self.device)).reshape(-1, self.n, self.n)
        sym = (phases @ self.table.to(self.device)).reshape(-1, self.m, self.n)
        return -(sym.mH @ sym)


def top_eigenvalue(neg: torch.Tensor) -> torch.Tensor:
    """lambda_max(P) from -P."""
    top: torch.Tensor = (-torch.linalg.eigvalsh(neg)[..., 0]).clamp(min=0)
    return top


def below(neg: torch.Tensor, t2: float, p_error: float) -> torch.Tensor:
    """True where lambda_max(P) < t2 is proven by a Cholesky factorisation of (t2 - slack) I - P.

    neg holds -P and is restored afterwards. The slack covers the rounding of P and of the
    factorisation (Higham, Thm 10.3; the trace of the shifted matrix is at most n t2)."""
    n = neg.shape[-1]
    slack = p_error + 4 * (n + 1) * n * _EPS * t2 / (1 - (n + 1) * _EPS)
    if t2 - slack <= 0:
        return torch.zeros(neg.shape[0], dtype=torch.bool)
    diag = neg.diagonal(dim1=-2, dim2=-1)
    saved = diag.clone()
    diag.add_(t2 - slack)
    _, info = torch.linalg.cholesky_ex(neg)
    diag.copy_(saved)
    ok: torch.Tensor = (info == 0).cpu()
    return ok


class _Cover:
    """Boxes covering half the frequency torus (w and -w have the same sigma for real kernels).

    Coordinates s_i = a_i w_i with a_i = (k_i - 1) / 2, so tau = sum |delta s_i|. The first two
    axes are searched in (u, v) = (s_1 + s_2, s_1 - s_2), where |ds_1| + |ds_2| = max(|du|, |dv|):
    there a square of half-width 2b costs the same tau as a square of half-width b in s, at
    twice the area. Cells have half-widths b * (2, 2, 1, ..., 1), so tau = d * b.
    """

    def __init__(self, half: list[float]) -> None:
        self.a = torch.tensor(half, dtype=torch.float64)
        self.d = len(half)
        self.rotated = self.d >= 2
        self.ratio = torch.tensor([2.0, 2.0] + [1.0] * (self.d - 2) if self.rotated else [1.0], dtype=torch.float64)
        self.extent = torch.tensor(
            [2 * math.pi * x for x in half[:-1]] + [math.pi * half[-1]], dtype=torch.float64
        )

    def tau(self, b: float) -> float:
        return self.d * b

    def base(self, tau: float) -> float:
        return tau / self.d

    def _to_s(self, y: torch.Tensor) -> torch.Tensor:
        if not self.rotated:
            return y
        s = y.clone()
        s[:, 0] = (y[:, 0] + y[:, 1]) / 2
        s[:, 1] = (y[:, 0] - y[:, 1]) / 2
        return s

    def frequencies(self, y: torch.Tensor) -> torch.Tensor:
        return self._to_s(y) / self.a

    def _inside(self, y: torch.Tensor, b: float) -> torch.Tensor:
        # A cell moves s_1, s_2 by at most 2b and the other s_i by b: keep it if it can reach
        # the region.
        s, reach = self._to_s(y), self.ratio * b
        return ((s >= -reach) & (s <= self.extent + reach)).all(dim=1)

    def start(self, b: float) -> torch.Tensor:
        lo, hi = torch.zeros(self.d, dtype=torch.float64), self.extent.clone()
        if self.rotated:
            e0, e1 = float(self.extent[0]), float(self.extent[1])
            lo[0], hi[0] = 0.0, e0 + e1
            lo[1], hi[1] = -e1, e0
        hw = self.ratio * b
        axes = [
            lo[i] + hw[i] + 2 * hw[i] * torch.arange(max(1, math.ceil(float((hi[i] - lo[i]) / (2 * hw[i])))),
                                                       dtype=torch.float64)
            for i in range(self.d)
        ]
        y = torch.cartesian_prod(*axes).reshape(-1, self.d)
        return y[self._inside(y, b)]

    def split(self, y: torch.Tensor, b: float) -> torch.Tensor:
        """Children of base half-width b / 2."""
        if not len(y):
            return y
        corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=self.d)), dtype=torch.float64)
        kids = (y[:, None, :] + corners[None, :, :] * (self.ratio * b / 2)).reshape(-1, self.d)
        return kids[self._inside(kids, b / 2)]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@dataclass
class ConvResult:
    interval: Interval
    points: int  # Gram evaluations, for benchmarks
    exact_points: int


class _Search:
    """Running lower end (best exact value seen) and proven upper end over sets of points."""

    def __init__(self, sym: GramSymbol, target: float) -> None:
        self.sym = sym
        self.target = target
        self.lower2 = 0.0
        self.upper = 0.0
        self.points = 0
        self.exact_points = 0

    def exact_at(self, neg: torch.Tensor) -> float:
        """sigma at one point; raises the lower end, returns an upper end for that point."""
        self.exact_points += 1
        top = float(top_eigenvalue(neg)[0])
        self.lower2 = max(self.lower2, top)
        # eigvalsh is backward stable: error ~ n eps ||P||.
        return math.sqrt(top * (1 + 64 * neg.shape[-1] * _EPS) + self.sym.p_error)

    def cap(self) -> float:
        return math.sqrt(self.lower2) * (1 + self.target)

    def settle(self, w: torch.Tensor, factor: float, final: bool) -> torch.Tensor:
        """Close the points whose sigma / factor is proven at most cap(); return the others' indices.

        Points go in order of trace P (an upper bound of sigma^2 and a fair guess of where it
        is large). The first is taken exactly so the lower end starts high; points whose trace
        is already small enough close without a factorisation. At the last level a failing
        point holds a value above the lower end: it is taken exactly, which raises the lower
        end and usually closes the rest."""
        self.points += len(w)
        traces = self.sym.trace(w)
        order = torch.argsort(traces, descending=True)
        w, traces = w[order], traces[order]
        if float(traces[0]) > self.lower2:
            self.exact_at(self.sym.negated(w[:1]))
        cap = self.cap()
        if factor > 0:
            cheap = traces + self.sym.p_error <= (cap * factor) ** 2
        else:
            cheap = torch.zeros(len(w), dtype=torch.bool)
        if bool(cheap.any()):
            self.upper = max(self.upper, cap)
        todo = torch.nonzero(~cheap).flatten()
        opened = []
        for sl in _chunks(len(todo), self.sym.batch_size()):
            idx = todo[sl]
            neg = self.sym.negated(w[idx])
            still = torch.arange(len(neg))
            kept: list[int] = []
            tries = 0
            while len(still):
                cap = self.cap()
                if factor > 0:
                    part = neg if len(still) == len(neg) else neg[still]
                    closed = below(part, (cap * factor) ** 2, self.sym.p_error)
                    if bool(closed.any()):
                        self.upper = max(self.upper, cap)
                        still = still[~closed]
                if not len(still) or tries >= (_MAX_EXACT if final else 1):
                    break
                first, still = int(still[0]), still[1:]
                bound = self.exact_at(neg[first : first + 1]) / factor if factor > 0 else math.inf
                tries += 1
                if bound <= self.cap() * (1 + 1e-9):
                    self.upper = max(self.upper, bound)
                else:
                    kept.append(first)
                if not final:
                    break  # coarse levels: the exact value only raises the lower end
            still = torch.cat([still, torch.tensor(kept, dtype=torch.long)])
            opened.append(idx[still])
        return order[torch.cat(opened)] if opened else torch.zeros(0, dtype=torch.long)

    def interval(self, method: str) -> Interval:
        lower = math.sqrt(self.lower2)
        return Interval(lower, max(self.upper, lower) * (1 + ROUNDING_MARGIN), "freq-grid", method, True)


def _matrix(k: torch.Tensor) -> Interval:
    """A kernel with one tap is a matrix at every frequency; its upper end keeps the rounding margin."""
    iv = exact_norm(k.reshape(k.shape[0], k.shape[1]))
    return Interval(iv.lower, iv.upper * (1 + ROUNDING_MARGIN), iv.lower_method, iv.upper_method, True)


def _prepare(k: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    k = _trim(k)  # trimming zero taps leaves the reshaped norm as it was
    active = [i for i, s in enumerate(k.shape[2:]) if s > 1]
    return k.reshape(k.shape[0], k.shape[1], *(k.shape[2 + i] for i in active)), active


def conv_bound(k: torch.Tensor, rtol: float, reshape: float | None = None) -> ConvResult:
    """Certified bracket of S(K) for a float64 kernel (c_out, c_in, k_1, ..., k_d); reshape, when
    the caller has it, is ||K.reshape(c_out, -1)||_2 (it saves an SVD for the simple bound)."""
    if not bool(torch.any(k != 0)):
        return ConvResult(exact(0.0, "zero"), 0, 0)
    k, active = _prepare(k)
    if not active:
        return ConvResult(_matrix(k), 1, 1)
    sym = GramSymbol(k)
    cover = _Cover([(s - 1) / 2 for s in sym.ks])
    target = rtol * _TARGET
    # The last level's tau makes 1 / (1 - tau^2 / 2) = 1 + target; the first is 2^levels larger.
    tau_final = math.sqrt(2 * (1 - 1 / (1 + target)))
    levels = max(0, math.floor(math.log2(1.2 / tau_final)))
    b = cover.base(tau_final * 2**levels)
    cells = cover.start(b)
    search = _Search(sym, target)
    while len(cells):
        if search.points + len(cells) > MAX_POINTS:
            return ConvResult(_fallback(k, math.sqrt(search.lower2)), search.points, search.exact_points)
        tau = cover.tau(b)
        factor = 1 - tau * tau / 2 if tau < math.sqrt(2) else 0.0
        opened = search.settle(cover.frequencies(cells), factor, final=factor * (1 + target) >= 1 - 1e-12)
        cells = cover.split(cells[opened], b)
        b /= 2
    iv = search.interval("freq-bnb")
    simple = taps_bound(k, reshape)
    if simple < iv.upper:
        iv = Interval(iv.lower, simple, "freq-grid", "sqrt-taps-reshape", True)
    return ConvResult(iv, search.points, search.exact_points)


def grid_bound(k: torch.Tensor, sizes: tuple[int, ...], rtol: float) -> Interval:
    """max of sigma_max(K^(w)) over w = 2 pi j / n: the exact norm of the circular convolution
    on an input of that size, bracketed to rtol (certified per point, no interpolation)."""
    if not bool(torch.any(k != 0)):
        return exact(0.0, "zero")
    k, active = _prepare(k)
    if not active:
        return _matrix(k)
    n = [sizes[i] for i in active]
    axes = [torch.arange(m if i < len(n) - 1 else m // 2 + 1, dtype=torch.float64) * (2 * math.pi / m)
            for i, m in enumerate(n)]
    w = torch.cartesian_prod(*axes).reshape(-1, len(n))
    search = _Search(GramSymbol(k), rtol * _TARGET)
    for i in search.settle(w, 1.0, final=True).tolist():
        # outlived the exact tries of its batch: its own exact value bounds it
        search.upper = max(search.upper, search.exact_at(search.sym.negated(w[i : i + 1])))
    return search.interval("grid-cholesky")


def _trim(k: torch.Tensor) -> torch.Tensor:
    """Drop all-zero border slices: a shifted kernel has the same singular values at every w."""
    for axis in range(2, k.ndim):
        mass = k.abs().transpose(0, axis).reshape(k.shape[axis], -1).sum(dim=1)
        nz = torch.nonzero(mass).flatten()
        k = k.narrow(axis, int(nz[0]), int(nz[-1]) - int(nz[0]) + 1)
    return k


def _fallback(k: torch.Tensor, lower: float) -> Interval:
    return Interval(lower, taps_bound(k), "freq-grid", "sqrt-taps-reshape", True)


def conv_interval(k: torch.Tensor, rtol: float, reshape: float | None = None) -> Interval:
    return conv_bound(k, rtol, reshape).interval


def zero_padded_lower(k: torch.Tensor, sizes: tuple[int, ...], steps: int = 40, seed: int = 0) -> float:
    """Lanczos on A^T A for the zero-padded ('same', stride 1) convolution A of that input size.
    The result is ||A x|| for the top Ritz vector x (unit norm): a lower bound of ||A||."""
    import torch.nn.functional as F

    d = k.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    adjoint = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    pad = [s // 2 for s in k.shape[2:]]
    shape = (1, k.shape[1], *sizes)
    crop = (slice(None), slice(None), *(slice(0, n) for n in sizes))

    def apply(x: torch.Tensor) -> torch.Tensor:
        return conv(x.reshape(shape), k, padding=pad)

    def gram(x: torch.Tensor) -> torch.Tensor:
        # even kernels: the adjoint comes out one longer per axis; crop back to the input grid
        return adjoint(apply(x), k, padding=pad)[crop].reshape(-1)

    x = lanczos_top_vector(gram, math.prod(shape), steps, seed, k.device)
    return float(torch.linalg.vector_norm(apply(x)))
