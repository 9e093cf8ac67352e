"""Rescale a checkpoint so that certified norms are at most a target: one policy per layer
(`--target`), or one for the whole network (`--network-target`, over a graph).

The guarantee is about what is written: each new tensor is computed in float64, cast to the
tensor's own dtype, measured again as cast, and shrunk further while rounding leaves it above
the target. Layers are measured once, by the audit; each kind says how it is rescaled. Both
policies write through the checkpoint format registry and report in one schema.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lipaudit import __version__
from lipaudit.audit import Progress, measure_operators, run_audit
from lipaudit.bound import Strategy, log10_product
from lipaudit.checkpoint import Checkpoint
from lipaudit.checkpoint.writer import Edits, Value
from lipaudit.findings import finding
from lipaudit.kinds.base import Context, LayerSpec, RescaleOptions, Rescaling
from lipaudit.report import CheckpointInfo, Finding, Gated, Layer, finite
from lipaudit.settings import NormalizeSettings
from lipaudit.types import ConvNorm, Mode

if TYPE_CHECKING:
    from lipaudit.bound.graph import GraphStrategy

__all__ = ["Change", "NormalizeReport", "NormalizeSettings", "normalize"]

# Each retry shrinks by a little more than the rounding excess; bf16 needs a few.
_SHRINK_TRIES = 12


@dataclass(frozen=True)
class Change:
    """What happened to one layer."""

    tensor: str
    name: str
    kind: str
    action: str  # scaled, unchanged or skipped
    reason: str
    before: float | None
    after: float | None
    scale: float | None
    certified: bool
    written: tuple[str, ...] = ()

    @property
    def raised(self) -> bool:
        """Divide mode raised this layer up to the target."""
        return self.action == "scaled" and self.scale is not None and self.scale > 1

    def to_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "name": self.name,
            "kind": self.kind,
            "action": self.action,
            "reason": self.reason,
            "before": finite(self.before),
            "after": finite(self.after),
            "scale": finite(self.scale),
            "certified": self.certified,
            "written": list(self.written),
        }


@dataclass(frozen=True)
class NormalizeReport(Gated):
    tool_version: str
    checkpoint: CheckpointInfo
    output: str | None
    written: bool
    settings: NormalizeSettings
    changes: tuple[Change, ...]
    log10_before: float | None
    log10_after: float | None
    certified: bool
    findings: tuple[Finding, ...]
    fail_on: str = "error"
    method: str = "chain"  # how the network bounds were computed: chain or graph

    def to_dict(self) -> dict[str, object]:
        from lipaudit.report import SCHEMA_VERSION, bound_dict

        return {
            "schema_version": SCHEMA_VERSION,
            "command": "normalize",
            "tool": {"name": "lipaudit", "version": self.tool_version},
            "checkpoint": self.checkpoint.to_dict(),
            "output": {"path": self.output, "written": self.written},
            "settings": self.settings.to_dict(),
            "layers": [c.to_dict() for c in self.changes],
            "network": {
                "before": bound_dict(self.log10_before),
                "after": bound_dict(self.log10_after),
                "certified": self.certified,
                "method": self.method,
                "target": self.settings.network_target,
            },
            "findings": [f.to_dict() for f in self.findings],
            "passed": self.passed,
            "error": None,
        }


def _tolerance(spec: LayerSpec, settings: NormalizeSettings) -> float:
    """How far below the target a layer may sit and still count as normalised (idempotence)."""
    dtype = getattr(torch, spec.dtype, torch.float32)
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    conv = spec.kind.convolution and settings.conv_norm == ConvNorm.OPERATOR
    return (settings.audit.conv_rtol if conv else 1e-6) + 4 * eps


def _matches(spec: LayerSpec, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (spec.name, spec.tensor, spec.module))


@dataclass(frozen=True)
class _Outcome:
    change: Change
    values: dict[str, Value]
    baked: tuple[torch.Tensor, tuple[str, ...], str] | None = None  # (tensor, old keys, new key)


def _shrink(
    r: Rescaling, scale: float, target: float, dtype_of: Callable[[str], torch.dtype]
) -> tuple[dict[str, torch.Tensor], float, float, bool]:
    """Cast build(scale) to the stored dtypes, measure it, and shrink while it is above the target."""
    for attempt in range(_SHRINK_TRIES):
        stored = {k: v.to(dtype_of(k)) for k, v in r.build(scale).items()}
        after, certified = r.measure({k: v.to(torch.float64) for k, v in stored.items()})
        if after <= target:
            return stored, after, scale, certified and r.certified
        scale *= target / after * (1 - 1e-7 * 4**attempt)
    raise ArithmeticError("rounding keeps the layer above the target")


def _rescale(spec: LayerSpec, layer: Layer, ctx: Context, settings: NormalizeSettings,
             dtypes: dict[str, str]) -> _Outcome:
    reshape = settings.conv_norm == ConvNorm.RESHAPE and spec.kind.convolution
    before = layer.reshape_sigma if reshape else layer.sigma.upper
    base = Change(spec.tensor, spec.name, str(spec.kind.kind), "unchanged", "", before, before, None,
                  layer.sigma.certified)

    def unchanged(reason: str) -> _Outcome:
        return _Outcome(replace(base, reason=reason), {})

    def skipped(reason: str) -> _Outcome:
        return _Outcome(replace(base, action="skipped", reason=reason), {})

    if not spec.covered:
        return unchanged(f"not covered by the network bound ({spec.kind.kind})")
    if settings.include and not _matches(spec, settings.include):
        return unchanged("not matched by --include")
    if _matches(spec, settings.exclude):
        return unchanged("matched by --exclude")
    opts = RescaleOptions(settings.target, settings.bake, settings.conv_norm == ConvNorm.RESHAPE)
    r = spec.kind.rescale(spec, layer.sigma, ctx, opts)
    if isinstance(r, str):
        # The kinds that refuse for a reason that is not a failure (PReLU at or under the target).
        fine = before is not None and before <= settings.target
        return unchanged(r) if fine and spec.kind.per_channel else skipped(r)
    if before is None:
        return skipped("norm unknown (non-finite weights or unformable parametrization)")
    if before == 0.0:
        return unchanged("all-zero weight")
    target = settings.target
    if r.start is None and before <= target and (
        settings.mode == Mode.CLIP or before >= target * (1 - _tolerance(spec, settings))
    ):
        return unchanged("already at or under the target" if settings.mode == Mode.CLIP else "already at the target")
    if r.start is not None and settings.mode == Mode.CLIP and before <= target:
        return unchanged("already at or under the target")

    def dtype_of(key: str) -> torch.dtype:
        return getattr(torch, r.dtype_of.get(key) or dtypes.get(key, "float32"))  # type: ignore[no-any-return]

    try:
        stored, after, scale, cert = _shrink(r, r.start if r.start is not None else target / before, target, dtype_of)
    except ArithmeticError as e:
        return skipped(str(e))
    finally:
        if r.release is not None:
            r.release()
    change = replace(base, action="scaled", reason=r.reason, after=after, certified=cert,
                     scale=scale if r.start is None else (after / before if before else None),
                     written=tuple(stored))
    if r.baked is not None:
        new_key, olds = r.baked
        return _Outcome(change, {}, (stored[new_key], olds, new_key))
    values: dict[str, Value] = dict(stored)
    if r.rebuild is not None:  # recompute at write time: memory follows the largest tensor, not the file
        values = {k: _recompute(r.rebuild, scale, v.dtype) for k, v in stored.items()}
    return _Outcome(change, values)


def _recompute(
    rebuild: Callable[[float], torch.Tensor], scale: float, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    """The same float64 product and cast as was measured, so the bits written are the bits checked."""
    return lambda: rebuild(scale).to(dtype)


def normalize(
    ckpt: Checkpoint, settings: NormalizeSettings, output: Path | None = None, progress: Progress | None = None,
    bound_by: Strategy | None = None,
) -> NormalizeReport:
    """Audit once, rescale what the settings ask, and write to output (None: a dry run).

    Nothing is written when a covered layer could not be brought to the target, unless
    settings.partial; what was written is part of the returned report. With
    settings.network_target the graph strategy `bound_by` is required (network policy)."""
    if settings.network_target is not None:
        from lipaudit.bound.graph import GraphStrategy

        if not isinstance(bound_by, GraphStrategy):
            from lipaudit.errors import UsageError

            raise UsageError(f"{ckpt.path}: --network-target needs the network's graph: a .pt2 archive, --graph "
                             "ARCH.pt2 or --model", ckpt.path)
        return _normalize_network(ckpt, settings, output, progress, bound_by)
    result = run_audit(ckpt, settings.audit, progress, bound_by)
    report = result.report
    ctx = Context(ckpt.load, settings.audit)
    dtypes = {i.key: i.dtype for i in ckpt.infos}
    edits = Edits(metadata={"lipaudit": _metadata(settings)})
    changes: list[Change] = []
    findings: list[Finding] = []
    written_storage: dict[object, str] = {}
    for spec, layer in zip(result.plan.layers, report.layers, strict=True):
        out = _rescale(spec, layer, ctx, settings, dtypes)
        for key, value in out.values.items():
            ident = ckpt.storage_identity(key)
            if ident is not None and ident in written_storage:
                findings.append(finding("LIP014", key, f"{key} shares its storage with {written_storage[ident]}: "
                                        "scaled once"))
                continue
            if ident is not None:
                written_storage[ident] = key
            edits.values[key] = value
        if out.baked is not None:
            value, olds, new_key = out.baked
            edits.replaced[new_key] = (value, olds)
        if out.change.action == "skipped" and layer.in_network_bound:
            findings.append(finding("LIP012", out.change.tensor, f"{out.change.name}: not normalised: "
                                    f"{out.change.reason}"))
        changes.append(out.change)
    reshape = settings.conv_norm == ConvNorm.RESHAPE
    convs = [spec.kind.convolution for spec in result.plan.layers]
    if reshape and any(c.action == "scaled" and conv for c, conv in zip(changes, convs, strict=True)):
        findings.append(finding(
            "LIP013", None,
            "convolutions were scaled by their reshaped-kernel norm, as torch.nn.utils.spectral_norm does: their "
            "operator norms stay above the target and the result is not certified",
        ))
    raised = [c for c in changes if c.raised]
    if raised:
        findings.append(finding(
            "LIP020", None,
            f"divide mode raised {len(raised)} layers up to the target (largest factor "
            f"{max(c.scale or 1 for c in raised):.4g}); --mode clip only scales layers down",
        ))
    after_values: list[float | None] = []
    for c, x, conv in zip(changes, report.layers, convs, strict=True):
        if not x.in_network_bound:
            continue
        if c.action == "scaled" and not (conv and reshape):
            after_values.append(c.after)
        elif c.action == "scaled":  # a reshape-normalised conv: its operator bound scales with the weight
            after_values.append(None if x.sigma.upper is None or c.scale is None else x.sigma.upper * c.scale)
        else:
            after_values.append(x.sigma.upper)
    covered = [c for c, x in zip(changes, report.layers, strict=True) if x.in_network_bound]
    certified = report.network.certified and not reshape and all(c.certified for c in covered)
    failed = any(f.code == "LIP012" for f in findings)
    written = False
    if output is not None and failed and not settings.partial:
        findings.append(finding("LIP012", None, "nothing was written: a covered layer could not be brought to the "
                                "target (pass --partial to write the other layers anyway)"))
    elif output is not None:
        write_output(ckpt, edits, output)
        written = True
    findings = [f for f in findings if f.code not in settings.audit.ignore]
    return NormalizeReport(
        __version__, report.checkpoint, None if output is None else str(output), written, settings,
        tuple(changes), report.network.log10_upper, log10_product(after_values), certified,
        tuple(findings), fail_on=str(settings.audit.fail_on),
    )


def _metadata(settings: NormalizeSettings) -> str:
    import json

    return json.dumps(
        {
            "version": __version__,
            "target": settings.target,
            "mode": settings.mode,
            "conv_norm": settings.conv_norm,
            "conv_rtol": settings.audit.conv_rtol,
        },
        sort_keys=True,
    )


def write_output(ckpt: Checkpoint, edits: Edits, target: Path) -> None:
    """Stage, read back and check, then move into place; on any failure nothing changes."""
    ckpt.write(edits, target)


# --- the network policy -------------------------------------------------------------------------

_SCALABLE = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
# written weights are rounded to their dtype: aim this much below the network target
_HEADROOM = 1e-5
_NETWORK_TRIES = 6


def _normalize_network(ckpt: Checkpoint, settings: NormalizeSettings, output: Path | None,
                       progress: Progress | None, by: GraphStrategy) -> NormalizeReport:
    """One common factor c for every conv/linear weight the graph uses, the largest with the
    certified graph bound at most the target; the rounded weights are measured again, as they will
    be written, and nothing is written unless their certified bound is at most the target."""
    import math

    from lipaudit.errors import UsageError

    target = settings.network_target
    assert target is not None
    result = run_audit(ckpt, settings.audit, progress, by)
    report = result.report
    shown = ckpt.path
    if not report.network.certified or report.network.log10_upper is None or by.result is None:
        why = "; ".join(report.network.not_certified_because) or "see the findings"
        raise UsageError(f"{shown}: the network bound is not certified ({why}); --network-target needs a "
                         "certified graph bound", shown)
    dtypes = {i.key: i.dtype for i in ckpt.infos}
    params = {b.param: by.key_of(b.param) for b in by.result.layers.values()
              if b.kind in _SCALABLE and by.key_of(b.param) in dtypes
              and getattr(torch, dtypes[by.key_of(b.param)], None) in (torch.float16, torch.bfloat16, torch.float32,
                                                                         torch.float64)}
    if not params:
        raise UsageError(f"{shown}: no conv or linear weights to rescale", shown)
    goal = math.log10(target) + math.log10(1 - _HEADROOM)

    def bound_at(log_c: float) -> float:
        res = by.walk(settings.audit, {p: 10.0**log_c for p in params})
        return float(res.outputs.get("input", math.inf))

    now = report.network.log10_upper
    lo, hi = min(0.0, goal - now), max(0.0, goal - now)
    steps = 0
    while bound_at(lo) > goal:
        lo -= max(1.0, hi - lo)
        steps += 1
        if steps > 40:
            raise UsageError(f"{shown}: the bound cannot reach {target:g} by scaling the layers (a path without "
                             "weights, such as an identity skip, already exceeds it)", shown)
    if bound_at(hi) <= goal:
        lo = hi
    else:
        while hi - lo > 1e-9:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if bound_at(mid) <= goal else (lo, mid)
    scale = 10.0**lo
    keys = sorted(set(params.values()))
    after_log: float | None = None
    certified = False
    values: dict[str, torch.Tensor] = {}
    for attempt in range(_NETWORK_TRIES):
        values = {k: (ckpt.load(k).to(torch.float64) * scale).to(getattr(torch, dtypes[k])) for k in keys}
        if not all(bool(torch.isfinite(v).all()) for v in values.values()):
            raise UsageError(f"{shown}: rescaling overflows a weight's dtype", shown)
        again = by.with_weights(values, settings.audit)
        measure_operators(again, result.plan, settings.audit, shown)
        res = again.walk(settings.audit)
        after_log = None if res.uncovered or "input" not in res.outputs else res.outputs["input"] + math.log10(
            1 + 1e-9)
        certified = after_log is not None and res.certified_norms
        if after_log is not None and after_log <= math.log10(target):
            break
        if after_log is None or attempt == _NETWORK_TRIES - 1:
            break
        scale *= 10.0 ** (math.log10(target) - after_log) * (1 - 4 * _HEADROOM)
    rows = {x.tensor: x for x in report.layers}
    changes: list[Change] = []
    for spec, layer in zip(result.plan.layers, report.layers, strict=True):
        up = layer.sigma.upper
        if spec.tensor in values:
            changes.append(Change(spec.tensor, spec.name, str(spec.kind.kind), "scaled",
                                  "network target: one factor for every conv/linear weight of the graph", up,
                                  None if up is None else up * scale, scale, layer.sigma.certified,
                                  (spec.tensor,)))
        else:
            changes.append(Change(spec.tensor, spec.name, str(spec.kind.kind), "unchanged",
                                  "not a conv or linear weight of the graph", up, up, None, layer.sigma.certified))
    for k in keys:
        if k not in rows:  # a weight the graph uses that the table does not list
            changes.append(Change(k, k, "graph weight", "scaled", "network target", None, None, scale, certified,
                                  (k,)))
    findings: list[Finding] = []
    reached = certified and after_log is not None and after_log <= math.log10(target)
    written = False
    if not reached:
        findings.append(finding(
            "LIP026", None,
            f"--network-target {target:g}: the certified graph bound of the rescaled weights is "
            f"{'unknown' if after_log is None else f'{10.0 ** after_log:.6g}'}, above the target; nothing written",
        ))
    elif output is not None:
        edits = Edits(metadata={"lipaudit": _metadata(settings)})
        edits.values.update(values)
        write_output(ckpt, edits, output)
        written = True
    findings = [f for f in findings if f.code not in settings.audit.ignore]
    return NormalizeReport(
        __version__, report.checkpoint, None if output is None else str(output), written, settings,
        tuple(changes), report.network.log10_upper, after_log, certified, tuple(findings),
        fail_on=str(settings.audit.fail_on), method="graph",
    )
