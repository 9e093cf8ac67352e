"""lipaudit diff: layer matching, the --max-increase gate, every output format, report sniffing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lipaudit.commands.diff import diff
from lipaudit.diff import compare, match_layers, parse_percent, read_report
from lipaudit.errors import MalformedInputError, UsageError
from lipaudit.formats import FORMAT_NAMES, render_diff

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "fixtures" / "mlp.safetensors")


def _run(*args: str) -> Any:
    return CliRunner().invoke(diff, list(args), catch_exceptions=False)


def _layer(tensor: str, name: str, upper: float | None, lower: float | None = None) -> dict[str, Any]:
    lower = upper if lower is None else lower
    return {"tensor": tensor, "name": name, "kind": "linear",
            "sigma": {"lower": lower, "upper": upper, "certified": upper is not None}}


def _report(layers: list[dict[str, Any]], upper: float | None, log10: float | None = None,
            path: str = "m.pt") -> dict[str, Any]:
    if log10 is None and upper:
        log10 = math.log10(upper)
    return {
        "schema_version": 1, "tool": {"name": "lipaudit", "version": "0.1.0"},
        "checkpoint": {"path": path, "sha256": "0" * 64}, "layers": layers,
        "network": {"lipschitz_upper": upper, "log10_lipschitz_upper": log10, "certified": True},
        "findings": [], "passed": True, "error": None,
    }


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> str:
    """mlp.safetensors with layer 2's weight doubled."""
    tensors = load_file(MLP)
    tensors["2.weight"] = tensors["2.weight"] * 2
    path = tmp_path_factory.mktemp("diff") / "mlp_2x.safetensors"
    save_file(tensors, str(path))
    return str(path)


def test_identical_checkpoints_pass() -> None:
    r = _run(MLP, MLP, "--max-increase", "0%", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and doc["violations"] == []
    assert doc["network"]["rise_pct"] == 0.0
    assert {x["status"] for x in doc["layers"]} == {"unchanged"}
    assert doc["added"] == [] and doc["removed"] == []


def test_a_doubled_layer_fails_at_ten_percent(scaled: str) -> None:
    r = _run(MLP, scaled, "--max-increase", "10%", "--format", "json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["passed"] is False
    by_name = {x["name"]: x for x in doc["layers"]}
    # independent reference: the float64 LAPACK norm of the weights, ratio 2 by construction
    w = load_file(MLP)["2.weight"].double().numpy()
    assert by_name["2"]["old"]["upper"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-3)
    assert by_name["2"]["new"]["upper"] == pytest.approx(2 * np.linalg.norm(w, 2), rel=1e-3)
    assert by_name["2"]["rise_pct"] == pytest.approx(100.0, abs=0.1)
    assert by_name["0"]["rise_pct"] == pytest.approx(0.0, abs=1e-9)
    assert doc["network"]["rise_pct"] == pytest.approx(100.0, abs=0.1)
    assert any(v.startswith("network") for v in doc["violations"])
    assert any(v.startswith("2 (2.weight)") for v in doc["violations"])
    # a looser gate passes; no gate never fails
    assert _run(MLP, scaled, "--max-increase", "101").exit_code == 0
    assert _run(MLP, scaled).exit_code == 0
    # the other way round the bound falls
    assert _run(scaled, MLP, "--max-increase", "0").exit_code == 0


def test_reports_and_checkpoints_mix(tmp_path: Path, scaled: str) -> None:
    from lipaudit.commands.diff import audit_to_dict

    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(audit_to_dict(None, "auto", None)(MLP)), encoding="utf-8")
    r = _run(str(saved), scaled, "--max-increase", "10", "--format", "json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["network"]["rise_pct"] == pytest.approx(100.0, abs=0.1)
    r = _run(str(saved), MLP, "--max-increase", "0", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["network"]["rise_pct"] == 0.0


def test_every_format(scaled: str) -> None:
    table = _run(MLP, scaled, "--max-increase", "10%")
    assert table.exit_code == 1
    assert "+100.00%" in table.stdout and "FAILED: 2 gate failures (--max-increase 10%)" in table.stdout
    md = _run(MLP, scaled, "--max-increase", "10%", "--format", "markdown").stdout
    assert "| layer | kind | status | old upper | new upper | change |" in md and "### Gate failures" in md
    gh = _run(MLP, scaled, "--max-increase", "10%", "--format", "github").stdout.splitlines()
    errors = [x for x in gh if x.startswith("::error ")]
    assert len(errors) == 2 and all("file=" in x and "title=lipaudit diff::" in x for x in errors)
    assert "%25" in errors[0]  # the % of the message is escaped
    assert gh[-1].startswith("::notice title=lipaudit diff::")


def test_output_file(tmp_path: Path) -> None:
    out = tmp_path / "d.md"
    r = _run(MLP, MLP, "--format", "markdown", "-o", str(out))
    assert r.exit_code == 0 and r.stdout == ""
    assert out.read_text(encoding="utf-8").startswith("## lipaudit diff:")


def test_matching_by_key_then_name() -> None:
    old = (_layer("a.weight", "a", 1.0), _layer("b.weight", "b", 2.0), _layer("c.weight", "c", 3.0))
    new = (_layer("a.weight_orig", "a", 1.0), _layer("b.weight", "b", 2.0), _layer("d.weight", "d", 1.0))
    pairs = [(x and x["tensor"], y and y["tensor"]) for x, y in match_layers(old, new)]
    assert pairs == [("a.weight", "a.weight_orig"), ("b.weight", "b.weight"), (None, "d.weight"), ("c.weight", None)]
    d = compare(_report(list(old), 6.0), _report(list(new), 2.0), 10.0)
    assert [x.tensor for x in d.added] == ["d.weight"] and [x.tensor for x in d.removed] == ["c.weight"]
    assert d.passed and d.network_rise_pct == pytest.approx(-100 * 2 / 3)
    doc = d.to_dict()
    assert doc["added"] == ["d.weight"] and doc["removed"] == ["c.weight"]
    assert doc["layers"][0]["old_tensor"] == "a.weight"


def test_zero_unknown_and_huge_bounds() -> None:
    zero = _report([_layer("w", "w", 0.0)], 0.0, None)
    one = _report([_layer("w", "w", 1.0)], 1.0)
    d = compare(zero, one, 1000.0)
    assert d.network_rise_pct == math.inf and not d.passed
    text = render_diff(d, "json")  # strict JSON: no Infinity
    assert json.loads(text)["network"] == {"rise_pct": None, "rise_unbounded": True}
    assert compare(one, zero, 0.0).passed
    unknown = _report([_layer("w", "w", None)], None, None)
    d = compare(one, unknown, 10.0)
    assert not d.passed and any("unknown" in v for v in d.violations)
    assert compare(unknown, one, 10.0).passed  # nothing to compare against
    # beyond float range: only log10 is known
    big = _report([_layer("w", "w", 1.0)], None, 400.0)
    bigger = _report([_layer("w", "w", 1.0)], None, 400.0 + math.log10(1.05))
    assert compare(big, bigger, 4.9).network_rise_pct == pytest.approx(5.0)
    assert not compare(big, bigger, 4.9).passed and compare(big, bigger, 5.1).passed
    for fmt in FORMAT_NAMES:
        assert "10^400" in render_diff(compare(big, bigger, 5.0), fmt) or fmt in ("json", "sarif")


def test_percent_parsing() -> None:
    assert parse_percent("10%") == 10.0 and parse_percent(" 2.5 % ") == 2.5 and parse_percent("0") == 0.0
    for bad in ("abc", "-1", "nan", "inf", "%"):
        with pytest.raises(UsageError):
            parse_percent(bad)
    r = CliRunner().invoke(diff, [MLP, MLP, "--max-increase", "ten"])
    assert r.exit_code == 2 and "ten" in r.output


def test_bad_reports(tmp_path: Path) -> None:
    broken = _report([], 1.0)
    del broken["layers"]
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(MalformedInputError):
        compare(broken, broken)
    r = _run(str(p), str(p), "--format", "json")
    assert r.exit_code == 4 and json.loads(r.stdout)["error"]["code"] == "malformed_input"
    err = {"schema_version": 1, "tool": {"name": "lipaudit", "version": "0.1.0"},
           "error": {"code": "unsafe_input", "exit_code": 3, "message": "pickle", "path": "x"}}
    p.write_text(json.dumps(err), encoding="utf-8")
    assert _run(str(p), MLP).exit_code == 4
    many = {"schema_version": 1, "tool": {"name": "lipaudit"}, "reports": [_report([], 1.0)] * 2, "passed": True}
    p.write_text(json.dumps(many), encoding="utf-8")
    assert _run(str(p), MLP).exit_code == 2
    one = copy.deepcopy(many)
    one["reports"] = one["reports"][:1]
    p.write_text(json.dumps(one), encoding="utf-8")
    assert read_report(str(p)) == one


def test_sniffing_leaves_checkpoints_and_indexes_alone(tmp_path: Path) -> None:
    index = ROOT / "fixtures" / "mlp_sharded" / "model.safetensors.index.json"
    assert read_report(str(index)) is None
    assert read_report(MLP) is None
    other = tmp_path / "other.json"
    other.write_text('{"a": NaN}', encoding="utf-8")
    assert read_report(str(other)) is None
    r = _run(str(index), MLP, "--format", "json", "--max-increase", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["network"]["rise_pct"] == pytest.approx(0.0, abs=1e-9)


def test_missing_file_is_not_a_traceback(tmp_path: Path) -> None:
    r = CliRunner().invoke(diff, [str(tmp_path / "nope.pt"), MLP])
    assert r.exit_code in (2, 4) and "Traceback" not in r.output


def test_hostile_names_render() -> None:
    old = _report([_layer("evil\x1b[2J|*`", "evil\x1b[2J|*`[/]", 1.0)], 1.0)
    new = _report([_layer("evil\x1b[2J|*`", "evil\x1b[2J|*`[/]", 3.0)], 3.0, path="x\n::error::y")
    d = compare(old, new, 10.0)
    for fmt in FORMAT_NAMES:
        text = render_diff(d, fmt)
        assert "\x1b" not in text
    gh = render_diff(d, "github")
    assert all(line.startswith("::") for line in gh.splitlines())


def test_sarif_and_html_diffs_through_the_inspect_registry(scaled: str) -> None:
    from tests.test_sarif import validate

    r = _run(MLP, scaled, "--max-increase", "10%", "--format", "sarif")
    assert r.exit_code == 1
    log = validate(r.stdout)
    results = log["runs"][0]["results"]
    assert len(results) == 2 and {x["ruleId"] for x in results} == {"LIP040"}
    assert any(x.get("locations", [{}])[0].get("logicalLocations", [{}])[0].get("name") == "2.weight"
               for x in results)
    page = _run(MLP, scaled, "--max-increase", "10%", "--format", "html").stdout
    assert page.startswith("<!DOCTYPE html>") and "FAILED: 2 gate failures" in page and "+100.00%" in page
    assert page.index("FAILED") < page.index("<table")


def test_names_never_start_a_workflow_command_in_any_diff_format(tmp_path: Path) -> None:
    """issue 17 item 13: one escaping path for every command's output."""
    import torch

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"::warning::x.weight": torch.eye(3), "a\n::error::b.weight": torch.eye(2)}, a)
    torch.save({"::warning::x.weight": 3 * torch.eye(3), "a\n::error::b.weight": torch.eye(2)}, b)
    for fmt in FORMAT_NAMES:
        out = _run(str(a), str(b), "--max-increase", "10", "--format", fmt).stdout
        for line in out.splitlines():
            if fmt == "github":  # every line is one of lipaudit's own commands, names inside escaped
                assert line.startswith(("::error file=", "::notice title=lipaudit diff::")), line
            else:
                assert not line.lstrip().startswith("::"), (fmt, line)
