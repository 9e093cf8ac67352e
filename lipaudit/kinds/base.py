"""The layer-kind protocol: recognise tensors, measure, rescale, describe the chain.

A kind is one class and one entry in `lipaudit.kinds.KINDS`. Planning offers each kind, in
registry order, the weight candidates of one module; the first kind that claims a candidate owns
it. Nothing outside a kind's class compares kind names.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from lipaudit.checkpoint.model import TensorInfo
from lipaudit.kinds.parametrize import Parametrization
from lipaudit.report import Finding, Sigma
from lipaudit.types import Kind

if TYPE_CHECKING:
    from lipaudit.settings import Settings


@dataclass(frozen=True)
class Candidate:
    """A weight as the module uses it: a plain tensor, or one formed by a parametrization."""

    logical: str  # the parameter's name in the module (weight, weight_ih_l0, in_proj_weight, ...)
    info: TensorInfo  # the stored tensor the weight is made from (weight, weight_orig, v, ...)
    param: Parametrization | None
    uses: tuple[str, ...]  # every key the weight is formed from
    notes: tuple[str, ...] = ()


@dataclass
class Group:
    """The tensors of one module, keyed by their name inside it."""

    module: str
    leaves: dict[str, TensorInfo]
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def last(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def has(self, leaf: str) -> bool:
        return leaf in self.leaves

    def key(self, leaf: str) -> str:
        return self.leaves[leaf].key


@dataclass(frozen=True)
class LayerSpec:
    """One layer to audit."""

    tensor: str
    module: str
    kind: LayerKind
    shape: tuple[int, ...]
    dtype: str
    uses: tuple[str, ...]
    notes: tuple[str, ...] = ()
    parametrization: Parametrization | None = None
    companions: Mapping[str, str] = field(default_factory=dict)  # role -> key (running_var, ...)
    name: str = ""

    @property
    def covered(self) -> bool:
        return self.kind.covered


@dataclass
class Measured:
    """What measuring one layer found."""

    sigma: Sigma
    reshape: float | None = None
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    at_input_size: dict[str, object] | None = None
    grouping: dict[str, object] | None = None


class Context:
    """What a kind needs while measuring or rescaling: float64 tensors and the settings."""

    def __init__(self, load: Callable[[str], torch.Tensor], settings: Settings) -> None:
        self._load = load
        self.settings = settings

    def load(self, key: str) -> torch.Tensor:
        from lipaudit.checkpoint.pages import release
        from lipaudit.spectral import to_float64

        src = self._load(key)
        out = to_float64(src, self.settings.device)
        if out.data_ptr() != src.data_ptr():
            release(src)  # read once: a mapped file's pages need not stay resident
        return out


@dataclass(frozen=True)
class Rescaling:
    """How to scale a layer: build(c) gives the new float64 values of the keys it writes for a
    factor c, measure(values) the certified upper end of the result and whether it is certified."""

    reason: str
    build: Callable[[float], dict[str, torch.Tensor]]
    measure: Callable[[dict[str, torch.Tensor]], tuple[float, bool]]
    baked: tuple[str, tuple[str, ...]] | None = None  # (new key, keys it replaces)
    dtype_of: Mapping[str, str] = field(default_factory=dict)  # new key -> dtype of what it replaces
    # The factor to try first; None: target / the layer's upper end (build(c) scales the norm by c).
    start: float | None = None
    certified: bool = True  # False when the norm being normalised is not the operator norm
    # When set, the written value is recomputed at write time by rebuild(c), which reads only the
    # checkpoint and holds nothing; release() drops what the shrink loop kept.
    rebuild: Callable[[float], torch.Tensor] | None = None
    release: Callable[[], None] | None = None


@dataclass(frozen=True)
class RescaleOptions:
    target: float
    bake: bool
    reshape_convs: bool  # --conv-norm reshape: what torch's spectral_norm divides by


@dataclass(frozen=True)
class ChainIO:
    """A layer's widths as a link of a chain: `accepts(width, prev_spatial)` says whether the
    previous layer's output can feed it; `outputs(width)` what it gives for that input."""

    accepts: Callable[[int, bool], bool]
    outputs: Callable[[int | None], frozenset[int]]  # None: the layer is first
    spatial: bool | None  # output laid out per position (conv); None: as its input
    takes: str  # what it takes, for messages


class LayerKind(ABC):
    """One kind of layer."""

    kind: ClassVar[Kind]
    covered: ClassVar[bool] = True
    # Findings of this kind are not gated by --fail-layer-above (their norm is not a layer bound).
    gated: ClassVar[bool] = True
    # A per-channel map (BatchNorm, PReLU): its width tells the layout of the layer before it.
    per_channel: ClassVar[bool] = False
    # A convolution: its operator norm differs from the reshaped-kernel norm spectral_norm divides by,
    # and its bracket is as wide as --rtol.
    convolution: ClassVar[bool] = False

    @abstractmethod
    def claim(self, group: Group, cand: Candidate) -> LayerSpec | None:
        """A spec if this kind owns the candidate."""

    def claim_extra(self, group: Group, done: set[str]) -> list[LayerSpec]:
        """Layers made of tensors that are not weight candidates (BatchNorm's running_var)."""
        return []

    @abstractmethod
    def measure(self, spec: LayerSpec, ctx: Context) -> Measured:
        """The layer's operator norm as a proven interval."""

    def rescale(self, spec: LayerSpec, measured: Sigma, ctx: Context, opts: RescaleOptions) -> Rescaling | str:
        """How to scale the layer, or why it is not scaled."""
        return f"{self.kind} layers are not rescaled"

    def chain(self, spec: LayerSpec, hint: ChainHint) -> list[ChainIO]:
        """The ways this layer can sit in a chain (several when the layout is ambiguous)."""
        return []

    def describe(self, spec: LayerSpec) -> str:
        """Short label for tables: the kind, plus markers."""
        return str(self.kind)

    def spec(self, group: Group, cand: Candidate, notes: tuple[str, ...] = (), **extra: object) -> LayerSpec:
        info = cand.info
        return LayerSpec(
            tensor=info.key, module=group.module, kind=self, shape=info.shape, dtype=info.dtype,
            uses=cand.uses, notes=cand.notes + notes, parametrization=cand.param,
            companions=dict(extra.get("companions", {})),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class ChainHint:
    """What the chain strategy knows around a layer: the next covered layer's per-channel width."""

    next_channels: int | None = None


def name_matches(pattern: re.Pattern[str], text: str) -> bool:
    return bool(pattern.search(text))
