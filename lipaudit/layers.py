"""Tensors of a state dict -> layers: kind, effective weight, whether the network bound covers it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from lipaudit.checkpoint.model import TensorInfo

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
_PRELU = re.compile(r"prelu", re.IGNORECASE)
_RNN = re.compile(r"^weight_(ih|hh|hr)(_l\d+(_reverse)?)?$")
_PREFIXES = ("module.", "_orig_mod.")

CONV_KINDS = {3: "conv1d", 4: "conv2d", 5: "conv3d"}
# Cosine between the stored u and W v above which a spectral-norm layout is taken as read.
ALIGNED = 0.99


@dataclass(frozen=True)
class Parametrization:
    """How the weight the model uses is formed from what is stored."""

    type: str  # spectral_norm or weight_norm
    api: str  # old (torch.nn.utils.*) or new (torch.nn.utils.parametrizations.*)
    original: str
    u: str | None = None
    v: str | None = None
    g: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One layer to audit."""

    tensor: str
    module: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    uses: tuple[str, ...]
    covered: bool
    math: str  # dense, conv, diag, prelu or none
    notes: tuple[str, ...] = ()
    parametrization: Parametrization | None = None
    running_var: str | None = None
    name: str = ""


@dataclass
class Plan:
    layers: list[LayerSpec] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def unsupported_reason(info: TensorInfo) -> str | None:
    """Why a tensor cannot enter the math, or None."""
    if info.is_meta:
        return "meta tensor: holds no data"
    if info.is_nested:
        return "nested tensor: not supported"
    if info.layout != "strided":
        return f"{info.layout} layout: not supported"
    if info.is_quantized:
        return f"quantized tensor ({info.dtype}): not supported"
    if not info.is_float:
        return f"{info.dtype} tensor: not a float weight"
    if len(info.shape) == 0:
        return "scalar: not a layer weight"
    if info.numel == 0:
        return "empty tensor"
    return None


def _split(key: str) -> tuple[str, str]:
    """(owning module, leaf); parametrizations belong to the module that holds them."""
    parts = key.split(".")
    if "parametrizations" in parts:
        i = parts.index("parametrizations")
        return ".".join(parts[:i]), ".".join(parts[i:])
    return ".".join(parts[:-1]), parts[-1]


def strip_prefixes(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if module.startswith(p):
                module, changed = module[len(p):], True
    return module


def _last(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _weight_kind(module: str, leaf: str, ndim: int) -> tuple[str, bool, str, tuple[str, ...]]:
    """kind, covered, math, notes for a weight-like tensor."""
    last = _last(module)
    if _RNN.match(leaf):
        return "rnn", False, "dense", (
            "recurrent weight: no global Lipschitz bound from weights alone; not in the network bound",
        )
    if leaf == "in_proj_weight" or (ndim == 2 and _ATTENTION.match(last)):
        return "linear", False, "dense", (
            "attention projection: dot-product attention has no global Lipschitz bound; "
            "not in the network bound",
        )
    if ndim == 2 and _EMBEDDING.search(last):
        return "embedding", False, "dense", (
            "embedding: its input is discrete, so it has no Lipschitz constant; not in the network bound",
        )
    if ndim == 2:
        return "linear", True, "dense", ()
    if ndim in CONV_KINDS:
        return CONV_KINDS[ndim], True, "conv", ()
    if ndim == 1 and _PRELU.search(last):
        return "other", True, "prelu", ("PReLU: Lipschitz constant max(1, max |a|)",)
    if ndim == 1:
        return "norm", False, "none", (
            "LayerNorm/GroupNorm/RMSNorm: depends on the input's statistics; "
            "no Lipschitz bound from weights alone",
        )
    return "other", False, "none", (f"{ndim}-d weight: not a known layer",)


def plan_layers(infos: list[TensorInfo], bn_eps: float) -> Plan:
    """Group tensors by module and decide what each one is."""
    plan = Plan()
    groups: dict[str, dict[str, TensorInfo]] = {}
    for info in infos:
        module, leaf = _split(info.key)
        groups.setdefault(module, {})[leaf] = info
    for module, leaves in groups.items():
        _plan_module(module, leaves, plan, bn_eps)
    _name_layers(plan)
    return plan


def _key(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _plan_module(module: str, leaves: dict[str, TensorInfo], plan: Plan, bn_eps: float) -> None:
    done: set[str] = set()

    def skip(leaf: str, reason: str) -> None:
        plan.skipped.append((leaves[leaf].key, reason))
        done.add(leaf)

    def usable(leaf: str) -> bool:
        reason = unsupported_reason(leaves[leaf])
        if reason is not None:
            skip(leaf, reason)
            return False
        return True

    def add(
        leaf: str, logical: str, param: Parametrization | None, used: list[str], extra: tuple[str, ...] = ()
    ) -> None:
        """leaf holds the stored weight; logical is the parameter's name in the module."""
        info = leaves[leaf]
        kind, covered, math, notes = _weight_kind(module, logical, len(info.shape))
        if kind.startswith("conv") and len(info.shape) > 1 and info.shape[1] == 1 and info.shape[0] > 1:
            notes += ("one input channel per output: if depthwise, the true grouped norm can be lower",)
        plan.layers.append(LayerSpec(
            tensor=info.key, module=module, kind=kind, shape=info.shape, dtype=info.dtype,
            uses=tuple(leaves[u].key for u in used), covered=covered, math=math,
            notes=notes + extra, parametrization=param,
        ))
        done.update(used)

    # New API: module.parametrizations.<p>.original (+ .0._u/.0._v, or original0/original1).
    for leaf in list(leaves):
        m = re.fullmatch(r"parametrizations\.([^.]+)\.original", leaf)
        if m:
            p = m.group(1)
            u, v = f"parametrizations.{p}.0._u", f"parametrizations.{p}.0._v"
            used = [leaf] + [x for x in (u, v) if x in leaves]
            if u in leaves and v in leaves:
                if all(usable(x) for x in used):
                    param = Parametrization("spectral_norm", "new", leaves[leaf].key,
                                            u=leaves[u].key, v=leaves[v].key)
                    add(leaf, p, param, used, ("spectral_norm (torch.nn.utils.parametrizations): "
                                            "audited as original / (u^T W v) with the stored u, v",))
            elif usable(leaf):
                info = leaves[leaf]
                plan.layers.append(LayerSpec(
                    tensor=info.key, module=module, kind="other", shape=info.shape, dtype=info.dtype,
                    uses=(info.key,), covered=False, math="none",
                    notes=(f"unknown parametrization of {p!r}: the weight the model uses "
                           "cannot be formed from the stored tensors",),
                ))
                done.add(leaf)
        m = re.fullmatch(r"parametrizations\.([^.]+)\.original0", leaf)
        if m and f"parametrizations.{m.group(1)}.original1" in leaves:
            g, v = leaf, f"parametrizations.{m.group(1)}.original1"
            if usable(g) and usable(v):
                param = Parametrization("weight_norm", "new", leaves[v].key, g=leaves[g].key)
                add(v, m.group(1), param, [v, g], ("weight_norm: audited as g * v / ||v||",))
    # Old API: <p>_orig, <p>_u, <p>_v (spectral norm) or <p>_g, <p>_v (weight norm).
    for leaf in list(leaves):
        if leaf in done:
            continue
        if leaf.endswith("_orig") and f"{leaf[:-5]}_u" in leaves:
            p = leaf[:-5]
            used = [leaf, f"{p}_u"] + ([f"{p}_v"] if f"{p}_v" in leaves else [])
            if all(usable(x) for x in used):
                vkey = leaves[f"{p}_v"].key if f"{p}_v" in leaves else None
                param = Parametrization("spectral_norm", "old", leaves[leaf].key,
                                        u=leaves[f"{p}_u"].key, v=vkey)
                add(leaf, p, param, used, ("spectral_norm (torch.nn.utils): audited as "
                                        f"{p}_orig / (u^T W v) with the stored u, v",))
        elif leaf.endswith("_g") and f"{leaf[:-2]}_v" in leaves and f"{leaf[:-2]}_orig" not in leaves:
            p = leaf[:-2]
            v = f"{p}_v"
            if usable(leaf) and usable(v):
                param = Parametrization("weight_norm", "old", leaves[v].key, g=leaves[leaf].key)
                add(v, p, param, [v, leaf], ("weight_norm: audited as g * v / ||v||",))
    # BatchNorm in eval mode: a diagonal map.
    if "running_var" in leaves and "running_var" not in done:
        w = "weight" if "weight" in leaves and len(leaves["weight"].shape) == 1 else None
        used = ["running_var"] + ([w] if w else [])
        if all(usable(x) for x in used):
            main = leaves[w or "running_var"]
            plan.layers.append(LayerSpec(
                tensor=main.key, module=module, kind="batchnorm", shape=main.shape, dtype=main.dtype,
                uses=tuple(leaves[x].key for x in used), covered=True, math="diag",
                notes=(f"eval mode: max |gamma| / sqrt(running_var + eps), eps = {bn_eps:g}",)
                + (() if w else ("no affine weight: gamma = 1",)),
                running_var=leaves["running_var"].key,
            ))
            done.update(used)
        for leaf, why in (("running_mean", "running mean: a shift, does not change the Lipschitz constant"),
                          ("num_batches_tracked", "batch counter: not a weight")):
            if leaf in leaves and leaf not in done:
                skip(leaf, why)
    for leaf, info in leaves.items():
        if leaf in done:
            continue
        if leaf == "weight" or _RNN.match(leaf) or leaf == "in_proj_weight":
            if usable(leaf):
                add(leaf, leaf, None, [leaf])
        elif leaf.startswith("bias") or leaf.endswith("_bias") or leaf.startswith("bias_"):
            skip(leaf, "bias: does not change the Lipschitz constant")
        elif leaf.startswith("parametrizations."):
            skip(leaf, "parametrization state without its original weight")
        else:
            reason = unsupported_reason(info)
            skip(leaf, reason or f"{leaf!r} is not a recognised layer weight")


def _name_layers(plan: Plan) -> None:
    """Module names without module./_orig_mod. prefixes, unless stripping makes two collide;
    a module with several audited weights (an LSTM) names each by its parameter too."""
    per_module: dict[str, int] = {}
    for s in plan.layers:
        per_module[s.module] = per_module.get(s.module, 0) + 1

    def base(s: LayerSpec, strip: bool) -> str:
        module = strip_prefixes(s.module) if strip else s.module
        if per_module[s.module] > 1 or not module:
            leaf = s.tensor[len(s.module) + 1:] if s.module else s.tensor
            return f"{module}.{leaf}" if module else leaf
        return module

    stripped = [base(s, True) for s in plan.layers]
    counts: dict[str, int] = {}
    for n in stripped:
        counts[n] = counts.get(n, 0) + 1
    plan.layers = [
        replace(s, name=n if counts[n] == 1 else base(s, False))
        for s, n in zip(plan.layers, stripped, strict=True)
    ]


@dataclass(frozen=True)
class Effective:
    """The weight the model uses at inference, in float64."""

    weight: torch.Tensor | None
    notes: tuple[str, ...] = ()
    sn_dim: int | None = None  # the dim spectral_norm reshapes along, for its own matrix


def sn_matrix(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The matrix torch's spectral_norm takes the norm of (dim first, the rest flattened)."""
    if dim != 0:
        w = w.movedim(dim, 0)
    return w.reshape(w.shape[0], -1)


def effective_weight(spec: LayerSpec, load: Callable[[str], torch.Tensor]) -> Effective:
    """Apply the stored parametrization the way eval mode does."""
    p = spec.parametrization
    if p is None:
        return Effective(load(spec.tensor))
    orig = load(p.original)
    if p.type == "weight_norm":
        assert p.g is not None
        g = load(p.g)
        if g.numel() == 1:
            norm = torch.linalg.vector_norm(orig)
        else:
            dims = [i for i in range(orig.ndim) if g.ndim == orig.ndim and g.shape[i] == orig.shape[i] != 1]
            if len(dims) != 1 or g.numel() != orig.shape[dims[0]]:
                return Effective(None, ("weight_norm: g's shape does not match v; cannot form the weight",))
            others = [i for i in range(orig.ndim) if i != dims[0]]
            norm = torch.linalg.vector_norm(orig, dim=others, keepdim=True)
        return Effective(orig * (g.reshape(norm.shape) if g.numel() > 1 else g.reshape(())) / norm)
    assert p.u is not None
    u = load(p.u).reshape(-1)
    v = load(p.v).reshape(-1) if p.v else None
    fits = []
    for dim in (0, 1)[: max(1, min(2, orig.ndim))]:
        mat = sn_matrix(orig, dim)
        if mat.shape[0] == u.numel() and (v is None or mat.shape[1] == v.numel()):
            fits.append((dim, mat))
    if not fits:
        return Effective(None, ("spectral_norm: stored u, v do not match the weight's shape",))
    if v is None:
        # Checkpoints from before torch stored v: take the v that u implies.
        dim, mat = fits[0]
        z = mat.T @ u
        v = z / torch.linalg.vector_norm(z)
        fits = [(dim, mat)]
    note = ""
    if len(fits) > 1:
        # Square channel counts fit both layouts (Conv vs ConvTranspose). The last power
        # iteration left u = normalize(W v) for the layout it ran on, so u lines up with W v
        # there (cosine ~1 unless the weights moved a lot since).
        def alignment(fit: tuple[int, torch.Tensor]) -> float:
            wv = fit[1] @ v
            return float(abs(u @ wv) / (torch.linalg.vector_norm(wv) * torch.linalg.vector_norm(u) + 1e-300))

        fits.sort(key=alignment, reverse=True)
        if alignment(fits[0]) < ALIGNED:
            # No clear winner: take the layout whose estimate is smaller, which makes the
            # audited weight larger, so the bound stays an upper bound either way.
            fits.sort(key=lambda f: abs(float(u @ (f[1] @ v))))
            note = "; layout (Conv or ConvTranspose) ambiguous, took the one giving the larger weight"
    dim, mat = fits[0]
    sigma = float(u @ (mat @ v))
    if not math.isfinite(sigma) or sigma <= 0:
        return Effective(None, (f"spectral_norm: stored u^T W v = {sigma:g}; the effective weight is undefined",))
    note = (f"stored spectral-norm estimate u^T W v = {sigma:.6g}"
            + (" (dim 1, ConvTranspose layout)" if dim else "") + note)
    return Effective(orig / sigma, (note,), sn_dim=dim)
