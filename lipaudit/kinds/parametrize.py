"""Weights formed from stored tensors (spectral_norm, weight_norm), as eval mode forms them.

Each parametrization knows the keys it reads, how to form the weight the model uses, and how far
the model's own arithmetic in the stored dtype can move that weight from the float64 one
(docs/mathematics.md, "Parametrized weights").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Load = Callable[[str], torch.Tensor]


def unit_roundoff(dtype: str) -> float:
    """Half the machine epsilon of a stored float dtype (fp8 and unknown: bf16's, the coarsest common)."""
    table = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
    return table.get(dtype, 2.0**-4 if dtype.startswith("float8") else 2.0**-8)


def accumulate_roundoff(dtype: str) -> float:
    """Sums run in float64 for float64 weights, in float32 for every narrower float type."""
    return 2.0**-53 if dtype == "float64" else 2.0**-24


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u); inf when n u >= 1."""
    return n * u / (1 - n * u) if n * u < 1 else math.inf


def sn_matrix(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The matrix torch's spectral_norm takes the norm of: dim first, the rest flattened."""
    if dim != 0:
        w = w.movedim(dim, 0)
    return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class Formed:
    """The weight the model uses, in float64, with a bound on its distance from the model's own.

    `scale` is the factor that multiplies the original (1 / sigma for spectral_norm), `slack` a
    bound on ||model's weight - weight||_F (the rounding of the stored dtype's arithmetic), and
    `slack_rel` a relative error of `scale` itself. The true operator norm N of the model's weight
    satisfies N <= (norm(weight) + slack) * (1 + slack_rel).
    """

    weight: torch.Tensor
    dim: int  # for spectral_norm: the layout's dim; 0 otherwise
    slack: float
    slack_rel: float
    note: str
    layout_hint: str = ""  # square spectral_norm weights: which layout the stored u suggests


@dataclass(frozen=True)
class SpectralNorm:
    """torch.nn.utils.spectral_norm (old keys weight_orig/_u/_v) or its parametrizations form."""

    original: str
    u: str
    v: str | None
    api: str  # "old" or "new"; the display note depends on it
    dims: tuple[int, ...]  # layouts the shapes allow: (0,) for ndim <= 2, (0, 1) for square convs
    type: str = "spectral_norm"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.original, self.u) + ((self.v,) if self.v else ())

    def form(self, load: Load, dtype: str) -> list[Formed] | str:
        """One formed weight per possible layout, or why none can be formed."""
        orig = load(self.original)
        u = load(self.u).reshape(-1)
        v_stored = load(self.v).reshape(-1) if self.v else None
        out: list[Formed] = []
        aligned: list[float] = []
        for dim in self.dims:
            mat = sn_matrix(orig, dim)
            if mat.shape[0] != u.numel() or (v_stored is not None and mat.shape[1] != v_stored.numel()):
                continue
            if v_stored is None:
                # Checkpoints from before torch stored v: torch derives it from u the same way.
                z = mat.T @ u
                nz = torch.linalg.vector_norm(z)
                if float(nz) == 0:
                    return "spectral_norm: stored u is orthogonal to the weight; the weight is undefined"
                v = z / nz
            else:
                v = v_stored
            wv = mat @ v
            sigma = float(u @ wv)
            aligned.append(abs(sigma) / max(float(torch.linalg.vector_norm(wv) * torch.linalg.vector_norm(u)), 1e-300))
            # The model computes u^T (W v) in its own dtype: bound that rounding (Higham 3.5).
            m, n = mat.shape
            dot_bound = float(u.abs() @ (mat.abs() @ v.abs()))
            err = (_gamma(n + m, accumulate_roundoff(dtype)) + 2 * unit_roundoff(dtype)) * dot_bound
            if not math.isfinite(sigma) or abs(sigma) <= err:
                return (f"spectral_norm: stored u^T W v = {sigma:.6g} is within the rounding of the model's "
                        "arithmetic of 0; the weight the model uses is not bounded")
            # Dividing each entry in the stored dtype moves it by at most u |w| / |sigma|.
            slack = unit_roundoff(dtype) * float(torch.linalg.vector_norm(orig)) / (abs(sigma) - err)
            layout = " (dim 1, ConvTranspose layout)" if dim else ""
            out.append(Formed(orig / sigma, dim, slack, err / (abs(sigma) - err),
                              f"stored spectral-norm estimate u^T W v = {sigma:.6g}{layout}"))
        if not out:
            return "spectral_norm: stored u, v do not match the weight's shape"
        # torch's default is dim 0 for every module but ConvTranspose (dim 1). A kernel is audited
        # as a Conv's (the kind every conv kernel is read as); a ConvTranspose's kernel whose u lines up
        # with dim 1, as its power iteration leaves it, gets both layouts.
        return _infer_layout(out, aligned, 0)


# The last power iteration leaves u = normalize(W v) in the layout it ran on, so u lines up with
# W v there (up to the optimiser's last step) and only by chance in the other layout.
ALIGNED = 0.99
UNALIGNED = 0.9


def _infer_layout(forms: list[Formed], aligned: list[float], default: int) -> list[Formed]:
    """Square weights fit both layouts. Stored u can be set by hand to line up with either, so it
    alone proves nothing: one layout is kept only when it is torch's default for the weight and u
    agrees; otherwise both stay (the interval is their hull) and the hint says what u suggests."""
    if len(forms) < 2:
        return forms
    best = max(range(len(forms)), key=lambda i: aligned[i])
    clear = aligned[best] >= ALIGNED and all(a < UNALIGNED for i, a in enumerate(aligned) if i != best)
    f = forms[best]
    if clear and f.dim == default:
        return [Formed(f.weight, f.dim, f.slack, f.slack_rel,
                       f.note + f" (layout: torch's default dim {f.dim}, and stored u lines up with W v there, "
                       f"cosine {aligned[best]:.4f})")]
    cosines = ", ".join(f"dim {x.dim}: {a:.4f}" for x, a in zip(forms, aligned, strict=True))
    if clear:
        why = (f"stored u suggests dim {f.dim} (cosine of u with W v, {cosines}), which is not torch's default "
               f"(dim {default}; dim 1 is a ConvTranspose's)")
    else:
        why = f"stored u lines up with neither layout clearly (cosine of u with W v, {cosines})"
    hint = (f"spectral_norm layout of a square weight is not known: {why}; stored u can be set to line up with "
            "either, so the interval covers both layouts (pass --model to read the layout from the module)")
    return [Formed(x.weight, x.dim, x.slack, x.slack_rel, x.note, hint) for x in forms]


@dataclass(frozen=True)
class WeightNorm:
    """torch.nn.utils.weight_norm (weight_g/weight_v) or its parametrizations form (original0/1)."""

    original: str  # v
    g: str
    type: str = "weight_norm"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.original, self.g)

    def form(self, load: Load, dtype: str) -> list[Formed] | str:
        v = load(self.original)
        g = load(self.g)
        if g.numel() == 1:  # dim=None: one norm over the whole tensor
            norm = torch.linalg.vector_norm(v)
            count = v.numel()
            factor = g.reshape(())
        else:
            dims = [i for i in range(v.ndim) if g.ndim == v.ndim and g.shape[i] == v.shape[i] != 1]
            if len(dims) != 1 or g.numel() != v.shape[dims[0]]:
                return "weight_norm: g's shape does not match v; cannot form the weight"
            others = [i for i in range(v.ndim) if i != dims[0]]
            norm = torch.linalg.vector_norm(v, dim=others, keepdim=True)
            count = v.numel() // g.numel()
            factor = g.reshape(norm.shape)
        if bool((norm == 0).any()):
            return "weight_norm: a slice of v is all zero; the weight is undefined"
        # ||v|| in the stored dtype: sum of squares (gamma_n), a square root, a division, a product.
        rel = _gamma(count, accumulate_roundoff(dtype)) + 4 * unit_roundoff(dtype)
        return [Formed(v * factor / norm, 0, 0.0, rel, "weight_norm: audited as g * v / ||v||")]


Parametrization = SpectralNorm | WeightNorm
