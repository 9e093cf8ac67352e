"""The slope floor: a value below which no certificate can go that sees each activation only
through its secant-slope range (docs/mathematics.md, "The slope floor").

Replace activation node j, whose secant slopes lie in [a_j, b_j], by z -> lambda * z with one slope
per element, lambda in [a_j, b_j]. That map has slopes in the same range, so the network built this
way is one that every slope-based certificate must also cover: products of norms, the loop
transformation and the block rules here, LipSDP-neuron. Its Jacobian norm at a point is at most its
Lipschitz constant, hence at most any such certificate. The search maximises ||J v|| over the slopes
(each lambda = a + (b - a) sigmoid(theta), theta moved by Adam on the gradient of ||J v||^2) and over
v (power iteration), counting work in function evaluations like the measured lower end.

It is not a bound on the network itself: the real network may never realise those slopes together.
It splits a bracket in two: certified / floor is what a better slope-based method could still
remove, floor / lower is what slope ranges alone cannot see.

An activation read by a product of two input-dependent tensors (the x * f(x) patterns of
graph/ops/elementwise.py) is left as it is: its bound there uses the function, not only its slopes.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.graph.interpret import CannotRun, Evaluator, network_function
from lipaudit.graph.lower import _FLOATS, Counter, Spent, check_memory, jvp_vjp, start_points
from lipaudit.graph.model import Graph
from lipaudit.graph.ops.elementwise import PRODUCTS
from lipaudit.graph.ops.registry import lookup
from lipaudit.text import clean_message

# Adam on the slopes' logits: step, decay rates
RATE = 0.3
BETA1, BETA2 = 0.9, 0.999


@dataclass(frozen=True)
class Floor:
    value: float | None  # largest ||J v|| / ||v|| of a slope-replaced network found
    relaxed: int  # activation nodes replaced by slopes
    kept: int  # activation nodes left as they are
    work: int
    budget: int
    seed: int
    note: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "relaxed": self.relaxed, "kept": self.kept, "work": self.work,
                "budget": self.budget, "seed": self.seed, "note": self.note, "seconds": self.seconds}


def relaxable(graph: Graph) -> tuple[dict[str, tuple[float, float, tuple[int, ...]]], int]:
    """{node: (a, b, output shape)} for the activation nodes the floor replaces, and how many
    activation nodes it keeps as they are."""
    varying = set(graph.inputs)
    for n in graph.nodes:
        if any(t in varying for t in n.tensor_inputs()):
            varying.update(o for o in n.outputs if o is not None)
    out: dict[str, tuple[float, float, tuple[int, ...]]] = {}
    kept = 0
    for n in graph.nodes:
        entry = lookup(n.op, n.overload) if n.namespace == "aten" else None
        if entry is None or entry.spec.slopes is None or not n.outputs or n.outputs[0] not in varying:
            continue
        rng = entry.spec.slopes(n)
        name = n.outputs[0]
        shape = graph.shapes.get(name) or graph.hints.get(name) if name else None
        read_as_function = any(
            c.op.rstrip("_") in PRODUCTS and sum(t in varying for t in c.tensor_inputs()) > 1
            for c in graph.consumers.get(name or "", []))
        if rng is None or shape is None or read_as_function or not all(math.isfinite(v) for v in rng):
            kept += 1
            continue
        out[n.name] = (float(rng[0]), float(rng[1]), tuple(int(s) for s in shape))
    return out, kept


def slope_floor(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None, work: int, seed: int,
                limits: Limits | None = None) -> Floor:
    """The largest Jacobian norm of a slope-replaced network found with at most `work` function
    evaluations (a J v with its J^T u counts 2, a gradient with respect to the slopes 3)."""
    check_memory(graph, limits or Limits())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl = _floor(graph, consts, samples, work, seed, limits)
    return Floor(fl.value, fl.relaxed, fl.kept, fl.work, fl.budget, fl.seed, fl.note, time.perf_counter() - t0)


def _floor(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None, work: int, seed: int,
           limits: Limits | None) -> Floor:
    ranges, kept = relaxable(graph)
    if not ranges:
        return Floor(None, 0, kept, 0, work, seed, "no activation with a slope range to replace")
    try:
        f = network_function(graph, consts, limits)
    except CannotRun as e:
        return Floor(None, len(ranges), kept, 0, work, seed, f"not measured: {e}")
    shapes = [graph.shapes.get(n) or graph.hints.get(n) for n in graph.inputs]
    if not shapes or any(s is None for s in shapes):
        return Floor(None, len(ranges), kept, 0, work, seed, "not measured: input sizes are not known")
    if not all(graph.dtypes.get(n, 7) in _FLOATS for n in graph.inputs):
        return Floor(None, len(ranges), kept, 0, work, seed, "not measured: non-float inputs")
    fixed = [tuple(int(v) for v in s or ()) for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    use = samples is not None and len(samples) == len(fixed) and all(
        tuple(s.shape) == sh and s.is_floating_point() and bool(torch.isfinite(s).all())
        for s, sh in zip(samples, fixed, strict=True))
    x = start_points(fixed, samples if use else None, 1, gen)[0][0]
    theta = {n: 0.5 * torch.randn(sh, generator=gen, dtype=torch.float64) for n, (_, _, sh) in ranges.items()}
    first = {n: torch.zeros_like(t) for n, t in theta.items()}
    second = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in x]
    counter = Counter(work)
    best: float | None = None
    note = ""

    def slopes(th: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: (a + (b - a) * torch.sigmoid(th[n])).clamp(a, b) for n, (a, b, _) in ranges.items()}

    try:
        for step in range(1, work + 1):
            fixed_slopes = slopes(theta)

            def fx(*xs: torch.Tensor, s: dict[str, torch.Tensor] = fixed_slopes) -> torch.Tensor:
                return f(list(xs), relax=s)

            nv = math.sqrt(math.fsum(float((t * t).sum()) for t in v))
            if nv == 0 or not math.isfinite(nv):
                v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in x]
                continue
            v = [t / nv for t in v]
            counter.take(2)
            jv, back = jvp_vjp(fx, x, v)
            value = float(torch.linalg.vector_norm(jv))
            if math.isfinite(value) and (best is None or value > best):
                best = value
            v = [t.detach() for t in back(jv)]
            counter.take(3)
            grads = _slope_gradient(f, x, v, theta, slopes)
            if grads is None:
                break
            for n, g in grads.items():
                first[n].mul_(BETA1).add_(g, alpha=1 - BETA1)
                second[n].mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                mhat = first[n] / (1 - BETA1**step)
                shat = second[n] / (1 - BETA2**step)
                theta[n] = theta[n] + RATE * mhat / (shat.sqrt() + 1e-12)
    except Spent:
        pass
    except Exception as e:  # optional, like the lower end: a graph it cannot run only stops it
        note = f"stopped early: {type(e).__name__}: {clean_message(e, 120)}"
    return Floor(best, len(ranges), kept, counter.used, work, seed, note)


def _slope_gradient(f: Any, x: list[torch.Tensor], v: list[torch.Tensor], theta: dict[str, torch.Tensor],
                    slopes: Any) -> dict[str, torch.Tensor] | None:
    """The gradient of ||J v||^2 / ||v||^2 with respect to the slopes' logits."""
    nv = math.sqrt(math.fsum(float((t * t).sum()) for t in v))
    if nv == 0 or not math.isfinite(nv):
        return None
    u = [t / nv for t in v]
    th = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    with torch.enable_grad():
        s = slopes(th)
        jv = torch.func.jvp(lambda *xs: f(list(xs), relax=s), tuple(x), tuple(u))[1]
        gs = torch.autograd.grad((jv * jv).sum(), list(th.values()), allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(th[n])) for n, g in zip(th, gs, strict=True)}
    if not all(bool(torch.isfinite(g).all()) for g in out.values()):
        return None
    return out
