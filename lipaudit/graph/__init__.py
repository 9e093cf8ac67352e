"""Network bounds on the real wiring of a torch.export archive (.pt2), and a measured lower end."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.pt2 import Pt2Archive, open_pt2
from lipaudit.errors import MalformedInputError
from lipaudit.graph.bound import INPUT, LinearOp, Result, bound_graph
from lipaudit.graph.interpret import Evaluator, check_shapes
from lipaudit.graph.lower import Measured, measure
from lipaudit.graph.model import Graph, parse_graph
from lipaudit.graph.relax import Floor, slope_floor
from lipaudit.settings import BLOCK_WORK, FLOOR_WORK
from lipaudit.spectral import Interval
from lipaudit.text import visible

__all__ = [
    "GraphBound", "GraphSettings", "Loaded", "floor_end", "graph_of", "inspect_archive", "inspect_state_dict",
    "load_archive", "lower_end", "match_state_dict", "on_state_dict",
]

ASSUMPTIONS = (
    "eval mode: batch norm uses its running statistics, dropout is off",
    "the bound is for the exported input shapes (pooling, means and upsampling use them); convolutions are "
    "bounded for every input size",
    "Euclidean norms over the whole input and over all float outputs together",
    "zero padding inside convolutions; explicit reflect/replicate/circular pads are bounded as their own maps",
)


@dataclass(frozen=True)
class GraphSettings:
    rtol: float = 1e-4  # dense matrices
    conv_rtol: float = 1e-2
    seed: int = 0
    measure: bool = True  # run the interpreter for a measured lower end
    measure_work: int = 200  # function evaluations for the measured lower end (lipaudit/graph/lower.py)
    block_work: float = BLOCK_WORK  # block bounds' work over the layers' own (lipaudit/graph/tighten.py)
    floor_work: int = FLOOR_WORK  # function evaluations for the slope floor (lipaudit/graph/relax.py); 0: none
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> GraphSettings:
        """From the CLI's Settings (any object with rtol, conv_rtol, seed, limits)."""
        values = {k: getattr(settings, k) for k in ("rtol", "conv_rtol", "seed", "limits", "block_work", "floor_work")
                  if hasattr(settings, k)}
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class LayerBound:
    """One weight layer of the graph: its own operator norm and, when folded or merged, the norm of
    the combined operator the network bound used."""

    param: str
    node: str
    kind: str
    lower: float
    upper: float
    method: str
    certified: bool
    fused_with: tuple[str, ...]
    fused_upper: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "param": self.param, "node": self.node, "kind": self.kind, "lower": self.lower, "upper": self.upper,
            "method": self.method, "certified": self.certified, "fused_with": list(self.fused_with),
            "fused_upper": self.fused_upper,
        }


@dataclass(frozen=True)
class GraphBound:
    """The network bound over the exported DAG."""

    log10_upper: float | None  # None when an uncovered node lies between input and output
    certified: bool
    lipschitz_lower: float | None
    uncovered: tuple[tuple[str, str], ...]
    nodes: tuple[dict[str, Any], ...]  # per node: name, op, log10 gain, log10 bound from the input
    dominant_path: tuple[str, ...]
    chain_log10: float | None  # product of every layer's own norm and activation constant
    assumptions: tuple[str, ...]
    layers: dict[str, LayerBound]  # by parameter name
    partial: tuple[dict[str, Any], ...]  # bounds of covered parts: from a source to an uncovered node/output
    bound_seconds: float
    lower_seconds: float | None
    lower_note: str
    method: str = "graph"
    blocks: tuple[dict[str, Any], ...] = ()  # blocks bounded as a whole (lipaudit/graph/tighten.py)
    lower_detail: dict[str, Any] = field(default_factory=dict)  # how the lower end was found
    slope_floor: float | None = None  # no slope-based certificate goes below it (lipaudit/graph/relax.py)
    floor_detail: dict[str, Any] = field(default_factory=dict)

    @property
    def lipschitz_upper(self) -> float | None:
        if self.log10_upper is None:
            return None
        return float(10.0**self.log10_upper) if self.log10_upper < 308 else math.inf

    @property
    def ratio(self) -> float | None:
        """upper / lower: how loose the certificate can be at most."""
        if self.log10_upper is None or not self.lipschitz_lower:
            return None
        return float(10.0 ** (self.log10_upper - math.log10(self.lipschitz_lower)))

    def to_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        upper = self.lipschitz_upper
        return {
            "method": self.method,
            "lipschitz_upper": num(upper),
            "log10_lipschitz_upper": num(self.log10_upper),
            "certified": self.certified,
            "lipschitz_lower": num(self.lipschitz_lower),
            "ratio_upper_lower": num(self.ratio),
            "chain_log10_product": num(self.chain_log10),
            "graph_vs_chain_log10": num(None if self.log10_upper is None or self.chain_log10 is None
                                        else self.log10_upper - self.chain_log10),
            "uncovered": [{"node": n, "reason": r} for n, r in self.uncovered],
            "partial": [{k: (num(v) if isinstance(v, float) else v) for k, v in p.items()} for p in self.partial],
            "dominant_path": list(self.dominant_path),
            "nodes": [{k: (num(v) if isinstance(v, float) else v) for k, v in n.items()} for n in self.nodes],
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "assumptions": list(self.assumptions),
            "seconds": {"bound": self.bound_seconds, "lower": self.lower_seconds,
                        "floor": self.floor_detail.get("seconds")},
            "lower_note": self.lower_note,
            "bracket": {"lower": num(self.lipschitz_lower), "upper": num(upper), "ratio": num(self.ratio),
                        "slope_floor": num(self.slope_floor)},
            "lower": self.lower_detail,
            "slope_floor": num(self.slope_floor),
            "floor": self.floor_detail,
            "blocks": [{k: (num(v) if isinstance(v, float) else v) for k, v in b.items()} for b in self.blocks],
        }


@dataclass
class Loaded:
    """An archive, its graph, and where its constant tensors come from."""

    archive: Pt2Archive
    graph: Graph
    load: Callable[[str], torch.Tensor]  # graph tensor name -> tensor
    keys: dict[str, str] | None = None  # parameter name -> state-dict key, when a state dict supplies them
    limits: Limits | None = None  # budgets every node's output is checked against before it runs

    def evaluator(self) -> Evaluator:
        return Evaluator(self.graph, self.load, self.limits)


def load_archive(path: str, limits: Limits | None = None) -> Loaded:
    return graph_of(open_pt2(path, limits), limits)


def graph_of(arch: Pt2Archive, limits: Limits | None = None) -> Loaded:
    """The graph of an archive already open (a .pt2 checkpoint is read once)."""
    try:
        graph = parse_graph(arch.program, arch.shown, (limits or Limits()).nodes)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise MalformedInputError(f"{arch.shown}: malformed graph JSON ({type(e).__name__})", arch.shown) from None
    for name, fqn in list(graph.params.items()):
        if fqn not in arch.weights and fqn in arch.constants:
            # a non-persistent buffer: torch.export.save stores it with the constants
            graph.constants[name] = graph.params.pop(name)
    for fqn in graph.params.values():
        if fqn not in arch.weights:
            raise MalformedInputError(f"{arch.shown}: the graph uses {visible(fqn, 80)!r}, which the weights config "
                                      "lacks", arch.shown)
    for fqn in graph.constants.values():
        if fqn not in arch.constants:
            raise MalformedInputError(f"{arch.shown}: the graph uses constant {visible(fqn, 80)!r}, which the "
                                      "constants config lacks", arch.shown)

    def load(name: str) -> torch.Tensor:
        if name in graph.params:
            return arch.weight(graph.params[name])
        return arch.constant(graph.constants[name])

    return Loaded(arch, graph, load, limits=limits)


def summarise(res: Result, lower: Measured | None, floor: Floor | None = None,
              assumptions: tuple[str, ...] = ASSUMPTIONS) -> GraphBound:
    reaches = [k for k in res.outputs if k != INPUT and res.outputs[k] != -math.inf]
    upper = res.outputs.get(INPUT, -math.inf)
    # any uncovered node leaves the network uncertified, even one whose output the bound never met
    log10_upper: float | None = None if reaches or res.uncovered else upper
    if log10_upper is not None and math.isfinite(log10_upper):
        log10_upper += math.log10(1 + 1e-9)  # the rounding of the log-space sums and products
    certified = log10_upper is not None and res.certified_norms
    layers: dict[str, LayerBound] = {}
    for rec in res.layers:
        name = rec.params[0] if rec.params else rec.node
        if name in layers:
            continue  # a weight used twice: its first use names it
        layers[name] = LayerBound(
            param=name, node=rec.node, kind=rec.op, lower=rec.interval.lower, upper=rec.interval.upper,
            method=rec.interval.method, certified=rec.interval.certified,
            fused_with=tuple(p for p in rec.fused_with if p not in rec.params),
            fused_upper=rec.fused.upper if rec.fused is not None else None,
        )
    nodes = tuple({"node": n.node, "op": n.op, "log10_gain": n.gain, "log10_bound": n.bound, "note": n.note}
                  for n in res.nodes)
    lower_value = lower.lower if lower is not None else None
    if lower_value is not None and log10_upper is not None and lower_value > 0:
        # a measured value above a certified bound would be a bug; never hide it
        if math.log10(lower_value) > log10_upper + 1e-6:
            raise AssertionError("measured Jacobian norm above the certified bound along "
                                 + " -> ".join(res.path))
    floor_value = floor.value if floor is not None else None
    if floor_value is not None and log10_upper is not None and floor_value > 0:
        # every rule of the walk sees a replaced activation through its slope range only, so the
        # replaced network is covered by the same certificate
        if math.log10(floor_value) > log10_upper + 1e-6:
            raise AssertionError("a slope-replaced network's Jacobian norm is above the certified bound along "
                                 + " -> ".join(res.path))
    blocks = [dict(b) for b in res.blocks]
    for b in blocks:
        own = (floor.blocks or {}).get((b["entry"], b["exit"])) if floor is not None else None
        if own is None:
            continue
        if own > b["upper"] * (1 + 1e-6):
            raise AssertionError(f"a slope-replaced block's Jacobian norm is above its certified bound: "
                                 f"{b['entry']} -> {b['exit']}")
        b["floor"] = own
    note = "" if lower is None else (f"{lower.starts} starts, {lower.steps} steps from {lower.start_from}"
                                     + (f"; {lower.note}" if lower.note else ""))
    return GraphBound(
        log10_upper=log10_upper, certified=certified, lipschitz_lower=lower_value,
        uncovered=tuple(res.uncovered), nodes=nodes, dominant_path=tuple(res.path), chain_log10=res.chain_log10,
        assumptions=assumptions, layers=layers, partial=tuple(res.partial), bound_seconds=res.seconds,
        lower_seconds=lower.seconds if lower is not None else None,
        lower_note=note if lower is not None else "not measured", blocks=tuple(blocks),
        lower_detail={} if lower is None else {
            "work": lower.work, "budget": lower.budget, "seed": lower.seed, "starts": lower.starts,
            "steps": lower.steps, "best_start": lower.best_start, "best_scale": lower.best_scale},
        slope_floor=floor_value, floor_detail={} if floor is None else floor.to_dict(),
    )


def verify_shapes(loaded: Loaded) -> list[str]:
    """Names of nodes whose declared output shapes could not be checked; a declared shape that the
    ops do not produce makes the archive malformed."""
    arch, graph = loaded.archive, loaded.graph

    def meta(name: str) -> torch.Tensor:
        p = arch.weights[graph.params[name]] if name in graph.params else arch.constants[graph.constants[name]]
        return torch.empty(p.shape, dtype=torch.float64 if p.dtype.is_floating_point else p.dtype, device="meta")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mismatched, unverified = check_shapes(graph, meta, loaded.limits)
    if mismatched:
        raise MalformedInputError(
            f"{arch.shown}: the graph declares shapes its ops do not produce (first: {visible(mismatched[0], 80)!r})",
            arch.shown,
        )
    return unverified


def bound_loaded(loaded: Loaded, settings: GraphSettings, factors: dict[str, float] | None = None,
                 norms: dict[tuple[Any, ...], Any] | None = None,
                 norm: Callable[[LinearOp], Interval] | None = None,
                 unverified: list[str] | None = None, blocks: dict[Any, Any] | None = None) -> Result:
    """The graph bound after the shape check; nodes whose shapes could not be checked are uncovered.
    `unverified` is the shape check's answer when the caller already has it (it runs the ops once);
    `blocks` keeps the blocks found between walks over the same loaded graph."""
    from lipaudit.pool import single_threaded

    if unverified is None:
        unverified = verify_shapes(loaded)
    with single_threaded():  # composite kernels are convolutions of kernels: the same bits anywhere
        res = bound_graph(loaded.graph, loaded.evaluator(), settings.rtol, settings.conv_rtol, settings.seed,
                          factors, norms, norm, block_work=settings.block_work, found=blocks)
    covered = {n for n, _ in res.uncovered}
    for name in unverified:
        if name not in covered:
            res.uncovered.append((name, "its declared output shape could not be checked by running the op"))
            covered.add(name)
    return res


def lower_end(loaded: Loaded, settings: GraphSettings) -> Measured | None:
    """A measured lower end of the network's constant (None when not asked for)."""
    if not settings.measure:
        return None
    samples, _why = loaded.archive.sample_inputs()
    return measure(loaded.graph, loaded.evaluator(), samples, settings.measure_work, settings.seed, settings.limits)


def floor_end(loaded: Loaded, settings: GraphSettings, res: Result | None = None) -> Floor | None:
    """The slope floor and the floors of the blocks res used (None when not asked for: no
    measurement, or no floor work)."""
    if not settings.measure or settings.floor_work <= 0:
        return None
    samples, _why = loaded.archive.sample_inputs()
    return slope_floor(loaded.graph, loaded.evaluator(), samples, settings.floor_work, settings.seed,
                       settings.limits, blocks=list(res.blocks) if res is not None else None)


def measured_ends(loaded: Loaded, settings: GraphSettings, res: Result | None) -> tuple[Measured | None,
                                                                                      Floor | None]:
    """The measured lower end and the slope floor, on a fixed number of torch threads (pool.fixed_threads):
    the thread count decides the order of float sums in convolutions, and the searches follow them."""
    from lipaudit.pool import fixed_threads

    with fixed_threads():
        return lower_end(loaded, settings), floor_end(loaded, settings, res)


def _bound(loaded: Loaded, settings: GraphSettings) -> GraphBound:
    res = bound_loaded(loaded, settings)
    return summarise(res, *measured_ends(loaded, settings, res))


def inspect_archive(path: str, settings: GraphSettings | None = None) -> GraphBound:
    """Bound the network of a .pt2 archive over its graph, and measure a lower end."""
    settings = settings or GraphSettings()
    return _bound(load_archive(path, settings.limits), settings)


# -- a state dict on an exported architecture ----------------------------------------------------

def match_state_dict(graph: Graph, archive: Pt2Archive, keys: list[str], shown: str) -> dict[str, str]:
    """graph parameter/buffer name -> state-dict key; a missing or extra key is an error naming them.
    Buffers the state dict does not hold (non-persistent ones) come from the archive."""
    from lipaudit.errors import UsageError
    from lipaudit.kinds import strip_prefixes

    by_name: dict[str, str] = {}
    for k in keys:
        s = strip_prefixes(k)
        if s in by_name:
            raise UsageError(f"{shown}: keys {visible(by_name[s], 80)!r} and {visible(k, 80)!r} collide after "
                             "prefix stripping", shown)
        by_name[s] = k
    wanted = set(graph.params.values())
    kinds = graph.param_kinds
    required = {w for w in wanted if kinds.get(w) == "parameter" or w in by_name}
    missing = sorted(w for w in wanted if kinds.get(w) == "parameter" and w not in by_name)
    buffers_missing = sorted(w for w in wanted if kinds.get(w) == "buffer" and w not in by_name)
    extra = sorted(s for s in by_name if s not in wanted)
    if missing or extra or any(not w.endswith("num_batches_tracked") for w in buffers_missing
                               if _persistent(archive, w)):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: " + ", ".join(visible(m, 60) for m in missing[:8]))
        pb = [w for w in buffers_missing if _persistent(archive, w) and not w.endswith("num_batches_tracked")]
        if pb:
            parts.append(f"missing buffers {len(pb)}: " + ", ".join(visible(m, 60) for m in pb[:8]))
        if extra:
            parts.append(f"extra {len(extra)}: " + ", ".join(visible(by_name[e], 60) for e in extra[:8]))
        raise UsageError(f"{shown}: the state dict does not match the graph {archive.shown} ({'; '.join(parts)})",
                         shown)
    return {w: by_name[w] for w in required}


def _persistent(archive: Pt2Archive, fqn: str) -> bool:
    for s in archive.program["graph_module"]["signature"].get("input_specs", []):
        b = s.get("buffer") if isinstance(s, dict) else None
        if isinstance(b, dict) and b.get("buffer_name") == fqn:
            return bool(b.get("persistent", True))
    return True


def inspect_state_dict(graph_path: str, keys: list[str], load: Callable[[str], torch.Tensor], shown: str,
                       settings: GraphSettings | None = None) -> GraphBound:
    """Bound a state dict's network on the architecture of graph_path: tensors are matched by name
    (after stripping module./_orig_mod.), shapes must agree, nothing is guessed."""
    settings = settings or GraphSettings()
    return _bound(on_state_dict(load_archive(graph_path, settings.limits), keys, load, shown), settings)


def on_state_dict(loaded: Loaded, keys: list[str], load: Callable[[str], torch.Tensor], shown: str) -> Loaded:
    """The graph with a state dict's tensors in place of the archive's (matched as match_state_dict says)."""
    from lipaudit.errors import UsageError

    mapping = match_state_dict(loaded.graph, loaded.archive, keys, shown)
    graph, arch = loaded.graph, loaded.archive

    def load_sd(name: str) -> torch.Tensor:
        if name in graph.params:
            fqn = graph.params[name]
            if fqn in mapping:
                t = load(mapping[fqn])
                want = arch.weights[fqn].shape
                if tuple(t.shape) != want:
                    raise UsageError(f"{shown}: {visible(mapping[fqn], 80)!r} has shape {tuple(t.shape)}, the graph "
                                     f"needs {want}", shown)
                return t
            return arch.weight(fqn)
        return arch.constant(graph.constants[name])

    # shapes are checked up front so a mismatch is an error, not an uncovered node
    for fqn in mapping:
        for name, f in graph.params.items():
            if f == fqn:
                load_sd(name)
                break
    return Loaded(arch, graph, load_sd, {fqn: key for fqn, key in mapping.items()}, loaded.limits)
