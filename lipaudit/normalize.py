"""Rescale a checkpoint's covered layers so their certified norms are at most a target.

The guarantee is about what is written: each new tensor is computed in float64, cast to the
tensor's own dtype, measured again as cast, and shrunk further while rounding leaves it above
the target.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lipaudit import __version__
from lipaudit.audit import Progress, audit
from lipaudit.checkpoint import Checkpoint
from lipaudit.checkpoint.writer import Edits
from lipaudit.findings import RULES
from lipaudit.layers import LayerSpec, effective_weight, plan_layers, sn_matrix
from lipaudit.report import CheckpointInfo, Finding, Gated, Layer, Report, Settings
from lipaudit.spectral import to_float64
from lipaudit.spectral.conv import conv_bound
from lipaudit.spectral.dense import exact_norm, svd_norm

# Each retry shrinks by a little more than the rounding excess; bf16 needs a few.
_SHRINK_TRIES = 12


@dataclass(frozen=True)
class NormalizeSettings:
    target: float = 1.0
    mode: str = "divide"  # divide: every covered layer to target; clip: only those above it
    conv_norm: str = "operator"  # operator: certified S(K); reshape: what torch's spectral_norm uses
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bake: bool = False
    audit: Settings = field(default_factory=Settings)

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "mode": self.mode,
            "conv_norm": self.conv_norm,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "bake": self.bake,
            "audit": self.audit.to_dict(),
        }


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

    def to_dict(self) -> dict[str, object]:
        from lipaudit.report import finite

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


def _scaled(
    base: Change, reason: str, after: float, scale: float | None, certified: bool, written: tuple[str, ...]
) -> Change:
    return replace(base, action="scaled", reason=reason, after=after, scale=scale, certified=certified, written=written)


def _finding(code: str, tensor: str | None, message: str, severity: str | None = None) -> Finding:
    return Finding(code, severity or RULES[code].severity, tensor, message)


def _tolerance(spec: LayerSpec, conv_rtol: float, conv_norm: str) -> float:
    """How far below the target a layer may sit and still count as normalised (idempotence)."""
    dtype = getattr(torch, spec.dtype, torch.float32)
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    base = conv_rtol if spec.math == "conv" and conv_norm == "operator" else 1e-6
    return base + 4 * eps


def _matches(spec: LayerSpec, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (spec.name, spec.tensor, spec.module))


class _Layer:
    """Rescales one layer's stored tensors and measures the result as stored."""

    def __init__(self, spec: LayerSpec, layer: Layer, ckpt: Checkpoint, settings: NormalizeSettings) -> None:
        self.spec, self.layer, self.ckpt, self.s = spec, layer, ckpt, settings
        self.device = settings.audit.device
        self.baked_from: dict[str, str] = {}

    def load(self, key: str) -> torch.Tensor:
        return to_float64(self.ckpt.load(key), self.device)

    def measure_weight(self, w: torch.Tensor) -> tuple[float, bool]:
        """Upper end of the norm that is being normalised, and whether it is certified."""
        if self.spec.math == "conv":
            if self.s.conv_norm == "reshape":
                return svd_norm(w.reshape(w.shape[0], -1)), False
            return conv_bound(w, self.s.audit.conv_rtol).interval.upper, True
        return exact_norm(w.reshape(w.shape[0], -1)).upper, True

    def before(self) -> float | None:
        if self.spec.math == "conv" and self.s.conv_norm == "reshape":
            return self.layer.reshape_sigma
        return self.layer.sigma.upper

    def shrink(
        self,
        build: Callable[[float], dict[str, torch.Tensor]],
        measure: Callable[[dict[str, torch.Tensor]], tuple[float, bool]],
        scale: float,
    ) -> tuple[dict[str, torch.Tensor], float, float, bool]:
        """Cast build(scale) to the stored dtypes, measure it, and shrink while it is above the target."""
        target = self.s.target
        for attempt in range(_SHRINK_TRIES):
            values = build(scale)
            stored = {k: v.to(self.ckpt_dtype(k)) for k, v in values.items()}
            after, certified = measure({k: v.to(torch.float64) for k, v in stored.items()})
            if after <= target:
                return stored, after, scale, certified
            scale *= target / after * (1 - 1e-7 * 4**attempt)
        raise ArithmeticError(f"{self.spec.tensor}: rounding keeps the layer above the target")

    def ckpt_dtype(self, key: str) -> torch.dtype:
        """The dtype a key is stored in; a baked weight takes the dtype of what it replaces."""
        key = self.baked_from.get(key, key)
        for info in self.ckpt.infos:
            if info.key == key:
                return getattr(torch, info.dtype)  # type: ignore[no-any-return]
        return torch.float32

    def run(self) -> tuple[Change, dict[str, torch.Tensor], tuple[torch.Tensor, tuple[str, ...], str] | None]:
        """The change, new values by key, and a baked replacement (tensor, old keys, new key)."""
        spec, s = self.spec, self.s
        before = self.before()
        base = Change(
            spec.tensor, spec.name, spec.kind, "unchanged", "", before, before, None, self.layer.sigma.certified
        )

        def unchanged(reason: str) -> tuple[Change, dict[str, torch.Tensor], None]:
            return replace(base, reason=reason), {}, None

        def skipped(reason: str) -> tuple[Change, dict[str, torch.Tensor], None]:
            return replace(base, action="skipped", reason=reason, after=before), {}, None

        if not self.layer.in_network_bound:
            return unchanged(f"not covered by the network bound ({spec.kind})")
        if s.include and not _matches(spec, s.include):
            return unchanged("not matched by --include")
        if _matches(spec, s.exclude):
            return unchanged("matched by --exclude")
        if spec.math == "prelu":
            if before is not None and before > self.s.target:
                return skipped("PReLU slopes above the target are an activation, not a weight to rescale")
            return unchanged("PReLU slopes are an activation, not a weight to rescale")
        if before is None:
            return skipped("norm unknown (non-finite weights or unformable parametrization)")
        if before == 0.0:
            return unchanged("all-zero weight")
        target = s.target
        if before <= target and (
            s.mode == "clip" or before >= target * (1 - _tolerance(spec, s.audit.conv_rtol, s.conv_norm))
        ):
            return unchanged("already at or under the target" if s.mode == "clip" else "already at the target")
        scale = target / before
        p = spec.parametrization
        if p is not None and p.type == "spectral_norm":
            return self.spectral_norm(base, scale)
        if spec.math == "diag":
            return self.batchnorm(base, scale)
        if p is not None and p.type == "weight_norm":
            assert p.g is not None
            g, v = self.load(p.g), self.load(p.original)

            def build_g(c: float) -> dict[str, torch.Tensor]:
                return {p.g: g * c}  # type: ignore[dict-item]

            def measure_g(vals: dict[str, torch.Tensor]) -> tuple[float, bool]:
                eff = effective_weight(
                    spec, lambda k: vals[k] if k in vals else (v if k == p.original else self.load(k))
                )
                assert eff.weight is not None
                return self.measure_weight(eff.weight)

            stored, after, scale, cert = self.shrink(build_g, measure_g, scale)
            return (
                _scaled(
                    base,
                    "g scaled",
                    after,
                    scale,
                    cert,
                    tuple(stored),
                ),
                stored,
                None,
            )
        w = self.load(spec.tensor)
        stored, after, scale, cert = self.shrink(
            lambda c: {spec.tensor: w * c}, lambda vals: self.measure_weight(vals[spec.tensor]), scale
        )
        return (
            _scaled(
                base,
                "weight scaled",
                after,
                scale,
                cert,
                (spec.tensor,),
            ),
            stored,
            None,
        )

    def batchnorm(self, base: Change, scale: float) -> tuple[Change, dict[str, torch.Tensor], None]:
        spec = self.spec
        if spec.running_var is None or spec.tensor == spec.running_var:
            return (
                replace(base, action="skipped", reason="BatchNorm without an affine weight: nothing to scale"),
                {},
                None,
            )
        gamma, var = self.load(spec.tensor), self.load(spec.running_var)
        denom = (var + self.s.audit.bn_eps).sqrt()

        def measure(vals: dict[str, torch.Tensor]) -> tuple[float, bool]:
            return float((vals[spec.tensor].abs() / denom).max()), True

        stored, after, scale, cert = self.shrink(lambda c: {spec.tensor: gamma * c}, measure, scale)
        return (
            _scaled(
                base,
                "gamma scaled",
                after,
                scale,
                cert,
                (spec.tensor,),
            ),
            stored,
            None,
        )

    def spectral_norm(
        self, base: Change, scale: float
    ) -> tuple[Change, dict[str, torch.Tensor], tuple[torch.Tensor, tuple[str, ...], str] | None]:
        spec, p = self.spec, self.spec.parametrization
        assert p is not None and p.u is not None
        eff = effective_weight(spec, self.load)
        assert eff.weight is not None and eff.sn_dim is not None
        if self.s.bake:
            w = eff.weight
            new_key = f"{spec.module}.weight" if spec.module else "weight"
            self.baked_from[new_key] = p.original
            stored, after, scale, cert = self.shrink(
                lambda c: {new_key: w * c}, lambda vals: self.measure_weight(vals[new_key]), scale
            )
            value = stored[new_key]
            return (
                _scaled(
                    base,
                    f"baked into a plain {new_key}",
                    after,
                    scale,
                    cert,
                    (new_key,),
                ),
                {},
                (value, spec.uses, new_key),
            )
        if spec.math == "conv" and self.s.conv_norm == "operator":
            return (
                replace(
                    base,
                    action="skipped",
                    reason=(
                        "spectral_norm normalises the reshaped kernel, so the operator norm of this "
                        "convolution cannot be set through u, v; use --bake to write a plain weight"
                    ),
                ),
                {},
                None,
            )
        if abs(self.s.target - 1.0) > 1e-12:
            return (
                replace(
                    base, action="skipped", reason=("spectral_norm fixes the norm at 1; use --bake for another target")
                ),
                {},
                None,
            )
        # Set u, v to the top singular pair: the effective matrix then has norm exactly 1.
        u_key, v_key = p.u, p.v
        orig = self.load(p.original)
        mat = sn_matrix(orig, eff.sn_dim)
        uu, _, vh = torch.linalg.svd(mat, full_matrices=False)
        u0, v0 = uu[:, 0], vh[0]

        def build(c: float) -> dict[str, torch.Tensor]:
            # u grows by 1/c: u^T W v grows, the effective weight shrinks below 1 when rounding needs it
            out = {u_key: u0 / c}
            if v_key is not None:
                out[v_key] = v0
            return out

        def measure(vals: dict[str, torch.Tensor]) -> tuple[float, bool]:
            e = effective_weight(spec, lambda k: vals[k] if k in vals else self.load(k))
            assert e.weight is not None
            if spec.math == "conv":
                return svd_norm(sn_matrix(e.weight, eff.sn_dim or 0)), False
            return self.measure_weight(e.weight)

        stored, after, _, cert = self.shrink(build, measure, 1.0)
        return (
            _scaled(
                base,
                "u, v set to the top singular vectors",
                after,
                after / base.before if base.before else None,
                cert,
                tuple(stored),
            ),
            stored,
            None,
        )


def normalize(
    ckpt: Checkpoint, settings: NormalizeSettings, progress: Progress | None = None
) -> tuple[NormalizeReport, Edits]:
    """Plan and compute the rescaled tensors; writing is the caller's (see checkpoint.writer)."""
    report: Report = audit(ckpt, settings.audit, progress)
    specs = plan_layers(ckpt.infos, settings.audit.bn_eps)
    edits = Edits(metadata={"lipaudit": _metadata(settings)})
    changes: list[Change] = []
    findings: list[Finding] = []
    written_storage: dict[tuple[int, int], str] = {}
    for spec, layer in zip(specs.layers, report.layers, strict=True):
        try:
            change, values, baked = _Layer(spec, layer, ckpt, settings).run()
        except ArithmeticError as e:
            b = layer.sigma.upper
            change, values, baked = (
                Change(spec.tensor, spec.name, spec.kind, "skipped", str(e), b, b, None, False),
                {},
                None,
            )
        for key, value in values.items():
            ident = _storage(ckpt, key)
            if ident is not None and ident in written_storage:
                findings.append(
                    _finding("LIP014", key, f"{key} shares its storage with {written_storage[ident]}: scaled once")
                )
                continue
            if ident is not None:
                written_storage[ident] = key
            edits.values[key] = value
        if baked is not None:
            value, olds, new_key = baked
            edits.replaced[new_key] = (value, olds)
        if change.action == "skipped" and layer.in_network_bound:
            findings.append(_finding("LIP012", change.tensor, f"{change.name}: not normalised: {change.reason}"))
        changes.append(change)
    if settings.conv_norm == "reshape" and any(c.action == "scaled" and c.kind.startswith("conv") for c in changes):
        findings.append(
            _finding(
                "LIP013",
                None,
                "convolutions were scaled by their reshaped-kernel norm, as "
                "torch.nn.utils.spectral_norm does: their operator norms stay above the target "
                "and the result is not certified",
            )
        )
    covered = [c for c, x in zip(changes, report.layers, strict=True) if x.in_network_bound]

    def log10(values: list[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        if any(v == 0 for v in values):
            return -math.inf
        return math.fsum(math.log10(v) for v in values if v is not None)

    after_values: list[float | None] = []
    for c, x in zip(changes, report.layers, strict=True):
        if not x.in_network_bound:
            continue
        if c.action == "scaled" and not (x.kind.startswith("conv") and settings.conv_norm == "reshape"):
            after_values.append(c.after)
        elif c.action == "scaled":  # reshape-normalised conv: its operator bound scales with the weight
            after_values.append(None if x.sigma.upper is None or c.scale is None else x.sigma.upper * c.scale)
        else:
            after_values.append(x.sigma.upper)
    certified = report.network.certified and settings.conv_norm == "operator" and all(c.certified for c in covered)
    return NormalizeReport(
        __version__,
        report.checkpoint,
        None,
        False,
        settings,
        tuple(changes),
        report.network.log10_upper,
        log10(after_values),
        certified,
        tuple(findings),
    ), edits


def _storage(ckpt: Checkpoint, key: str) -> tuple[int, int] | None:
    if ckpt.root is None or key not in ckpt.slots:
        return None
    container, ck = ckpt.slots[key]
    t = container[ck]
    return (t.untyped_storage().data_ptr(), t.storage_offset())


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
    from lipaudit.checkpoint.sniff import SHARDED
    from lipaudit.checkpoint.writer import commit_all, transaction, verify, write_checkpoint
    from lipaudit.errors import OutputError
    from lipaudit.text import visible

    made = False
    if ckpt.format == SHARDED and not target.exists():  # a sharded checkpoint goes into a folder
        try:
            target.mkdir()
            made = True
        except OSError as e:
            raise OutputError(f"{visible(str(target))}: cannot create the folder ({e.strerror})") from None
    try:
        with transaction() as staged:
            staged.extend(write_checkpoint(ckpt, edits, target))
            verify(ckpt, edits, staged)
            commit_all(staged)
    except BaseException:
        if made:
            target.rmdir()
        raise
