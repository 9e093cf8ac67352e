"""Shared steps of the weight kinds: forming the weight, checking it, widening for rounding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from lipaudit.findings import finding
from lipaudit.kinds.base import Context, LayerSpec, Measured
from lipaudit.kinds.parametrize import Formed, SpectralNorm, sn_matrix
from lipaudit.report import UNKNOWN, Sigma
from lipaudit.spectral import Interval

# spectral_norm's own target is 1; its stored u, v may lag the weights by this much.
SN_DRIFT = 1e-3


def formed(spec: LayerSpec, ctx: Context) -> list[Formed] | str:
    """The weight(s) the model uses: one per layout the stored tensors allow."""
    p = spec.parametrization
    if p is None:
        return [Formed(ctx.load(spec.tensor), 0, 0.0, 0.0, "")]
    return p.form(ctx.load, spec.dtype)


def check(spec: LayerSpec, forms: list[Formed] | str, out: Measured) -> list[Formed] | None:
    """The usable forms, or None after recording why there are none."""
    if isinstance(forms, str):
        out.findings.append(finding("LIP010", spec.tensor, forms))
        out.notes.append(forms)
        return None
    if not all(bool(torch.isfinite(f.weight).all()) for f in forms):
        out.findings.append(finding("LIP004", spec.tensor, "the weight holds NaN or infinite values"))
        return None
    if not any(bool(torch.any(f.weight != 0)) for f in forms):
        out.findings.append(finding("LIP007", spec.tensor, "all-zero weight: norm 0"))
    out.notes.extend(f.note for f in forms if f.note)
    if len(forms) > 1:
        hint = forms[0].layout_hint or "the stored u does not tell the layout"
        out.notes.append(f"spectral_norm layout ambiguous (dim 0 or dim 1): {hint}")
        out.findings.append(finding("LIP024", spec.tensor, hint))
    return forms


def widen(iv: Interval, f: Formed, frob_factor: float) -> Interval:
    """Cover the rounding of the model's own arithmetic (docs/mathematics.md, parametrized weights).
    frob_factor turns a Frobenius-norm perturbation into an operator-norm one (sqrt(taps) for convs)."""
    if f.slack == 0 and f.slack_rel == 0:
        return iv
    slack = f.slack * frob_factor
    upper = (iv.upper + slack) * (1 + f.slack_rel)
    lower = max(0.0, iv.lower * (1 - f.slack_rel) - slack)
    return replace(iv, lower=lower, upper=upper)


def hull(ivs: list[Interval]) -> Interval:
    """An interval that holds whichever of several candidate weights is the real one."""
    if len(ivs) == 1:
        return ivs[0]
    lo = min(ivs, key=lambda x: x.lower)
    hi = max(ivs, key=lambda x: x.upper)
    loose = next((x.loose for x in ivs if x.loose), None)
    certified = all(x.certified for x in ivs)
    return replace(hi, lower=lo.lower, lower_method=lo.lower_method, certified=certified, loose=loose)


def to_sigma(iv: Interval) -> Sigma:
    return Sigma(iv.lower, iv.upper, iv.method, iv.lower_method, iv.upper_method, iv.certified)


def measure_forms(
    spec: LayerSpec, ctx: Context, bound: Callable[[Formed, Measured], Interval], frob_factor: float
) -> Measured:
    """Form, check, bound each form, widen for rounding, take the hull."""
    out = Measured(UNKNOWN)
    forms = check(spec, formed(spec, ctx), out)
    if forms is None:
        return out
    ivs = [widen(bound(f, out), f, frob_factor) for f in forms]
    iv = hull(ivs)
    if iv.loose:
        out.findings.append(finding("LIP015", spec.tensor, iv.loose))
        out.notes.append(iv.loose)
    out.sigma = to_sigma(iv)
    return out


def check_spectral_norm(spec: LayerSpec, matrix_norm: float | None, out: Measured) -> None:
    """LIP005: the matrix spectral_norm normalises should have norm 1; more means u, v lag behind."""
    if not isinstance(spec.parametrization, SpectralNorm) or matrix_norm is None:
        return
    if matrix_norm > 1 + SN_DRIFT:
        out.findings.append(finding(
            "LIP005", spec.tensor,
            f"the stored u, v underestimate the weight's norm: the matrix spectral_norm normalises has "
            f"norm {matrix_norm:.6g}, not 1",
        ))


def sn_matrix_norm(f: Formed) -> float:
    from lipaudit.spectral.dense import svd_norm

    return svd_norm(sn_matrix(f.weight, f.dim))
