"""Rescale the weights of a .pt2 archive: only weight bytes change, every other member stays as it was."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint import writer
from lipaudit.checkpoint.pt2 import open_pt2, patched_archive, weight_edits, write_to
from lipaudit.errors import OutputError, UsageError
from lipaudit.graph import GraphBound, GraphSettings, Loaded, bound_loaded, load_archive, summarise
from lipaudit.graph.bound import INPUT, Result, bound_graph
from lipaudit.spectral import Interval
from lipaudit.text import visible

_SCALABLE = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
# written weights are rounded to their dtype; aim this much below a network target
_HEADROOM = 1e-5


@dataclass(frozen=True)
class Change:
    param: str
    before: float  # the layer's own certified upper end
    factor: float

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "upper_before": self.before, "factor": self.factor,
                "upper_after": self.before * self.factor}


@dataclass(frozen=True)
class NormalizeResult:
    changes: tuple[Change, ...]
    before: GraphBound
    after: GraphBound | None  # re-audited from the written file (None on a dry run)
    written: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [c.to_dict() for c in self.changes],
            "network_before": self.before.to_dict(),
            "network_after": self.after.to_dict() if self.after is not None else None,
            "written": self.written,
        }


def _scalable(res: Result, loaded: Loaded) -> dict[str, float]:
    """Weights of conv and linear layers -> their own certified upper end (first use of each)."""
    out: dict[str, float] = {}
    for rec in res.layers:
        if rec.op in _SCALABLE and len(rec.params) == 1:
            fqn = rec.params[0]
            p = loaded.archive.weights.get(fqn)
            if p is None or p.use_pickle or not p.dtype.is_floating_point:
                continue
            out[fqn] = max(out.get(fqn, 0.0), rec.interval.upper)
    return out


def plan_layers(res: Result, loaded: Loaded, target: float, mode: str) -> dict[str, float]:
    factors: dict[str, float] = {}
    for fqn, upper in _scalable(res, loaded).items():
        if upper <= 0 or not math.isfinite(upper):
            continue
        if mode == "clip" and upper <= target:
            continue
        factors[fqn] = target / upper
    return factors


def plan_network(res: Result, loaded: Loaded, settings: GraphSettings, target: float,
                 norms: dict[tuple[Any, ...], Interval]) -> dict[str, float]:
    """One common factor c for every covered conv/linear weight, the largest with bound(c) <= target
    (the bound grows with c; found by bisection on log c with the norms reused)."""
    if res.uncovered or INPUT not in res.outputs or any(k != INPUT for k in res.outputs):
        names = ", ".join(visible(n, 40) for n, _ in res.uncovered[:4])
        raise UsageError(f"{loaded.archive.shown}: the network bound is not certified (uncovered: {names}); "
                         "--network-target needs a certified graph bound", loaded.archive.shown)
    weights = list(_scalable(res, loaded))
    if not weights:
        raise UsageError(f"{loaded.archive.shown}: no conv or linear weights to rescale", loaded.archive.shown)
    goal = math.log10(target) + math.log10(1 - _HEADROOM)

    def bound_at(log_c: float) -> float:
        f = {w: 10.0**log_c for w in weights}
        r = bound_graph(loaded.graph, loaded.evaluator(), settings.rtol, settings.conv_rtol, settings.seed, f, norms)
        return r.outputs.get(INPUT, math.inf)

    now = res.outputs[INPUT]
    # with every weight scaled by c, the bound moves by at most c^(number of weight layers on a path)
    lo, hi = min(0.0, (goal - now)), max(0.0, (goal - now))
    lo_val = bound_at(lo)
    steps = 0
    while lo_val > goal:
        lo -= max(1.0, hi - lo)
        lo_val = bound_at(lo)
        steps += 1
        if steps > 40:
            raise UsageError(f"{loaded.archive.shown}: the bound cannot reach {target:g} by scaling the layers "
                             "(a path without weights, such as an identity skip, already exceeds it)",
                             loaded.archive.shown)
    if bound_at(hi) <= goal:
        lo = hi
    else:
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if bound_at(mid) <= goal:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-9:
                break
    return {w: 10.0**lo for w in weights}


def normalize_archive(path: str, output: str | None, target: float = 1.0, mode: str = "divide",
                      network_target: float | None = None, settings: GraphSettings | None = None,
                      in_place: bool = False, dry_run: bool = False) -> NormalizeResult:
    """Per-layer rescaling to target (mode divide or clip), or, with network_target, one factor for
    all conv/linear weights so that the certified graph bound is at most network_target."""
    settings = settings or GraphSettings(measure=False)
    src = Path(path)
    if output is None and not in_place and not dry_run:
        raise UsageError("normalize needs -o OUT (or --in-place)")
    dst = src if in_place or output is None else Path(output)
    if not dry_run and not in_place and dst.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"{visible(str(dst))}: the output is the input; pass --in-place to overwrite it")
    if mode not in ("divide", "clip"):
        raise UsageError(f"unknown mode {mode!r}")
    if not (target > 0 and math.isfinite(target)) or (network_target is not None and not (
            network_target > 0 and math.isfinite(network_target))):
        raise UsageError("targets must be positive and finite")
    loaded = load_archive(path, settings.limits)
    norms: dict[tuple[Any, ...], Interval] = {}
    res = bound_loaded(loaded, settings, None, norms)
    before = summarise(res, None)
    if network_target is not None:
        factors = plan_network(res, loaded, settings, network_target, norms)
    else:
        factors = plan_layers(res, loaded, target, mode)
    owns = _scalable(res, loaded)
    changes = tuple(Change(f, owns[f], c) for f, c in factors.items())
    if dry_run:
        return NormalizeResult(changes, before, None, None)
    arch = loaded.archive

    def rounded(fs: dict[str, float]) -> dict[str, torch.Tensor]:
        out = {f: (arch.weight(f).to(torch.float64) * c).to(arch.weights[f].dtype) for f, c in fs.items()}
        for f, v in out.items():
            if not bool(torch.isfinite(v).all()):
                raise OutputError(f"{arch.shown}: rescaling {visible(f, 80)!r} overflows its dtype; nothing "
                                  "written", arch.shown)
        return out

    values = rounded(factors)
    if network_target is not None:
        # the weights as written are rounded to their dtype: audit those, and shrink until they fit
        for _ in range(8):
            got = _bound_with(loaded, values, settings)
            if got <= math.log10(network_target):
                break
            shrink = 10.0 ** (math.log10(network_target) - got) * (1 - 4 * _HEADROOM)
            factors = {f: c * shrink for f, c in factors.items()}
            values = rounded(factors)
        changes = tuple(Change(f, owns[f], c) for f, c in factors.items())
    data = patched_archive(arch, weight_edits(arch, values))
    writer.check_target(dst)
    with writer.transaction() as staged:
        s = writer.stage(dst, write_to(data))
        staged.append(s)
        after = _verify(Path(s.readable_path), arch.shown, loaded, values, settings, network_target)
        writer.commit_all(staged)
    return NormalizeResult(changes, before, after, str(dst))


def _bound_with(loaded: Loaded, values: dict[str, torch.Tensor], settings: GraphSettings) -> float:
    """log10 of the graph bound with some weights replaced."""
    by_name = {name: values[fqn] for name, fqn in loaded.graph.params.items() if fqn in values}

    def load(name: str) -> torch.Tensor:
        return by_name[name] if name in by_name else loaded.load(name)

    res = bound_graph(loaded.graph, Loaded(loaded.archive, loaded.graph, load).evaluator(), settings.rtol,
                      settings.conv_rtol, settings.seed)
    return res.outputs.get(INPUT, math.inf) + math.log10(1 + 1e-9)


def _verify(path: Path, shown: str, loaded: Loaded, values: dict[str, torch.Tensor], settings: GraphSettings,
            network_target: float | None) -> GraphBound:
    """Read the staged file back: same members, untouched ones byte-identical, weights as intended,
    and (with a network target) the re-audited bound at most the target."""

    def fail(why: str) -> OutputError:
        return OutputError(f"{shown}: the written archive does not read back as intended ({why})", shown)

    new = open_pt2(path, settings.limits)
    old = loaded.archive
    if list(new.members) != list(old.members):
        raise fail("members differ")
    changed = {old.weight_member(f) for f in values}
    for name in old.members:
        if name not in changed and new.read_member(name) != old.read_member(name):
            raise fail(f"member {visible(name, 80)} changed")
    for f, v in values.items():
        if not torch.equal(new.weight(f), v):
            raise fail(f"weight {visible(f, 80)}")
    reread = load_archive(str(path), settings.limits)
    res = bound_loaded(reread, settings)
    after = summarise(res, None)
    if network_target is not None and (after.log10_upper is None
                                       or after.log10_upper > math.log10(network_target)):
        raise fail("the re-audited network bound exceeds the target")
    return after
