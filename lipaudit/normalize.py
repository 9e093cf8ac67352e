"""Rescale a checkpoint's covered layers so their certified norms are at most a target.

The guarantee is about what is written: each new tensor is computed in float64, cast to the
tensor's own dtype, measured again as cast, and shrunk further while rounding leaves it above
the target. Layers are measured once, by the audit; each kind says how it is rescaled.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lipaudit import __version__
from lipaudit.audit import Progress, run_audit
from lipaudit.bound import log10_product
from lipaudit.checkpoint import Checkpoint
from lipaudit.checkpoint.writer import Edits, Value
from lipaudit.findings import finding
from lipaudit.kinds.base import Context, LayerSpec, RescaleOptions, Rescaling
from lipaudit.report import CheckpointInfo, Finding, Gated, Layer, finite
from lipaudit.settings import NormalizeSettings
from lipaudit.types import ConvNorm, Mode

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
            },
            "findings": [f.to_dict() for f in self.findings],
            "passed": self.passed,
            "error": None,
        }


def _tolerance(spec: LayerSpec, settings: NormalizeSettings) -> float:
    """How far below the target a layer may sit and still count as normalised (idempotence)."""
    dtype = getattr(torch, spec.dtype, torch.float32)
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    conv = spec.kind.kind.startswith("conv") and settings.conv_norm == ConvNorm.OPERATOR
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
    reshape = settings.conv_norm == ConvNorm.RESHAPE and spec.kind.kind.startswith("conv")
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
    ckpt: Checkpoint, settings: NormalizeSettings, output: Path | None = None, progress: Progress | None = None
) -> NormalizeReport:
    """Audit once, rescale what the settings ask, and write to output (None: a dry run).

    Nothing is written when a covered layer could not be brought to the target, unless
    settings.partial; what was written is part of the returned report."""
    result = run_audit(ckpt, settings.audit, progress)
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
    if reshape and any(c.action == "scaled" and c.kind.startswith("conv") for c in changes):
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
    for c, x in zip(changes, report.layers, strict=True):
        if not x.in_network_bound:
            continue
        if c.action == "scaled" and not (x.kind.startswith("conv") and reshape):
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
