"""Per-channel maps: BatchNorm in eval mode (covered), PReLU (covered), norm layers (not covered)."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

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
from lipaudit.kinds.weights import to_sigma
from lipaudit.report import UNKNOWN, Sigma
from lipaudit.spectral import exact
from lipaudit.types import Kind

_PRELU = re.compile(r"prelu", re.IGNORECASE)
# Names of normalisation layers; with them a weight is an elementwise gain whatever its ndim.
_NORM = re.compile(
    r"(^|[._])(ln|ln_?\d*|ln_f|layer_?norm|layernorm|rms_?norm|group_?norm|instance_?norm|norm\d*|"
    r"[a-z_]*_norm|norm_[a-z0-9_]*|post_attention_layernorm|input_layernorm)$",
    re.IGNORECASE,
)


def _per_channel(c: int) -> list[ChainIO]:
    return [ChainIO(
        accepts=lambda w, spatial: c in (1, w),
        outputs=lambda w: frozenset({w if w is not None else c}),
        spatial=None, takes=f"{c} channels",
    )]


class BatchNorm(LayerKind):
    """Eval mode: the diagonal map gamma / sqrt(running_var + eps); its norm is the largest entry."""

    kind = Kind.BATCHNORM
    per_channel = True

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if cand.logical == "weight" and group.has("running_var") and len(cand.info.shape) == 1 \
                and group.leaves["running_var"].shape == cand.info.shape and cand.param is None:
            spec = self.spec(group, cand, self._notes(group, True),
                             companions={"running_var": group.key("running_var")})
            return replace(spec, uses=(*spec.uses, group.key("running_var")))
        return None

    def claim_extra(self, group: Group, done: set[str]) -> list[LayerSpec]:
        """BatchNorm(affine=False): running statistics only, gamma = 1."""
        if "running_var" in done or not group.has("running_var") or group.has("weight"):
            return []
        info = group.leaves["running_var"]
        if len(info.shape) != 1:
            return []
        done.add("running_var")
        return [LayerSpec(
            tensor=info.key, module=group.module, kind=self, shape=info.shape, dtype=info.dtype,
            uses=(info.key,), notes=self._notes(group, False), companions={"running_var": info.key},
        )]

    @staticmethod
    def _notes(group: Group, affine: bool) -> tuple[str, ...]:
        notes = ("eval mode: max |gamma| / sqrt(running_var + eps)",)
        return notes + (() if affine else ("no affine weight: gamma = 1",))

    def _diag(self, spec: LayerSpec, ctx: Context) -> tuple[torch.Tensor, torch.Tensor] | str:
        var = ctx.load(spec.companions["running_var"])
        gamma = ctx.load(spec.tensor) if spec.tensor != spec.companions["running_var"] else torch.ones_like(var)
        if not bool(torch.isfinite(var).all() and torch.isfinite(gamma).all()):
            return "gamma or running_var holds NaN or infinite values"
        denom = var + ctx.settings.bn_eps
        if bool((denom <= 0).any()):
            return "running_var + eps is not positive"
        return gamma, denom.sqrt()

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        d = self._diag(spec, ctx)
        if isinstance(d, str):
            return Measured(UNKNOWN, findings=[finding("LIP004", spec.tensor, d)])
        gamma, denom = d
        # Each entry is one division: its rounding is covered by the 1 + 2^-52 factor.
        value = float((gamma.abs() / denom).max())
        return Measured(to_sigma(exact(value * (1 + 2.0**-50), "diagonal")),
                        notes=[f"eps = {ctx.settings.bn_eps:g}"])

    def rescale(self, spec: LayerSpec, measured: Sigma, ctx: Context, opts: RescaleOptions) -> Rescaling | str:
        if spec.tensor == spec.companions["running_var"]:
            return "BatchNorm without an affine weight: nothing to scale"
        d = self._diag(spec, ctx)
        if isinstance(d, str):
            return d
        gamma, denom = d
        return Rescaling(
            "gamma scaled",
            build=lambda c: {spec.tensor: gamma * c},
            measure=lambda vals: (float((vals[spec.tensor].abs() / denom).max()) * (1 + 2.0**-50), True),
        )

    def chain(self, spec: LayerSpec, hint: ChainHint) -> list[ChainIO]:
        return _per_channel(spec.shape[0])


class PReLU(LayerKind):
    """An activation with learned slopes: Lipschitz constant max(1, max |a|)."""

    kind = Kind.OTHER
    per_channel = True

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if cand.logical == "weight" and len(cand.info.shape) == 1 and _PRELU.search(group.last) and cand.param is None:
            return self.spec(group, cand, ("PReLU: Lipschitz constant max(1, max |a|)",))
        return None

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        w = ctx.load(spec.tensor)
        if not bool(torch.isfinite(w).all()):
            bad = finding("LIP004", spec.tensor, "the weight holds NaN or infinite values")
            return Measured(UNKNOWN, findings=[bad])
        return Measured(to_sigma(exact(max(1.0, float(w.abs().max())), "max-slope")))

    def rescale(self, spec: LayerSpec, measured: Sigma, ctx: Context, opts: RescaleOptions) -> Rescaling | str:
        if measured.upper is not None and measured.upper > opts.target:
            return "PReLU slopes above the target are an activation, not a weight to rescale"
        return "PReLU slopes are an activation, not a weight to rescale"

    def chain(self, spec: LayerSpec, hint: ChainHint) -> list[ChainIO]:
        return _per_channel(spec.shape[0])

    def describe(self, spec: LayerSpec) -> str:
        return "prelu"


class Norm(LayerKind):
    """LayerNorm, GroupNorm, RMSNorm, InstanceNorm: they divide by the input's own statistics, so no
    Lipschitz bound follows from their weights. Recognised by name or by an elementwise bias of the
    weight's shape, whatever the weight's ndim (LayerNorm([1, 264]) stores a 2-D gain)."""

    kind = Kind.NORM
    covered = False
    gated = False
    why = ("LayerNorm/GroupNorm/RMSNorm: depends on the input's statistics; no Lipschitz bound from "
           "weights alone; not in the network bound")

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if cand.logical != "weight" or cand.param is not None:
            return None
        shape = cand.info.shape
        elementwise = group.has("bias") and group.leaves["bias"].shape == shape and len(shape) != 1
        if len(shape) == 1 or elementwise or _NORM.search(group.module):
            return self.spec(group, cand, (self.why,))
        return None

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        return Measured(UNKNOWN)
