"""The CLI as CI uses it: start-up, several paths, refusals, usage errors in JSON, safe output lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES, run, validate


def test_cli_import_leaves_torch_unloaded() -> None:
    code = "import sys, lipaudit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_and_module_agree() -> None:
    script = shutil.which("lipaudit")
    assert script is not None
    a = subprocess.run([script, "--version"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "lipaudit", "--version"], capture_output=True, text=True)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_several_paths_make_one_document_and_the_worst_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run("inspect", FIXTURES / "mlp.pt", FIXTURES / "conv_bn.pt", bad, "--format", "json", "-q")
    doc = validate(json.loads(result.stdout))
    assert [r.get("error") is None for r in doc["reports"]] == [True, True, False]
    assert doc["passed"] is False and result.exit_code == 4


def test_a_folder_and_a_glob_expand(tmp_path: Path) -> None:
    for name in ("a.pt", "b.pt"):
        shutil.copy(FIXTURES / "mlp.pt", tmp_path / name)
    for args in ((tmp_path,), (str(tmp_path / "*.pt"),)):
        result = run("inspect", *args, "--format", "json", "-q")
        doc = validate(json.loads(result.stdout))
        assert len(doc["reports"]) == 2 and result.exit_code == 0


def test_report_over_the_input_is_refused(tmp_path: Path) -> None:
    src = shutil.copy(FIXTURES / "mlp.pt", tmp_path / "m.pt")
    before = Path(src).read_bytes()
    result = run("inspect", src, "-o", src)
    assert result.exit_code == 2 and Path(src).read_bytes() == before


def test_normalize_needs_force_to_replace(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep")
    assert run("normalize", FIXTURES / "mlp.pt", "-o", out, "-q").exit_code == 2
    assert out.read_bytes() == b"keep"
    assert run("normalize", FIXTURES / "mlp.pt", "-o", out, "-q", "--force").exit_code == 0
    assert out.read_bytes() != b"keep"


def test_usage_errors_follow_format_json() -> None:
    out = subprocess.run([sys.executable, "-m", "lipaudit", "inspect", "x.pt", "--format", "json", "--rtol", "abc"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert validate(json.loads(out.stdout))["error"]["code"] == "usage"


def test_names_never_start_a_workflow_command(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"::add-mask::x.weight": torch.eye(3), "::stop-commands::t.weight": torch.eye(3)}, path)
    for fmt in ("table", "markdown", "github"):
        result = run("inspect", path, "--format", fmt, "-q")
        assert not any(line.lstrip().startswith("::") and "title=" not in line for line in result.stdout.splitlines())


def test_markdown_mentions_are_inert(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"@org/team.weight": torch.eye(3), "#1.weight": torch.eye(3)}, path)
    text = run("inspect", path, "--format", "markdown", "-q").stdout
    assert "@org" not in text and "#1" not in text


def test_html_report_holds_charts(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = run("inspect", FIXTURES / "demo_sn_cnn.pt", "--format", "html", "-o", out, "-q")
    assert result.exit_code == 0
    page = out.read_text()
    assert page.count("<svg") >= 1 and "Frequency response" in page and page.count("<div class=\"bar\">") == 5


def test_pyproject_gate_decides_the_exit_code(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "pyproject.toml").write_text('[tool.lipaudit]\nfail-above = 0.001\n\n[[tool.lipaudit.overrides]]\n'
                                             'paths = ["ok/*"]\nfail-above = 1e12\nassume = "chain"\n')
    (tmp_path / "ok").mkdir()
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "m.pt")
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "ok" / "m.pt")
    monkeypatch.chdir(tmp_path)
    assert run("inspect", "m.pt", "-q").exit_code == 1
    assert run("inspect", "ok/m.pt", "-q").exit_code == 0
    assert run("inspect", "m.pt", "-q", "--fail-above", "1e12").exit_code == 1  # the wiring is not known
    assert run("inspect", "m.pt", "-q", "--fail-above", "1e12", "--assume", "chain").exit_code == 0
    (tmp_path / "pyproject.toml").write_text("[tool.lipaudit]\nfail-abov = 1\n")
    assert run("inspect", "m.pt", "-q").exit_code == 2


def test_pt2_archive_is_bounded_over_its_graph() -> None:
    result = run("inspect", FIXTURES / "residual.pt2", "--format", "json", "-q", "--measure-work", "40")
    net = validate(json.loads(result.stdout))["network"]
    assert result.exit_code == 0 and net["method"] == "graph" and net["certified"]
    assert net["lipschitz_upper"] >= 1.5 and net["lipschitz_lower"] <= net["lipschitz_upper"]
    assert net["lipschitz_upper"] == pytest.approx(1.5, rel=1e-6)  # x + 0.5 x: 1 + a, not the product 0.5


def test_attention_graph_is_never_certified() -> None:
    result = run("inspect", FIXTURES / "attention.pt2", "--format", "json", "-q", "--no-measure",
                 "--fail-above", "1e9")
    doc = validate(json.loads(result.stdout))
    assert not doc["network"]["certified"] and doc["network"]["uncovered"]
    assert result.exit_code == 1


def test_state_dict_on_an_exported_graph(tmp_path: Path) -> None:
    from torch.export import load  # our own fixture: trusted

    module = load(FIXTURES / "residual.pt2").module()
    sd = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, sd)
    result = run("inspect", sd, "--graph", FIXTURES / "residual.pt2", "--format", "json", "-q", "--no-measure")
    net = validate(json.loads(result.stdout))["network"]
    assert result.exit_code == 0 and net["method"] == "graph"
    assert net["lipschitz_upper"] == pytest.approx(1.5, rel=1e-6)
    torch.save({"other.weight": torch.eye(2)}, sd)
    assert run("inspect", sd, "--graph", FIXTURES / "residual.pt2", "-q").exit_code == 2


def test_normalize_pt2_to_a_network_target(tmp_path: Path) -> None:
    out = tmp_path / "o.pt2"
    result = run("normalize", FIXTURES / "residual.pt2", "-o", out, "--network-target", "1.2", "--format", "json")
    assert result.exit_code == 0, result.output
    net = validate(json.loads(run("inspect", out, "--format", "json", "-q", "--no-measure").stdout))["network"]
    assert net["certified"] and net["lipschitz_upper"] <= 1.2
