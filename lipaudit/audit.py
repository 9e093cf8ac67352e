"""Checkpoint -> Report. Never prints; progress goes through a callback."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lipaudit import __version__
from lipaudit.bound import Measuring, Strategy
from lipaudit.bound.chain import Chain
from lipaudit.checkpoint import Checkpoint
from lipaudit.errors import ResourceLimitError
from lipaudit.findings import finding
from lipaudit.kinds import Plan, plan_layers
from lipaudit.kinds.base import Context, LayerSpec, Measured
from lipaudit.pool import run_all, shape_cost
from lipaudit.report import CheckpointInfo, Finding, Layer, Network, Report, Skipped
from lipaudit.settings import Settings
from lipaudit.spectral import TIME_BUDGET

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Audit:
    """The report, and the plan it came from (normalize rescales from both, without measuring twice)."""

    report: Report
    plan: Plan


def _layer(spec: LayerSpec, m: Measured, time_s: float) -> Layer:
    p = spec.parametrization
    return Layer(
        tensor=spec.tensor, name=spec.name, kind=str(spec.kind.kind), shape=spec.shape, dtype=spec.dtype,
        sigma=m.sigma, reshape_sigma=m.reshape, in_network_bound=spec.covered,
        notes=tuple(dict.fromkeys((*spec.notes, *m.notes))), uses=spec.uses,
        parametrization=p.type if p is not None else None, time_s=time_s, at_input_size=m.at_input_size,
        label=spec.kind.describe(spec), grouping=m.grouping,
    )


# One measurement: a layer spec, where its tensors come from, and the settings it runs under.
Job = tuple[LayerSpec, Callable[[str], torch.Tensor], Settings]


def _measure(job: Job, path: str) -> tuple[Measured, float]:
    spec, load, settings = job
    t0 = time.perf_counter()
    try:
        m = spec.kind.measure(spec, Context(load, settings))
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise ResourceLimitError(f"{spec.name}: out of memory while measuring this layer ({type(e).__name__})",
                                 path) from None
    return m, time.perf_counter() - t0


def _measure_all(jobs: list[Job], path: str, settings: Settings,
                 progress: Progress | None) -> list[tuple[Measured, float]]:
    """Layers are independent: lipaudit.pool runs them, one torch thread per worker, dearest first."""
    total = len(jobs)
    seen = [0]

    def started(_: int, job: Job) -> None:
        if progress:
            progress(seen[0], total, job[0].name)
        seen[0] += 1

    workers = settings.jobs if settings.device == "cpu" else 1
    return run_all(jobs, lambda job: _measure(job, path), workers,
                   cost=lambda job: shape_cost(job[0].shape), started=started)


def measure_operators(by: Measuring, plan: Plan, settings: Settings, path: str,
                      progress: Progress | None = None) -> None:
    """A strategy's own operators alone, in the pool (normalize re-measures what it will write)."""
    operators = by.operators(plan, settings)
    done = _measure_all([(op.spec, op.load, op.settings) for op in operators], path, settings, progress)
    by.use({op.spec.tensor: m for op, (m, _) in zip(operators, done, strict=True)},
           frozenset(op.spec.tensor for op in operators if op.table is not None))


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _tie_key(spec: LayerSpec, ckpt: Checkpoint) -> tuple[object, ...] | None:
    """Layers whose weight is the very same stored tensor (tied weights) are measured once."""
    if spec.uses != (spec.tensor,):  # measured from several tensors (BatchNorm, parametrizations)
        return None
    ident = ckpt.storage_identity(spec.tensor)
    if ident is None:
        return None
    return (ident, str(spec.kind.kind))


def _gates(layers: list[Layer], specs: list[LayerSpec], net: Network, settings: Settings) -> list[Finding]:
    """A gate fails on a number above its threshold, and fails closed on a number that is not a proof
    (unless --allow-uncertified)."""
    out: list[Finding] = []
    if settings.fail_above is not None:
        up = net.upper
        if net.log10_upper is None:
            out.append(finding("LIP001", None, "network bound is unknown (see LIP004/LIP010); the gate fails closed"))
        elif up is None or up > settings.fail_above:
            shown = f"{up:.6g}" if up is not None else f"10^{net.log10_upper:.4g}"
            out.append(finding("LIP001", None, f"network Lipschitz bound {shown} is above {settings.fail_above:g}"))
        elif not net.certified and not settings.allow_uncertified:
            why = "; ".join(net.not_certified_because) or "see the findings"
            out.append(finding(
                "LIP017", None,
                f"--fail-above {settings.fail_above:g}: the network bound is not certified ({why}), so the gate "
                "cannot pass on it; pass --allow-uncertified to gate on it anyway",
            ))
    if settings.fail_layer_above is not None:
        for x, s in zip(layers, specs, strict=True):
            if not s.kind.gated or (x.sigma.method == "none" and not x.in_network_bound):
                continue
            if x.sigma.upper is None:
                out.append(finding("LIP002", x.tensor, f"{x.name}: norm unknown; the gate fails closed"))
            elif x.sigma.upper > settings.fail_layer_above:
                out.append(finding(
                    "LIP002", x.tensor,
                    f"{x.name}: norm upper bound {x.sigma.upper:.6g} is above {settings.fail_layer_above:g}",
                ))
            elif not x.sigma.certified and not settings.allow_uncertified:
                what = (TIME_BUDGET if any(n.startswith(TIME_BUDGET) for n in x.notes)
                        else "an estimate, not a proof")
                out.append(finding(
                    "LIP017", x.tensor,
                    f"--fail-layer-above: {x.name}'s upper end {x.sigma.upper:.6g} is {what}; "
                    "pass --allow-uncertified to gate on it anyway",
                ))
    return out


def _heatmaps(specs: list[LayerSpec], layers: list[Layer], ckpt: Checkpoint, settings: Settings) -> dict[str, object]:
    """Frequency responses of the convolutions with the largest upper ends, from the weight the
    model uses (a spectral-norm layer's formed weight, not its stored original)."""
    if not settings.heatmaps:
        return {}
    from lipaudit.formats.html import frequency_response
    from lipaudit.kinds.weights import formed

    convs = [(x.sigma.upper or 0.0, s) for s, x in zip(specs, layers, strict=True) if s.kind.convolution]
    out: dict[str, object] = {}
    for _, spec in sorted(convs, key=lambda t: -t[0])[: settings.heatmaps]:
        forms = formed(spec, Context(ckpt.load, settings))
        if not isinstance(forms, str) and bool(torch.isfinite(forms[0].weight).all()):
            out[spec.tensor] = frequency_response(forms[0].weight)
    return out


def run_audit(ckpt: Checkpoint, settings: Settings, progress: Progress | None = None,
              bound_by: Strategy | None = None) -> Audit:
    """Measure every layer, then bound the network with `bound_by` (default: the chain product)."""
    t0 = time.perf_counter()
    plan = plan_layers(ckpt.infos)
    first: dict[tuple[object, ...], int] = {}
    twin: dict[int, int] = {}  # layer index -> index of the tied layer measured for it
    for i, spec in enumerate(plan.layers):
        key = _tie_key(spec, ckpt)
        if key is not None:
            twin[i] = first.setdefault(key, i)
    by = bound_by or Chain()
    operators = by.operators(plan, settings) if isinstance(by, Measuring) else []
    reported = {op.table: n for n, op in enumerate(operators) if op.table is not None}
    todo = [i for i, spec in enumerate(plan.layers) if twin.get(i, i) == i and spec.tensor not in reported]
    jobs: list[Job] = [(plan.layers[i], ckpt.load, settings) for i in todo]
    jobs += [(op.spec, op.load, op.settings) for op in operators]
    done = _measure_all(jobs, ckpt.path, settings, progress)
    own = dict(zip(todo, done, strict=False))
    extra = done[len(todo):]
    if isinstance(by, Measuring):
        by.use({op.spec.tensor: m for op, (m, _) in zip(operators, extra, strict=True)},
               frozenset(op.spec.tensor for op in operators if op.table is not None))
    results: dict[int, tuple[Layer, list[Finding]]] = {}
    layers: list[Layer] = []
    findings: list[Finding] = []
    for i, spec in enumerate(plan.layers):
        j = twin.get(i, i)
        if j == i:
            if spec.tensor in reported:
                op = operators[reported[spec.tensor]]
                m, t = extra[reported[spec.tensor]]
                m = replace(m, notes=[*op.spec.notes, *m.notes],
                            findings=[replace(f, tensor=spec.tensor) for f in m.findings])
            else:
                m, t = own[i]
            results[i] = (_layer(spec, m, t), m.findings)
            layer, found = results[i]
        else:
            src = results[j][0]
            layer = replace(src, tensor=spec.tensor, name=spec.name, uses=spec.uses, in_network_bound=spec.covered,
                            notes=(*src.notes, f"tied to {src.tensor}: the same stored tensor, measured once"),
                            time_s=0.0)
            found = [replace(f, tensor=spec.tensor) for f in results[j][1]]
        layers.append(layer)
        findings.extend(found)
    if progress:
        progress(len(plan.layers), len(plan.layers), "")
    if any(x.grouping is not None and not x.grouping.get("known") for x in layers):
        findings.append(finding(
            "LIP018", None,
            "a convolution kernel's shape does not tell its grouping (groups=1 and grouped or depthwise layers "
            "store the same shapes): lower ends hold for every grouping, upper ends too; pin it with "
            "--groups NAME=N (or '*=1' when no layer is grouped) for tighter lower ends",
        ))
    bound = by.bound(layers, plan, settings)
    net = bound.network
    findings.extend(bound.findings)
    if ckpt.alternatives:
        alts = ", ".join(ckpt.alternatives)
        findings.append(finding("LIP008", None,
                                f"audited {ckpt.key!r}; the checkpoint also holds {alts} (choose with --key)"))
    findings.extend(finding(code, None, message) for code, message in ckpt.notes)
    findings.extend(_gates(layers, plan.layers, net, settings))
    findings = [f for f in findings if f.code not in settings.ignore]
    skipped = [Skipped(k, r) for k, r in plan.skipped] + [Skipped(x.path, x.reason) for x in ckpt.ignored]
    info = CheckpointInfo(
        path=ckpt.path, format=ckpt.format, sha256=ckpt.sha256, tensors=len(ckpt.infos),
        parameters=ckpt.parameters, key=ckpt.key, shards=tuple(ckpt.shards),
        files=tuple(ckpt.files),
    )
    report = Report(__version__, info, settings, tuple(layers), tuple(skipped), net, tuple(findings),
                    time.perf_counter() - t0, _peak_rss(), fail_on=str(settings.fail_on),
                    heatmaps=_heatmaps(plan.layers, layers, ckpt, settings))
    return Audit(report, plan)


def audit(ckpt: Checkpoint, settings: Settings, progress: Progress | None = None,
          bound_by: Strategy | None = None) -> Report:
    return run_audit(ckpt, settings, progress, bound_by).report
