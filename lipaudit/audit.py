"""Checkpoint -> Report. Never prints; progress goes through a callback."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from lipaudit import __version__
from lipaudit.checkpoint import Checkpoint
from lipaudit.findings import RULES
from lipaudit.layers import LayerSpec, effective_weight, plan_layers, sn_matrix
from lipaudit.report import (
    UNKNOWN,
    CheckpointInfo,
    Finding,
    Layer,
    Network,
    Report,
    Settings,
    Sigma,
    Skipped,
)
from lipaudit.spectral import Interval, exact, to_float64
from lipaudit.spectral.conv import conv_interval, grid_bound, zero_padded_lower
from lipaudit.spectral.dense import dense_interval, svd_norm

Progress = Callable[[int, int, str], None]

# Below this ratio the gap between the reshaped-kernel norm and the operator norm is noise.
RESHAPE_GAP = 1.05
# Width of the bracket for the norm at a given input size (a finite grid needs no interpolation).
GRID_RTOL = 1e-6
# spectral_norm's own target is 1; its stored u, v may lag the weights by this much.
SN_DRIFT = 1e-3


def _finding(code: str, tensor: str | None, message: str, severity: str | None = None) -> Finding:
    return Finding(code, severity or RULES[code].severity, tensor, message)


def _sigma(iv: Interval) -> Sigma:
    return Sigma(iv.lower, iv.upper, iv.method, iv.lower_method, iv.upper_method, iv.certified)


class _LayerAudit:
    """Measures one layer; collects its notes and findings."""

    def __init__(self, spec: LayerSpec, ckpt: Checkpoint, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.ckpt = ckpt
        self.notes: list[str] = list(spec.notes)
        self.findings: list[Finding] = []
        self.reshape: float | None = None
        self.sized: dict[str, object] | None = None

    def load(self, key: str) -> torch.Tensor:
        return to_float64(self.ckpt.load(key), self.settings.device)

    def nonfinite(self, what: str) -> Sigma:
        self.findings.append(_finding("LIP004", self.spec.tensor, f"{what} holds NaN or infinite values"))
        return UNKNOWN

    def run(self) -> Sigma:
        spec, s = self.spec, self.settings
        if spec.math == "none":
            return UNKNOWN
        if spec.math == "diag":
            return self.diagonal()
        eff = effective_weight(spec, self.load)
        self.notes.extend(eff.notes)
        w = eff.weight
        if w is None:
            self.findings.append(_finding("LIP010", spec.tensor, "; ".join(eff.notes)))
            return UNKNOWN
        if not bool(torch.isfinite(w).all()):
            return self.nonfinite("the weight")
        if spec.math == "prelu":
            return _sigma(exact(max(1.0, float(w.abs().max())), "max-slope"))
        if not bool(torch.any(w != 0)):
            self.findings.append(_finding("LIP007", spec.tensor, "all-zero weight: norm 0"))
        if spec.math == "conv":
            self.reshape = svd_norm(sn_matrix(w, eff.sn_dim or 0))
            iv = conv_interval(w, s.conv_rtol, self.reshape if not eff.sn_dim else None)
            iv = self.at_input_size(w, iv)
        else:
            iv = dense_interval(w.reshape(w.shape[0], -1), s.method, s.rtol, s.seed)
        self.check_spectral_norm(eff.sn_dim, iv)
        self.check_reshape_gap(iv)
        return _sigma(iv)

    def at_input_size(self, w: torch.Tensor, iv: Interval) -> Interval:
        """With a known input size: the circular norm exactly, and a bracket for zero padding."""
        spec = self.spec
        size = self.settings.input_size_for((spec.name, spec.tensor, spec.module), w.ndim - 2)
        if size is None:
            return iv
        circ = grid_bound(w, size, GRID_RTOL)
        padded = tuple(n + k - 1 for n, k in zip(size, w.shape[2:], strict=True))
        zero_up = grid_bound(w, padded, GRID_RTOL)
        zero_lo = min(zero_padded_lower(w, size, seed=self.settings.seed), zero_up.upper)
        self.sized = {
            "size": list(size),
            "circular": {"lower": circ.lower, "upper": circ.upper, "certified": True},
            "zero_padding": {"lower": zero_lo, "upper": zero_up.upper, "padding": "same", "stride": 1,
                             "certified": True},
        }
        self.notes.append(
            f"at input size {'x'.join(map(str, size))}: circular padding {circ.upper:.6g}; "
            f"zero 'same' padding, stride 1, in [{zero_lo:.6g}, {zero_up.upper:.6g}]"
        )
        # Every size's norm is at most S, so these raise the lower end of S too.
        best = max(iv.lower, circ.lower, zero_lo)
        if best > iv.lower:
            return Interval(min(best, iv.upper), iv.upper, "input-size", iv.upper_method, iv.certified)
        return iv

    def diagonal(self) -> Sigma:
        spec = self.spec
        assert spec.running_var is not None
        var = self.load(spec.running_var)
        gamma = self.load(spec.tensor) if spec.tensor != spec.running_var else torch.ones_like(var)
        if not bool(torch.isfinite(var).all() and torch.isfinite(gamma).all()):
            return self.nonfinite("gamma or running_var")
        denom = var + self.settings.bn_eps
        if bool((denom <= 0).any()):
            self.findings.append(_finding("LIP004", spec.tensor, "running_var + eps is not positive"))
            return UNKNOWN
        return _sigma(exact(float((gamma.abs() / denom.sqrt()).max()), "diagonal"))

    def check_spectral_norm(self, sn_dim: int | None, iv: Interval) -> None:
        p = self.spec.parametrization
        if p is None or p.type != "spectral_norm" or sn_dim is None:
            return
        matrix_norm = self.reshape if self.spec.math == "conv" else iv.lower
        if matrix_norm is not None and matrix_norm > 1 + SN_DRIFT:
            self.findings.append(_finding(
                "LIP005", self.spec.tensor,
                f"the stored u, v underestimate the weight's norm: the matrix spectral_norm "
                f"normalises has norm {matrix_norm:.6g}, not 1",
            ))

    def check_reshape_gap(self, iv: Interval) -> None:
        r = self.reshape
        if r is None or r <= 0 or iv.lower < RESHAPE_GAP * r:
            return
        p = self.spec.parametrization
        severity = "warning" if p is not None and p.type == "spectral_norm" else "info"
        self.findings.append(_finding(
            "LIP003", self.spec.tensor,
            f"operator norm is at least {iv.lower:.4g}, {iv.lower / r:.2f}x the reshaped-kernel norm "
            f"{r:.4g} that torch.nn.utils.spectral_norm divides by",
            severity,
        ))


def _assumptions(layers: list[Layer], settings: Settings) -> list[str]:
    kinds = {x.kind for x in layers if x.in_network_bound}
    out = [
        "chain: the covered layers are applied one after another; a residual block x + f(x) is "
        "bounded by 1 + L_f, and a state dict does not show residual connections",
        "activations are 1-Lipschitz (ReLU, LeakyReLU with slope <= 1, tanh, max pooling); "
        "sigmoid (1/4) only lowers the bound, GELU (~1.13) and SiLU (~1.10) raise it",
        "Euclidean (l2) norms on inputs and outputs; biases, average pooling and dropout do not raise the bound",
    ]
    if "batchnorm" in kinds:
        out.append(f"BatchNorm in eval mode (running statistics), eps = {settings.bn_eps:g}")
    if any(k.startswith("conv") for k in kinds):
        out.append(
            "convolutions: the bound S(K) holds for zero or circular padding, any stride, dilation and "
            "input size (reflect and replicate padding are not covered), bracketed to relative width "
            f"{settings.conv_rtol:g}; ConvTranspose kernels get the same bound; grouped kernels are read "
            "as ungrouped, which can only raise it"
        )
    if any(x.parametrization for x in layers):
        out.append(
            "parametrized weights (spectral_norm, weight_norm) are formed from the stored tensors as in eval mode"
        )
    out.append("certified upper ends carry a relative margin of 1e-10 for float64 rounding")
    missing = [x for x in layers if not x.in_network_bound]
    if missing:
        names = sorted({x.kind for x in missing})
        out.append(
            f"{len(missing)} layers ({', '.join(names)}) are not covered: the product bounds "
            "the covered layers only, not the whole network"
        )
    return out


def _network(layers: list[Layer], settings: Settings) -> Network:
    covered = [x for x in layers if x.in_network_bound]
    uppers = [x.sigma.upper for x in covered]
    log10: float | None
    if any(u is None for u in uppers):
        log10 = None
    elif any(u == 0 for u in uppers):
        log10 = -math.inf
    else:
        log10 = math.fsum(math.log10(u) for u in uppers if u is not None)
    not_covered = len(layers) - len(covered)
    certified = log10 is not None and not_covered == 0 and all(x.sigma.certified for x in covered)
    return Network(log10, certified, len(covered), not_covered, tuple(_assumptions(layers, settings)))


def _chain_break(layers: list[Layer]) -> Finding | None:
    """First covered layer whose input width cannot be the previous layer's output."""
    prev: Layer | None = None
    width: int | None = None  # output channels (spatial) or features of prev
    spatial = False
    for x in (y for y in layers if y.in_network_bound):
        shape = x.shape
        if x.kind == "linear":
            fits = width is None or (shape[1] % width == 0 if spatial else shape[1] == width)
            out, out_spatial = shape[0], False
        elif x.kind.startswith("conv"):
            if width is None or spatial:
                fits = width is None or width % shape[1] == 0 or width == shape[0]
                transposed = width is not None and width % shape[1] != 0
            else:
                fits = width % shape[1] == 0 or width % shape[0] == 0
                transposed = width % shape[1] != 0
            out, out_spatial = (shape[1] if transposed else shape[0]), True
        else:  # batchnorm, PReLU: per-channel maps
            fits = width is None or shape[0] in (1, width)
            out, out_spatial = (width if width is not None and shape[0] == 1 else shape[0]), spatial
        if not fits and prev is not None:
            return _finding(
                "LIP011", x.tensor,
                f"{x.name} takes {shape[1] if len(shape) > 1 else shape[0]} inputs per position but "
                f"{prev.name} before it gives {width}: the covered layers are not a simple chain "
                "(parallel heads or branches), so their product may not bound this network",
            )
        prev, width, spatial = x, out, out_spatial
    return None


def _gates(layers: list[Layer], net: Network, settings: Settings) -> list[Finding]:
    out: list[Finding] = []
    if settings.fail_above is not None:
        up = net.upper
        if net.log10_upper is None:
            out.append(_finding(
                "LIP001", None, "network bound is unknown (see LIP004/LIP010); the gate fails closed"
            ))
        elif up is None or up > settings.fail_above:
            shown = f"{up:.6g}" if up is not None else f"10^{net.log10_upper:.4g}"
            out.append(_finding("LIP001", None, f"network Lipschitz bound {shown} is above {settings.fail_above:g}"))
    if settings.fail_layer_above is not None:
        for x in layers:
            if x.kind in ("embedding", "norm") or (x.sigma.method == "none" and not x.in_network_bound):
                continue
            if x.sigma.upper is None:
                out.append(_finding("LIP002", x.tensor, f"{x.name}: norm unknown; the gate fails closed"))
            elif x.sigma.upper > settings.fail_layer_above:
                out.append(_finding(
                    "LIP002", x.tensor,
                    f"{x.name}: norm upper bound {x.sigma.upper:.6g} is above {settings.fail_layer_above:g}",
                ))
    return out


def _measure(spec: LayerSpec, ckpt: Checkpoint, settings: Settings) -> tuple[Layer, list[Finding]]:
    t0 = time.perf_counter()
    job = _LayerAudit(spec, ckpt, settings)
    sigma = job.run()
    layer = Layer(
        tensor=spec.tensor, name=spec.name, kind=spec.kind, shape=spec.shape, dtype=spec.dtype,
        sigma=sigma, reshape_sigma=job.reshape, in_network_bound=spec.covered,
        notes=tuple(job.notes), uses=spec.uses,
        parametrization=spec.parametrization.type if spec.parametrization else None,
        time_s=time.perf_counter() - t0, at_input_size=job.sized,
    )
    return layer, job.findings


def _measure_all(
    specs: list[LayerSpec], ckpt: Checkpoint, settings: Settings, progress: Progress | None
) -> list[tuple[Layer, list[Finding]]]:
    """Layers are independent: with several jobs each worker runs single-threaded LAPACK, which
    keeps both cores busy through the serial parts of the conv search (about 1.2x on 2 cores)."""
    total = len(specs)
    if settings.jobs <= 1 or total <= 1 or settings.device != "cpu":
        out = []
        for i, spec in enumerate(specs):
            if progress:
                progress(i, total, spec.name)
            out.append(_measure(spec, ckpt, settings))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
            futures = [pool.submit(_measure, spec, ckpt, settings) for spec in specs]
            for i, (spec, fut) in enumerate(zip(specs, futures, strict=True)):
                if progress:
                    progress(i, total, spec.name)
                fut.result()
            return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _tie_key(spec: LayerSpec, ckpt: Checkpoint) -> tuple[object, ...] | None:
    """Layers whose weight is the very same stored tensor (tied weights) are measured once."""
    if spec.parametrization is not None or spec.math not in ("dense", "conv"):
        return None
    if ckpt.format not in ("torch-zip", "torch-legacy"):  # safetensors cannot hold shared tensors
        return None
    t = ckpt.load(spec.tensor)
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, spec.kind)


def audit(ckpt: Checkpoint, settings: Settings, progress: Progress | None = None) -> Report:
    t0 = time.perf_counter()
    plan = plan_layers(ckpt.infos, settings.bn_eps)
    first: dict[tuple[object, ...], int] = {}
    twin: dict[int, int] = {}  # layer index -> index of the tied layer measured for it
    for i, spec in enumerate(plan.layers):
        key = _tie_key(spec, ckpt)
        if key is not None:
            twin[i] = first.setdefault(key, i)
    todo = [spec for i, spec in enumerate(plan.layers) if twin.get(i, i) == i]
    measured = iter(_measure_all(todo, ckpt, settings, progress))
    results: dict[int, tuple[Layer, list[Finding]]] = {}
    layers: list[Layer] = []
    findings: list[Finding] = []
    for i, spec in enumerate(plan.layers):
        j = twin.get(i, i)
        if j == i:
            results[i] = next(measured)
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
    net = _network(layers, settings)
    if net.layers_not_covered:
        findings.append(_finding(
            "LIP006", None,
            f"{net.layers_not_covered} layers are not covered by the network bound; it is not a bound "
            "on the whole network",
        ))
    if net.log10_upper is not None and not all(x.sigma.certified for x in layers if x.in_network_bound):
        findings.append(_finding("LIP009", None, "some factors of the network bound are estimates, not proofs"))
    chain = _chain_break(layers)
    if chain is not None:
        findings.append(chain)
    if ckpt.alternatives:
        alts = ", ".join(ckpt.alternatives)
        findings.append(_finding(
            "LIP008", None, f"audited {ckpt.key!r}; the checkpoint also holds {alts} (choose with --key)"
        ))
    findings.extend(_gates(layers, net, settings))
    skipped = [Skipped(k, r) for k, r in plan.skipped] + [Skipped(x.path, x.reason) for x in ckpt.ignored]
    info = CheckpointInfo(
        path=ckpt.path, format=ckpt.format, sha256=ckpt.sha256, tensors=len(ckpt.infos),
        parameters=ckpt.parameters, key=ckpt.key, shards=tuple(ckpt.shards),
    )
    return Report(__version__, info, settings, tuple(layers), tuple(skipped), net, tuple(findings),
                  time.perf_counter() - t0, _peak_rss())
