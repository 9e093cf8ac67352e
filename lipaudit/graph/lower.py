"""The measured lower end of a network's Lipschitz constant: the largest ||J(x)|| found, in float64.

At each start point x, power iteration on J(x)^T J(x) (forward mode for J v, reverse mode for J^T u,
both from torch.func) estimates ||J(x)||; then x moves uphill along the gradient of ||J_beta(x) v||^2 and
the iteration resumes from the same v, until the start stops climbing. J_beta is the Jacobian of
the network with its kinks rounded off (graph/ops/smooth.py): a piecewise-linear network's own
Jacobian is constant on each piece, so its gradient is zero and gives no direction. Start points
are the archive's sample inputs when present, random points at the scale of those inputs (or of a
unit normal), and the same at larger scales, so that saturating activations are also probed.

Everything is counted in function evaluations (one forward, one J v or one J^T u each), never in
seconds: the same file, seed and budget give the same number on any machine. Every value reported is
attained: ||J(x) v|| / ||v|| at a point x that the seed and the start index reproduce.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.errors import ResourceLimitError
from lipaudit.graph.interpret import CannotRun, Evaluator, network_function
from lipaudit.graph.model import FLOAT_CODES, Graph
from lipaudit.text import clean_message

# the input scales tried, relative to the data's: the data itself, then points further out
SCALES = (1.0, 4.0, 16.0)
# The ascent steers by the network with its kinks rounded at scale 1 / beta (graph/ops/smooth.py),
# beta cycling through these, relative to the start's scale.
BETAS = (1.0, 2.0, 4.0, 8.0)
# Ascent steps per start at most; a start that has not risen by 0.1% in PATIENCE steps gives way
# to the next. STEP: each step's length relative to ||x||.
ASCENT = 100
PATIENCE = 16
STEP = 0.05
_BYTES = 8  # everything runs in float64
# rough peak of a forward plus a reverse pass, in copies of every intermediate tensor
_COPIES = 3


@dataclass(frozen=True)
class Measured:
    lower: float | None  # largest ||J(x) v|| / ||v|| found
    seconds: float
    starts: int
    steps: int  # power-iteration steps done
    start_from: str  # "sample inputs" or "random"
    note: str
    work: int = 0  # function evaluations used
    budget: int = 0
    seed: int = 0
    best_start: int | None = None  # the start index that attained lower (0 is the sample inputs when present)
    best_scale: float | None = None  # that start's scale relative to the data


class Spent(Exception):
    """The work budget is used up."""


class Counter:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0

    def take(self, n: int = 1) -> None:
        if self.used + n > self.budget:
            raise Spent
        self.used += n


def check_memory(graph: Graph, limits: Limits) -> None:
    """Refuse, before any allocation, a measurement whose declared tensors exceed the budgets."""
    total = 0
    for name in _tensors(graph):
        shape = graph.shapes.get(name) or graph.hints.get(name)
        if shape is None:
            continue
        size = math.prod(int(s) for s in shape) * _BYTES
        if size > limits.tensor_bytes:
            raise ResourceLimitError(f"measuring the Jacobian needs a {size / 2**30:.1f} GiB tensor ({name}); "
                                     f"the limit is {limits.tensor_bytes / 2**30:.1f} GiB per tensor")
        total += size
    if total * _COPIES > limits.total_bytes:
        raise ResourceLimitError(f"measuring the Jacobian needs about {total * _COPIES / 2**30:.1f} GiB; the limit "
                                 f"is {limits.total_bytes / 2**30:.1f} GiB")


def _tensors(graph: Graph) -> list[str]:
    names = list(graph.inputs)
    for n in graph.nodes:
        names.extend(o for o in n.outputs if o is not None)
    return names


def measure(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None, work: int, seed: int,
            limits: Limits | None = None, starts: int = 6, steps: int = 8, ascent: int = ASCENT,
            inner: int = 2) -> Measured:
    """The largest Jacobian norm found with at most `work` function evaluations.

    Raises ResourceLimitError when the graph's declared tensors do not fit the limits."""
    check_memory(graph, limits or Limits())
    import time

    t0 = time.perf_counter()
    # torch's forward-mode AD sets up its own decompositions on first use, with deprecation warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _measure(graph, consts, samples, work, seed, starts, steps, ascent, inner, limits)
    return Measured(m.lower, time.perf_counter() - t0, m.starts, m.steps, m.start_from, m.note, m.work, m.budget,
                    m.seed, m.best_start, m.best_scale)


def runnable(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None,
             limits: Limits | None) -> tuple[Callable[..., torch.Tensor], list[tuple[int, ...]], bool] | str:
    """(the network function, the input shapes, whether the samples fit them), or why the network
    cannot be run for a measurement."""
    try:
        f = network_function(graph, consts, limits)
    except CannotRun as e:
        return f"not measured: {e}"
    shapes = [graph.shapes.get(n) or graph.hints.get(n) for n in graph.inputs]
    if not shapes or any(s is None for s in shapes):
        return "not measured: input sizes are not known"
    if not all(graph.dtypes.get(n, 7) in FLOAT_CODES for n in graph.inputs):
        return "not measured: non-float inputs"
    fixed = [tuple(int(v) for v in s or ()) for s in shapes]
    use = samples is not None and len(samples) == len(fixed) and all(
        tuple(s.shape) == sh and s.is_floating_point() and bool(torch.isfinite(s).all())
        for s, sh in zip(samples, fixed, strict=True))
    return f, fixed, use


def norm_of(xs: list[torch.Tensor]) -> float:
    return math.sqrt(math.fsum(float((t * t).sum()) for t in xs))


def start_points(shapes: list[tuple[int, ...]], samples: list[torch.Tensor] | None, count: int,
                 gen: torch.Generator) -> list[tuple[list[torch.Tensor], float]]:
    """(point, scale): the samples first, then random points at the data's scale and beyond."""
    points: list[tuple[list[torch.Tensor], float]] = []
    centre = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    spread = [1.0 for _ in shapes]
    if samples is not None:
        points.append(([s.detach().to(torch.float64) for s in samples], 1.0))
        centre = [s.detach().to(torch.float64) for s in samples]
        spread = [float(s.detach().to(torch.float64).std()) if s.numel() > 1 else 1.0 for s in samples]
        spread = [v if math.isfinite(v) and v > 0 else 1.0 for v in spread]
    i = 0
    while len(points) < count:
        scale = SCALES[i % len(SCALES)]
        i += 1
        noise = [torch.randn(s, generator=gen, dtype=torch.float64) * (sd * scale) for s, sd in zip(shapes, spread,
                                                                                                    strict=True)]
        base = centre if samples is not None and scale == 1.0 else [torch.zeros_like(c) for c in centre]
        points.append(([b + n for b, n in zip(base, noise, strict=True)], scale))
    return points


def _measure(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None, work: int, seed: int,
             starts: int, steps: int, ascent: int, inner: int, limits: Limits | None) -> Measured:
    ready = runnable(graph, consts, samples, limits)
    if isinstance(ready, str):
        return Measured(None, 0.0, 0, 0, "", ready, 0, work, seed)
    f, fixed, use = ready
    gen = torch.Generator().manual_seed(seed)
    points = start_points(fixed, samples if use else None, starts, gen)
    counter = Counter(work)
    best: float | None = None
    best_start: int | None = None
    best_scale: float | None = None
    done_steps = 0
    done_starts = 0
    note = ""

    def fx(*xs: torch.Tensor) -> torch.Tensor:
        return f(list(xs))

    def smooth_at(beta: float) -> Callable[..., torch.Tensor]:
        return lambda *xs: f(list(xs), smooth=beta)

    here = 0.0  # the largest value of the current start

    def power(x: list[torch.Tensor], v: list[torch.Tensor], count: int, index: int, scale: float) -> list[torch.Tensor]:
        nonlocal best, best_start, best_scale, done_steps, here
        for _ in range(count):
            nv = norm_of(v)
            if nv == 0 or not math.isfinite(nv):
                break
            v = [t / nv for t in v]
            counter.take(2)
            jv, back = jvp_vjp(fx, x, v)
            value = float(torch.linalg.vector_norm(jv))
            done_steps += 1
            if math.isfinite(value):
                here = max(here, value)
                if best is None or value > best:
                    best, best_start, best_scale = value, index, scale
            v = list(back(jv))
        return v

    try:
        for index, (x, scale) in enumerate(points):
            done_starts += 1
            v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in x]
            here = 0.0
            v = power(x, v, steps, index, scale)
            top, idle = here, 0
            for rnd in range(ascent):
                counter.take(2)
                x = _ascend(smooth_at(BETAS[rnd % len(BETAS)] / scale), x, v, gen)
                v = power(x, v, inner, index, scale)
                if here > top * (1 + 1e-3):
                    top, idle = here, 0
                else:
                    idle += 1
                    if idle >= PATIENCE:
                        break  # this start has stopped climbing: try the next
    except Spent:
        note = ""
    except Exception as e:  # the measurement is optional; a graph it cannot run only stops it
        note = f"stopped early: {type(e).__name__}: {clean_message(e, 120)}"
    return Measured(best, 0.0, done_starts, done_steps, "sample inputs" if use else "random", note,
                    counter.used, work, seed, best_start, best_scale)


def jvp_vjp(fx: Callable[..., torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor]) -> tuple[
        torch.Tensor, Callable[[torch.Tensor], Any]]:
    """(J v, u -> J^T u) at x. J v by forward mode, or, for ops without a forward-mode formula,
    as the transpose of the linear map u -> J^T u."""
    y, back = torch.func.vjp(fx, *x)[:2]
    try:
        jv: torch.Tensor = torch.func.jvp(fx, tuple(x), tuple(v))[1]
    except (NotImplementedError, RuntimeError):
        back2 = torch.func.vjp(lambda u: tuple(back(u)), torch.zeros_like(y))[1]
        (jv,) = back2(tuple(v))
    return jv, back


def _ascend(fx: Callable[..., torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor],
            gen: torch.Generator) -> list[torch.Tensor]:
    """One step on x along the gradient of ||J(x) v||^2, J the Jacobian of fx (the rounded network),
    of length STEP ||x|| (a random nudge where the gradient vanishes)."""
    xs = [t.detach().requires_grad_(True) for t in x]
    size = max(norm_of(x), 1e-3) * STEP
    grads: list[torch.Tensor] | None = None
    with torch.enable_grad():
        try:
            jv = torch.func.jvp(fx, tuple(xs), tuple(v))[1]
            g = torch.autograd.grad((jv * jv).sum(), xs, allow_unused=True)
            if all(t is not None for t in g):
                grads = [t for t in g if t is not None]
        except (NotImplementedError, RuntimeError):
            grads = None
    ng = norm_of(grads) if grads is not None else 0.0
    if grads is None or ng == 0 or not math.isfinite(ng):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in x]
        ng = norm_of(grads)
    return [(t + size * g / ng).detach() for t, g in zip(x, grads, strict=True)]
