"""action.yml and .pre-commit-hooks.yaml: the command lines they build are valid lipaudit calls."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "fixtures" / "demo_sn_cnn.pt")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block(lines: list[str], start: int) -> list[str]:
    """The lines indented deeper than lines[start]."""
    base = _indent(lines[start])
    out = []
    for line in lines[start + 1 :]:
        if line.strip() and _indent(line) <= base:
            break
        out.append(line)
    return out


def _step(step_id: str) -> dict[str, Any]:
    """The step's run script and env, with PyYAML when installed, else read by indentation
    (enough for this file: a literal block for run, one-line values for env)."""
    text = (ROOT / "action.yml").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        lines = text.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.strip() == f"- id: {step_id}")
        body = [lines[at], *_block(lines, at)]
        run_at = next(i for i, ln in enumerate(body) if ln.strip() == "run: |")
        run_lines = _block(body, run_at)
        cut = min(_indent(ln) for ln in run_lines if ln.strip())
        env_at = next(i for i, ln in enumerate(body) if ln.strip() == "env:")
        env = dict(ln.strip().split(": ", 1) for ln in _block(body, env_at) if ln.strip())
        return {"run": "\n".join(ln[cut:] for ln in run_lines) + "\n", "env": env}
    doc = yaml.safe_load(text)
    return next(s for s in doc["runs"]["steps"] if s.get("id") == step_id)  # type: ignore[no-any-return]


def _inputs() -> set[str]:
    text = (ROOT / "action.yml").read_text(encoding="utf-8")
    lines = text.splitlines()
    at = lines.index("inputs:")
    return {ln.strip().rstrip(":") for ln in _block(lines, at) if _indent(ln) == 2}


def _parse_inspect(args: list[str]) -> click.Context:
    """Parse with the real CLI, without running: a bad option or value raises."""
    from lipaudit.cli import cli

    assert args[0] == "inspect"
    command = cli.get_command(click.Context(cli), "inspect")
    assert command is not None
    return command.make_context("inspect", list(args[1:]))


def _shim(tmp_path: Path) -> Path:
    """A lipaudit on PATH that records its arguments, NUL-separated, one file per call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "lipaudit"
    shim.write_text('#!/usr/bin/env bash\nn=$(ls "$CALLS" | wc -l)\nprintf "%s\\0" "$@" > "$CALLS/$n"\n',
                    encoding="utf-8")
    shim.chmod(0o755)
    (tmp_path / "calls").mkdir()
    return bin_dir


def _run_audit_step(tmp_path: Path, inputs: dict[str, str], bin_dir: Path) -> subprocess.CompletedProcess[str]:
    step = _step("audit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_"))}
    # the step's env maps each INPUT_ variable to its input
    for var, expr in step["env"].items():
        name = re.fullmatch(r"\$\{\{ inputs\.([a-z-]+) \}\}", expr)
        assert name, (var, expr)
        env[var] = inputs.get(name.group(1), "")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["CALLS"] = str(tmp_path / "calls")
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary.md")
    return subprocess.run(["bash", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=600)


def _calls(tmp_path: Path) -> list[list[str]]:
    files = sorted((tmp_path / "calls").iterdir(), key=lambda p: int(p.name))
    return [p.read_bytes().decode().split("\0")[:-1] for p in files]


def test_action_inputs_reach_a_valid_inspect_command(tmp_path: Path) -> None:
    assert {"paths", "fail-above", "format", "args", "summary"} <= _inputs()
    bin_dir = _shim(tmp_path)
    inputs = {"paths": DEMO + "\n", "fail-above": "3.5", "format": "github",
              "args": "--rtol 0.01 --method exact $(touch pwned) ;", "summary": "true"}
    result = _run_audit_step(tmp_path, inputs, bin_dir)
    assert result.returncode == 0, result.stderr
    (log_call,) = _calls(tmp_path)  # one audit, the job summary written by the same run
    # shell syntax in an input stays one literal argument
    assert not (tmp_path / "pwned").exists() and "$(touch" in log_call
    log_call = [a for a in log_call if a not in ("$(touch", "pwned)", ";")]
    ctx = _parse_inspect(log_call)
    assert ctx.params["fail_above"] == 3.5 and ctx.params["fmt"] == "github" and ctx.params["method"] == "exact"
    ((fmt, _),) = ctx.params["write"]
    assert fmt == "markdown"


def test_action_without_gate_or_summary(tmp_path: Path) -> None:
    bin_dir = _shim(tmp_path)
    result = _run_audit_step(tmp_path, {"paths": DEMO, "format": "github", "summary": "false"}, bin_dir)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(tmp_path)
    assert call == ["inspect", DEMO, "--format", "github"]
    _parse_inspect(call)


def test_action_step_runs_lipaudit_and_keeps_its_exit_code(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "lipaudit").exists()
    result = _run_audit_step(tmp_path, {"paths": DEMO, "format": "github", "summary": "true"}, bin_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "::notice title=lipaudit::" in result.stdout
    assert (tmp_path / "summary.md").read_text(encoding="utf-8").startswith("## lipaudit")
    # one audit: the summary's numbers are the log's
    assert "31.072" in (tmp_path / "summary.md").read_text(encoding="utf-8") and "31.072" in result.stdout
    result = _run_audit_step(tmp_path, {"paths": DEMO, "format": "github", "fail-above": "5", "summary": "true"},
                             bin_dir)
    assert result.returncode == 1
    assert "::error" in result.stdout and "LIP001" in result.stdout


def _hook() -> dict[str, Any]:
    text = (ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        hook: dict[str, Any] = {}
        for line in text.splitlines():
            key, _, value = line.strip().removeprefix("- ").partition(": ")
            hook[key] = value
        return hook
    (hook,) = yaml.safe_load(text)
    return hook  # type: ignore[no-any-return]


def test_hook_entry_is_a_valid_inspect_call() -> None:
    hook = _hook()
    assert hook["id"] == "lipaudit" and hook["language"] == "python"
    entry = hook["entry"].split()
    assert entry[0] == "lipaudit"
    ctx = _parse_inspect([*entry[1:], DEMO])
    assert ctx.params["quiet"] is True
    files = re.compile(hook["files"])
    for name in ("a.pt", "m/b.pth", "pytorch_model.bin", "x.ckpt", "model.safetensors"):
        assert files.search(name), name
    for name in ("a.py", "model.safetensors.index.json", "pt", "notes.txt"):
        assert not files.search(name), name


@pytest.mark.skipif(shutil.which("pre-commit") is None, reason="pre-commit is not installed")
@pytest.mark.skipif(not os.environ.get("LIPAUDIT_PRECOMMIT"),
                    reason="installs lipaudit and torch into pre-commit's own environment from a package index "
                           "(minutes, network): set LIPAUDIT_PRECOMMIT=1 to run it")
def test_pre_commit_try_repo(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(ROOT / "fixtures" / "mlp.safetensors", repo / "model.safetensors")
    (repo / "README.md").write_text("not a checkpoint\n", encoding="utf-8")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid",
           # the hook's own environment installs torch: the CPU wheel, not gigabytes of CUDA libraries
           "PIP_INDEX_URL": os.environ.get("PIP_INDEX_URL", "https://download.pytorch.org/whl/cpu"),
           "PIP_EXTRA_INDEX_URL": os.environ.get("PIP_EXTRA_INDEX_URL", "https://pypi.org/simple")}
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    run = subprocess.run(["pre-commit", "try-repo", str(ROOT), "lipaudit", "--all-files", "--verbose"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "lipaudit" in run.stdout and "Passed" in run.stdout


def test_fallback_reader_agrees_with_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("yaml")
    step_yaml, hook_yaml = _step("audit"), _hook()
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    step, hook = _step("audit"), _hook()
    assert step["run"] == step_yaml["run"] and step["env"] == step_yaml["env"]
    for key in ("id", "entry", "files", "language"):
        assert hook[key] == hook_yaml[key]
