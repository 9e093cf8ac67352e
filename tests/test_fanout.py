"""Many checkpoints: --shard with merge, the result cache, executors. Every fan-out must give the
report one local run gives, except the fields TIMING_FIELDS names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lipaudit.cache import Cache
from lipaudit.errors import UsageError
from lipaudit.executors import check_spec
from lipaudit.fanout import Shard
from lipaudit.report_load import TIMING_FIELDS, BadDocument, report_from_dict, without_timing
from tests.conftest import FIXTURES, run, validate

FILES = ("mlp.pt", "mlp_legacy.pt", "conv_bn.pt", "mlp.safetensors", "demo_sn_cnn.pt")


@pytest.fixture
def zoo(tmp_path: Path) -> list[Path]:
    """A folder of checkpoints and a sharded checkpoint beside it: the paths a run is given."""
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name in FILES:
        shutil.copy(FIXTURES / name, folder / name)
    shutil.copytree(FIXTURES / "mlp_sharded", tmp_path / "sharded")
    return [folder, tmp_path / "sharded"]


def inspect_json(*args: object) -> tuple[int, dict[str, Any]]:
    result = run("inspect", *map(str, args), "--format", "json", "-q")
    return result.exit_code, validate(json.loads(result.stdout))


def test_shard_parse_refuses_what_is_not_i_of_n() -> None:
    for bad in ("0/3", "4/3", "1", "a/b", "1/0", "-1/2", "1/3/4"):
        with pytest.raises(UsageError):
            Shard.parse(bad)
    assert Shard.parse("2/3") == Shard(2, 3)


def test_shards_partition_the_sorted_list_whatever_the_order() -> None:
    files = [f"f{i:02d}" for i in range(11)]
    parts = [Shard(i, 4).pick(files) for i in range(1, 5)]
    assert sorted(f for p in parts for f in p) == files
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shuffled = files[5:] + files[:5]
    assert [set(Shard(i, 4).pick(shuffled)) for i in range(1, 5)] == [set(p) for p in parts]
    assert Shard(3, 20).pick(["a", "b"]) == []


def test_without_timing_drops_exactly_the_timing_fields() -> None:
    _, doc = inspect_json(FIXTURES / "mlp.pt")
    changed = json.loads(json.dumps(doc))
    changed["resources"] = {"time_s": 99.0, "peak_rss_bytes": 1}
    for layer in changed["layers"]:
        layer["time_s"] += 1.0
    assert without_timing(changed) == without_timing(doc) and changed != doc
    assert "resources" not in without_timing(doc) and all("time_s" not in x for x in without_timing(doc)["layers"])
    # anything else still counts
    other = json.loads(json.dumps(doc))
    other["layers"][0]["sigma"]["upper"] *= 1 + 1e-15
    assert without_timing(other) != without_timing(doc)
    assert {p[0] for p in TIMING_FIELDS} == {"resources", "layers", "network"}


def test_sharded_runs_merge_into_the_single_run(zoo: list[Path], tmp_path: Path) -> None:
    code, full = inspect_json(*zoo)
    assert len(full["reports"]) == len(FILES) + 1
    outs = []
    for i in (3, 1, 2):  # any order
        out = tmp_path / f"s{i}.json"
        result = run("inspect", *map(str, zoo), "--shard", f"{i}/3", "--format", "json", "-q", "-o", str(out))
        assert result.exit_code == 0
        shard_doc = validate(json.loads(out.read_text()))
        assert shard_doc["shard"]["index"] == i and len(shard_doc["shard"]["files"]) == len(FILES) + 1
        outs.append(out)
    merged = tmp_path / "merged.json"
    result = run("merge", *map(str, outs), "-o", str(merged))
    assert result.exit_code == code
    doc = validate(json.loads(merged.read_text()))
    assert "shard" not in doc
    assert without_timing(doc) == without_timing(full)
    assert json.dumps(without_timing(doc)) == json.dumps(without_timing(full))  # key order too


def test_merge_refuses_missing_twice_given_and_foreign_shards(zoo: list[Path], tmp_path: Path) -> None:
    def shard(i: int, n: int, *paths: Path) -> Path:
        out = tmp_path / f"{i}-{n}-{len(paths)}.json"
        assert run("inspect", *map(str, paths), "--shard", f"{i}/{n}", "--format", "json", "-q",
                   "-o", str(out)).exit_code == 0
        return out

    a, b = shard(1, 2, *zoo), shard(2, 2, *zoo)
    assert run("merge", str(a)).exit_code == 2  # 2/2 missing
    assert run("merge", str(a), str(a), str(b)).exit_code == 2
    other = shard(2, 2, zoo[0] / "mlp.pt", zoo[0] / "conv_bn.pt")
    assert run("merge", str(a), str(other)).exit_code == 2
    plain = tmp_path / "plain.json"
    plain.write_text(run("inspect", str(zoo[0] / "mlp.pt"), "--format", "json", "-q").stdout)
    assert run("merge", str(plain)).exit_code == 4
    # an entry that is not a report
    broken = json.loads(a.read_text())
    broken["reports"][0]["layers"] = "none"
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    assert run("merge", str(bad), str(b)).exit_code == 4


def test_an_empty_shard_passes_and_merges(tmp_path: Path) -> None:
    outs = []
    for i in (1, 2, 3):
        out = tmp_path / f"{i}.json"
        assert run("inspect", str(FIXTURES / "mlp.pt"), "--shard", f"{i}/3", "--format", "json", "-q",
                   "-o", str(out)).exit_code == 0
        outs.append(out)
    merged = run("merge", *map(str, outs), "-q")
    _, single = inspect_json(FIXTURES / "mlp.pt")
    assert merged.exit_code == 0
    assert without_timing(json.loads(merged.stdout)) == without_timing(single)  # one file: the report alone


def test_merge_keeps_the_worst_exit_code_and_errors(zoo: list[Path], tmp_path: Path) -> None:
    (zoo[0] / "broken.pt").write_bytes(b"not a checkpoint")
    code, full = inspect_json(*zoo, "--fail-layer-above", "1.0")
    outs = []
    for i in (1, 2):
        out = tmp_path / f"{i}.json"
        run("inspect", *map(str, zoo), "--fail-layer-above", "1.0", "--shard", f"{i}/2", "--format", "json", "-q",
            "-o", str(out))
        outs.append(out)
    merged = run("merge", *map(str, outs), "-q")
    assert code == 4 and merged.exit_code == code
    assert without_timing(json.loads(merged.stdout)) == without_timing(full)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json"))


def test_cache_hits_give_the_same_report_and_misses_follow_changes(zoo: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, fresh = inspect_json(*zoo)
    _, first = inspect_json(*zoo, "--cache", cache)
    assert len(_entries(cache)) == len(FILES) + 1
    stamps = {p: p.stat().st_mtime_ns for p in _entries(cache)}
    result = run("inspect", *map(str, zoo), "--cache", str(cache), "--format", "json")
    assert "cache: 6 hits, 0 misses" in result.stderr
    again = json.loads(result.stdout)
    assert again == first  # a hit is the stored document, timing included
    assert without_timing(again) == without_timing(fresh)
    assert {p: p.stat().st_mtime_ns for p in _entries(cache)} == stamps
    # a changed file, a setting that changes numbers: misses; jobs: a hit
    (zoo[0] / "mlp.pt").write_bytes((FIXTURES / "conv_bn.pt").read_bytes())
    result = run("inspect", *map(str, zoo), "--cache", str(cache), "--format", "json", "-j", "1")
    assert "cache: 5 hits, 1 misses" in result.stderr
    result = run("inspect", *map(str, zoo), "--cache", str(cache), "--format", "json", "--rtol", "1e-3")
    assert "cache: 0 hits, 6 misses" in result.stderr
    # a shard of a sharded checkpoint is part of the key
    shard = zoo[1] / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    result = run("inspect", str(zoo[1]), "--cache", str(cache), "--format", "json")
    assert "cache: 0 hits, 1 misses" in result.stderr
    # the index given alone: its shards are part of the key as well
    index = zoo[1] / "model.safetensors.index.json"
    assert "cache: 0 hits, 1 misses" in run("inspect", str(index), "--cache", str(cache)).stderr
    assert "cache: 1 hits, 0 misses" in run("inspect", str(index), "--cache", str(cache)).stderr
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert "cache: 0 hits, 1 misses" in run("inspect", str(index), "--cache", str(cache)).stderr


def test_a_run_answered_from_the_cache_never_imports_torch(zoo: list[Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    cache = tmp_path / "cache"
    first = run("inspect", *map(str, zoo), "--cache", str(cache), "--format", "table", "-q")
    code = ("import sys; from lipaudit.cli import main; sys.argv = ['lipaudit', 'inspect', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, zoo), "--cache", str(cache), "--format", "table", "-q"],
                         capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "False 0"
    # the tables agree but for the time column
    assert len(out.stdout.splitlines()) == len(first.stdout.splitlines())


def test_single_file_table_from_the_cache_matches(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = FIXTURES / "demo_sn_cnn.pt"
    fresh = run("inspect", str(path))  # not -q: a quiet table is the summary line alone
    run("inspect", str(path), "--cache", str(cache), "-q")
    hit = run("inspect", str(path), "--cache", str(cache))
    assert "cache: 1 hits" in hit.stderr
    # the table prints times; everything else agrees
    strip = [line for line in fresh.stdout.splitlines() if " s" not in line]
    assert [line for line in hit.stdout.splitlines() if " s" not in line] == strip
    assert hit.exit_code == fresh.exit_code


@pytest.mark.parametrize("damage", ["truncate", "number", "garbage", "key", "schema"])
def test_a_damaged_entry_is_ignored_and_replaced(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    path = FIXTURES / "mlp.pt"
    _, first = inspect_json(path, "--cache", cache)
    [entry] = _entries(cache)
    text = entry.read_text()
    doc = json.loads(text)
    if damage == "truncate":
        entry.write_text(text[: len(text) // 2])
    elif damage == "number":  # still valid JSON and schema: the digest catches it
        doc["report"]["layers"][0]["sigma"]["upper"] = 0.5
        entry.write_text(json.dumps(doc))
    elif damage == "garbage":
        entry.write_bytes(b"\xff\xfe\x00")
    elif damage == "key":
        doc["key"] = "0" * 64
        entry.write_text(json.dumps(doc))
    else:  # a field the schema forbids, with the digest recomputed to match
        from lipaudit.cache import _digest

        doc["report"]["checkpoint"]["extra"] = 1
        doc["digest"] = _digest(doc["report"], doc["labels"])
        entry.write_text(json.dumps(doc))
    result = run("inspect", str(path), "--cache", str(cache), "--format", "json")
    assert "1 invalid entries ignored" in result.stderr
    assert without_timing(json.loads(result.stdout)) == without_timing(first)
    assert json.loads(entry.read_text())["report"] == json.loads(result.stdout)  # replaced by the fresh one
    assert "1 hits" in run("inspect", str(path), "--cache", str(cache), "--format", "json").stderr


def test_report_from_dict_round_trips_and_refuses_altered_types() -> None:
    for name in ("mlp.pt", "conv_bn.pt", "demo_sn_cnn.pt", "residual.pt2"):
        _, doc = inspect_json(FIXTURES / name, "--no-measure")
        assert report_from_dict(doc).to_dict() == doc
    _, doc = inspect_json(FIXTURES / "mlp.pt")
    for field, value in (("passed", not doc["passed"]), ("layers", [{"tensor": 1}]), ("schema_version", 2)):
        with pytest.raises(BadDocument):
            report_from_dict({**doc, field: value})


def test_cache_folder_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError):
        Cache(f)
    assert run("inspect", str(FIXTURES / "mlp.pt"), "--cache", str(f)).exit_code == 2


def test_fanout_modules_leave_torch_unloaded() -> None:
    """--cache, --shard, --executor and merge are checked before torch is imported."""
    import subprocess
    import sys

    code = ("import sys, lipaudit.cache, lipaudit.fanout, lipaudit.executors, lipaudit.commands.merge, "
            "lipaudit.report_load; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_merge_renders_sarif_as_the_single_run(zoo: list[Path], tmp_path: Path) -> None:
    outs = []
    for i in (1, 2):
        out = tmp_path / f"{i}.json"
        run("inspect", *map(str, zoo), "--shard", f"{i}/2", "--format", "json", "-q", "-o", str(out))
        outs.append(out)
    sarif = run("merge", *map(str, outs), "--format", "sarif", "-q")
    assert sarif.exit_code == 0 and json.loads(sarif.stdout)["version"] == "2.1.0"
    single = run("inspect", *map(str, zoo), "--format", "sarif", "-q")
    assert json.loads(sarif.stdout)["runs"][0]["results"] == json.loads(single.stdout)["runs"][0]["results"]


def test_threads_are_given_back_after_several_files(zoo: list[Path]) -> None:
    import torch

    before = torch.get_num_threads()
    inspect_json(*zoo)
    assert torch.get_num_threads() == before


def test_executor_specs_are_checked_without_connecting() -> None:
    assert check_spec("local") == "local"
    for bad in ("spark://x:1", "local://x", "dask", "dask://", "nope"):
        with pytest.raises(UsageError):
            check_spec(bad)
    assert run("inspect", str(FIXTURES / "mlp.pt"), "--executor", "ray://h:1").exit_code == 2


def test_dask_on_a_local_cluster_gives_the_local_report(zoo: list[Path]) -> None:
    distributed = pytest.importorskip("distributed")
    _, local = inspect_json(*zoo)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", processes=True,
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address.removeprefix("tcp://")
        code, remote = inspect_json(*zoo, "--executor", f"dask://{address}")
    assert code == 0
    assert json.dumps(without_timing(remote)) == json.dumps(without_timing(local))
