"""The chain strategy: a state dict's covered layers applied one after another.

The product of the layers' certified upper ends bounds a chain. A state dict does not show the
wiring: names and shapes can hint at residual blocks or branches but cannot prove their absence,
so the product is an estimate unless the user asserts the network is a plain chain
(`--assume chain`), and then it is certified only under that assertion, which the report records.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lipaudit.bound import Bound, log10_product
from lipaudit.findings import finding
from lipaudit.kinds.base import ChainHint, ChainIO, LayerSpec
from lipaudit.report import Finding, Layer, Network

if TYPE_CHECKING:
    from lipaudit.kinds import Plan
    from lipaudit.settings import Settings

# Suspicious tensors named one by one in findings; the rest are counted.
_NAMED = 20
UNKNOWN_WIRING = "the wiring is not known (export the model, or pass --model)"
ASSERTED = ("chain (asserted by the user with --assume chain): the covered layers are applied one after another, "
            "in the order stored; the product is certified under this assertion, which lipaudit cannot check")
# Names that residual architectures give their blocks and shortcuts (torchvision's layer1.0.conv1,
# downsample, timm's blocks/stages, shortcut/skip branches): a hint in the findings, never a proof
# either way (MobileNetV2's features.N.conv.M has residuals and matches none of these).
_RESIDUAL = re.compile(
    r"(^|\.)(layer\d+|blocks?|stages?|res\w*|resblocks?|residual\w*)\.\d+\.|"
    r"(^|[._])(downsample|shortcut|skip\w*|residual\w*|identity)([._]|$)",
    re.IGNORECASE,
)


def assumptions(layers: list[Layer], specs: list[LayerSpec], settings: Settings) -> list[str]:
    """Each line is a condition under which the product is a bound; all are true as written."""
    kinds = {s.kind.kind for s, x in zip(specs, layers, strict=True) if x.in_network_bound}
    out = [ASSERTED] if "chain" in settings.assume else []
    out += [
        "chain: the covered layers are applied one after another, in the order stored, each to the previous "
        "one's output; residual connections (x + f(x) is bounded by 1 + L_f), branches and concatenations do "
        "not show in a state dict, and where they exist the product is not a bound",
        "activations between layers are 1-Lipschitz (ReLU, LeakyReLU with slope <= 1, tanh, ELU with "
        "alpha <= 1, sigmoid (1/4)); GELU (~1.129), SiLU (~1.100) and hardswish (1.5) multiply the bound by "
        "their constants",
        "pooling between layers is 1-Lipschitz: max pooling only with windows that do not overlap "
        "(kernel <= stride; overlapping windows multiply the bound by up to sqrt(prod ceil(k_i / s_i)), 3 for "
        "a 3x3 window at stride 1), average pooling only with count_include_pad=True and ceil_mode=False "
        "(otherwise it can exceed 1); upsampling multiplies the bound (nearest by a factor s per axis: "
        "sqrt(s^d))",
        "Euclidean (l2) norms on inputs and outputs; biases and dropout in eval mode do not change the bound",
    ]
    if "batchnorm" in kinds:
        out.append(f"BatchNorm in eval mode (running statistics), eps = {settings.bn_eps:g}")
    if any(k.startswith("conv") for k in kinds):
        out.append(
            "convolutions: each bound holds for zero padding of any size, circular padding up to 'same' "
            "(2p <= d(k-1); larger circular padding wraps the input more than once and can exceed it), any "
            "stride, dilation and input size, and for the transposed convolution; reflect and replicate "
            f"padding are not covered; brackets are {settings.conv_rtol:g} wide (relative); the upper end of "
            "a kernel whose grouping is unknown holds for every grouping"
        )
    if any(s.parametrization is not None for s in specs):
        out.append(
            "parametrized weights (spectral_norm, weight_norm) are formed from the stored tensors as in eval "
            "mode; their bounds cover the rounding of the model's own arithmetic in the stored dtype "
            "(with float32 accumulation for narrower types)"
        )
    out.append("certified upper ends carry margins for float64 rounding")
    return out


def _chain_break(layers: list[Layer], specs: list[LayerSpec]) -> Finding | None:
    """The first covered layer whose input cannot be what the covered layers before it give."""
    chain = [(x, s) for x, s in zip(layers, specs, strict=True) if x.in_network_bound]
    widths: frozenset[int] | None = None  # what the previous layer can give; None: the network input
    spatial = False
    prev: Layer | None = None
    for i, (x, s) in enumerate(chain):
        nxt = chain[i + 1][1] if i + 1 < len(chain) else None
        hint = ChainHint(next_channels=nxt.shape[0] if nxt is not None and nxt.kind.per_channel else None)
        ios: list[ChainIO] = s.kind.chain(s, hint)
        if not ios:
            continue
        fits = [(io, w) for io in ios for w in (sorted(widths) if widths is not None else [None])
                if w is None or io.accepts(w, spatial)]
        if not fits:
            assert prev is not None and widths is not None
            gives = " or ".join(map(str, sorted(widths)))
            return finding(
                "LIP011", x.tensor,
                f"{x.name} takes {ios[0].takes} but {prev.name} before it gives {gives}: the covered layers "
                "are not a simple chain (parallel heads or branches), so their product may not bound this network",
            )
        out: set[int] = set()
        out_spatial = False
        for io, w in fits:
            out |= io.outputs(w)
            out_spatial = out_spatial or (io.spatial if io.spatial is not None else spatial)
        widths = frozenset(out) or None
        spatial = out_spatial
        prev = x
    return None


class Chain:
    name = "chain"

    def bound(self, layers: list[Layer], plan: Plan, settings: Settings) -> Bound:
        specs = plan.layers
        covered = [x for x in layers if x.in_network_bound]
        log10 = log10_product([x.sigma.upper for x in covered])
        not_covered = len(layers) - len(covered)
        findings: list[Finding] = []
        why: list[str] = []
        if not covered:
            why.append("no layer could be bounded")
            findings.append(finding("LIP019", None, "no covered layer was found: there is nothing to bound, and "
                                    "the network bound is not a proof"))
        if log10 is None:
            why.append("a covered layer's norm is unknown")
        elif not all(x.sigma.certified for x in covered):
            why.append("a factor is an estimate")
            findings.append(finding("LIP009", None, "some factors of the network bound are estimates, not proofs"))
        if not_covered:
            why.append(f"{not_covered} layers are not covered")
            findings.append(finding(
                "LIP006", None,
                f"{not_covered} layers are not covered by the network bound; it is not a bound on the whole network",
            ))
        if plan.suspicious:
            why.append(f"{len(plan.suspicious)} tensors that may act on the signal are not covered")
            for key, reason in plan.suspicious[:_NAMED]:
                findings.append(finding("LIP016", key, f"not covered ({reason}); if the network uses it, the "
                                        "network bound does not include it"))
            if len(plan.suspicious) > _NAMED:
                findings.append(finding("LIP016", None, f"{len(plan.suspicious) - _NAMED} more such tensors"))
        # shapes and names are hints: a chain cannot be proven from them, only asserted
        brk = _chain_break(layers, specs)
        if brk is not None:
            findings.append(brk)
        residual = next((x for x in layers if x.in_network_bound and _RESIDUAL.search(x.tensor)), None)
        if residual is not None:
            findings.append(finding(
                "LIP011", residual.tensor,
                f"{residual.name}: names like this one belong to residual blocks (x + f(x), bounded by 1 + L_f), "
                "which a state dict does not show: the product may not bound this network; bound the exported "
                "graph instead (lipaudit inspect model.pt2, --graph, or --model)",
            ))
        asserted = "chain" in settings.assume
        if not asserted:
            why.append(UNKNOWN_WIRING)
        elif brk is not None or residual is not None:
            findings.append(finding(
                "LIP025", None,
                "--assume chain: the product is certified under your assertion that the network is a plain chain, "
                "although the layer shapes or names above hint otherwise",
            ))
        uncovered = tuple((x.tensor, x.notes[0] if x.notes else str(x.kind)) for x in layers if not x.in_network_bound)
        uncovered += tuple(plan.suspicious)
        network = Network(
            log10_upper=log10, certified=not why, layers_counted=len(covered), layers_not_covered=not_covered,
            assumptions=tuple(assumptions(layers, specs, settings)), method=self.name,
            not_certified_because=tuple(why), uncovered=uncovered,
            details={"assumed": ["chain"]} if asserted else None,
        )
        return Bound(network, tuple(findings))
