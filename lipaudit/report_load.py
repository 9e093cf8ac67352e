"""A report's JSON document back into a Report, strictly: what a cache entry, a Dask worker or a
shard hands over is checked field by field, and only a document that writes back to itself exactly
is accepted. Nothing here imports torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lipaudit.checkpoint.limits import Limits
from lipaudit.report import SCHEMA_VERSION, CheckpointInfo, Finding, Layer, Network, Report, Sigma, Skipped
from lipaudit.settings import Settings
from lipaudit.types import Method, Severity

# Fields a run fills from the clock or the process, not from the checkpoint: two runs of the same
# audit differ only there. Paths as (key, key, ...); "*" walks every item of a list.
TIMING_FIELDS: tuple[tuple[str, ...], ...] = (
    ("resources",),
    ("layers", "*", "time_s"),
    ("network", "details", "seconds"),
)


class BadDocument(ValueError):
    """A document that is not a report lipaudit wrote."""


def without_timing(doc: Any) -> Any:
    """A report, an error document or a several-paths document with TIMING_FIELDS left out."""
    if isinstance(doc, dict) and isinstance(doc.get("reports"), list):
        return {**doc, "reports": [without_timing(d) for d in doc["reports"]]}
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    for path in TIMING_FIELDS:
        out = _drop(out, path)
    return out


def _drop(node: Any, path: tuple[str, ...]) -> Any:
    head, rest = path[0], path[1:]
    if head == "*":
        return [_drop(x, rest) for x in node] if isinstance(node, list) else node
    if not isinstance(node, dict) or head not in node:
        return node
    out = dict(node)
    if rest:
        out[head] = _drop(out[head], rest)
    else:
        del out[head]
    return out


def _get(d: Mapping[str, Any], key: str, *types: type) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise BadDocument(f"missing {key!r}")
    v = d[key]
    if types and not (isinstance(v, types) and not (isinstance(v, bool) and bool not in types)):
        raise BadDocument(f"{key!r} has type {type(v).__name__}")
    return v


def _num(d: Mapping[str, Any], key: str) -> float | None:
    v = _get(d, key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadDocument(f"{key!r} is not a finite number")
    return float(v)


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    v = _get(d, key)
    if v is not None and not isinstance(v, str):
        raise BadDocument(f"{key!r} is not a string")
    return v


def _strs(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = _get(d, key, list)
    if not all(isinstance(x, str) for x in v):
        raise BadDocument(f"{key!r} is not a list of strings")
    return tuple(v)


def _opt_dict(d: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    v = _get(d, key)
    if v is not None and not isinstance(v, dict):
        raise BadDocument(f"{key!r} is not an object")
    return v


def _sigma(d: Mapping[str, Any]) -> Sigma:
    return Sigma(_num(d, "lower"), _num(d, "upper"), _get(d, "method", str), _opt_str(d, "lower_method"),
                 _opt_str(d, "upper_method"), _get(d, "certified", bool))


def _layer(d: Mapping[str, Any], label: str | None) -> Layer:
    shape = _get(d, "shape", list)
    if not all(type(x) is int and x >= 0 for x in shape):
        raise BadDocument("'shape' is not a list of sizes")
    kind = _get(d, "kind", str)
    return Layer(
        tensor=_get(d, "tensor", str), name=_get(d, "name", str), kind=kind, shape=tuple(shape),
        dtype=_get(d, "dtype", str), sigma=_sigma(_get(d, "sigma", dict)), reshape_sigma=_num(d, "reshape_sigma"),
        in_network_bound=_get(d, "in_network_bound", bool), notes=_strs(d, "notes"), uses=_strs(d, "uses"),
        parametrization=_opt_str(d, "parametrization"), time_s=_num(d, "time_s") or 0.0,
        at_input_size=_opt_dict(d, "at_input_size"), label=label if label is not None else kind,
        grouping=_opt_dict(d, "grouping"),
    )


def _network(d: Mapping[str, Any]) -> Network:
    upper, log10 = _num(d, "lipschitz_upper"), _num(d, "log10_lipschitz_upper")
    # to_dict writes -inf (a zero factor) as upper 0 with no log10; past float range as log10 alone
    log10_upper = log10 if log10 is not None else (-math.inf if upper == 0.0 else None)
    uncovered = _get(d, "uncovered", list)
    if not all(isinstance(u, dict) and isinstance(u.get("name"), str) and isinstance(u.get("reason"), str)
               for u in uncovered):
        raise BadDocument("'uncovered' is not a list of {name, reason}")
    layers_counted, not_covered = _get(d, "layers_counted", int), _get(d, "layers_not_covered", int)
    return Network(
        log10_upper=log10_upper, certified=_get(d, "certified", bool), layers_counted=layers_counted,
        layers_not_covered=not_covered, assumptions=_strs(d, "assumptions"), method=_get(d, "method", str),
        lipschitz_lower=_num(d, "lipschitz_lower"), not_certified_because=_strs(d, "not_certified_because"),
        uncovered=tuple((u["name"], u["reason"]) for u in uncovered), details=_opt_dict(d, "details"),
    )


def _settings(d: Mapping[str, Any]) -> Settings:
    limits = _get(d, "limits", dict)
    names = set(Limits().to_dict())
    if set(limits) != names or not all(type(v) is int for v in limits.values()):
        raise BadDocument("'limits' does not match this version's budgets")
    sizes = _get(d, "input_sizes", dict)
    groups = _get(d, "groups", dict)
    if not all(isinstance(v, list) and all(type(x) is int for x in v) for v in sizes.values()):
        raise BadDocument("'input_sizes' is not a map of sizes")
    if not all(type(v) is int for v in groups.values()):
        raise BadDocument("'groups' is not a map of integers")
    try:
        method, fail_on = Method(_get(d, "method", str)), Severity(_get(d, "fail_on", str))
    except ValueError as e:
        raise BadDocument(str(e)) from None
    return Settings(
        method=method, rtol=_get(d, "rtol", float, int), conv_rtol=_get(d, "conv_rtol", float, int),
        seed=_get(d, "seed", int), device=_get(d, "device", str), key=_opt_str(d, "key"),
        bn_eps=_get(d, "bn_eps", float, int), fail_above=_num(d, "fail_above"),
        fail_layer_above=_num(d, "fail_layer_above"),
        input_sizes=tuple((k, tuple(v)) for k, v in sizes.items()), groups=tuple(groups.items()),
        limits=Limits(**limits), jobs=_get(d, "jobs", int), allow_uncertified=_get(d, "allow_uncertified", bool),
        layer_time_s=_get(d, "layer_time_s", float, int), ignore=_strs(d, "ignore"), fail_on=fail_on,
    )


def report_from_dict(doc: Mapping[str, Any], labels: list[str] | None = None,
                     heatmaps: dict[str, Any] | None = None, heatmap_count: int = 0) -> Report:
    """The Report that wrote doc (Report.to_dict()); labels are the table's layer labels, which the
    JSON does not carry. BadDocument unless the Report writes doc back exactly."""
    try:
        if _get(doc, "schema_version", int) != SCHEMA_VERSION or _get(doc, "error") is not None:
            raise BadDocument("not a report of this schema version")
        tool = _get(doc, "tool", dict)
        ck = _get(doc, "checkpoint", dict)
        info = CheckpointInfo(
            path=_get(ck, "path", str), format=_get(ck, "format", str), sha256=_get(ck, "sha256", str),
            tensors=_get(ck, "tensors", int), parameters=_get(ck, "parameters", int), key=_opt_str(ck, "key"),
            shards=_strs(ck, "shards"),
            files=tuple((_get(x, "name", str), _get(x, "sha256", str)) for x in _get(ck, "files", list)),
        )
        layer_docs = _get(doc, "layers", list)
        if labels is not None and len(labels) != len(layer_docs):
            raise BadDocument("labels do not match the layers")
        layers = tuple(_layer(x, None if labels is None else labels[i]) for i, x in enumerate(layer_docs))
        skipped = tuple(Skipped(_get(x, "tensor", str), _get(x, "reason", str)) for x in _get(doc, "skipped", list))
        findings = tuple(
            Finding(_get(x, "code", str), _get(x, "severity", str), _opt_str(x, "tensor"), _get(x, "message", str))
            for x in _get(doc, "findings", list)
        )
        res = _get(doc, "resources", dict)
        rss = _get(res, "peak_rss_bytes")
        if rss is not None and type(rss) is not int:
            raise BadDocument("'peak_rss_bytes' is not an integer")
        settings = _settings(_get(doc, "settings", dict))
        from dataclasses import replace

        settings = replace(settings, heatmaps=heatmap_count)
        report = Report(
            tool_version=_get(tool, "version", str), checkpoint=info, settings=settings, layers=layers,
            skipped=skipped, network=_network(_get(doc, "network", dict)), findings=findings,
            time_s=_num(res, "time_s") or 0.0, peak_rss_bytes=rss, fail_on=str(settings.fail_on),
            heatmaps=dict(heatmaps or {}),
        )
    except (TypeError, AttributeError, KeyError) as e:  # a shape no field reader expected
        raise BadDocument(f"unexpected structure ({type(e).__name__})") from None
    if report.to_dict() != doc:
        raise BadDocument("the document does not write back to itself")
    return report
