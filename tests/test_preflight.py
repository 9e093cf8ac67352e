"""Usage errors before torch loads; folder search; Hugging Face cache roots; per-file overrides; sharded hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lipaudit.formats import middle
from tests.conftest import FIXTURES, run, validate

# Each usage error, with the exit code it must give; none may import torch.
USAGE_ERRORS = {
    "missing path": (["inspect", "no/such/file.pt"], 2),
    "missing folder in a list": (["inspect", str(FIXTURES / "mlp.pt"), "no/such/dir"], 2),
    "normalize without -o": (["normalize", str(FIXTURES / "mlp.pt")], 2),
    "-o over the input": (["normalize", str(FIXTURES / "mlp.pt"), "-o", str(FIXTURES / "mlp.pt")], 2),
    "inspect -o over the input": (["inspect", str(FIXTURES / "mlp.pt"), "-o", str(FIXTURES / "mlp.pt")], 2),
    "remote hf path": (["inspect", "hf://org/name"], 2),
    "missing --graph": (["inspect", str(FIXTURES / "mlp.pt"), "--graph", "no/such.pt2"], 2),
}

_PROBE = """
import sys
from lipaudit.cli import main
sys.argv = ["lipaudit", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    print(e.code, "torch" in sys.modules)
"""


def _probe(args: list[str]) -> tuple[int, bool]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    code, loaded = out.stdout.split()[-2:]
    return int(code), loaded == "True"


def _links(tmp_path: Path) -> tuple[Path, Path]:
    """A Hugging Face cache entry: snapshot files are links into blobs/."""
    root = tmp_path / "models--org--tiny"
    snap = root / "snapshots" / ("a" * 40)
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    save_file({"fc.weight": torch.eye(3) * 2}, str(root / "blobs" / "b1"))
    (snap / "model.safetensors").symlink_to(Path("../../blobs/b1"))
    return root, snap


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_come_before_torch(case: str) -> None:
    args, code = USAGE_ERRORS[case]
    assert _probe(args) == (code, False)


def test_in_place_through_a_link_and_unwritable_layouts_come_before_torch(tmp_path: Path) -> None:
    _, snap = _links(tmp_path)
    assert _probe(["normalize", str(snap), "--in-place"]) == (2, False)
    link = tmp_path / "link.pt"
    link.symlink_to(FIXTURES / "mlp.pt")
    assert _probe(["normalize", str(link), "--in-place"]) == (2, False)


def _median_seconds(args: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lipaudit", *args], capture_output=True, timeout=120)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_usage_errors_take_about_as_long_as_help() -> None:
    """Within 3x of --help (medians, measured side by side; the 0.3 s floor absorbs a loaded machine)."""
    base = _median_seconds(["--help"])
    for case in ("missing path", "normalize without -o"):
        took = _median_seconds(USAGE_ERRORS[case][0])
        assert took <= max(3 * base, base + 0.3), (case, took, base)


def test_folders_are_searched_recursively_and_what_is_passed_over_is_named(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "top.pt")
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "a" / "b" / "deep.pt")
    shutil.copytree(FIXTURES / "mlp_sharded", tmp_path / "a" / "sharded")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    result = run("inspect", tmp_path, "--format", "json")
    doc = validate(json.loads(result.stdout))
    paths = sorted(Path(r["checkpoint"]["path"]).relative_to(tmp_path).as_posix() for r in doc["reports"])
    assert paths == ["a/b/deep.pt", "a/sharded", "top.pt"]
    assert "notes.txt" in result.stderr and ".git" in result.stderr and "passed over 2 entries" in result.stderr
    flat = run("inspect", tmp_path, "--no-recursive", "--format", "json")
    doc = validate(json.loads(flat.stdout))
    assert Path(doc["checkpoint"]["path"]).name == "top.pt"  # one file found: one report
    assert "--no-recursive" in flat.stderr and str(tmp_path / "a") in flat.stderr


def test_hugging_face_cache_root_reads_refs_main_or_a_revision(tmp_path: Path) -> None:
    root, _ = _links(tmp_path)
    other = root / "snapshots" / ("b" * 40)
    other.mkdir()
    save_file({"fc.weight": torch.eye(3) * 5}, str(root / "blobs" / "b2"))
    (other / "model.safetensors").symlink_to(Path("../../blobs/b2"))
    (root / "refs" / "v2").write_text("b" * 40)
    for args, norm in (((), 2.0), (("--revision", "v2"), 5.0), (("--revision", "b" * 40), 5.0)):
        result = run("inspect", root, *args, "--format", "json", "-q")
        doc = validate(json.loads(result.stdout))
        assert result.exit_code == 0 and doc["layers"][0]["sigma"]["upper"] == pytest.approx(norm, rel=1e-12)
    bad = run("inspect", root, "--revision", "nope", "--format", "json")
    assert bad.exit_code == 2 and "v2" in json.loads(bad.stdout)["error"]["message"]
    assert run("inspect", FIXTURES / "mlp.pt", "--revision", "main").exit_code == 2
    # a folder of cache entries (the hub folder itself) is searched too
    assert run("inspect", tmp_path, "--format", "json", "-q").exit_code == 0


def test_remote_paths_are_refused_with_the_reason() -> None:
    result = run("inspect", "hf://org/name")
    assert result.exit_code == 2 and "network" in result.stderr


def test_overrides_match_each_file_found_in_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "strict").mkdir(parents=True)
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "models" / "loose.pt")
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "models" / "strict" / "tight.pt")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.lipaudit]\nfail-above = 1000\nassume = "chain"\n\n'
        '[[tool.lipaudit.overrides]]\npaths = ["models/strict/*"]\nfail-above = 0.001\n')
    monkeypatch.chdir(tmp_path)
    result = run("inspect", "models", "--format", "json")
    doc = validate(json.loads(result.stdout))
    passed = {Path(r["checkpoint"]["path"]).name: r["passed"] for r in doc["reports"]}
    assert passed == {"loose.pt": True, "tight.pt": False} and result.exit_code == 1
    assert "Found 1 error in 1 file (of 2 audited)" in result.stderr
    # the command line still wins over the override
    assert run("inspect", "models", "--fail-above", "1000", "-q").exit_code == 0


def test_sharded_sha256_covers_every_file(tmp_path: Path) -> None:
    folder = shutil.copytree(FIXTURES / "mlp_sharded", tmp_path / "s")
    doc = validate(json.loads(run("inspect", folder, "--format", "json", "-q").stdout))
    files = doc["checkpoint"]["files"]
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(f["name"] for f in files) == names
    for f in files:
        assert f["sha256"] == hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest()
    listing = "".join(f"{f['sha256']}  {f['name']}\n" for f in files)
    assert doc["checkpoint"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    # changing one shard changes the checkpoint's digest
    shard = folder / files[-1]["name"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    again = validate(json.loads(run("inspect", folder, "--format", "json", "-q").stdout))
    assert again["checkpoint"]["sha256"] != doc["checkpoint"]["sha256"]


def test_short_names_keep_block_index_and_leaf() -> None:
    names = [f"encoder.layer.{i}.attention.output.dense" for i in range(6)]
    short = [middle(n, 30) for n in names]
    assert len(set(short)) == 6 and all(len(s) <= 30 for s in short)
    assert all(s.endswith(f"{i}.attention.output.dense") or f".{i}." in s for i, s in enumerate(short))
    assert all(s.endswith("dense") for s in short)
    assert middle("encoder.layer.3.attention.self.query", 24).endswith("3.…query") or "3" in middle(
        "encoder.layer.3.attention.self.query", 24)
    leaves = ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")
    minilm = [middle(f"bert.encoder.layer.{i}.{leaf}", 20) for i in range(6) for leaf in leaves]
    assert len(set(minilm)) == 24 and all(len(s) <= 20 for s in minilm)
    assert middle("bert.encoder.layer.0.intermediate.dense", 20) == "…0.interm.dense"
    assert middle("short", 30) == "short"
    assert len(middle("x" * 80, 20)) == 20


def test_plurals_and_failure_reasons(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "a.pt")
    shutil.copy(FIXTURES / "mlp.pt", tmp_path / "b.pt")
    result = run("inspect", tmp_path, "--fail-above", "0.001")
    assert result.exit_code == 1
    assert "Found 2 errors in 2 files (of 2 audited)" in result.stderr
    assert "FAILED: 1 error: LIP001" in result.stdout and "1 errors" not in result.stdout + result.stderr
    assert os.linesep in result.stdout
