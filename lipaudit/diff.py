"""Compare two audits, layer by layer and for the network; gate on the largest rise."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lipaudit.errors import MalformedInputError, UsageError
from lipaudit.text import visible

DIFF_SCHEMA_VERSION = 1
# A report is small; anything larger than this is not one we wrote.
MAX_REPORT_BYTES = 256 * 2**20

AuditPath = Callable[[str], dict[str, Any]]


def parse_percent(text: str) -> float:
    """'10%' or '10' -> 10.0; a finite number at least 0."""
    t = str(text).strip().removesuffix("%").strip()
    try:
        x = float(t)
    except ValueError:
        raise UsageError(f"{text!r} is not a percentage like 10% or 10") from None
    if not math.isfinite(x) or x < 0:
        raise UsageError(f"{text!r}: the percentage must be a finite number at least 0")
    return x


def _log10(upper: object, log10: object = None) -> float | None:
    """A bound in log10: -inf for 0, None when unknown."""
    if isinstance(log10, int | float) and not isinstance(log10, bool) and math.isfinite(log10):
        return float(log10)
    if isinstance(upper, int | float) and not isinstance(upper, bool) and math.isfinite(upper) and upper >= 0:
        return math.log10(upper) if upper > 0 else -math.inf
    return None


def _rise_pct(old: float | None, new: float | None) -> float | None:
    """100 * (new / old - 1) from log10 values; inf when a zero becomes nonzero; None if unknown."""
    if old is None or new is None:
        return None
    if new == -math.inf:
        return 0.0 if old == -math.inf else -100.0
    if old == -math.inf:
        return math.inf
    d = new - old
    return math.inf if d > 300 else 100.0 * math.expm1(d * math.log(10))


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _from_log10(x: float | None) -> float | None:
    if x is None:
        return None
    if x == -math.inf:
        return 0.0
    return 10.0**x if x < 308 else None


@dataclass(frozen=True)
class Side:
    """One audited checkpoint, as the diff needs it."""

    path: str
    sha256: str | None
    log10_upper: float | None
    certified: bool
    layers: tuple[Mapping[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "sha256": self.sha256, "lipschitz_upper": _num(_from_log10(self.log10_upper)),
            "log10_lipschitz_upper": _num(self.log10_upper), "certified": self.certified,
        }


@dataclass(frozen=True)
class LayerDiff:
    tensor: str  # the new key (the old one when removed)
    old_tensor: str | None
    name: str
    kind: str
    status: str  # changed, unchanged, added, removed
    old_upper: float | None
    new_upper: float | None
    old_lower: float | None
    new_lower: float | None
    old_certified: bool
    new_certified: bool
    rise_pct: float | None  # of the upper end; None when a side is unknown or missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor, "old_tensor": self.old_tensor, "name": self.name, "kind": self.kind,
            "status": self.status,
            "old": {"lower": self.old_lower, "upper": self.old_upper, "certified": self.old_certified},
            "new": {"lower": self.new_lower, "upper": self.new_upper, "certified": self.new_certified},
            "rise_pct": _num(self.rise_pct), "rise_unbounded": self.rise_pct == math.inf,
        }


@dataclass(frozen=True)
class DiffResult:
    old: Side
    new: Side
    network_rise_pct: float | None
    layers: tuple[LayerDiff, ...]  # matched, in the new report's order, then removed ones
    max_increase_pct: float | None
    violations: tuple[str, ...]  # why the gate failed, one line each
    tool_version: str = "unknown"

    @property
    def added(self) -> tuple[LayerDiff, ...]:
        return tuple(x for x in self.layers if x.status == "added")

    @property
    def removed(self) -> tuple[LayerDiff, ...]:
        return tuple(x for x in self.layers if x.status == "removed")

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": DIFF_SCHEMA_VERSION,
            "tool": {"name": "lipaudit", "version": self.tool_version},
            "kind": "diff",
            "old": self.old.to_dict(),
            "new": self.new.to_dict(),
            "network": {
                "rise_pct": _num(self.network_rise_pct),
                "rise_unbounded": self.network_rise_pct == math.inf,
            },
            "layers": [x.to_dict() for x in self.layers],
            "added": [x.tensor for x in self.added],
            "removed": [x.tensor for x in self.removed],
            "max_increase_pct": self.max_increase_pct,
            "violations": list(self.violations),
            "passed": self.passed,
        }


def _bad(path: str, what: str) -> MalformedInputError:
    return MalformedInputError(f"{visible(path)}: not a lipaudit report ({what})", path)


def side_of(report: Mapping[str, Any], path: str) -> Side:
    """Check the parts of a report dict the diff reads; a bad one is a MalformedInputError."""
    if report.get("error"):
        err = report["error"]
        message = err.get("message") if isinstance(err, Mapping) else None
        raise MalformedInputError(f"{visible(path)}: the report holds an error: {visible(str(message))}", path)
    reports = report.get("reports")
    if isinstance(reports, list):
        if len(reports) != 1 or not isinstance(reports[0], Mapping):
            raise UsageError(f"{visible(path)}: holds {len(reports)} reports; diff compares one with one")
        return side_of(reports[0], path)
    net, layers, ckpt = report.get("network"), report.get("layers"), report.get("checkpoint")
    if not isinstance(net, Mapping) or not isinstance(layers, list) or not isinstance(ckpt, Mapping):
        raise _bad(path, "no network, layers or checkpoint")
    for x in layers:
        if not (isinstance(x, Mapping) and isinstance(x.get("tensor"), str) and isinstance(x.get("name"), str)
                and isinstance(x.get("sigma"), Mapping)):
            raise _bad(path, "a layer without tensor, name or sigma")
    sha = ckpt.get("sha256")
    shown = ckpt.get("path")
    return Side(
        path=shown if isinstance(shown, str) else path,
        sha256=sha if isinstance(sha, str) else None,
        log10_upper=_log10(net.get("lipschitz_upper"), net.get("log10_lipschitz_upper")),
        certified=net.get("certified") is True,
        layers=tuple(layers),
    )


def _bound(layer: Mapping[str, Any] | None, end: str) -> float | None:
    if layer is None:
        return None
    x = layer["sigma"].get(end)
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def match_layers(
    old: tuple[Mapping[str, Any], ...], new: tuple[Mapping[str, Any], ...]
) -> list[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]]:
    """Pairs (old, new): by tensor key first, then by name among the rest (a layer that gained
    spectral_norm keeps its name but its key becomes weight_orig); unmatched ones stand alone."""
    old_by_key = {x["tensor"]: x for x in old}
    pairs: dict[int, Mapping[str, Any] | None] = {}
    used: set[str] = set()
    for i, x in enumerate(new):
        if x["tensor"] in old_by_key and x["tensor"] not in used:
            pairs[i] = old_by_key[x["tensor"]]
            used.add(x["tensor"])
    rest = [x for x in old if x["tensor"] not in used]
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for x in rest:
        by_name.setdefault(x["name"], []).append(x)
    for i, x in enumerate(new):
        if i not in pairs and by_name.get(x["name"]):
            pairs[i] = by_name[x["name"]].pop(0)
    out: list[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]] = [
        (pairs.get(i), x) for i, x in enumerate(new)
    ]
    taken = {id(o) for o in pairs.values()}
    out += [(x, None) for x in old if id(x) not in taken]
    return out


def _layer_diff(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> LayerDiff:
    some = b if b is not None else a
    assert some is not None
    old_u, new_u = _bound(a, "upper"), _bound(b, "upper")
    rise = _rise_pct(_log10(old_u), _log10(new_u)) if a is not None and b is not None else None
    if a is None:
        status = "added"
    elif b is None:
        status = "removed"
    elif old_u == new_u and _bound(a, "lower") == _bound(b, "lower"):
        status = "unchanged"
    else:
        status = "changed"
    return LayerDiff(
        tensor=str(some["tensor"]), old_tensor=None if a is None else str(a["tensor"]), name=str(some["name"]),
        kind=str(some.get("kind", "")), status=status, old_upper=old_u, new_upper=new_u,
        old_lower=_bound(a, "lower"), new_lower=_bound(b, "lower"),
        old_certified=a is not None and a["sigma"].get("certified") is True,
        new_certified=b is not None and b["sigma"].get("certified") is True, rise_pct=rise,
    )


def _pct(x: float) -> str:
    return "unbounded" if x == math.inf else f"{x:+.4g}%"


def compare(
    old: Mapping[str, Any], new: Mapping[str, Any], max_increase_pct: float | None = None,
    old_path: str = "OLD", new_path: str = "NEW", tool_version: str = "unknown",
) -> DiffResult:
    """Diff two report dicts (Report.to_dict()). With max_increase_pct, a violation is the network
    bound or a matched layer's upper end rising by more than that, or becoming unknown."""
    a, b = side_of(old, old_path), side_of(new, new_path)
    layers = tuple(_layer_diff(x, y) for x, y in match_layers(a.layers, b.layers))
    net_rise = _rise_pct(a.log10_upper, b.log10_upper)
    violations: list[str] = []
    if max_increase_pct is not None:
        limit = f"more than {max_increase_pct:g}%"
        if net_rise is not None and net_rise > max_increase_pct:
            violations.append(f"network Lipschitz bound rose by {_pct(net_rise)} ({limit})")
        elif net_rise is None and a.log10_upper is not None:
            violations.append("network Lipschitz bound is unknown in the new checkpoint")
        for x in layers:
            if x.rise_pct is not None and x.rise_pct > max_increase_pct:
                violations.append(f"{visible(x.name)} ({visible(x.tensor)}): upper bound rose by {_pct(x.rise_pct)} "
                                  f"({limit})")
            elif x.status not in ("added", "removed") and x.new_upper is None and x.old_upper is not None:
                violations.append(f"{visible(x.name)} ({visible(x.tensor)}): upper bound is unknown in the new "
                                  "checkpoint")
    return DiffResult(a, b, net_rise, layers, max_increase_pct, tuple(violations), tool_version)


def read_report(path: str) -> dict[str, Any] | None:
    """The report a file holds, or None when it is not a JSON report (a checkpoint, a shard index)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
                return None
            size = os.fstat(f.fileno()).st_size
            if size > MAX_REPORT_BYTES:
                return None
            f.seek(0)
            data = f.read(MAX_REPORT_BYTES + 1)
    except IsADirectoryError:
        return None
    except OSError as e:
        raise UsageError(f"{visible(path)}: cannot read ({e.strerror or e})") from None
    try:
        doc = json.loads(data.decode("utf-8-sig"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError):
        return None  # not JSON we wrote: let the checkpoint reader judge it
    if not isinstance(doc, dict) or "weight_map" in doc:
        return None
    tool = doc.get("tool")
    if isinstance(tool, dict) and tool.get("name") == "lipaudit" and "schema_version" in doc:
        return doc
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load_side(path: str, audit_path: AuditPath) -> dict[str, Any]:
    """A JSON report as it is; anything else is audited by audit_path(path) -> report dict."""
    doc = read_report(path)
    return doc if doc is not None else audit_path(path)


def diff_paths(
    old_path: str, new_path: str, audit_path: AuditPath, max_increase_pct: float | None = None,
    tool_version: str = "unknown",
) -> DiffResult:
    """Compare two checkpoints or JSON reports (either side may be either)."""
    old = load_side(old_path, audit_path)
    new = load_side(new_path, audit_path)
    return compare(old, new, max_increase_pct, old_path, new_path, tool_version)
