"""SARIF 2.1.0 for code scanning: one rule per finding code, one result per finding."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from lipaudit.findings import RULES
from lipaudit.text import visible

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVEL = {"error": "error", "warning": "warning", "info": "note"}
DIFF_RULE = "LIP040"  # a bound rose by more than diff --max-increase


def _reports(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """One report, or every report of a several-paths document."""
    reports = doc.get("reports")
    if isinstance(reports, list):
        return [r for r in reports if isinstance(r, Mapping)]
    return [doc]


def artifact_uri(path: str) -> str:
    """A relative path stays relative (to the repository root, as code scanning expects)."""
    p = path.replace(os.sep, "/")
    if os.path.isabs(path):
        return "file://" + quote(p if p.startswith("/") else "/" + p)
    return quote(PurePosixPath(p).as_posix().removeprefix("./"))


def _rule(code: str, severity: str) -> dict[str, Any]:
    rule = RULES.get(code)
    title = rule.title if rule is not None else code
    level = LEVEL.get(rule.severity if rule is not None else severity, "note")
    return {
        "id": code,
        "name": code,
        "shortDescription": {"text": title},
        "defaultConfiguration": {"level": level},
        "properties": {"tags": ["lipschitz"]},
    }


def _fingerprint(path: str, code: str, tensor: str | None) -> str:
    return hashlib.sha256("\0".join((path, code, tensor or "")).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _result(
    finding: Mapping[str, Any], rule_index: int, artifact_index: int, path: str
) -> dict[str, Any]:
    code = str(finding.get("code", ""))
    tensor = finding.get("tensor")
    tensor = visible(tensor, 500) if isinstance(tensor, str) else None
    message = visible(str(finding.get("message", "")), 2000)
    location: dict[str, Any] = {
        "physicalLocation": {
            "artifactLocation": {"uri": artifact_uri(path), "index": artifact_index},
            # code scanning shows a result only with a line; a checkpoint has no lines, so line 1
            "region": {"startLine": 1},
        }
    }
    if tensor:
        location["logicalLocations"] = [{"name": tensor, "fullyQualifiedName": tensor, "kind": "member"}]
    return {
        "ruleId": code,
        "ruleIndex": rule_index,
        "level": LEVEL.get(str(finding.get("severity")), "note"),
        "message": {"text": f"{tensor}: {message}" if tensor else message},
        "locations": [location],
        "partialFingerprints": {"lipauditFinding/v1": _fingerprint(path, code, tensor)},
    }


def sarif_log(doc: Mapping[str, Any], include_info: bool = True) -> dict[str, Any]:
    """The SARIF log of a report dict (or of a {"reports": [...]} document) as a dict."""
    rules: list[dict[str, Any]] = []
    rule_index: dict[str, int] = {}
    artifacts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    version = "unknown"
    for report in _reports(doc):
        tool = report.get("tool")
        if isinstance(tool, Mapping) and isinstance(tool.get("version"), str):
            version = tool["version"]
        error = report.get("error")
        if isinstance(error, Mapping):
            where = error.get("path")
            text = visible(str(error.get("message", "error")), 2000)
            notifications.append({
                "level": "error",
                "message": {"text": f"{visible(str(where))}: {text}" if where else text},
                "descriptor": {"id": str(error.get("code", "error"))},
            })
            continue
        checkpoint = report.get("checkpoint")
        if not isinstance(checkpoint, Mapping):
            continue
        path = str(checkpoint.get("path", ""))
        artifact: dict[str, Any] = {"location": {"uri": artifact_uri(path)}}
        sha = checkpoint.get("sha256")
        if isinstance(sha, str) and sha:
            artifact["hashes"] = {"sha-256": sha}
        artifacts.append(artifact)
        findings: Iterable[Any] = report.get("findings") or ()
        for f in findings:
            if not isinstance(f, Mapping) or (f.get("severity") == "info" and not include_info):
                continue
            code = str(f.get("code", "LIP000"))
            if code not in rule_index:
                rule_index[code] = len(rules)
                rules.append(_rule(code, str(f.get("severity"))))
            results.append(_result(f, rule_index[code], len(artifacts) - 1, path))
    invocation: dict[str, Any] = {"executionSuccessful": not notifications}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "lipaudit", "version": version, "rules": rules}},
        "artifacts": artifacts,
        "results": results,
        "invocations": [invocation],
        "columnKind": "unicodeCodePoints",
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def render(doc: Mapping[str, Any], include_info: bool = True) -> str:
    """SARIF 2.1.0 JSON text of a report dict (Report.to_dict()) or a several-reports document."""
    return json.dumps(sarif_log(doc, include_info), indent=2, ensure_ascii=False) + "\n"


def diff_log(d: DiffResult) -> dict[str, Any]:
    """A diff's gate failures as SARIF results (rule LIP040), on the new checkpoint."""
    from lipaudit.formats import diff_verdict

    path = d.new.path
    artifact: dict[str, Any] = {"location": {"uri": artifact_uri(path)}}
    if d.new.sha256:
        artifact["hashes"] = {"sha-256": d.new.sha256}
    by_prefix = {f"{visible(x.name)} ({visible(x.tensor)}):": x.tensor for x in d.layers}
    results = []
    for v in d.violations:
        tensor = next((t for prefix, t in by_prefix.items() if v.startswith(prefix)), None)
        finding = {"code": DIFF_RULE, "severity": "error", "tensor": tensor, "message": v}
        results.append(_result(finding, 0, 0, path))
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "lipaudit", "version": d.tool_version, "rules": [_rule(DIFF_RULE, "error")]}},
        "artifacts": [artifact],
        "results": results,
        "invocations": [{"executionSuccessful": True,
                         "properties": {"verdict": diff_verdict(d), "old": d.old.to_dict(), "new": d.new.to_dict()}}],
        "columnKind": "unicodeCodePoints",
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def render_diff(d: DiffResult, options: object) -> str:
    return json.dumps(diff_log(d), indent=2, ensure_ascii=False) + "\n"
