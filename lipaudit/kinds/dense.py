"""Matrix weights: Linear (covered), and the matrices with no global bound (attention, embeddings, RNNs)."""

from __future__ import annotations

import re

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
from lipaudit.kinds.parametrize import Formed, SpectralNorm, WeightNorm
from lipaudit.kinds.rescale import plain_rescaling, spectral_norm_rescaling, weight_norm_rescaling
from lipaudit.kinds.weights import check_spectral_norm, measure_forms
from lipaudit.report import Sigma
from lipaudit.spectral import Interval
from lipaudit.spectral.dense import dense_interval
from lipaudit.types import Kind

_ATTENTION = re.compile(
    r"^(q|k|v|q_proj|k_proj|v_proj|qkv|qkv_proj|query|key|value|c_attn|wqkv|to_q|to_k|to_v|"
    r"to_qkv|in_proj|query_key_value|wq|wk|wv|q_lin|k_lin|v_lin)$",
    re.IGNORECASE,
)
_EMBEDDING = re.compile(
    r"(embed|embedding|embeddings|emb|wte|wpe|embed_tokens|tok_embeddings|word_embeddings|"
    r"position_embeddings|token_type_embeddings|embed_positions|shared)$",
    re.IGNORECASE,
)
_RNN = re.compile(r"^weight_(ih|hh|hr)(_l\d+(_reverse)?)?$")


def _matrix_measure(spec: LayerSpec, ctx: Context) -> Measured:
    s = ctx.settings

    def bound(f: Formed, out: Measured) -> Interval:
        return dense_interval(f.weight.reshape(f.weight.shape[0], -1), s.method, s.rtol, s.seed)

    out = measure_forms(spec, ctx, bound, 1.0)
    if isinstance(spec.parametrization, SpectralNorm) and out.sigma.lower is not None:
        # For a matrix the normalised matrix is the weight itself: its norm is the lower end.
        check_spectral_norm(spec, out.sigma.lower, out)
    return out


class Dense(LayerKind):
    """nn.Linear (and 1x1 mixing matrices): the exact largest singular value."""

    kind = Kind.LINEAR

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if len(cand.info.shape) != 2 or cand.logical != "weight":
            return None
        return self.spec(group, cand)

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        return _matrix_measure(spec, ctx)

    def rescale(self, spec: LayerSpec, measured: Sigma, ctx: Context, opts: RescaleOptions) -> Rescaling | str:
        return _rescale_matrix(spec, ctx, opts, measured)

    def chain(self, spec: LayerSpec, hint: ChainHint) -> list[ChainIO]:
        n_in, n_out = spec.shape[1], spec.shape[0]
        return [ChainIO(
            accepts=lambda w, spatial: w == n_in or (spatial and n_in % w == 0),
            outputs=lambda w: frozenset({n_out}),
            spatial=False, takes=f"{n_in} features",
        )]

    def describe(self, spec: LayerSpec) -> str:
        return _marked(str(self.kind), spec)


def _marked(label: str, spec: LayerSpec) -> str:
    if isinstance(spec.parametrization, SpectralNorm):
        return f"{label} (sn)"
    if isinstance(spec.parametrization, WeightNorm):
        return f"{label} (wn)"
    return label


def _rescale_matrix(spec: LayerSpec, ctx: Context, opts: RescaleOptions, measured: Sigma) -> Rescaling | str:
    from lipaudit.spectral.dense import exact_norm

    def norm(f: Formed) -> tuple[float, bool]:
        return exact_norm(f.weight.reshape(f.weight.shape[0], -1)).upper, True

    p = spec.parametrization
    if isinstance(p, SpectralNorm):
        return spectral_norm_rescaling(spec, ctx, opts, norm)
    if isinstance(p, WeightNorm):
        return weight_norm_rescaling(spec, ctx, norm)
    return plain_rescaling(spec, ctx, norm, upper=measured.upper if measured.certified else None)


class _NoGlobalBound(LayerKind):
    """Matrices whose layer has no Lipschitz bound from weights alone: measured, not covered."""

    covered = False
    why = ""

    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        return _matrix_measure(spec, ctx)

    def describe(self, spec: LayerSpec) -> str:
        return _marked(str(self.kind), spec)


class Attention(_NoGlobalBound):
    kind = Kind.LINEAR
    why = "attention projection: dot-product attention has no global Lipschitz bound; not in the network bound"

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if cand.logical == "in_proj_weight" or (len(cand.info.shape) == 2 and _ATTENTION.match(group.last)):
            return self.spec(group, cand, (self.why,))
        return None


class Embedding(_NoGlobalBound):
    kind = Kind.EMBEDDING
    gated = False
    why = "embedding: its input is discrete, so it has no Lipschitz constant; not in the network bound"

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if cand.logical == "weight" and len(cand.info.shape) == 2 and _EMBEDDING.search(group.last):
            return self.spec(group, cand, (self.why,))
        return None


class Recurrent(_NoGlobalBound):
    kind = Kind.RNN
    why = "recurrent weight: no global Lipschitz bound from weights alone; not in the network bound"

    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        if _RNN.match(cand.logical):
            return self.spec(group, cand, (self.why,))
        return None
