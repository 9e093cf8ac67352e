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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.graph.interpret import Evaluator, run_node
from lipaudit.graph.lower import Counter, Spent, check_memory, jvp_vjp, norm_of, runnable, start_points
from lipaudit.graph.model import Graph
from lipaudit.graph.ops.elementwise import PRODUCTS
from lipaudit.graph.ops.registry import lookup
from lipaudit.graph.tighten import slopes as slopes_of
from lipaudit.text import clean_message

# each block's own floor gets this share (in percent) of the network's budget
BLOCK_SHARE = 50
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
    blocks: dict[tuple[str, str], float] | None = None  # (entry, exit) -> the block's own floor

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "relaxed": self.relaxed, "kept": self.kept, "work": self.work,
                "budget": self.budget, "seed": self.seed, "note": self.note, "seconds": self.seconds,
                "block_work": BLOCK_SHARE * self.budget // 100}


def relaxable(graph: Graph, consts: Evaluator) -> tuple[dict[str, tuple[float, float, tuple[int, ...]]], int]:
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
        rng = slopes_of(n, consts.value)
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
                limits: Limits | None = None, blocks: list[dict[str, Any]] | None = None) -> Floor:
    """The largest Jacobian norm of a slope-replaced network found with at most `work` function
    evaluations (a J v with its J^T u counts 2, a gradient with respect to the slopes 3); with
    `blocks` (the walk's), each used block's own floor too."""
    check_memory(graph, limits or Limits())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl = _floor(graph, consts, samples, work, seed, limits)
        own = block_floors(graph, consts, blocks, BLOCK_SHARE * work // 100, seed, fl.ranges) if blocks else None
    return Floor(fl.value, len(fl.ranges), fl.kept, fl.work, work, seed, fl.note, time.perf_counter() - t0, own)


@dataclass(frozen=True)
class _Found:
    value: float | None
    ranges: dict[str, tuple[float, float, tuple[int, ...]]]
    kept: int
    work: int
    note: str


def _floor(graph: Graph, consts: Evaluator, samples: list[torch.Tensor] | None, work: int, seed: int,
           limits: Limits | None) -> _Found:
    ranges, kept = relaxable(graph, consts)
    if not ranges:
        return _Found(None, ranges, kept, 0, "no activation with a slope range to replace")
    ready = runnable(graph, consts, samples, limits)
    if isinstance(ready, str):
        return _Found(None, ranges, kept, 0, ready)
    f, fixed, use = ready
    gen = torch.Generator().manual_seed(seed)
    x = start_points(fixed, samples if use else None, 1, gen)[0][0]
    counter = Counter(work)
    best, note = _search(lambda xs, s: f(xs, relax=s), x, ranges, counter, gen)
    return _Found(best, ranges, kept, counter.used, note)


def block_floors(graph: Graph, consts: Evaluator, blocks: list[dict[str, Any]], work: int, seed: int,
                 ranges: dict[str, tuple[float, float, tuple[int, ...]]] | None = None) -> dict[tuple[str, str], float]:
    """{(entry, exit): floor} of each block the walk used (graph/tighten.py), each searched with `work`
    evaluations of the block alone. A block holds only linear maps and activations, so with every
    activation replaced its Jacobian is the same at every point: zero will do. ranges: relaxable's,
    when known."""
    if ranges is None:
        ranges = relaxable(graph, consts)[0]
    out: dict[tuple[str, str], float] = {}
    for b in blocks:
        names = b.get("nodes") or []
        shape = graph.shapes.get(b["entry"]) or graph.hints.get(b["entry"])
        if not b.get("used") or not names or shape is None or any(n not in graph.order for n in names):
            continue
        nodes = [graph.nodes[graph.order[n]] for n in names]
        inside = {n: ranges[n] for n in names if n in ranges}
        if not inside:
            continue
        env0: dict[str, torch.Tensor] = {}
        for n in nodes:
            for t in n.tensor_inputs():
                v = consts.value(t) if t != b["entry"] else None
                if v is not None:
                    env0[t] = v

        def run(xs: list[torch.Tensor], s: dict[str, torch.Tensor], nodes: list[Any] = nodes,
                env0: dict[str, torch.Tensor] = env0, entry: str = b["entry"], exit: str = b["exit"]) -> torch.Tensor:
            env = dict(env0)
            env[entry] = xs[0]
            for n in nodes:
                run_node(n, env, graph, relax=s)
            return env[exit].reshape(-1)

        gen = torch.Generator().manual_seed(seed)
        x = [torch.zeros(tuple(int(v) for v in shape), dtype=torch.float64)]
        value, _ = _search(run, x, inside, Counter(work), gen)
        if value is not None:
            out[(b["entry"], b["exit"])] = value
    return out


def _search(run: Callable[[list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor], x: list[torch.Tensor],
            ranges: dict[str, tuple[float, float, tuple[int, ...]]], counter: Counter,
            gen: torch.Generator) -> tuple[float | None, str]:
    """The largest ||J v|| / ||v|| of run(., slopes) at x found within the counter's budget."""
    theta = {n: 0.5 * torch.randn(sh, generator=gen, dtype=torch.float64) for n, (_, _, sh) in ranges.items()}
    first = {n: torch.zeros_like(t) for n, t in theta.items()}
    second = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in x]
    best: float | None = None
    note = ""

    def slopes(th: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: (a + (b - a) * torch.sigmoid(th[n])).clamp(a, b) for n, (a, b, _) in ranges.items()}

    try:
        for step in range(1, counter.budget + 1):
            fixed_slopes = slopes(theta)

            def fx(*xs: torch.Tensor, s: dict[str, torch.Tensor] = fixed_slopes) -> torch.Tensor:
                return run(list(xs), s)

            nv = norm_of(v)
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
            grads = _slope_gradient(run, x, v, theta, slopes)
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
    return best, note


def _slope_gradient(run: Callable[[list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
                    x: list[torch.Tensor], v: list[torch.Tensor], theta: dict[str, torch.Tensor],
                    slopes: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[
                        str, torch.Tensor] | None:
    """The gradient of ||J v||^2 / ||v||^2 with respect to the slopes' logits."""
    nv = norm_of(v)
    if nv == 0 or not math.isfinite(nv):
        return None
    u = [t / nv for t in v]
    th = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    with torch.enable_grad():
        s = slopes(th)
        jv = torch.func.jvp(lambda *xs: run(list(xs), s), tuple(x), tuple(u))[1]
        gs = torch.autograd.grad((jv * jv).sum(), list(th.values()), allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(th[n])) for n, g in zip(th, gs, strict=True)}
    if not all(bool(torch.isfinite(g).all()) for g in out.values()):
        return None
    return out
