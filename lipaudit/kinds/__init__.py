"""Layer kinds and the planning step: the tensors of a state dict -> layers.

KINDS is the registry. Planning groups tensors by module, forms weight candidates (plain or
parametrized), and offers each candidate to the kinds in order. Whatever no kind claims is listed
as skipped with a reason; a skipped tensor that could act on the signal (an unknown float matrix,
an int8 weight) is also flagged, because the network bound cannot be a proof while it is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from lipaudit.checkpoint.model import TensorInfo
from lipaudit.kinds.base import Candidate, Group, LayerKind, LayerSpec
from lipaudit.kinds.channelwise import BatchNorm, Norm, PReLU
from lipaudit.kinds.conv import Conv1d, Conv2d, Conv3d
from lipaudit.kinds.dense import Attention, Dense, Embedding, Recurrent
from lipaudit.kinds.parametrize import SpectralNorm, WeightNorm

# Order matters: the first kind that claims a candidate owns it.
KINDS: tuple[LayerKind, ...] = (
    BatchNorm(), PReLU(), Recurrent(), Attention(), Embedding(), Norm(), Dense(), Conv1d(), Conv2d(), Conv3d(),
)

_PREFIXES = ("module.", "_orig_mod.")
_WEIGHT_LEAF = re.compile(r"^(weight|in_proj_weight|weight_(ih|hh|hr)(_l\d+(_reverse)?)?)$")
# Tensors that never change a Lipschitz constant.
_BENIGN = {
    "running_mean": "running mean: a shift, does not change the Lipschitz constant",
    "num_batches_tracked": "batch counter: not a weight",
}


@dataclass
class Plan:
    layers: list[LayerSpec] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Skipped tensors that may act on the signal: the network bound cannot cover them.
    suspicious: list[tuple[str, str]] = field(default_factory=list)


def unsupported_reason(info: TensorInfo, allow_scalar: bool = False) -> str | None:
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
    if len(info.shape) == 0 and not allow_scalar:
        return "scalar: not a layer weight"
    if info.numel == 0:
        return "empty tensor"
    return None


def strip_prefixes(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if module.startswith(p):
                module, changed = module[len(p):], True
    return module


def _split(key: str) -> tuple[str, str]:
    """(owning module, leaf); parametrizations belong to the module that holds them."""
    parts = key.split(".")
    if "parametrizations" in parts:
        i = parts.index("parametrizations")
        return ".".join(parts[:i]), ".".join(parts[i:])
    return ".".join(parts[:-1]), parts[-1]


def _sn_dims(orig: TensorInfo, u: TensorInfo) -> tuple[int, ...]:
    """Layouts spectral_norm can have used: dim 0 (its default for Linear and Conv) or dim 1
    (ConvTranspose's default, and anyone's with spectral_norm(m, dim=1)), as u's length allows."""
    dims = []
    for dim in (0, 1) if len(orig.shape) >= 2 else (0,):
        if orig.shape[dim] == u.numel:
            dims.append(dim)
    return tuple(dims) or (0,)


class _Grouper:
    """Forms one module's weight candidates, recording what it cannot use."""

    def __init__(self, group: Group, plan: Plan) -> None:
        self.g, self.plan = group, plan
        self.done: set[str] = set()

    def skip(self, leaf: str, reason: str, suspicious: bool = False) -> None:
        key = self.g.key(leaf)
        self.plan.skipped.append((key, reason))
        if suspicious:
            self.plan.suspicious.append((key, reason))
        self.done.add(leaf)

    def usable(self, leaves: list[str], companions: tuple[str, ...] = ()) -> bool:
        """All usable (companions may be 0-d, as weight_norm(dim=None)'s g is); else all skipped."""
        reasons = {x: unsupported_reason(self.g.leaves[x], allow_scalar=x in companions) for x in leaves}
        if all(r is None for r in reasons.values()):
            return True
        for x in leaves:
            self.skip(x, reasons[x] or "part of a weight that cannot be formed", suspicious=True)
        return False

    def add(self, logical: str, main: str, param: SpectralNorm | WeightNorm | None, used: list[str],
            notes: tuple[str, ...] = ()) -> None:
        g = self.g
        self.g.candidates.append(Candidate(logical, g.leaves[main], param, tuple(g.key(x) for x in used), notes))
        self.done.update(used)

    def parametrized(self) -> None:
        g, leaves = self.g, self.g.leaves
        for leaf in list(leaves):
            if leaf in self.done:
                continue
            m = re.fullmatch(r"parametrizations\.([^.]+)\.original", leaf)
            if m:
                p = m.group(1)
                u, v = f"parametrizations.{p}.0._u", f"parametrizations.{p}.0._v"
                if u in leaves:
                    used = [leaf, u] + ([v] if v in leaves else [])
                    if self.usable(used):
                        sn = SpectralNorm(g.key(leaf), g.key(u), g.key(v) if v in leaves else None, "new",
                                          _sn_dims(leaves[leaf], leaves[u]))
                        self.add(p, leaf, sn, used, ("spectral_norm (torch.nn.utils.parametrizations): audited as "
                                                     "original / (u^T W v) with the stored u, v",))
                else:
                    self.skip(leaf, f"unknown parametrization of {p!r}: the weight the model uses cannot be "
                              "formed from the stored tensors", suspicious=True)
                continue
            m = re.fullmatch(r"parametrizations\.([^.]+)\.original0", leaf)
            if m and f"parametrizations.{m.group(1)}.original1" in leaves:
                v = f"parametrizations.{m.group(1)}.original1"
                if self.usable([v, leaf], companions=(leaf,)):
                    self.add(m.group(1), v, WeightNorm(g.key(v), g.key(leaf)), [v, leaf],
                             ("weight_norm (torch.nn.utils.parametrizations)",))
                continue
            if leaf.endswith("_orig") and f"{leaf[:-5]}_u" in leaves:
                p = leaf[:-5]
                used = [leaf, f"{p}_u"] + ([f"{p}_v"] if f"{p}_v" in leaves else [])
                if self.usable(used):
                    vkey = g.key(f"{p}_v") if f"{p}_v" in leaves else None
                    sn = SpectralNorm(g.key(leaf), g.key(f"{p}_u"), vkey, "old",
                                      _sn_dims(leaves[leaf], leaves[f"{p}_u"]))
                    self.add(p, leaf, sn, used, (f"spectral_norm (torch.nn.utils): audited as {p}_orig / (u^T W v) "
                                                 "with the stored u, v",))
            elif leaf.endswith("_g") and f"{leaf[:-2]}_v" in leaves and f"{leaf[:-2]}_orig" not in leaves:
                p = leaf[:-2]
                v = f"{p}_v"
                if self.usable([v, leaf], companions=(leaf,)):
                    self.add(p, v, WeightNorm(g.key(v), g.key(leaf)), [v, leaf], ("weight_norm (torch.nn.utils)",))

    def plain(self) -> None:
        for leaf in self.g.leaves:
            if leaf not in self.done and _WEIGHT_LEAF.match(leaf) and self.usable([leaf]):
                self.add(leaf, leaf, None, [leaf])

    def leftovers(self) -> None:
        for leaf, info in self.g.leaves.items():
            if leaf in self.done:
                continue
            if leaf in _BENIGN:
                self.skip(leaf, _BENIGN[leaf])
            elif leaf.startswith("bias") or leaf.endswith("_bias") or leaf.startswith("bias_"):
                self.skip(leaf, "bias: does not change the Lipschitz constant")
            elif leaf.startswith("parametrizations."):
                self.skip(leaf, "parametrization state without its original weight", suspicious=True)
            else:
                reason = unsupported_reason(info) or f"{leaf!r} is not a recognised layer weight"
                self.skip(leaf, reason, suspicious=_may_act(leaf, info))


def _may_act(leaf: str, info: TensorInfo) -> bool:
    """Could this unrecognised tensor scale the signal? Any float or complex tensor could (a gain,
    a mixing matrix); so could a quantised or integer matrix (an int8 weight). Integer vectors and
    scalars are indices and counters."""
    if info.is_float or info.dtype.startswith("complex") or info.is_quantized:
        return True
    return len(info.shape) >= 2


def plan_layers(infos: list[TensorInfo]) -> Plan:
    """Group tensors by module and decide what each one is."""
    plan = Plan()
    groups: dict[str, dict[str, TensorInfo]] = {}
    for info in infos:
        module, leaf = _split(info.key)
        groups.setdefault(module, {})[leaf] = info
    for module, leaves in groups.items():
        group = Group(module, leaves)
        grouper = _Grouper(group, plan)
        grouper.parametrized()
        grouper.plain()
        for cand in group.candidates:
            spec = next((s for k in KINDS if (s := k.claim(group, cand)) is not None), None)
            if spec is None:
                shape = "x".join(map(str, cand.info.shape)) or "scalar"
                for key in cand.uses:
                    reason = f"{shape} weight: not a known layer"
                    plan.skipped.append((key, reason))
                    plan.suspicious.append((key, reason))
            else:
                plan.layers.append(spec)
                grouper.done.update(leaf for leaf, info in leaves.items() if info.key in spec.uses)
        for kind in KINDS:
            plan.layers.extend(kind.claim_extra(group, grouper.done))
        grouper.leftovers()
    _name_layers(plan)
    return plan


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
