"""Operator norms of convolution kernels, valid for every padding, stride and input size.

S(K) = sup over w of sigma_max(K^(w)), with K^(w) = sum_p K[:, :, p] e^{-i w.p}, is the norm of
the convolution on the infinite grid; zero padding, circular padding up to 'same', strides,
dilation and transposition can only lower it (docs/mathematics.md, "Convolutions").

Two certificates (docs/mathematics.md, "Certifying S(K)"):
- cells: cover the frequency torus with boxes C (centre c, half-widths h). With
  tau_C = sum_i ((k_i - 1) / 2) h_i < sqrt(2), S <= max_C sigma_max(K^(c)) / (1 - tau_C^2 / 2).
  Branch and bound splits the boxes whose bound could still exceed lower * (1 + rtol); a box is
  closed by a Cholesky factorisation of t^2 I - P(c), P = K^H K, which proves sigma < t.
- a uniform grid of N_i points per axis: S <= max over the grid / prod_i (1 - t_i^2 / 2) with
  t_i = pi (k_i - 1) / (2 N_i). Used for flat spectra (every box must be split to the end anyway)
  and for kernels whose symbol is a vector (one FFT).

Every entry point scales the kernel by a power of two first, so no product can overflow or
underflow. Every search limit counts work fixed before the run (frequency points, exact
eigensolves per batch, Lanczos steps), so the same kernel gives the same bits under any load and
in any order. A wall-clock deadline stays as a safety net only: when it passes, a sound but looser
bound comes back marked not certified, with Interval.loose starting with TIME_BUDGET.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lipaudit.errors import ResourceLimitError
from lipaudit.settings import CONV_POINTS
from lipaudit.spectral import (
    ROUNDING_MARGIN,
    TIME_BUDGET,
    Interval,
    exact,
    lanczos_top_vector,
    scaled,
    unscale_interval,
    unscale_lower,
    unscale_upper,
)
from lipaudit.spectral.dense import GRAM_EIGH_WIDTH_CONV, exact_norm, svd_error, svd_norm

_EPS = float(torch.finfo(torch.float64).eps)
# Working sets (batches of Gram matrices, grid chunks) are sized to stay near this many bytes.
_BATCH_BYTES = 32 * 2**20
# Work limit of one kernel's search, in frequency points (Gram evaluations); past it the search
# stops with the sound, looser bound it has (the same bits on every machine).
MAX_POINTS = CONV_POINTS
# Exact eigenvalue evaluations per batch at the last level before its open cells are split.
_MAX_EXACT = 32
# Work of the probes and of each ascent on one level, in n^3 (one exact eigensolve of an n x n
# matrix each): a flat spectrum gains little from them, and wide channels make each one dear.
_EXACT_WORK = 2**21
# Boxes of a coarse level factored first; when none closes, the level's other boxes are not factored.
_SAMPLE = 16
# Aim a little below the requested rtol: the rounding slack (ROUNDING_MARGIN, far below 2%) cannot
# push the result past it.
_TARGET = 0.98
# Grams at least this wide get their lower ends from Lanczos steps, not an exact eigensolve (which
# costs several factorisations there); _RITZ_STEPS steps give the top eigenvalue to about 1e-7.
_RITZ_WIDTH = 96
_RITZ_STEPS = 32
# Error constant of a float64 FFT per level (Higham, Thm 24.2: mu + gamma_4 (sqrt 2 + mu), generous).
_FFT_ETA = 16 * _EPS
# The autocorrelation table is built shift by shift; beyond this many shifts the direct form is used.
_MAX_SHIFTS = 20_000


class OutOfTime(Exception):
    """The wall-clock safety net fired: what comes back depends on the machine's load."""

    lower = 0.0  # a lower end proven before time ran out, where the raiser knows one


_OutOfTime = OutOfTime


@dataclass(frozen=True)
class Budget:
    """deadline: a time.monotonic() value (a safety net, not a search limit); max_bytes: the largest
    working set allowed; max_points: the work limit of one search, in frequency points."""

    deadline: float | None = None
    max_bytes: int | None = None
    max_points: int = MAX_POINTS

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _OutOfTime

    def chunk(self) -> int:
        return _BATCH_BYTES if self.max_bytes is None else max(2**16, min(_BATCH_BYTES, self.max_bytes // 4))

    def fits(self, nbytes: float) -> bool:
        return self.max_bytes is None or nbytes <= self.max_bytes

    def need(self, nbytes: float, what: str) -> None:
        if not self.fits(nbytes):
            raise ResourceLimitError(
                f"{what} needs about {_mib(nbytes)} of memory, over the budget of {_mib(self.max_bytes or 0)}; "
                "raise the memory budget to audit this layer"
            )


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def kernel_matrix(k: torch.Tensor) -> torch.Tensor:
    """(c_out, c_in * prod k): the matrix torch.nn.utils.spectral_norm divides by."""
    return k.reshape(k.shape[0], -1)


def reshape_sigma(k: torch.Tensor) -> float:
    return svd_norm(kernel_matrix(k))


def taps_bound(k: torch.Tensor, reshape: float | None = None) -> float:
    """sqrt(k_1 ... k_d) * reshape_sigma: each input pixel meets at most prod k output positions.

    reshape, when given, is LAPACK's value (svd_norm); its rounding margin is added here."""
    mat = kernel_matrix(k)
    r = exact_norm(mat).upper if reshape is None else reshape * (1 + svd_error(*mat.shape))
    return math.sqrt(math.prod(k.shape[2:])) * r * (1 + ROUNDING_MARGIN)


def frobenius_taps_bound(k: torch.Tensor) -> float:
    """sqrt(prod k) * ||K||_F >= the taps bound; needs no factorisation at all."""
    ks, e = scaled(k)
    fro = float(torch.linalg.vector_norm(ks)) * (1 + ks.numel() * _EPS)
    return unscale_upper(math.sqrt(math.prod(k.shape[2:])) * fro * (1 + ROUNDING_MARGIN), e)


def same_padding(ks: Sequence[int], dilation: int | Sequence[int] = 1) -> list[tuple[int, int]]:
    """torch's padding='same': total d (k - 1) per axis, left = total // 2, the rest on the right."""
    dil = _per_axis(dilation, len(ks))
    out = []
    for k, d in zip(ks, dil, strict=True):
        total = d * (int(k) - 1)
        out.append((total // 2, total - total // 2))
    return out


def _per_axis(x: int | Sequence[int], d: int) -> list[int]:
    return [int(x)] * d if isinstance(x, int) else [int(v) for v in x]


# --- the symbol -------------------------------------------------------------------------------


def _grouped(k: torch.Tensor, groups: int) -> torch.Tensor:
    """(g, m, n, k...) with m >= n in each group: K^(w)^T has the same singular values."""
    c_out = k.shape[0]
    if groups < 1 or c_out % groups:
        raise ValueError(f"groups={groups} does not divide {c_out} output channels")
    kg = k.reshape(groups, c_out // groups, *k.shape[1:])
    if kg.shape[1] < kg.shape[2]:
        kg = kg.transpose(1, 2)
    return kg.contiguous()


def _overlaps(ks: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """(q, src, dst) for the shifts q >= 0 (lexicographically) of a kernel with taps ks: the spatial
    slices with K[..., src] meeting K[..., dst] = K[..., src + q], so sum_p K_p K_{p+q} pairs them."""
    out = []
    for q in itertools.product(*(range(-(s - 1), s) for s in ks)):
        if q >= tuple(0 for _ in q):
            pairs = list(zip(q, ks, strict=True))
            out.append((q, tuple(slice(max(0, -qi), s - max(0, qi)) for qi, s in pairs),
                        tuple(slice(max(0, qi), s - max(0, -qi)) for qi, s in pairs)))
    return out


class GramSymbol:
    """P_j(w) = K_j^(w)^H K_j^(w) for every group j, on the smaller channel side, for batches of w.

    Real arithmetic: P(w) = A_0 + sum_{q > 0} cos(w.q) (A_q + A_q^T) - i sin(w.q) (A_q - A_q^T),
    with the autocorrelation A_q = sum_p K_p^T K_{p+q} (A_{-q} = A_q^T), or directly
    K^(w) = sum_p K_p (cos(w.p) - i sin(w.p)) and P = K^H K when that is cheaper."""

    def __init__(self, kg: torch.Tensor, budget: Budget | None = None) -> None:
        budget = budget or Budget()
        if kg.shape[1] < kg.shape[2]:
            kg = kg.transpose(1, 2).contiguous()
        self.g, self.m, self.n = int(kg.shape[0]), int(kg.shape[1]), int(kg.shape[2])
        self.ks = tuple(int(s) for s in kg.shape[3:])
        self.device = kg.device
        g, m, n = self.g, self.m, self.n
        taps = math.prod(self.ks)
        span = math.prod(2 * s - 1 for s in self.ks)
        half = (span + 1) // 2
        flat = kg.reshape(g, m, n, taps)
        tap_sum = float(torch.linalg.vector_norm(flat, dim=(1, 2)).sum(dim=1).max())
        auto_cost = half * n * n * 2
        direct_cost = taps * m * n * 2 + m * n * n * 4
        auto_bytes = half * g * n * n * 8 * 2
        self.autocorr = span <= _MAX_SHIFTS and auto_cost < direct_cost and budget.fits(4 * auto_bytes)
        if self.autocorr:
            # -P(w) = c(w) @ neg_cos + i s(w) @ sin_t: two real GEMMs, written into the real and
            # imaginary parts of complex storage.
            self.shifts, self.neg_cos, self.sin_t, self.traces = self._autocorrelation(kg)
            work = m * taps + span
        else:
            budget.need(taps * g * m * n * 8 + g * taps * taps * 8, "the convolution symbol table")
            self.shifts = torch.tensor(list(itertools.product(*(range(s) for s in self.ks))), dtype=torch.float64)
            self.table = flat.permute(3, 0, 1, 2).reshape(taps, -1)
            self.tap_gram = torch.einsum("gmnp,gmnq->gpq", flat, flat)
            work = taps + m
        # Rounding of P(w) in spectral norm (Higham, Thm 3.5; complex factor 4; 2 more because
        # LAPACK reads one triangle; the phases w.q carry a relative error eps |w.q|).
        work += 8 + int(2 * math.pi * sum(2 * s for s in self.ks))
        self.p_error = 8 * work * _EPS * tap_sum * tap_sum + 2.0**-1000
        self.batch = max(1, budget.chunk() // (16 * max(g * n * n, g * m * n, span)))
        # Batches reuse these blocks: a fresh one would be mapped and zeroed by the OS every batch.
        self._blocks: dict[str, torch.Tensor] = {}

    def _reused(self, name: str, points: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat storage for `points` points' matrices: the shared block `name`, or a fresh one when
        more points than a batch are asked for."""
        per_point = self.g * self.n * self.n
        if points > self.batch:
            return torch.empty(points * per_point, dtype=dtype, device=self.device)
        block = self._blocks.get(name)
        if block is None:
            block = self._blocks[name] = torch.empty(self.batch * per_point, dtype=dtype, device=self.device)
        return block[: points * per_point]

    def _buffer(self, points: int) -> torch.Tensor:
        """Storage for `points` points' matrices -P(w)."""
        return self._reused("out", points, torch.complex128)

    def _real(self, points: int) -> torch.Tensor:
        """A real (points, g n n) scratch block for one GEMM's result."""
        return self._reused("real", points, torch.float64).view(points, -1)

    def factor_space(self, like: torch.Tensor) -> torch.Tensor:
        """Where below() writes its Cholesky factors."""
        points = -(-like.shape[0] // self.g)
        return self._reused("factor", points, like.dtype)[: like.numel()].view(like.shape)

    def _autocorrelation(
        self, kg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shifts q >= 0 (lexicographically), -(A_q + A_q^T) (-A_0 for q = 0), A_q - A_q^T and the
        traces of the cosine terms, each table row filled in place (no stacked copies)."""
        g, n = self.g, self.n
        every = (slice(None), slice(None), slice(None))
        overlaps = _overlaps(self.ks)
        shifts = [q for q, _, _ in overlaps]
        neg_cos = torch.empty(len(shifts), g, n, n, dtype=kg.dtype, device=kg.device)
        sin_t = torch.empty_like(neg_cos)
        tr = torch.empty(len(shifts), g, dtype=kg.dtype, device=kg.device)
        for i, (_, to, fro) in enumerate(overlaps):
            src, dst = kg[(*every, *to)], kg[(*every, *fro)]
            a = src.transpose(1, 2).reshape(g, n, -1) @ dst.transpose(1, 2).reshape(g, n, -1).transpose(1, 2)
            at = a.transpose(-1, -2)
            if i == 0:
                torch.neg(a, out=neg_cos[i])
                sin_t[i].zero_()
            else:
                torch.add(a, at, out=neg_cos[i]).neg_()
                torch.sub(a, at, out=sin_t[i])
            tr[i] = a.diagonal(dim1=-2, dim2=-1).sum(-1) * (1 if i == 0 else 2)
        return (torch.tensor(shifts, dtype=torch.float64), neg_cos.reshape(len(shifts), -1),
                sin_t.reshape(len(shifts), -1), tr)

    def _phases(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arg = w.to(self.device) @ self.shifts.to(self.device).T
        return torch.cos(arg), torch.sin(arg)

    def trace(self, w: torch.Tensor) -> torch.Tensor:
        """max over groups of trace P_j(w) = ||K_j^(w)||_F^2 >= lambda_max, for a fraction of the cost."""
        c, s = self._phases(w)
        if self.autocorr:
            t = c @ self.traces
        else:
            t = torch.einsum("bp,gpq,bq->bg", c, self.tap_gram, c) + torch.einsum("bp,gpq,bq->bg", s, self.tap_gram, s)
        out: torch.Tensor = t.max(dim=1).values.cpu()
        return out

    def negated(self, w: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """w: (B, d) frequencies -> -P_j(w), (B * g, n, n), point-major. reuse: in the shared block,
        valid until the next reuse call."""
        c, s = self._phases(w)
        m, n = self.m, self.n
        if self.autocorr:
            buf = self._buffer(len(w)) if reuse else torch.empty(len(w) * self.g * n * n, dtype=torch.complex128,
                                                                 device=self.device)
            parts = torch.view_as_real(buf).view(len(w), -1, 2)
            tmp = self._real(len(w))
            torch.matmul(c, self.neg_cos, out=tmp)
            parts[..., 0].copy_(tmp)
            torch.matmul(s, self.sin_t, out=tmp)
            parts[..., 1].copy_(tmp)
            return buf.view(-1, n, n)
        sym = torch.complex(c @ self.table, -(s @ self.table)).reshape(-1, m, n)
        return -(sym.mH @ sym)


def top_eigenvalue(neg: torch.Tensor) -> torch.Tensor:
    """lambda_max(P) from -P."""
    top: torch.Tensor = (-torch.linalg.eigvalsh(neg)[..., 0]).clamp(min=0)
    return top


def below(neg: torch.Tensor, t2: float, p_error: float, groups: int = 1,
          space: torch.Tensor | None = None) -> torch.Tensor:
    """Per point (groups consecutive matrices): lambda_max(P) < t2 for every group, proven by a
    Cholesky factorisation of (t2 - slack) I - P. neg holds -P and is restored afterwards. The
    slack covers the rounding of P and of the factorisation (Higham, Thm 10.3)."""
    n = neg.shape[-1]
    points = neg.shape[0] // groups
    slack = p_error + 4 * (n + 1) * n * _EPS * t2 / (1 - (n + 1) * _EPS)
    if t2 - slack <= 0:
        return torch.zeros(points, dtype=torch.bool)
    diag = neg.diagonal(dim1=-2, dim2=-1)
    saved = diag.clone()
    diag.add_(t2 - slack)
    if space is None:
        _, info = torch.linalg.cholesky_ex(neg)
    else:
        info = torch.empty(neg.shape[0], dtype=torch.int32, device=neg.device)
        # LAPACK's column-major layout: a row-major `out` makes torch factor into a fresh 32 MiB
        # block and copy it back (9,000 page faults a batch); the factor itself is not used
        torch.linalg.cholesky_ex(neg, out=(space.mT, info))
    diag.copy_(saved)
    ok: torch.Tensor = (info == 0).reshape(points, groups).all(dim=1).cpu()
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

    def count(self, b: float) -> float:
        """About how many cells of base half-width b cover the region."""
        vol = float(torch.prod(self.extent + 2 * self.ratio * b))
        cell = float(torch.prod(2 * self.ratio * b)) / (2 if self.rotated else 1)
        return vol / cell

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

    def __init__(self, sym: GramSymbol, target: float, budget: Budget) -> None:
        self.sym = sym
        self.target = target
        self.budget = budget
        self.lower2 = 0.0
        self.upper = 0.0
        self.points = 0
        self.exact_points = 0
        self.open_trace = 0.0  # max trace P over the points the last settle left open
        self.best_w: torch.Tensor | None = None  # where the lower end was found

    def exact_at(self, neg: torch.Tensor, w: torch.Tensor | None = None) -> float:
        """sigma at one point (its g matrices); raises the lower end, returns an upper end there."""
        self.exact_points += 1
        top = float(top_eigenvalue(neg).max())
        err = svd_error(neg.shape[-1], neg.shape[-1]) * math.sqrt(neg.shape[-1]) * top + self.sym.p_error
        if top - err > self.lower2:
            self.lower2 = top - err
            self.best_w = w
        return math.sqrt(top + err)

    def raise_lower(self, neg: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Raise the lower end from one point (its g matrices). Wide Grams take the Rayleigh quotient
        of a Ritz vector, evaluated directly: it is attained, so it is a lower end whatever the
        Lanczos recurrence's rounding did."""
        n = neg.shape[-1]
        if n < _RITZ_WIDTH:
            self.exact_at(neg, w)
            return
        best = 0.0
        for j in range(neg.shape[0]):
            p = neg[j]

            def gram(v: torch.Tensor, p: torch.Tensor = p) -> torch.Tensor:
                return -(p @ v)  # P v

            x = lanczos_top_vector(gram, n, _RITZ_STEPS, 0, p.device, dtype=p.dtype)
            q = -float(torch.vdot(x, p @ x).real) / float(torch.vdot(x, x).real)
            # rounding of the two products (Higham, Thm 3.5; complex factor 4) against ||P||_F >= |P|
            err = 8 * (n + 2) * _EPS * float(torch.linalg.matrix_norm(p)) + self.sym.p_error
            best = max(best, q - err)
        if best > self.lower2:
            self.lower2 = best
            self.best_w = w

    def probe(self, w: torch.Tensor) -> None:
        """Exact values at a spread sample of points; the best may sit in a higher basin."""
        if not len(w):
            return
        self.budget.check()
        tops = top_eigenvalue(self.sym.negated(w)).reshape(len(w), self.sym.g).max(dim=1).values
        i = int(torch.argmax(tops))
        self.exact_at(self.sym.negated(w[i : i + 1]), w[i])

    def ascend(self, iters: int = 48) -> None:
        """Raise the lower end by a pattern search for a local maximum of sigma from the best point:
        a high lower end early lets the coarse levels close far more boxes."""
        if self.best_w is None:
            return
        w = self.best_w.clone()
        d, g = len(w), self.sym.g
        dirs = torch.cat([torch.eye(d, dtype=torch.float64), -torch.eye(d, dtype=torch.float64)])
        cur, h = -math.inf, 0.5 / max(1.0, max(self.sym.ks) / 2)
        for _ in range(iters):
            if h < 1e-5:
                break
            self.budget.check()
            pts = w[None, :] + h * dirs
            tops = top_eigenvalue(self.sym.negated(pts)).reshape(len(pts), g).max(dim=1).values
            i = int(torch.argmax(tops))
            if float(tops[i]) > cur:
                w, cur = pts[i], float(tops[i])
            else:
                h /= 2
        self.exact_at(self.sym.negated(w[None, :]), w)

    def cap(self) -> float:
        return math.sqrt(max(self.lower2, 0.0)) * (1 + self.target)

    def settle(self, w: torch.Tensor, factor: float, final: bool) -> torch.Tensor:
        """Close the points whose sigma / factor is proven at most cap(); return the others' indices.

        Points go in order of trace P (an upper bound of sigma^2 and a fair guess of where it
        is large). The first is taken exactly so the lower end starts high; points whose trace
        is already small enough close without a factorisation. At the last level a failing
        point holds a value above the lower end: it is taken exactly, which raises the lower
        end and usually closes the rest."""
        self.points += len(w)
        g = self.sym.g
        parts = []
        for sl in _chunks(len(w), self.sym.batch):
            self.budget.check()
            parts.append(self.sym.trace(w[sl]))
        traces = torch.cat(parts)
        order = torch.argsort(traces, descending=True)
        w, traces = w[order], traces[order]
        if float(traces[0]) > self.lower2:
            self.raise_lower(self.sym.negated(w[:1]), w[0])
        cap = self.cap()
        if factor > 0:
            cheap = traces + self.sym.p_error <= (cap * factor) ** 2
        else:
            cheap = torch.zeros(len(w), dtype=torch.bool)
        if bool(cheap.any()):
            self.upper = max(self.upper, cap)
        todo = torch.nonzero(~cheap).flatten()
        sample = min(len(todo), self.sym.batch, _SAMPLE)
        chunks = _chunks(len(todo), self.sym.batch)
        if not final and len(todo) > sample:
            # Coarse levels: try the likeliest to close (smallest trace) first; when none of them
            # closes, the spectrum is too flat for this level, and the rest stay open unfactored.
            todo = torch.cat([todo[-sample:], todo[:-sample]])
            chunks = [slice(0, sample)] + [slice(sl.start + sample, sl.stop + sample)
                                            for sl in _chunks(len(todo) - sample, self.sym.batch)]
        opened: list[torch.Tensor] = []
        for n_chunk, sl in enumerate(chunks):
            if n_chunk == 1 and not final and len(opened[0]) == sample:
                opened.append(todo[sl.start:])
                break
            self.budget.check()
            idx = todo[sl]
            neg = self.sym.negated(w[idx], reuse=True)
            still = torch.arange(len(idx))
            kept: list[int] = []
            ritzed: set[int] = set()
            tries = 0
            while len(still):
                cap = self.cap()
                if factor > 0:
                    part = neg if len(still) == len(idx) else neg.reshape(len(idx), g, *neg.shape[1:])[still].reshape(
                        -1, *neg.shape[1:])
                    closed = below(part, (cap * factor) ** 2, self.sym.p_error, g, self.sym.factor_space(part))
                    if bool(closed.any()):
                        self.upper = max(self.upper, cap)
                        still = still[~closed]
                if not len(still) or tries >= _MAX_EXACT:
                    break
                first = int(still[0])
                if not final or (factor > 0 and first not in ritzed and len(ritzed) < _MAX_EXACT
                                 and self.sym.n >= _RITZ_WIDTH):
                    # a cheap lower end first: at a final level the point is factored again at the new cap
                    self.raise_lower(neg[first * g : (first + 1) * g], w[idx[first]])
                    ritzed.add(first)
                    if not final:
                        break  # coarse levels: the value only raises the lower end
                    continue
                still = still[1:]
                bound = (self.exact_at(neg[first * g : (first + 1) * g], w[idx[first]]) / factor
                         if factor > 0 else math.inf)
                tries += 1
                if bound <= self.cap() * (1 + 1e-9):
                    self.upper = max(self.upper, bound)
                else:
                    kept.append(first)
            still = torch.cat([still, torch.tensor(kept, dtype=torch.long)])
            opened.append(idx[still])
        left = torch.cat(opened) if opened else torch.zeros(0, dtype=torch.long)
        self.open_trace = float(traces[left].max()) if len(left) else 0.0
        return order[left]

    def interval(self, method: str) -> Interval:
        lower = math.sqrt(max(self.lower2, 0.0))
        return Interval(lower, max(self.upper, lower) * (1 + ROUNDING_MARGIN), "freq-grid", method, True)


# --- vector symbols by FFT ----------------------------------------------------------------------


def _smooth(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d at least n: FFT sizes of the fast radices."""
    m = max(1, n)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _fold(h: torch.Tensor, sizes: Sequence[int], dil: Sequence[int]) -> torch.Tensor:
    """Kernel taps moved to positions d p mod n (summed where they meet): the circular kernel."""
    lead = h.shape[: h.ndim - len(sizes)]
    out = torch.zeros(*lead, *sizes, dtype=h.dtype, device=h.device)
    idx = [(torch.arange(k) * d) % n for k, d, n in zip(h.shape[len(lead):], dil, sizes, strict=True)]
    if all(k * d <= n for k, d, n in zip(h.shape[len(lead):], dil, sizes, strict=True)):
        index: tuple[Any, ...] = (Ellipsis, *torch.meshgrid(*idx, indexing="ij"))
        out[index] = h
        return out
    flat_idx = torch.zeros(1, dtype=torch.long)
    for i, n in zip(idx, sizes, strict=True):
        flat_idx = (flat_idx[:, None] * n + i[None, :]).reshape(-1)
    out.reshape(*lead, -1).index_add_(-1, flat_idx, h.reshape(*lead, -1))
    return out


def _fft_grid(kg: torch.Tensor, sizes: Sequence[int], dil: Sequence[int], budget: Budget) -> tuple[float, float]:
    """kg (g, m, n, k...): max over groups and the n-point grid of sigma_max(K_j^(2 pi r / n)), bracketed.

    One FFT per channel pair; the error of a float64 FFT of size N is at most log2(N) eta ||y||
    in 2-norm (Higham, Thm 24.2), so each entry is off by at most log2(N) eta sqrt(N) ||h||, and
    the matrix at a point by at most that with ||K_j||_F for ||h|| (docs/mathematics.md)."""
    g, m, n = int(kg.shape[0]), int(kg.shape[1]), int(kg.shape[2])
    d = len(sizes)
    total = math.prod(sizes)
    half = total // sizes[-1] * (sizes[-1] // 2 + 1)
    per_group = m * n * total * 8 + m * n * half * 16 * 2 + half * n * n * 16 * 2
    budget.need(per_group, "one group's frequency table")
    step = max(1, budget.chunk() // per_group)
    pow2 = all(x & (x - 1) == 0 for x in sizes)
    eta = _FFT_ETA * (1 if pow2 else 4)  # other radices and Bluestein's algorithm: a larger constant
    levels = sum(max(1.0, math.log2(x)) for x in sizes) + 2
    lo = hi = 0.0
    dims = tuple(range(3, 3 + d))
    for sl in _chunks(g, step):
        budget.check()
        hf = _fold(kg[sl], sizes, dil)
        spec = torch.fft.rfftn(hf, dim=dims).reshape(hf.shape[0], m, n, -1)
        fro = torch.linalg.vector_norm(hf.reshape(hf.shape[0], -1), dim=1)  # ||K_j||_F (folded)
        e_k = (levels * eta * math.sqrt(total) * fro * (1 + 4 * _EPS))[:, None]
        if n == 1:
            power = (spec.real**2 + spec.imag**2).sum(dim=(1, 2))  # (g', points)
            top = power.sqrt()
            rel = (m + 4) * _EPS
            up, low = top * (1 + rel), top * (1 - rel)
        else:
            mats = spec.permute(0, 3, 1, 2)  # (g', points, m, n)
            f2 = (mats.real**2 + mats.imag**2).sum(dim=(2, 3))
            lam = torch.linalg.eigvalsh(mats.mH @ mats)[..., -1].clamp(min=0)
            e_p = (8 * (m + 4) * _EPS + svd_error(n, n)) * f2
            up, low = (lam + e_p).sqrt(), (lam - e_p).clamp(min=0).sqrt()
        group_low = (low - e_k).clamp(min=0).max(dim=1).values
        lo = max(lo, float(group_low.max()))
        hi = max(hi, float((up + e_k).max()))
    return lo, hi


def _vector_grid(kg: torch.Tensor, sizes: Sequence[int], dil: Sequence[int], budget: Budget) -> tuple[float, float]:
    return _fft_grid(kg, sizes, dil, budget)


# --- S(K) ---------------------------------------------------------------------------------------


def _matrix(k: torch.Tensor, groups: int = 1) -> Interval:
    """A kernel with one tap is a (block-diagonal) matrix at every frequency."""
    kg = k.reshape(groups, k.shape[0] // groups, k.shape[1])
    ivs = [exact_norm(kg[j], GRAM_EIGH_WIDTH_CONV) for j in range(groups)]
    return Interval(max(i.lower for i in ivs), max(i.upper for i in ivs) * (1 + ROUNDING_MARGIN), "svd", "svd", True)


def _prepare(k: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    k = _trim(k)  # trimming zero taps leaves every norm as it was
    active = [i for i, s in enumerate(k.shape[2:]) if s > 1]
    return k.reshape(k.shape[0], k.shape[1], *(k.shape[2 + i] for i in active)), active


def _grid_sizes(ks: Sequence[int], target: float, fft: bool = True) -> list[int]:
    """N_i with prod_i (1 - t_i^2 / 2) >= 1 / (1 + target), t_i = pi (k_i - 1) / (2 N_i); FFT-friendly
    sizes when fft (the Gram route evaluates any grid directly)."""
    d = len(ks)
    # a little to spare (1e-5, less for tiny targets): a grid point whose lower end is the cap's
    # base then closes by its own factorisation
    spare = min(1e-5, target * 1e-3)
    t = math.sqrt(2 * (1 - ((1 + target) / (1 + spare)) ** (-1 / d)))
    sizes = [max(2, math.ceil(math.pi * (s - 1) / 2 / t)) for s in ks]
    return [_smooth(n) for n in sizes] if fft else sizes


def _grid_factor(ks: Sequence[int], sizes: Sequence[int]) -> float:
    f = 1.0
    for s, n in zip(ks, sizes, strict=True):
        t = math.pi * (s - 1) / 2 / n
        f *= 1 - t * t / 2 if t < math.sqrt(2) else 0.0
    return f


def _uniform_points(sizes: Sequence[int]) -> torch.Tensor:
    """One of each pair {w, -w} of the uniform grid (sigma(w) = sigma(-w) for real kernels): the
    index vectors i with i <= (-i mod N) in lexicographic order, about half the grid."""
    idx = torch.cartesian_prod(*(torch.arange(n) for n in sizes)).reshape(-1, len(sizes))
    n = torch.tensor(list(sizes))
    neg = (-idx) % n
    keep = torch.zeros(len(idx), dtype=torch.bool)
    undecided = torch.ones(len(idx), dtype=torch.bool)
    for axis in range(len(sizes)):  # the first axis where i and -i differ decides
        a, b = idx[:, axis], neg[:, axis]
        keep |= undecided & (a < b)
        undecided &= a == b
    keep |= undecided  # w = -w on the grid
    return idx[keep].to(torch.float64) * (2 * math.pi / n.to(torch.float64))


def _loose(lower: float, upper: float, why: str) -> str:
    ratio = upper / lower if lower > 0 else math.inf
    at_most = f"at most {ratio:.3g}x the lower end" if math.isfinite(ratio) else "not bracketed from below"
    return f"{why}: the upper end is loose ({at_most})"


def timed_out(iv: Interval) -> Interval:
    """The safety net fired: the bound is sound but hangs on the load, so it is no certificate."""
    return replace(iv, certified=False, loose=f"{TIME_BUDGET}; {iv.loose}" if iv.loose else TIME_BUDGET)


def _fallback(k: torch.Tensor, groups: int, lower: float, level: float, reshape: float | None,
              budget: Budget, why: str) -> Interval:
    """The taps bound (or the best box bound so far, if smaller): sound, within sqrt(prod k) of S."""
    kg = k.reshape(groups, k.shape[0] // groups, *k.shape[1:])
    rows, cols = kg.shape[1], math.prod(kg.shape[2:])
    if budget.fits(rows * cols * 8 * 4 + min(rows, cols) ** 2 * 8 * 3):
        if groups == 1 and reshape is not None:
            taps = taps_bound(k, reshape)
        else:
            taps = max(taps_bound(kg[j]) for j in range(groups))
        method = "sqrt-taps-reshape"
    else:
        taps = frobenius_taps_bound(k)
        method = "sqrt-taps-frobenius"
    upper = min(taps, level)
    if level < taps:
        method = "freq-boxes"
    upper = max(upper, lower)
    return Interval(lower, upper, "freq-grid", method, True, loose=_loose(lower, upper, why))


def conv_bound(
    k: torch.Tensor,
    rtol: float,
    reshape: float | None = None,
    *,
    groups: int = 1,
    deadline: float | None = None,
    max_bytes: int | None = None,
    max_points: int = MAX_POINTS,
) -> ConvResult:
    """Certified bracket of max_j S(K_j) over the groups of a float64 kernel (c_out, c_in/groups,
    k_1, ..., k_d); reshape, when the caller has it and groups == 1, is LAPACK's
    ||K.reshape(c_out, -1)||_2 (it saves an SVD for the fallback bound)."""
    budget = Budget(deadline, max_bytes, max_points)
    if k.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide {k.shape[0]} output channels")
    budget.need(k.numel() * 8 * 3, "the kernel")
    if k.numel() == 0 or not bool(torch.any(k != 0)):
        return ConvResult(exact(0.0, "zero"), 0, 0)
    ks, e = scaled(k)
    res = _conv_bound(ks, rtol, None if reshape is None else math.ldexp(reshape, -e), groups, budget)
    return replace(res, interval=unscale_interval(res.interval, e))


def _conv_bound(k: torch.Tensor, rtol: float, reshape: float | None, groups: int, budget: Budget) -> ConvResult:
    k, active = _prepare(k)
    if not active:
        return ConvResult(_matrix(k, groups), 1, 1)
    kg = _grouped(k, groups)
    spatial = tuple(int(s) for s in kg.shape[3:])
    target = rtol * _TARGET
    lower = 0.0
    try:
        sizes = _grid_sizes(spatial, target)
        g, m, n = (int(x) for x in kg.shape[:3])
        taps = math.prod(spatial)
        # Vector symbols, and long kernels with few channels: one FFT per channel pair.
        long = taps > 64 and math.prod(sizes) * m * n <= 2**26
        if n == 1 or long:
            points = math.prod(sizes) * g * m * n
            if budget.fits(m * n * math.prod(sizes) * 48 + math.prod(sizes) * n * n * 32) and points <= 2**31:
                lo, hi = _vector_grid(kg, sizes, [1] * len(sizes), budget)
                lower = lo
                iv = Interval(lo, hi / _grid_factor(spatial, sizes) * (1 + ROUNDING_MARGIN), "freq-grid",
                              "freq-fft", True)
                return ConvResult(iv, math.prod(sizes), 0)
        sym = GramSymbol(kg, budget)
        search = _Search(sym, target, budget)
        return _branch_and_bound(k, kg, sym, search, spatial, target, reshape, groups, budget)
    except _OutOfTime:
        iv = _fallback(k, groups, lower, math.inf, reshape, budget, "time budget exhausted")
        return ConvResult(timed_out(iv), 0, 0)


def _branch_and_bound(k: torch.Tensor, kg: torch.Tensor, sym: GramSymbol, search: _Search,
                      spatial: tuple[int, ...], target: float, reshape: float | None, groups: int,
                      budget: Budget) -> ConvResult:
    cover = _Cover([(s - 1) / 2 for s in spatial])
    # The last level's tau makes 1 / (1 - tau^2 / 2) = 1 + target; the first is 2^levels larger.
    tau_final = math.sqrt(2 * (1 - 1 / (1 + target)))
    levels = max(0, math.floor(math.log2(1.2 / tau_final)))
    b = cover.base(tau_final * 2**levels)
    # A flat spectrum keeps every cell open to the end: a uniform grid is then cheaper.
    grid = _grid_sizes(spatial, target, fft=False)
    grid_points = math.prod(grid) / 2
    cells = cover.start(b)
    level = math.inf
    ascended: torch.Tensor | None = None
    try:
        while len(cells):
            if search.points + len(cells) > budget.max_points:
                iv = _fallback(k, groups, math.sqrt(max(search.lower2, 0)), level, reshape, budget,
                               f"search stopped after {search.points} points")
                return ConvResult(iv, search.points, search.exact_points)
            # (wide channels: trace tests close most boxes cheaply, grid points each need a factorisation)
            if len(cells) > grid_points and search.points + grid_points <= budget.max_points:
                return _uniform(search, grid, spatial, budget)
            tau = cover.tau(b)
            factor = 1 - tau * tau / 2 if tau < math.sqrt(2) else 0.0
            opened = search.settle(cover.frequencies(cells), factor, final=factor * (1 + target) >= 1 - 1e-12)
            probes = min(64, _EXACT_WORK // sym.n**3)  # exact values cost n^3 each: few for wide channels
            if factor * (1 + target) < 1 - 1e-12 and len(opened) and probes > 0:
                pick = torch.linspace(0, len(opened) - 1, min(len(opened), probes)).round().long()
                search.probe(cover.frequencies(cells[opened[pick]]))
            steps = min(48, _EXACT_WORK // (2 * len(spatial) * sym.n**3))
            if factor * (1 + target) < 1 - 1e-12 and search.best_w is not ascended and steps > 0:
                search.ascend(steps)  # from each level's best point: a new peak may have shown up
                ascended = search.best_w
            if factor > 0:
                level = max(search.upper, math.sqrt(search.open_trace + sym.p_error) / factor if len(opened) else 0)
            cells = cover.split(cells[opened], b)
            b /= 2
    except _OutOfTime:
        iv = _fallback(k, groups, math.sqrt(max(search.lower2, 0)), level, reshape, budget,
                       "time budget exhausted")
        return ConvResult(timed_out(iv), search.points, search.exact_points)
    iv = search.interval("freq-bnb")
    if groups == 1:
        simple = taps_bound(k, reshape)
        if simple < iv.upper:
            iv = Interval(iv.lower, simple, "freq-grid", "sqrt-taps-reshape", True)
    return ConvResult(iv, search.points, search.exact_points)


def _uniform(search: _Search, sizes: list[int], spatial: tuple[int, ...], budget: Budget) -> ConvResult:
    """Every point of a uniform grid, with the per-axis certificate."""
    factor = _grid_factor(spatial, sizes)
    w = _uniform_points(sizes)
    step = max(1, search.sym.batch * 16)
    for sl in _chunks(len(w), step):
        budget.check()
        for i in search.settle(w[sl], factor, final=True).tolist():
            search.upper = max(search.upper, search.exact_at(search.sym.negated(w[sl][i : i + 1])) / factor)
    return ConvResult(search.interval("freq-uniform"), search.points, search.exact_points)


def _trim(k: torch.Tensor) -> torch.Tensor:
    """Drop all-zero border slices: a shifted kernel has the same singular values at every w."""
    for axis in range(2, k.ndim):
        mass = k.abs().transpose(0, axis).reshape(k.shape[axis], -1).sum(dim=1)
        nz = torch.nonzero(mass).flatten()
        if len(nz):
            k = k.narrow(axis, int(nz[0]), int(nz[-1]) - int(nz[0]) + 1)
    return k


def row_lower(k: torch.Tensor, rtol: float = 1e-2, budget: Budget | None = None) -> tuple[float, int]:
    """max over output channels o of a proven lower end of S(K[o:o+1]), and the best o.

    One output channel's operator is a row block of whichever group holds it, so this is a
    lower end of the norm for every grouping the shape allows. Its symbol is a vector, whose
    squared norm is the real trigonometric polynomial sum_q R_o(q) cos(w.q) of the row's
    autocorrelation R_o(q) = sum_{i, p} K[o, i, p] K[o, i, p + q]: a few shifts per row, evaluated
    on a grid as fine as the certificate's by one small product per batch of points."""
    budget = budget or Budget()
    if k.numel() == 0 or not bool(torch.any(k != 0)):
        return 0.0, 0
    ks, e = scaled(k)
    ks, _ = _prepare(ks)  # the same trimmed, active axes as conv_bound: the same grid
    c_out, c_in = ks.shape[0], ks.shape[1]
    spatial = [int(s) for s in ks.shape[2:]]
    if not spatial or all(s == 1 for s in spatial):
        norms = torch.linalg.vector_norm(ks.reshape(c_out, -1), dim=1)
        best = int(torch.argmax(norms))
        return unscale_lower(float(norms[best]) * (1 - (c_in + 4) * _EPS), e), best
    budget.need(ks.numel() * 8 * 3, "the kernel's row autocorrelation")
    every = (slice(None), slice(None))
    overlaps = _overlaps(spatial)
    shifts = [q for q, _, _ in overlaps]
    table = torch.empty(len(shifts), c_out, dtype=ks.dtype, device=ks.device)
    for i, (_, to, fro) in enumerate(overlaps):
        budget.check()
        src, dst = ks[(*every, *to)], ks[(*every, *fro)]
        table[i] = (src * dst).reshape(c_out, -1).sum(dim=1) * (1 if i == 0 else 2)
    fro2 = table[0].clamp(min=0)  # R_o(0) = ||K_o||_F^2 bounds every |R_o(q)|
    # Rounding of the table (gamma of c_in prod(k) terms), of the phases (eps |w.q| each) and of the
    # sum over shifts, each against ||K_o||_F^2 per shift (generous constants, as for GramSymbol).
    terms = c_in * math.prod(spatial) + len(shifts) + 8 + int(2 * math.pi * sum(2 * s for s in spatial))
    err = (8 * len(shifts) * terms * _EPS) * fro2 + 2.0**-1000
    w = _uniform_points(_grid_sizes(spatial, rtol * _TARGET, fft=False))
    shift_t = torch.tensor(shifts, dtype=torch.float64, device=ks.device).T
    step = max(1, budget.chunk() // (8 * max(c_out, len(shifts)) * 2))
    best_val, best_o = -math.inf, 0
    for sl in _chunks(len(w), step):
        budget.check()
        power = torch.cos(w[sl].to(ks.device) @ shift_t) @ table  # (points, c_out): ||K_o^(w)||^2
        low = (power - err).max(dim=0).values
        o = int(torch.argmax(low))
        if float(low[o]) > best_val:
            best_val, best_o = float(low[o]), o
    lower = math.sqrt(max(best_val, 0.0)) * (1 - 4 * _EPS)
    return unscale_lower(lower, e), best_o


def conv_interval(
    k: torch.Tensor,
    rtol: float,
    reshape: float | None = None,
    *,
    groups: int | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
    max_points: int = MAX_POINTS,
) -> Interval:
    """The layer's norm for every padding, stride and input size.

    groups known: max over the groups of S(K_j). groups None: the shape (c_out, c_in/g, k...) does
    not tell g, so the upper end is the ungrouped reading's (valid for every g) and the lower
    end the best single output channel's (valid for every g); grouping_assumed says so."""
    if groups is not None:
        return conv_bound(k, rtol, reshape if groups == 1 else None, groups=groups, deadline=deadline,
                          max_bytes=max_bytes, max_points=max_points).interval
    return grouping_pair(k, rtol, reshape, deadline=deadline, max_bytes=max_bytes, max_points=max_points)[0]


def grouping_pair(
    k: torch.Tensor,
    rtol: float,
    reshape: float | None = None,
    *,
    deadline: float | None = None,
    max_bytes: int | None = None,
    max_points: int = MAX_POINTS,
) -> tuple[Interval, Interval]:
    """(the interval for an unknown grouping, the ungrouped reading's interval), sharing one search."""
    iv = conv_bound(k, rtol, reshape, groups=1, deadline=deadline, max_bytes=max_bytes,
                    max_points=max_points).interval
    if k.shape[0] == 1:
        return iv, iv
    budget = Budget(deadline, max_bytes, max_points)
    timed = False
    try:
        lower, _ = row_lower(k, rtol, budget)
    except _OutOfTime:
        lower, timed = 0.0, True
    lower = min(lower, iv.upper)
    unknown = Interval(lower, iv.upper, "row-grid", iv.upper_method, iv.certified, loose=iv.loose,
                       grouping_assumed=True)
    if timed and iv.certified:
        unknown = timed_out(unknown)
    return unknown, iv


# --- known input size ---------------------------------------------------------------------------


def grid_bound(
    k: torch.Tensor,
    sizes: tuple[int, ...],
    rtol: float,
    *,
    groups: int | None = None,
    dilation: int | Sequence[int] = 1,
    deadline: float | None = None,
    max_bytes: int | None = None,
    upper_cap: float | None = None,
) -> Interval:
    """The norm of the circular convolution (stride 1) on an input of that size: the max of
    sigma_max(K^(w)) over w = 2 pi j d / n, bracketed by rounding only. groups None: the upper end
    of the ungrouped reading and the lower end of the best output channel. upper_cap, a known
    bound (S(K)), is the fallback when the deadline passes."""
    budget = Budget(deadline, max_bytes)
    if k.numel() == 0 or not bool(torch.any(k != 0)):
        return exact(0.0, "zero")
    dil = _per_axis(dilation, k.ndim - 2)
    ks, e = scaled(k)
    cap = None if upper_cap is None else math.ldexp(upper_cap, -e)
    known = 0.0  # a lower end valid for the grouping asked about, found so far
    try:
        if groups is None and k.shape[0] > 1 and k.shape[1] > 0:
            _, o = row_lower(ks, 1e-2, budget)  # the best output channel: a row block of every grouping
            lo = _grid_at(ks[o : o + 1], sizes, dil, 1, budget, rtol)
            known = lo.lower
            try:
                up = _grid_at(ks, sizes, dil, 1, budget, rtol)
            except _OutOfTime:
                raise _OutOfTime from None  # its lower end holds for the ungrouped reading only
            iv = Interval(min(lo.lower, up.upper), up.upper, "grid-rows", up.upper_method, True,
                          grouping_assumed=True)
        else:
            iv = _grid_at(ks, sizes, dil, groups or 1, budget, rtol)
    except _OutOfTime as exc:
        known = max(known, exc.lower)
        if cap is None:
            raise ResourceLimitError("the time budget ran out before the grid at the input size was done; "
                                     "raise the per-layer time budget") from None
        iv = timed_out(Interval(min(known, cap), cap, "grid-partial", "operator-bound", True,
                                 loose=_loose(known, cap, "time budget exhausted at the input size"),
                                 grouping_assumed=groups is None and k.shape[0] > 1))
    return unscale_interval(iv, e)


def _grid_at(k: torch.Tensor, sizes: Sequence[int], dil: list[int], groups: int, budget: Budget,
             rtol: float) -> Interval:
    kg = _grouped(k, groups)
    if kg.shape[2] == 1:
        lo, hi = _vector_grid(kg, sizes, dil, budget)
        return Interval(lo, hi * (1 + ROUNDING_MARGIN), "grid-fft", "grid-fft", True)
    kt, active = _prepare(k)
    if not active:
        return _matrix(kt, groups)
    kgt = _grouped(kt, groups)
    n = [sizes[i] for i in active]
    d = [dil[i] for i in active]
    axes = [((torch.arange(m if i < len(n) - 1 else m // 2 + 1) * di) % m).to(torch.float64) * (2 * math.pi / m)
            for i, (m, di) in enumerate(zip(n, d, strict=True))]
    w = torch.cartesian_prod(*axes).reshape(-1, len(n))
    sym = GramSymbol(kgt, budget)
    search = _Search(sym, rtol * _TARGET, budget)
    try:
        for sl in _chunks(len(w), max(1, sym.batch * 16)):
            for i in search.settle(w[sl], 1.0, final=True).tolist():
                # outlived the exact tries of its batch: its own exact value bounds it
                search.upper = max(search.upper, search.exact_at(sym.negated(w[sl][i : i + 1])))
    except _OutOfTime as exc:
        exc.lower = math.sqrt(max(search.lower2, 0.0))
        raise
    return search.interval("grid-cholesky")


def zero_padded_lower(
    k: torch.Tensor,
    sizes: tuple[int, ...],
    pads: Sequence[tuple[int, int]] | None = None,
    steps: int = 40,
    seed: int = 0,
    *,
    dilation: int | Sequence[int] = 1,
    groups: int | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> float:
    """||A x|| / ||x|| (less its rounding) for a Lanczos vector x of the zero-padded, stride-1
    convolution A with per-axis (left, right) pads (default: torch's 'same'): a lower bound of ||A||.
    The work is `steps` products with A^T A; when the deadline (a safety net) passes first,
    OutOfTime comes up with the lower end of the vector reached so far.

    groups None: the best single output channel's operator, a row block of every grouping."""
    budget = Budget(deadline, max_bytes)
    d = k.ndim - 2
    dil = _per_axis(dilation, d)
    pads = list(pads) if pads is not None else same_padding(k.shape[2:], dil)
    if k.numel() == 0 or not bool(torch.any(k != 0)):
        return 0.0
    ks, e = scaled(k)
    timed = False
    if groups is None:
        if ks.shape[0] > 1:
            try:
                _, o = row_lower(ks, 1e-2, budget)
            except _OutOfTime:
                o = int(torch.argmax(torch.linalg.vector_norm(ks.reshape(ks.shape[0], -1), dim=1)))
                timed = True
            ks = ks[o : o + 1]
        groups = 1
    c_in = ks.shape[1] * groups
    shape = (1, c_in, *sizes)
    n = math.prod(shape)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    flat_pads = [p for pair in reversed(pads) for p in pair]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return conv(F.pad(x.reshape(shape), flat_pads), ks, dilation=dil, groups=groups)

    out_numel = apply(torch.zeros(shape, dtype=ks.dtype)).numel()
    if out_numel == 0:
        return 0.0
    budget.need(8 * (n + out_numel) * 6, "the operator's vectors at this input size")
    basis_cap = _BATCH_BYTES if budget.max_bytes is None else budget.max_bytes // 2
    lanczos = 8 * n * (steps + 1) <= basis_cap

    def gram(x: torch.Tensor) -> torch.Tensor:
        budget.check()
        with torch.enable_grad():
            v = x.detach().reshape(shape).requires_grad_(True)
            y = apply(v)
            (grad,) = torch.autograd.grad(y, v, grad_outputs=y.detach())
        return grad.reshape(-1)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64).to(ks.device)
    try:
        if lanczos:
            x = lanczos_top_vector(gram, n, steps, seed, ks.device)
        else:  # large inputs: power iteration keeps only the current vector, and keeps it on timeout
            for _ in range(steps):
                z = gram(x)
                zn = float(torch.linalg.vector_norm(z))
                if zn == 0.0:
                    break
                x = z / zn
    except _OutOfTime:
        timed = True
    lower = unscale_lower(_rayleigh(apply, ks, x, groups), e)
    if timed:
        late = OutOfTime()
        late.lower = lower
        raise late
    return lower


def _rayleigh(apply: Callable[[torch.Tensor], torch.Tensor], k: torch.Tensor, x: torch.Tensor, groups: int) -> float:
    """||A x|| / ||x|| less the rounding of A x: |fl(Ax) - Ax| <= gamma |A| |x|, and by Schur's
    test || |A| || <= sqrt(max row sum * max column sum) of |K|."""
    with torch.no_grad():
        y = apply(x)
    xn = float(torch.linalg.vector_norm(x))
    if xn == 0:
        return 0.0
    a = k.abs()
    per_group = a.reshape(groups, a.shape[0] // groups, -1)
    row = float(per_group.sum(dim=2).max())
    col_sums = a.reshape(groups, a.shape[0] // groups, a.shape[1], -1).sum(dim=(1, 3))
    col = float(col_sums.max())
    gamma = (a.shape[1] * math.prod(a.shape[2:]) + 8) * _EPS * 2
    num = float(torch.linalg.vector_norm(y)) * (1 - 4 * _EPS) - gamma * math.sqrt(row * col) * xn
    return max(0.0, num / (xn * (1 + 4 * _EPS)))


def circular_copies(
    sizes: Sequence[int],
    ks: Sequence[int],
    pads: Sequence[tuple[int, int]],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> tuple[int, int]:
    """(max, min) over input pixels of how many outputs read the circular conv's row at that pixel.

    The circularly padded, strided convolution is A = R C, with C the n-point circular
    convolution and R picking rows (an output at t reads row (t - left) mod n of C), so
    A^T A = C^T D C with D the row counts: min D ||C||^2 <= ||A||^2 <= max D ||C||^2."""
    d = len(sizes)
    st, dil = _per_axis(stride, d), _per_axis(dilation, d)
    hi, lo = 1, 1
    for n, k, (left, right), s, dl in zip(sizes, ks, pads, st, dil, strict=True):
        length = n + left + right - dl * (int(k) - 1)
        if length <= 0:
            return 0, 0
        t = torch.arange(0, length, s)
        counts = torch.bincount((t - left) % n, minlength=n)
        hi *= int(counts.max())
        lo *= int(counts.min())
    return hi, lo


def circular_interval(
    k: torch.Tensor,
    sizes: tuple[int, ...],
    pads: Sequence[tuple[int, int]] | None = None,
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int | None = None,
    rtol: float = 1e-6,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> Interval:
    """The norm of a circularly padded convolution (any padding, over-padding included, where the
    output wraps and the norm can exceed S(K)), at a known input size."""
    dil = _per_axis(dilation, k.ndim - 2)
    pads = list(pads) if pads is not None else same_padding(k.shape[2:], dil)
    hi, lo = circular_copies(sizes, k.shape[2:], pads, stride, dil)
    if hi == 0:
        return exact(0.0, "empty-output")
    c_in = k.shape[1] * (groups or 1)
    if hi != lo and c_in * math.prod(sizes) <= 256 and k.shape[0] * math.prod(sizes) * hi <= 4096:
        return _circular_dense(k, sizes, pads, _per_axis(stride, len(sizes)), dil, groups)
    circ = grid_bound(k, sizes, rtol, groups=groups, dilation=dil, deadline=deadline, max_bytes=max_bytes)
    upper = circ.upper * math.sqrt(hi) * (1 + 4 * _EPS)
    lower = min(circ.lower * math.sqrt(lo) * (1 - 4 * _EPS), sys.float_info.max)  # finite weights, finite norm
    if hi == lo:
        method = "grid-circular"
    else:
        method = "grid-circular-copies"
    return Interval(lower, upper, method, method, circ.certified, loose=circ.loose,
                    grouping_assumed=circ.grouping_assumed)


def _circular_dense(k: torch.Tensor, sizes: Sequence[int], pads: Sequence[tuple[int, int]], stride: list[int],
                    dil: list[int], groups: int | None) -> Interval:
    """Small inputs: the operator's matrix, from basis vectors pushed through torch's own padding
    and convolution, and its norm by exact_norm (groups None: upper of the ungrouped reading,
    lower of the best output channel's rows)."""
    ks, e = scaled(k)
    g = groups or 1
    c_in = ks.shape[1] * g
    n = c_in * math.prod(sizes)
    basis = torch.eye(n, dtype=ks.dtype).reshape(n, c_in, *sizes)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(sizes) - 1]
    flat_pads = [p for pair in reversed(list(pads)) for p in pair]
    out = conv(F.pad(basis, flat_pads, mode="circular"), ks, stride=stride, dilation=dil, groups=g)
    a = out.reshape(n, ks.shape[0], -1)  # (input, output channel, output position)
    full = exact_norm(a.reshape(n, -1).T)
    if groups is not None or ks.shape[0] == 1:
        return unscale_interval(replace(full, lower_method="dense", upper_method="dense"), e)
    rows = max(exact_norm(a[:, o, :].T).lower for o in range(ks.shape[0]))
    iv = Interval(rows, full.upper, "dense-rows", "dense", True, grouping_assumed=True)
    return unscale_interval(iv, e)
