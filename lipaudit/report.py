"""The audit report: frozen records, their JSON form, and the exit-code policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lipaudit.settings import Settings

__all__ = ["Settings"]  # re-exported: callers build a Report's settings from here too

SCHEMA_VERSION = 1


def finite(x: float | None) -> float | None:
    """JSON has no NaN or Infinity: unknown or unbounded numbers are null."""
    return x if x is not None and math.isfinite(x) else None


def from_log10(log10: float | None) -> float | None:
    """A bound kept in log10: 0 for a zero factor, None if unknown or beyond float range."""
    if log10 is None:
        return None
    if log10 == -math.inf:
        return 0.0
    return 10.0**log10 if log10 < 308 else None


def bound_dict(log10: float | None) -> dict[str, float | None]:
    return {"lipschitz_upper": finite(from_log10(log10)), "log10_lipschitz_upper": finite(log10)}


@dataclass(frozen=True)
class Sigma:
    lower: float | None
    upper: float | None
    method: str
    lower_method: str | None
    upper_method: str | None
    certified: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": finite(self.lower),
            "upper": finite(self.upper),
            "method": self.method,
            "lower_method": self.lower_method,
            "upper_method": self.upper_method,
            "certified": self.certified,
        }


UNKNOWN = Sigma(None, None, "none", None, None, False)


@dataclass(frozen=True)
class Layer:
    tensor: str
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    sigma: Sigma
    reshape_sigma: float | None
    in_network_bound: bool
    notes: tuple[str, ...]
    uses: tuple[str, ...]
    parametrization: str | None
    time_s: float
    at_input_size: dict[str, Any] | None = None
    label: str = ""  # kind plus markers, for tables: "conv2d (sn)"
    grouping: dict[str, Any] | None = None  # convolutions: groups, whether known

    @property
    def reshape_ratio(self) -> tuple[float | None, float | None] | None:
        """The operator norm over the reshaped-kernel norm, as a bracket."""
        r = self.reshape_sigma
        if r is None or not r or self.sigma.lower is None or self.sigma.upper is None:
            return None
        return self.sigma.lower / r, self.sigma.upper / r

    def to_dict(self) -> dict[str, Any]:
        ratio = self.reshape_ratio
        return {
            "tensor": self.tensor,
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sigma": self.sigma.to_dict(),
            "reshape_sigma": finite(self.reshape_sigma),
            "reshape_ratio": None if ratio is None else {"lower": finite(ratio[0]), "upper": finite(ratio[1])},
            "in_network_bound": self.in_network_bound,
            "parametrization": self.parametrization,
            "at_input_size": self.at_input_size,
            "grouping": self.grouping,
            "uses": list(self.uses),
            "notes": list(self.notes),
            "time_s": round(self.time_s, 6),
        }


@dataclass(frozen=True)
class Skipped:
    tensor: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "reason": self.reason}


@dataclass(frozen=True)
class Network:
    log10_upper: float | None  # None: unknown; -inf: a zero factor
    certified: bool
    layers_counted: int
    layers_not_covered: int
    assumptions: tuple[str, ...]
    method: str = "chain"  # the bound strategy: chain or graph
    lipschitz_lower: float | None = None  # a measured lower end (graph strategies)
    not_certified_because: tuple[str, ...] = ()
    uncovered: tuple[tuple[str, str], ...] = ()  # (node or tensor, why) left out of the bound
    details: dict[str, Any] | None = None  # strategy-specific: contributions, dominant path, ...

    @property
    def upper(self) -> float | None:
        return from_log10(self.log10_upper)

    def to_dict(self) -> dict[str, Any]:
        return {
            **bound_dict(self.log10_upper),
            "certified": self.certified,
            "layers_counted": self.layers_counted,
            "layers_not_covered": self.layers_not_covered,
            "assumptions": list(self.assumptions),
            "method": self.method,
            "lipschitz_lower": finite(self.lipschitz_lower),
            "not_certified_because": list(self.not_certified_because),
            "uncovered": [{"name": n, "reason": r} for n, r in self.uncovered],
            "details": self.details,
        }


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    tensor: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "tensor": self.tensor, "message": self.message}


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str
    sha256: str
    tensors: int
    parameters: int
    key: str | None
    shards: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # sharded: each file (index first) and its sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "key": self.key,
            "shards": list(self.shards),
            "files": [{"name": n, "sha256": h} for n, h in self.files],
        }


class Gated:
    """The exit-code policy of every command, in one place: an error finding (a failed gate,
    non-finite weights, a layer normalize could not bring to its target) is exit 1; with
    fail_on = warning, warnings are too."""

    findings: tuple[Finding, ...]
    fail_on: str = "error"

    @property
    def passed(self) -> bool:
        failing = ("error",) if self.fail_on == "error" else ("error", "warning")
        return not any(f.severity in failing for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


@dataclass(frozen=True)
class Report(Gated):
    tool_version: str
    checkpoint: CheckpointInfo
    settings: Settings
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]
    network: Network
    findings: tuple[Finding, ...] = field(default=())
    time_s: float = 0.0  # the audit, from opened checkpoint to report
    peak_rss_bytes: int | None = None  # of the process, at the end of the audit
    fail_on: str = "error"
    # tensor key -> sigma_max(K^(w)) over a frequency grid, for the worst convolutions (html only)
    heatmaps: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "lipaudit", "version": self.tool_version},
            "checkpoint": self.checkpoint.to_dict(),
            "settings": self.settings.to_dict(),
            "layers": [x.to_dict() for x in self.layers],
            "skipped": [x.to_dict() for x in self.skipped],
            "network": self.network.to_dict(),
            "findings": [x.to_dict() for x in self.findings],
            "resources": {"time_s": round(self.time_s, 6), "peak_rss_bytes": self.peak_rss_bytes},
            "passed": self.passed,
            "error": None,
        }


def error_document(tool_version: str, code: str, exit_code: int, message: str, path: str | None) -> dict[str, Any]:
    """What --format json prints when there is no report."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "lipaudit", "version": tool_version},
        "error": {"code": code, "exit_code": exit_code, "message": message, "path": path},
    }


def schema(command: str = "inspect") -> dict[str, Any]:
    """The JSON Schema of a command's report, shipped inside the package."""
    import json
    from importlib.resources import files

    name = "report-v1" if command == "inspect" else "normalize-v1"
    text = files("lipaudit").joinpath(f"schema/{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]
