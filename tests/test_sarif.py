"""--format sarif: valid against the vendored OASIS SARIF 2.1.0 schema, one rule per finding code."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema
import pytest

from lipaudit.formats import sarif

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "data" / "sarif-schema-2.1.0.json").read_text(encoding="utf-8"))


@cache
def _report(name: str, fail_above: float | None = None) -> str:
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.report import Settings

    ckpt = open_checkpoint(f"fixtures/{name}", None)
    return json.dumps(audit(ckpt, Settings(fail_above=fail_above)).to_dict())


def report(name: str, fail_above: float | None = None) -> dict[str, Any]:
    return json.loads(_report(name, fail_above))  # type: ignore[no-any-return]


def validate(text: str) -> dict[str, Any]:
    log = json.loads(text)
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    return log  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_schema_is_the_oasis_one() -> None:
    assert SCHEMA["id"].endswith("/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json")
    bad = {"version": "2.1.0", "runs": [{"tool": {"driver": {}}}]}  # driver needs a name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(bad)


def test_demo_report_validates_with_one_rule_per_code() -> None:
    doc = report("demo_sn_cnn.pt", fail_above=0.5)
    log = validate(sarif.render(doc))
    assert log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "lipaudit" and driver["version"] == doc["tool"]["version"]
    codes = [f["code"] for f in doc["findings"]]
    assert sorted(r["id"] for r in driver["rules"]) == sorted(set(codes))
    assert {"LIP001", "LIP003", "LIP005"} <= set(codes)
    levels = {r["id"]: r["defaultConfiguration"]["level"] for r in driver["rules"]}
    assert levels["LIP001"] == "error" and levels["LIP003"] == "warning"
    assert all(r["shortDescription"]["text"] for r in driver["rules"])
    assert len(run["results"]) == len(doc["findings"])
    for finding, result in zip(doc["findings"], run["results"], strict=True):
        assert result["ruleId"] == finding["code"]
        assert driver["rules"][result["ruleIndex"]]["id"] == finding["code"]
        assert result["level"] == {"error": "error", "warning": "warning", "info": "note"}[finding["severity"]]
        (loc,) = result["locations"]
        assert loc["physicalLocation"]["artifactLocation"]["uri"] == "fixtures/demo_sn_cnn.pt"
        if finding["tensor"]:
            assert loc["logicalLocations"][0]["name"] == finding["tensor"]
            assert result["message"]["text"].startswith(finding["tensor"] + ": ")
        assert finding["message"] in result["message"]["text"]
    assert run["artifacts"][0]["hashes"]["sha-256"] == doc["checkpoint"]["sha256"]
    assert run["invocations"][0]["executionSuccessful"] is True
    # fingerprints tell results apart
    prints = [r["partialFingerprints"]["lipauditFinding/v1"] for r in run["results"]]
    assert len(set(prints)) == len({(f["code"], f["tensor"]) for f in doc["findings"]})


def test_info_findings_are_notes_and_can_be_left_out() -> None:
    doc = report("lstm_train_state.pt")
    infos = [f for f in doc["findings"] if f["severity"] == "info"]
    assert infos, "the fixture should give an info finding"
    run = validate(sarif.render(doc))["runs"][0]
    assert sum(r["level"] == "note" for r in run["results"]) == len(infos)
    run = validate(sarif.render(doc, include_info=False))["runs"][0]
    assert all(r["level"] != "note" for r in run["results"])
    assert len(run["results"]) == len(doc["findings"]) - len(infos)


def test_no_findings_is_a_valid_empty_run() -> None:
    doc = report("mlp.safetensors")
    doc["findings"] = []
    run = validate(sarif.render(doc))["runs"][0]
    assert run["results"] == [] and run["tool"]["driver"]["rules"] == []


def test_hostile_names_and_paths_stay_valid() -> None:
    doc = copy.deepcopy(report("demo_sn_cnn.pt", fail_above=0.5))
    doc["checkpoint"]["path"] = "models/my model #1%.pt"
    for f in doc["findings"]:
        f["tensor"] = "evil\x1b[31m[/]\u202e\n{}" if f["tensor"] else None
        f["message"] += " \x00\x07"
    log = validate(sarif.render(doc))
    for result in log["runs"][0]["results"]:
        text = result["message"]["text"]
        assert not any(ord(c) < 32 or c == "\u202e" for c in text)
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert " " not in uri and "#" not in uri and unquote(uri) == "models/my model #1%.pt"


def test_absolute_path_is_a_file_uri() -> None:
    doc = report("mlp.safetensors")
    doc["checkpoint"]["path"] = "/data/ckpt/a b.pt"
    assert sarif.artifact_uri(doc["checkpoint"]["path"]) == "file:///data/ckpt/a%20b.pt"
    validate(sarif.render(doc))


def test_several_reports_and_an_error_document() -> None:
    good = report("demo_sn_cnn.pt", fail_above=0.5)
    other = report("lstm_train_state.pt")
    error = {"schema_version": 1, "tool": {"name": "lipaudit", "version": "0.1.0"},
             "error": {"code": "malformed_input", "exit_code": 4, "message": "bad zip", "path": "x.pt"}}
    doc = {"schema_version": 1, "tool": good["tool"], "reports": [good, error, other], "passed": False}
    run = validate(sarif.render(doc))["runs"][0]
    uris = [a["location"]["uri"] for a in run["artifacts"]]
    assert uris == ["fixtures/demo_sn_cnn.pt", "fixtures/lstm_train_state.pt"]
    assert len(run["results"]) == len(good["findings"]) + len(other["findings"])
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["index"] for r in run["results"]} == {0, 1}
    inv = run["invocations"][0]
    assert inv["executionSuccessful"] is False
    assert "bad zip" in inv["toolExecutionNotifications"][0]["message"]["text"]
