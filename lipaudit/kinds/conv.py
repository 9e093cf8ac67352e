"""Convolutions (1-D to 3-D, plain or transposed): the frequency-domain bound S(K)."""

from __future__ import annotations

import math
import re
import time
from typing import ClassVar

from lipaudit.findings import finding
from lipaudit.kinds.base import (
    Candidate,
    ChainHint,
    ChainIO,
    Context,
    Group,
    LayerKind,
    LayerSpec,
    Measured,
    RescaleOptions,
    Rescaling,
)
from lipaudit.kinds.parametrize import Formed, SpectralNorm, WeightNorm, sn_matrix
from lipaudit.kinds.rescale import plain_rescaling, spectral_norm_rescaling, weight_norm_rescaling
from lipaudit.kinds.weights import check_spectral_norm, measure_forms
from lipaudit.report import Sigma
from lipaudit.spectral import Interval
from lipaudit.spectral.dense import svd_norm
from lipaudit.text import visible
from lipaudit.types import Kind

# Below this ratio the gap between the reshaped-kernel norm and the operator norm is noise.
RESHAPE_GAP = 1.05
# Width of the bracket for the norm at a given input size (a finite grid needs no interpolation).
GRID_RTOL = 1e-6
_TRANSPOSED_NAME = re.compile(r"(transpose|deconv|convt|upconv|up_conv|upsampl)", re.IGNORECASE)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _groups(spec: LayerSpec, ctx: Context) -> int | None:
    """The groups the user pinned, 1 where the shape allows nothing else, else None (unknown)."""
    g = ctx.settings.groups_for((spec.name, spec.tensor, spec.module, "*"))
    if g is not None:
        if spec.shape[0] % g:
            from lipaudit.errors import UsageError

            raise UsageError(f"--groups {g} for {visible(spec.name)}: it does not divide the kernel's "
                             f"{spec.shape[0]} output channels")
        return g
    return 1 if spec.shape[0] == 1 else None


class Conv(LayerKind):
    """A kernel (c_out, c_in / groups, k_1, ..., k_d); ConvTranspose kernels have the same norm."""

    convolution = True

    dims: ClassVar[int]

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if len(cand.info.shape) != self.dims + 2 or cand.logical != "weight":
            return None
        return self.spec(group, cand)

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        from lipaudit.spectral.conv import conv_interval, grouping_pair

        s = ctx.settings
        groups = _groups(spec, ctx)
        deadline = time.monotonic() + s.layer_time_s
        reshapes: list[float] = []
        ungrouped: list[Interval] = []

        def bound(f: Formed, out: Measured) -> Interval:
            # What torch's spectral_norm divides by: its own layout's reshaped matrix.
            r = svd_norm(sn_matrix(f.weight, f.dim))
            reshapes.append(r)
            simple = r if not f.dim else None
            if groups is None:
                iv, g1 = grouping_pair(f.weight, s.conv_rtol, simple, deadline=deadline, max_points=s.conv_points)
                ungrouped.append(g1)
            else:
                iv = conv_interval(f.weight, s.conv_rtol, simple, groups=groups, deadline=deadline,
                                   max_points=s.conv_points)
            return self._at_input_size(spec, ctx, f, iv, groups, out)

        taps = math.prod(spec.shape[2:])
        out = measure_forms(spec, ctx, bound, math.sqrt(taps))
        out.reshape = max(reshapes) if reshapes else None
        if isinstance(spec.parametrization, SpectralNorm):
            check_spectral_norm(spec, out.reshape, out)
        g1_lower = min(x.lower for x in ungrouped) if ungrouped else out.sigma.lower
        out.grouping = {
            "groups": groups,
            "known": groups is not None,
            "ungrouped_lower": g1_lower if groups is None else None,
        }
        if groups is None and out.sigma.lower is not None:
            out.notes.append(
                "grouping unknown (the kernel's shape allows several): the lower end holds for every "
                f"grouping; read as ungrouped (groups=1) the norm is at least {g1_lower:.6g}"
            )
        self._reshape_gap(spec, out, g1_lower, groups is None)
        return out

    def _reshape_gap(self, spec: LayerSpec, out: Measured, lower: float | None, assumed: bool) -> None:
        r = out.reshape
        if r is None or r <= 0 or lower is None or lower < RESHAPE_GAP * r:
            return
        severity = "warning" if isinstance(spec.parametrization, SpectralNorm) else "info"
        cond = "read as ungrouped (groups=1), the " if assumed else ""
        out.findings.append(finding(
            "LIP003", spec.tensor,
            f"{cond}operator norm is at least {lower:.4g}, {lower / r:.2f}x the reshaped-kernel norm "
            f"{r:.4g} that torch.nn.utils.spectral_norm divides by",
            severity,  # type: ignore[arg-type]
        ))

    def _at_input_size(
        self, spec: LayerSpec, ctx: Context, f: Formed, iv: Interval, groups: int | None, out: Measured
    ) -> Interval:
        """With a known input size: the circular norm exactly, and a bracket for zero 'same' padding."""
        from lipaudit.spectral.conv import OutOfTime, grid_bound, same_padding, timed_out, zero_padded_lower

        s = ctx.settings
        size = s.input_size_for((spec.name, spec.tensor, spec.module), self.dims)
        if size is None:
            return iv
        w = f.weight
        pads = same_padding(tuple(w.shape[2:]))
        circ = grid_bound(w, size, GRID_RTOL, groups=groups, deadline=time.monotonic() + s.layer_time_s,
                          upper_cap=iv.upper)
        padded = tuple(n + k - 1 for n, k in zip(size, w.shape[2:], strict=True))
        zero_up = grid_bound(w, padded, GRID_RTOL, groups=groups, deadline=time.monotonic() + s.layer_time_s,
                             upper_cap=iv.upper)
        timed = not (circ.certified and zero_up.certified)
        try:
            zero_lo = zero_padded_lower(w, size, pads, seed=s.seed, groups=groups,
                                        deadline=time.monotonic() + s.layer_time_s)
        except OutOfTime as exc:
            zero_lo, timed = exc.lower, True
        zero_lo = min(zero_lo, zero_up.upper)
        out.at_input_size = {
            "size": list(size),
            "circular": {"lower": circ.lower, "upper": circ.upper, "certified": circ.certified},
            "zero_padding": {"lower": zero_lo, "upper": zero_up.upper, "padding": "same", "stride": 1,
                             "certified": not timed},
        }
        out.notes.append(
            f"at input size {'x'.join(map(str, size))}: circular padding in [{circ.lower:.6g}, {circ.upper:.6g}]; "
            f"zero 'same' padding, stride 1, in [{zero_lo:.6g}, {zero_up.upper:.6g}]"
        )
        # Every size's norm is at most S, so these raise the lower end of S too.
        best = max(iv.lower, circ.lower, zero_lo)
        if best > iv.lower:
            iv = Interval(min(best, iv.upper), iv.upper, "input-size", iv.upper_method, iv.certified,
                          loose=iv.loose)
        # A lower end found under the safety net depends on the load: no certificate then.
        return timed_out(iv) if timed and iv.certified else iv

    def rescale(self, spec: LayerSpec, measured: Sigma, ctx: Context, opts: RescaleOptions) -> Rescaling | str:
        from lipaudit.spectral.conv import conv_interval

        s = ctx.settings
        groups = _groups(spec, ctx)

        def operator(f: Formed) -> tuple[float, bool]:
            return conv_interval(f.weight, s.conv_rtol, groups=groups).upper, True

        def reshaped(f: Formed) -> tuple[float, bool]:
            return svd_norm(sn_matrix(f.weight, f.dim)), False

        norm = reshaped if opts.reshape_convs else operator
        frob = math.sqrt(math.prod(spec.shape[2:]))
        p = spec.parametrization
        if isinstance(p, SpectralNorm):
            if not opts.bake and not opts.reshape_convs:
                return ("spectral_norm normalises the reshaped kernel, so the operator norm of this "
                        "convolution cannot be set through u, v; use --bake to write a plain weight")
            return spectral_norm_rescaling(spec, ctx, opts, norm, frob)
        if isinstance(p, WeightNorm):
            return weight_norm_rescaling(spec, ctx, norm, frob)
        if opts.reshape_convs or not measured.certified:
            return plain_rescaling(spec, ctx, norm, certified=not opts.reshape_convs)
        return plain_rescaling(spec, ctx, norm, upper=measured.upper, frob_factor=frob)

    def chain(self, spec: LayerSpec, hint: ChainHint) -> list[ChainIO]:
        c0, c1 = spec.shape[0], spec.shape[1]
        p = spec.parametrization
        layouts = p.dims if isinstance(p, SpectralNorm) else (0, 1)
        normal = ChainIO(
            accepts=lambda w, spatial: w % c1 == 0 and (not spatial or c0 % (w // c1) == 0),
            outputs=lambda w: frozenset({c0}),
            spatial=True, takes=f"{c1} (or a multiple, if grouped) channels",
        )
        outs = frozenset(c1 * g for g in _divisors(c0))
        transposed = ChainIO(
            accepts=lambda w, spatial: w == c0 if spatial else w % c0 == 0,
            outputs=lambda w: outs,
            spatial=True, takes=f"{c0} channels (as a transposed convolution)",
        )
        # A transposed reading needs evidence: a shape alone fits both and would hide real branches.
        evidence = (
            layouts == (1,)
            or bool(_TRANSPOSED_NAME.search(spec.module))
            or (hint.next_channels is not None and hint.next_channels in outs and hint.next_channels != c0)
        )
        if layouts == (1,):
            return [transposed]
        if 1 not in layouts or not evidence:
            return [normal]
        return [normal, transposed]

    def describe(self, spec: LayerSpec) -> str:
        label = str(self.kind)
        if isinstance(spec.parametrization, SpectralNorm):
            label += " (sn)"
        elif isinstance(spec.parametrization, WeightNorm):
            label += " (wn)"
        return label


class Conv1d(Conv):
    kind = Kind.CONV1D
    dims = 1


class Conv2d(Conv):
    kind = Kind.CONV2D
    dims = 2


class Conv3d(Conv):
    kind = Kind.CONV3D
    dims = 3
