"""Rescalings shared by the weight kinds: plain weights, weight_norm's g, spectral_norm's u and v."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lipaudit.kinds.base import Context, LayerSpec, RescaleOptions, Rescaling
from lipaudit.kinds.parametrize import Formed, SpectralNorm, WeightNorm, sn_matrix
from lipaudit.kinds.weights import widen
from lipaudit.spectral import exact

Norm = Callable[[Formed], tuple[float, bool]]


def _overlay(vals: dict[str, torch.Tensor], ctx: Context) -> Callable[[str], torch.Tensor]:
    return lambda k: vals[k] if k in vals else ctx.load(k)


def _formed_upper(p: SpectralNorm | WeightNorm, spec: LayerSpec, load: Callable[[str], torch.Tensor],
                  norm: Norm, frob_factor: float) -> tuple[float, bool]:
    """The largest certified upper end over the forms the new values give, rounding included."""
    forms = p.form(load, spec.dtype)
    if isinstance(forms, str):
        raise ArithmeticError(forms)
    worst, certified = 0.0, True
    for f in forms:
        up, cert = norm(f)
        worst = max(worst, widen(exact(up, "x"), f, frob_factor).upper)
        certified = certified and cert
    return worst, certified


def plain_rescaling(spec: LayerSpec, ctx: Context, norm: Norm, certified: bool = True,
                    upper: float | None = None, frob_factor: float = 1.0) -> Rescaling:
    """W <- c W. With `upper`, a certified upper end of ||W||, the result is measured without a new
    search: for any real a, ||V|| <= |a| upper + frob_factor ||V - a W||_F (the second term bounds the
    rounding of the cast; frob_factor turns a Frobenius norm into the operator's, sqrt(taps) for a
    convolution). The weight is read again when needed, so no rescaled copy is held in memory."""
    key = spec.tensor
    held: dict[str, object] = {}  # the float64 weight and the last factor, while the shrink loop runs

    def build(c: float) -> dict[str, torch.Tensor]:
        w = held.get("w")
        if not isinstance(w, torch.Tensor):
            w = held["w"] = ctx.load(key)
        held["c"] = c
        return {key: w * c}

    def fast(vals: dict[str, torch.Tensor]) -> tuple[float, bool]:
        assert upper is not None
        w, c = held["w"], held["c"]
        assert isinstance(w, torch.Tensor) and isinstance(c, float)
        err = float(torch.linalg.vector_norm(vals[key] - w * c))
        # The float64 products and sums above round by far less than this relative margin.
        return (abs(c) * upper + frob_factor * err) * (1 + 1e-9), True

    return Rescaling(
        "weight scaled",
        build=build,
        measure=fast if upper is not None else (lambda vals: norm(Formed(vals[key], 0, 0.0, 0.0, ""))),
        certified=certified,
        rebuild=lambda c: ctx.load(key) * c,
        release=held.clear,
    )


def weight_norm_rescaling(spec: LayerSpec, ctx: Context, norm: Norm, frob_factor: float = 1.0) -> Rescaling:
    p = spec.parametrization
    assert isinstance(p, WeightNorm)
    g = ctx.load(p.g)
    return Rescaling(
        "g scaled",
        build=lambda c: {p.g: g * c},
        measure=lambda vals: _formed_upper(p, spec, _overlay(vals, ctx), norm, frob_factor),
    )


def spectral_norm_rescaling(
    spec: LayerSpec, ctx: Context, opts: RescaleOptions, norm: Norm, frob_factor: float = 1.0
) -> Rescaling | str:
    """--bake: a plain weight in place of the parametrization; otherwise u, v set to the top
    singular pair of the matrix spectral_norm normalises, so the weight it forms has that norm 1."""
    p = spec.parametrization
    assert isinstance(p, SpectralNorm)
    forms = p.form(ctx.load, spec.dtype)
    if isinstance(forms, str):
        return forms
    if len(forms) > 1:
        return ("the spectral_norm layout (Conv or ConvTranspose) cannot be told from the shapes, so the "
                "weight the model uses is not known exactly")
    f = forms[0]
    if opts.bake:
        w = f.weight
        new_key = f"{spec.module}.weight" if spec.module else "weight"
        return Rescaling(
            f"baked into a plain {new_key}",
            build=lambda c: {new_key: w * c},
            measure=lambda vals: norm(Formed(vals[new_key], 0, 0.0, 0.0, "")),
            baked=(new_key, spec.uses),
            dtype_of={new_key: spec.dtype},
        )
    if abs(opts.target - 1.0) > 1e-12:
        return "spectral_norm fixes the norm at 1; use --bake for another target"
    mat = sn_matrix(ctx.load(p.original), f.dim)
    uu, _, vh = torch.linalg.svd(mat, full_matrices=False)
    u0, v0 = uu[:, 0], vh[0]

    def build(c: float) -> dict[str, torch.Tensor]:
        # u grows by 1/c, so u^T W v does and the formed weight's norm becomes c
        out = {p.u: u0 / c}
        if p.v is not None:
            out[p.v] = v0
        return out

    return Rescaling(
        "u, v set to the top singular vectors",
        build=build,
        measure=lambda vals: _formed_upper(p, spec, _overlay(vals, ctx), norm, frob_factor),
        start=opts.target,
    )
