"""Typed settings of every command, with their defaults in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lipaudit.checkpoint.limits import Limits
from lipaudit.types import ConvNorm, Method, Mode, Severity


def default_jobs() -> int:
    return max(1, min(8, os.cpu_count() or 1))


DENSE_RTOL = 1e-4
CONV_RTOL = 1e-2
# Work limit of one convolution's search, in frequency points (docs/architecture.md, "Work budgets").
CONV_POINTS = 1_000_000
# work of a graph's block bounds, as a multiple of its layers' own (lipaudit/graph/tighten.py)
BLOCK_WORK = 0.1
# function evaluations of the slope floor's search (lipaudit/graph/relax.py); 0 leaves it out
FLOOR_WORK = 200


@dataclass(frozen=True)
class Settings:
    """What `inspect` (and the audit inside `normalize`) runs with."""

    method: Method = Method.AUTO
    rtol: float = DENSE_RTOL
    conv_rtol: float = CONV_RTOL
    seed: int = 0
    device: str = "cpu"
    key: str | None = None
    bn_eps: float = 1e-5
    fail_above: float | None = None
    fail_layer_above: float | None = None
    # (layer name or tensor key, or "*" for every conv of that dimension) -> spatial size
    input_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # (layer name or tensor key) -> the conv's groups, when the user knows it
    groups: tuple[tuple[str, int], ...] = ()
    limits: Limits = field(default_factory=Limits)
    jobs: int = field(default_factory=default_jobs)
    # Gates given a bound that is not a proof fail, unless this is set.
    allow_uncertified: bool = False
    # Work limit of one convolution's search, in frequency points: fixed before the run, so the
    # intervals are the same under any load, --jobs and layer order.
    conv_points: int = CONV_POINTS
    # Work of the block bounds of a graph (lipaudit/graph/tighten.py), as a multiple of the work of
    # its layers' own operators, counted from shapes: blocks are bounded cheapest first within it.
    block_work: float = BLOCK_WORK
    floor_work: int = FLOOR_WORK
    # Wall-clock safety net of one layer (seconds), for hostile inputs only: when it fires the layer's
    # bound is reported as not certified (LIP015) and gates fail on it.
    layer_time_s: float = 120.0
    ignore: tuple[str, ...] = ()  # finding codes left out of the report
    fail_on: Severity = Severity.ERROR
    heatmaps: int = 0  # frequency responses of this many of the worst convolutions (for html)
    # What the user asserts about the network (--assume chain): the chain product is certified under it.
    assume: tuple[str, ...] = ()

    def input_size_for(self, names: tuple[str, ...], dims: int) -> tuple[int, ...] | None:
        for key, size in self.input_sizes:
            if key in names and len(size) == dims:
                return size
        for key, size in self.input_sizes:
            if key == "*" and len(size) == dims:
                return size
        return None

    def groups_for(self, names: tuple[str, ...]) -> int | None:
        for key, g in self.groups:
            if key in names:
                return g
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": str(self.method),
            "rtol": self.rtol,
            "conv_rtol": self.conv_rtol,
            "seed": self.seed,
            "device": self.device,
            "key": self.key,
            "bn_eps": self.bn_eps,
            "fail_above": self.fail_above,
            "fail_layer_above": self.fail_layer_above,
            "input_sizes": {k: list(v) for k, v in self.input_sizes},
            "groups": dict(self.groups),
            "limits": self.limits.to_dict(),
            "jobs": self.jobs,
            "allow_uncertified": self.allow_uncertified,
            "conv_points": self.conv_points,
            "block_work": self.block_work,
            "floor_work": self.floor_work,
            "layer_time_s": self.layer_time_s,
            "ignore": list(self.ignore),
            "fail_on": str(self.fail_on),
            "assume": list(self.assume),
        }


@dataclass(frozen=True)
class NormalizeSettings:
    target: float = 1.0
    mode: Mode = Mode.DIVIDE
    conv_norm: ConvNorm = ConvNorm.OPERATOR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bake: bool = False
    partial: bool = False  # write even when a covered layer could not be brought to the target
    audit: Settings = field(default_factory=lambda: Settings(method=Method.EXACT))
    # One common factor for every conv/linear weight so the certified graph bound is at most this.
    network_target: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "mode": str(self.mode),
            "conv_norm": str(self.conv_norm),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "bake": self.bake,
            "partial": self.partial,
            "audit": self.audit.to_dict(),
            "network_target": self.network_target,
        }
