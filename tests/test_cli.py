"""The command line: streams, formats, gates and exit codes (DESIGN §4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lipaudit import __version__
from tests.conftest import FIXTURES, run, run_json, validate

DEMO = FIXTURES / "demo_sn_cnn.pt"


def test_version_and_help() -> None:
    assert __version__ in run("--version").stdout
    assert "inspect" in run("--help").stdout


def test_stdout_is_only_the_report_and_summary_goes_to_stderr() -> None:
    result = run("inspect", DEMO, "--format", "json")
    assert result.exit_code == 0
    validate(json.loads(result.stdout))
    assert "no certified network bound" in result.stderr and "estimate 31.072" in result.stderr
    quiet = run("inspect", DEMO, "--format", "json", "-q")
    assert quiet.stderr == ""


@pytest.mark.parametrize("fmt", ["table", "markdown", "github"])
def test_text_formats_mention_every_layer(fmt: str) -> None:
    result = run("inspect", DEMO, "--format", fmt, *(() if fmt == "table" else ("-q",)))
    assert result.exit_code == 0
    if fmt != "github":
        for name in ("features.0", "features.6", "head"):
            assert name in result.stdout
    assert "LIP003" in result.stdout


def test_quiet_table_is_the_summary_line_and_its_reason() -> None:
    """pre-commit hooks run with --quiet: the one line that matters stays, the tables go."""
    ok = run("inspect", DEMO, "-q")
    assert ok.stdout.splitlines() == [
        f"{DEMO}: 5 layers, no certified network bound (the wiring is not known (export the model, or pass "
        "--model)); estimate 31.072 (product of 5 layers), 10 findings (0 errors): PASSED"]
    assert ok.stderr == ""
    bad = run("inspect", DEMO, "-q", "--fail-above", "1")
    assert bad.exit_code == 1 and len(bad.stdout.splitlines()) == 1
    assert "FAILED: 1 error: LIP001" in bad.stdout and "31.07" in bad.stdout


def test_github_annotations_are_workflow_commands() -> None:
    out = run("inspect", DEMO, "--format", "github", "--fail-above", "1", "-q").stdout.splitlines()
    assert all(line.startswith("::") for line in out)
    shown = str(DEMO).replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    assert any(line.startswith(f"::error file={shown},title=LIP001 network") for line in out)
    assert any(line.startswith(f"::warning file={shown},title=LIP003 reshaped") for line in out)


def test_fail_above_gates_on_the_network_bound() -> None:
    code, doc = run_json(str(DEMO), "--fail-above", "1000")  # a state dict's product is not a proof
    assert code == 1 and [f["code"] for f in doc["findings"] if f["severity"] == "error"] == ["LIP017"]
    code, doc = run_json(str(DEMO), "--fail-above", "1000", "--assume", "chain")
    assert code == 0 and doc["passed"] and doc["settings"]["assume"] == ["chain"]
    assert "asserted by the user" in doc["network"]["assumptions"][0]
    code, doc = run_json(str(DEMO), "--fail-above", "1.0", "--assume", "chain")
    assert code == 1 and not doc["passed"]
    assert [f["code"] for f in doc["findings"] if f["severity"] == "error"] == ["LIP001"]


def test_fail_layer_above_names_each_layer() -> None:
    code, doc = run_json(str(DEMO), "--fail-layer-above", "1.5")
    assert code == 1
    failing = sorted(f["tensor"] for f in doc["findings"] if f["code"] == "LIP002")
    assert failing == [f"features.{i}.weight_orig" for i in (0, 2, 4, 6)]  # convs, not the linear head


@pytest.mark.parametrize("bad", [["--fail-above", "-1"], ["--fail-above", "nan"], ["--method", "magic"],
                                 ["--rtol", "0"], ["--format", "xml"]])
def test_bad_options_are_usage_errors(bad: list[str]) -> None:
    result = run("inspect", DEMO, *bad)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_missing_file_is_exit_2_and_one_line() -> None:
    result = run("inspect", "/no/such/file.pt")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stdout == ""


def test_output_file_written_only_after_success(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run("inspect", DEMO, "--format", "json", "-o", out, "-q")
    assert result.exit_code == 0 and result.stdout == ""
    validate(json.loads(out.read_text()))
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    bad = tmp_path / "never.json"
    result = run("inspect", tmp_path / "missing.pt", "-o", bad)
    assert result.exit_code == 2 and not bad.exists()


def test_output_keeps_an_existing_files_mode(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    out.write_text("old")
    os.chmod(out, 0o640)
    assert run("inspect", DEMO, "--format", "markdown", "-o", out, "-q").exit_code == 0
    assert (out.stat().st_mode & 0o777) == 0o640
    assert out.read_text().startswith("## lipaudit")


def test_unwritable_output_is_exit_6(tmp_path: Path) -> None:
    result = run("inspect", DEMO, "-o", tmp_path / "no_such_dir" / "r.txt", "--format", "json")
    assert result.exit_code == 6
    assert json.loads(result.stdout)["error"]["code"] == "output"
    result = run("inspect", DEMO, "-o", tmp_path)
    assert result.exit_code == 6


def test_internal_error_is_exit_70_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import lipaudit.audit

    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("synthetic")

    monkeypatch.setattr(lipaudit.audit, "audit", boom)
    result = run("inspect", DEMO, "--format", "json")
    assert result.exit_code == 70
    assert "Traceback" not in result.stderr
    assert validate(json.loads(result.stdout))["error"]["code"] == "internal"


def test_resource_limit_is_exit_5(tmp_path: Path) -> None:
    node: object = {"w": torch.ones(2, 2)}
    for _ in range(80):
        node = {"x": node}
    path = tmp_path / "deep.pt"
    torch.save(node, path)
    code, doc = run_json(str(path))
    assert code == 5, doc


def test_cuda_without_a_gpu_is_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert run("inspect", DEMO, "--device", "cuda").exit_code == 2


def test_hostile_names_are_shown_inert(tmp_path: Path) -> None:
    names = ["[bold red]evil[/]", "esc\x1b[2J.x", "line\nbreak", "::error::pwn", "pipe|`tick`"]
    path = tmp_path / "names.pt"
    torch.save({f"{n}.weight": torch.eye(2) * (i + 2) for i, n in enumerate(names)}, path)
    for fmt in ("table", "markdown", "github", "json"):
        result = run("inspect", path, "--format", fmt, "-q", "--fail-layer-above", "1")
        assert result.exit_code == 1, result.stdout
        assert "\x1b" not in result.stdout
        if fmt == "table":
            assert "[bold red]evil[/]" in result.stdout
        if fmt == "github":
            lines = result.stdout.splitlines()
            assert all(line.startswith(("::error file=", "::notice ")) for line in lines)
            assert all("title=LIP002 " in line for line in lines if line.startswith("::error"))
        if fmt == "markdown":
            assert "pipe\\|\\`tick\\`" in result.stdout


def test_input_size_adds_exact_circular_and_a_zero_padding_bracket() -> None:
    from tests.spectral.conv_reference import conv_matrix, op_norm

    code, doc = run_json(str(DEMO), "--input-size", "6x6", "--input-size", "head=4x4")
    assert code == 0
    assert doc["settings"]["input_sizes"] == {"*": [6, 6], "head": [4, 4]}
    sd = torch.load(DEMO, weights_only=True)
    for x in doc["layers"]:
        if x["kind"] != "conv2d":
            assert x["at_input_size"] is None
            continue
        at = x["at_input_size"]
        assert at["size"] == [6, 6]
        # the weight the model uses: weight_orig / (u^T W v)
        w = sd[x["tensor"]].double()
        u, v = sd[x["tensor"].replace("_orig", "_u")].double(), sd[x["tensor"].replace("_orig", "_v")].double()
        w = w / (u @ w.reshape(w.shape[0], -1) @ v)
        circ = op_norm(conv_matrix(w, (6, 6), padding=1, circular=True))
        zero = op_norm(conv_matrix(w, (6, 6), padding=1))
        assert at["circular"]["lower"] <= circ * (1 + 1e-9) and at["circular"]["upper"] >= circ
        assert at["circular"]["upper"] <= circ * (1 + 1e-6)
        assert at["zero_padding"]["lower"] <= zero * (1 + 1e-9) <= at["zero_padding"]["upper"] * (1 + 1e-9)
        assert at["circular"]["upper"] <= x["sigma"]["upper"]
        assert any("at input size 6x6" in n for n in x["notes"])


@pytest.mark.parametrize("bad", ["0x3", "axb", "1x2x3x4", "=", "name=5000x1"])
def test_bad_input_size_is_a_usage_error(bad: str) -> None:
    assert run("inspect", DEMO, "--input-size", bad).exit_code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_same_numbers() -> None:
    code, cpu = run_json(str(DEMO), "--device", "cpu")
    code2, gpu = run_json(str(DEMO), "--device", "cuda")
    assert code == code2 == 0
    for a, b in zip(cpu["layers"], gpu["layers"], strict=True):
        assert b["sigma"]["upper"] == pytest.approx(a["sigma"]["upper"], rel=1e-9)


def test_write_adds_outputs_of_the_same_audit(tmp_path: Path) -> None:
    md, doc, page = tmp_path / "s.md", tmp_path / "r.json", tmp_path / "r.html"
    result = run("inspect", DEMO, "--format", "github", "--write", f"markdown={md}", "--write", f"json={doc}",
                 "--write", f"html={page}", "-q")
    assert result.exit_code == 0 and result.stdout.startswith("::")
    upper = json.loads(doc.read_text())["network"]["lipschitz_upper"]
    assert f"{upper:.5g}" in md.read_text() and f"{upper:.5g}" in page.read_text()
    assert 'class="chart heatmaps"' in page.read_text()  # the html output still gets its heatmaps
    bad = run("inspect", DEMO, "--write", "pdf=x.pdf")
    assert bad.exit_code == 2 and "FORMAT=FILE" in bad.output
    assert run("inspect", DEMO, "--write", f"json={DEMO}").exit_code == 2  # never over an input
