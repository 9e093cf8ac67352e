"""Hostile and broken inputs (docs/security.md): documented exit code, one line, nothing run or left."""

from __future__ import annotations

import collections
import importlib
import json
import os
import pickle
import re
import runpy
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.conftest import FIXTURES, run, run_json, validate


def audit(path: Path, *args: str) -> tuple[int, str]:
    """Exit code and stderr; the JSON on stdout must be one valid object, stderr one line."""
    result = run("inspect", path, "--format", "json", *args)
    doc = json.loads(result.stdout)
    validate(doc)
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr + result.stdout
    if result.exit_code not in (0, 1):
        assert result.stderr.count("\n") == 1, result.stderr
        assert doc["error"]["exit_code"] == result.exit_code
    return result.exit_code, result.stderr


class Payload:
    """Pickles to a call of fn(*args) on load."""

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.fn, self.args


def _payloads(sentinel: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {sentinel}"),
        "eval": Payload(eval, f"open({str(sentinel)!r}, 'w')"),
        "subprocess": Payload(subprocess.call, ["touch", str(sentinel)]),
        "importlib": Payload(importlib.import_module, "antigravity"),
        "runpy": Payload(runpy.run_path, str(sentinel)),
    }


@pytest.mark.parametrize("via", ["os.system", "eval", "subprocess", "importlib", "runpy"])
@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_pickles_never_runs(tmp_path: Path, via: str, legacy: bool) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w.weight": torch.eye(2), "x": _payloads(sentinel)[via]}, path,
               _use_new_zipfile_serialization=not legacy)
    code, err = audit(path)
    assert code == 3
    assert not sentinel.exists()
    assert "weights_only" not in err


def test_plain_pickles(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "raw_evil.pkl"
    evil.write_bytes(pickle.dumps(_payloads(sentinel)["os.system"], protocol=2))
    assert audit(evil)[0] == 3 and not sentinel.exists()
    benign = tmp_path / "raw.pkl"
    benign.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert audit(benign)[0] == 4


def test_a_whole_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    assert audit(path)[0] == 3


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_reads(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "p.pt"
    torch.save({"w.weight": torch.eye(2) * 3}, path, pickle_protocol=protocol)
    code, _ = audit(path)
    assert code == 0


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
                 compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", compression=compression) as b:
        for info in a.infolist():
            data = edit(info.filename, a.read(info.filename))
            if data is not None:
                b.writestr(info.filename, data)
    return dst


@pytest.mark.parametrize(
    ("name", "edit", "code"),
    [
        ("missing_record", lambda n, d: None if n.endswith("data/0") else d, 4),
        ("short_record", lambda n, d: d[:100] if n.endswith("data/0") else d, 4),
        ("long_record", lambda n, d: d + b"\0" * 64 if n.endswith("data/0") else d, 4),
        ("garbage_pickle", lambda n, d: b"\x80\x02garbage" if n.endswith("data.pkl") else d, 4),
        ("bad_byteorder", lambda n, d: b"middle" if n.endswith("byteorder") else d, 4),
        ("big_endian", lambda n, d: b"big" if n.endswith("byteorder") else d, (0, 1)),
    ],
)
def test_zip_records(tmp_path: Path, name: str, edit: Callable[[str, bytes], bytes | None],
                     code: int | tuple[int, int]) -> None:
    path = _rewrite_zip(FIXTURES / "mlp.pt", tmp_path / f"{name}.pt", edit)
    got = audit(path)[0]
    assert got in (code if isinstance(code, tuple) else (code,))


def test_zip_tricks(tmp_path: Path) -> None:
    bomb = _rewrite_zip(FIXTURES / "mlp.pt", tmp_path / "deflate.pt", lambda n, d: d, zipfile.ZIP_DEFLATED)
    assert audit(bomb)[0] == 5
    dup = tmp_path / "dup.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        with zipfile.ZipFile(FIXTURES / "mlp.pt") as a, zipfile.ZipFile(dup, "w") as b:
            for info in a.infolist():
                b.writestr(info.filename, a.read(info.filename))
            b.writestr("mlp/data.pkl", b"\x80\x02}q\x00.")
    assert audit(dup)[0] == 4


def test_stride_zero_bomb_stays_small(tmp_path: Path) -> None:
    """A 2 KB file declaring a 40 GB matrix: exit 5, and the child never grows past 1.5 GB."""
    path = tmp_path / "bomb.pt"
    torch.save({"w.weight": torch.zeros(1).as_strided((100_000, 100_000), (0, 0))}, path)
    assert path.stat().st_size < 4096
    assert audit(path)[0] == 5
    small = tmp_path / "small_bomb.pt"  # under the tensor budget, but an expanded view all the same
    torch.save({"w.weight": torch.zeros(1).as_strided((20_000, 20_000), (0, 0))}, small)
    assert audit(small)[0] == 5
    # the child's own peak, through a parent of its own: RUSAGE_CHILDREN of this process would also
    # count every earlier test's children
    code = ("import resource, subprocess, sys; "
            f"rc = subprocess.run([sys.executable, '-m', 'lipaudit', 'inspect', {str(path)!r}], "
            "capture_output=True, timeout=120).returncode; "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150).stdout.split()
    rc, peak_kb = int(out[0]), int(out[1])
    assert rc == 5
    assert peak_kb < 1.5 * 2**20


def test_invalid_sparse_tensor_is_never_built(tmp_path: Path) -> None:
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 5], [0, 1]]), torch.tensor([1.0, 2.0]), (2, 2),
                                  check_invariants=False)
    path = tmp_path / "sparse.pt"
    torch.save({"s": bad, "w.weight": torch.eye(2)}, path)
    code, doc = run_json(str(path))
    assert code == 0
    assert any(s["tensor"] == "s" and "sparse" in s["reason"] for s in doc["skipped"])


def test_odd_tensor_kinds_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized and nested tensors are deprecated or prototype
        torch.save({
            "q.weight": torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8),
            "m.weight": torch.empty(3, 3, device="meta"),
            "n.weight": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            "w.weight": torch.eye(2),
        }, path)
    result = run("inspect", path, "--format", "json", "-q")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert {s["tensor"] for s in doc["skipped"]} == {"q.weight", "m.weight", "n.weight"}


def test_self_reference_and_depth(tmp_path: Path) -> None:
    loop: dict[str, object] = {"w.weight": torch.eye(3)}
    loop["again"] = loop
    path = tmp_path / "loop.pt"
    torch.save(loop, path)
    assert audit(path)[0] == 0
    deep: object = {"w": torch.eye(2)}
    for _ in range(200):
        deep = [deep]
    torch.save(deep, tmp_path / "deep.pt")
    assert audit(tmp_path / "deep.pt")[0] == 5


def test_many_tensors_against_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(50)}, str(path))
    assert audit(path, "--max-tensors", "10")[0] == 5
    pt = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.zeros(1) for i in range(50)}, pt)
    assert audit(pt, "--max-tensors", "10")[0] == 5


def test_truncation_at_many_offsets(tmp_path: Path) -> None:
    for src in (FIXTURES / "mlp.pt", FIXTURES / "mlp_legacy.pt", FIXTURES / "mlp.safetensors"):
        data = src.read_bytes()
        for cut in sorted({1, 7, 8, 9, 64, 200, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
            path = tmp_path / f"cut{cut}{src.suffix}"
            path.write_bytes(data[:cut])
            assert audit(path)[0] == 4, (src.name, cut)


def _st(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F = {"dtype": "F32", "shape": [1]}


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x02\x03",
        _st({}, length=2**63)[:16],
        struct.pack("<Q", 4) + b"\xff\xfe{}",
        struct.pack("<Q", 4) + b"nope",
        _st([1, 2]),
        _st({"__metadata__": {"k": 1}}),
        _st({"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _st({"a": {**_F, "data_offsets": [-4, 0]}}, b"\0" * 4),
        _st({"a": {**_F, "data_offsets": [4, 0]}}, b"\0" * 4),
        _st({"a": {**_F, "data_offsets": [0, 4]}, "b": {**_F, "data_offsets": [2, 6]}}, b"\0" * 6),
        _st({"a": {**_F, "data_offsets": [0, 4]}, "b": {**_F, "data_offsets": [8, 12]}}, b"\0" * 12),
        _st({"a": {**_F, "data_offsets": [0, 4]}}, b"\0" * 8),
        _st({"a": {**_F, "data_offsets": [0, 4]}}, b"\0" * 2),
        _st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
    ids=["short", "huge_header", "not_utf8", "not_json", "not_object", "metadata", "lowercase_dtype", "negative",
         "reversed", "overlap", "gap", "trailing", "truncated", "shape_mismatch"],
)
def test_malformed_safetensors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    assert audit(path)[0] == 4


def _shard_folder(tmp_path: Path, target: str) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w.weight": target}}))
    return folder


@pytest.mark.parametrize(
    "kind", ["pickle", "fifo", "folder", "missing", "parent", "absolute", "link_to_fifo", "dangling", "dotdot_link"]
)
def test_hostile_shards(tmp_path: Path, kind: str) -> None:
    target = {"parent": "../x.safetensors", "absolute": "/etc/passwd",
              "dotdot_link": "../blobs/x.safetensors"}.get(kind, "shard.safetensors")
    folder = _shard_folder(tmp_path, target)
    shard = folder / "shard.safetensors"
    sentinel = tmp_path / "pwned"
    if kind == "pickle":
        torch.save({"w.weight": _payloads(sentinel)["os.system"]}, shard)
    elif kind == "link_to_fifo":
        os.mkfifo(tmp_path / "pipe")
        shard.symlink_to(tmp_path / "pipe")
    elif kind == "dangling":
        shard.symlink_to(tmp_path / "nothing")
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "folder":
        shard.mkdir()
    t0 = time.monotonic()
    assert audit(folder)[0] == 4
    assert time.monotonic() - t0 < 30
    assert not sentinel.exists()


def test_nan_and_inf_never_reach_the_json(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    w = torch.ones(3, 3)
    w[0, 0] = float("inf")
    save_file({"a.weight": w, "b.weight": torch.full((2, 2), float("nan")), "c.running_var": torch.ones(2)}, str(path))
    result = run("inspect", path, "--format", "json", "-q")
    assert result.exit_code == 1
    assert not re.search(r"[:\[,]\s*-?(NaN|Infinity)\b", result.stdout)
    json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def test_long_and_hostile_names_in_every_format(tmp_path: Path) -> None:
    names = ["x" * 100_000, "", "\x1b]0;title\x07", "a\u202eb", "::warning::x", "%0A", "[link](http://x)"]
    path = tmp_path / "names.pt"
    torch.save({f"{n}.weight": torch.eye(2) * 2 for n in names}, path)
    for fmt in ("table", "markdown", "github"):
        result = run("inspect", path, "--format", fmt, "-q")
        assert result.exit_code == 0
        out = result.stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert max(len(line) for line in out.splitlines()) < 2000
        if fmt == "github":
            assert all(line.startswith(("::notice ", "::warning ", "::error ")) for line in out.splitlines())


# -- fuzzing: random damage to valid files ---------------------------------------------------

_SEEDS = {name: (FIXTURES / name).read_bytes() for name in ("mlp.pt", "mlp_legacy.pt", "mlp.safetensors")}


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(_SEEDS)))
    data = bytearray(_SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "zero", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero":
            data[pos : pos + draw(st.integers(1, 64))] = b"\0" * len(data[pos : pos + 64])
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return name, bytes(data)


@settings(max_examples=120, deadline=20_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=damaged())
def test_fuzz_damaged_files(tmp_path: Path, sample: tuple[str, bytes]) -> None:
    name, data = sample
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / name
    path.write_bytes(data)
    t0 = time.monotonic()
    code, _ = audit(path)
    assert code in (0, 1, 3, 4, 5)
    assert time.monotonic() - t0 < 20
    assert [p.name for p in folder.iterdir()] == [name]  # nothing written beside it
    assert path.read_bytes() == data


# -- the second red-team round: each case in every format and through normalize ----------------


class Reduce:
    """Pickles as fn(*args), with optional BUILD state and dict items, as a crafted file would."""

    def __init__(self, fn: object, *args: object, state: object = None,
                 items: list[tuple[object, object]] | None = None) -> None:
        self.fn, self.args, self.state, self.items = fn, args, state, items

    def __reduce__(self) -> tuple[object, ...]:
        return (self.fn, self.args, self.state, None, iter(self.items) if self.items is not None else None)


def _typed(t: torch.Tensor) -> object:
    return torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)


def _st_raw(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _case_shared(p: Path) -> None:
    d: object = {"w.weight": torch.eye(3)}
    for _ in range(40):
        d = [d, d]  # one list reused through the memo: 2^40 paths, 1 KB on disk
    torch.save(d, p)


def _case_shared_dict(p: Path) -> None:
    d: object = {"w.weight": torch.eye(3)}
    for _ in range(40):
        d = {"a": d, "b": d}
    torch.save(d, p)


def _case_hidden_items(p: Path) -> None:
    hidden = Reduce(collections.OrderedDict, state={"items": set}, items=[("w.weight", torch.eye(3) * 100)])
    torch.save({"state_dict": hidden, "other": {"x.weight": torch.eye(2) * 0.5}}, p)


def _case_shadowed_storage(p: Path) -> None:
    s = torch.zeros(1)
    rebuilt = Reduce(torch._tensor._rebuild_from_type_v2, torch._utils._rebuild_tensor_v2, torch.Tensor,
                     (_typed(s), 0, (60_000, 60_000), (0, 0), False, collections.OrderedDict()),
                     {"untyped_storage": torch.Tensor})
    torch.save({"w.weight": rebuilt}, p)


def _case_shadowed_detach(p: Path) -> None:
    rebuilt = Reduce(torch._tensor._rebuild_from_type_v2, torch._utils._rebuild_tensor_v2, torch.Tensor,
                     (_typed(torch.eye(2)), 0, (2, 2), (2, 1), False, collections.OrderedDict()),
                     {"detach": torch.Tensor, "__reduce_ex__": set})
    torch.save({"w.weight": rebuilt}, p)


def _case_bytearray(p: Path) -> None:
    torch.save({"w.weight": torch.eye(2), "x": Reduce(bytearray, 3_000_000_000)}, p)


def _case_uninitialised(p: Path) -> None:
    torch.save({"w.weight": Reduce(torch.DoubleTensor, 3, 3)}, p)


def _case_hooks(p: Path) -> None:
    bad = Reduce(torch._utils._rebuild_tensor_v2, _typed(torch.eye(2)), 0, (2, 2), (2, 1), False, 5)
    torch.save({"w.weight": bad}, p)


def _case_huge_dim_torch(p: Path) -> None:
    bad = Reduce(torch._utils._rebuild_tensor_v2, _typed(torch.zeros(0)), 0, (0, 2**64), (1, 1), False,
                 collections.OrderedDict())
    torch.save({"w.weight": torch.eye(2), "e": bad}, p)


def _case_huge_dim_st(p: Path) -> None:
    p.write_bytes(_st_raw({"e": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]},
                           "w.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
                          torch.eye(2).numpy().tobytes()))


def _case_deep_json(p: Path) -> None:
    meta = "[" * 100_000 + "]" * 100_000
    raw = ('{"__metadata__": {"x": ' + meta + '}, "w.weight": {"dtype": "F32", "shape": [1], '
           '"data_offsets": [0, 4]}}').encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)


def _case_expanded(p: Path) -> None:
    torch.save({"w.weight": torch.eye(4), "scale": torch.ones(1).expand(16)}, p)


def _case_header_80_02(p: Path) -> None:
    header: dict[str, object] = {"w.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                                 "__metadata__": {"pad": ""}}
    size = len(json.dumps(header).encode())
    header["__metadata__"] = {"pad": "x" * (640 - size)}
    p.write_bytes(_st_raw(header, (torch.eye(2) * 2).numpy().tobytes()))
    assert p.read_bytes()[:2] == b"\x80\x02"


def _case_second_data_pkl(p: Path) -> None:
    torch.save({"w.weight": torch.eye(2)}, p.with_suffix(".tmp"))
    with zipfile.ZipFile(p.with_suffix(".tmp")) as a, zipfile.ZipFile(p, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
        b.writestr("other/data.pkl", a.read(next(n for n in a.namelist() if n.endswith("data.pkl"))))
    p.with_suffix(".tmp").unlink()


def _case_module(p: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), p)


def _case_escapes(p: Path) -> None:
    torch.save({"\x1b]0;x\x07::error::a\r\n::add-mask::b.weight": torch.eye(2), "state_dict": Reduce(
        collections.OrderedDict, state={"\x1b[31mitems": set}, items=[])}, p)


# case name -> (builder, file name, exit codes it may give)
CATALOGUE: dict[str, tuple[Callable[[Path], None], str, tuple[int, ...]]] = {
    "shared_list": (_case_shared, "x.pt", (0, 5)),
    "shared_dict": (_case_shared_dict, "x.pt", (0, 5)),
    "hidden_items": (_case_hidden_items, "x.pt", (3,)),
    "shadowed_storage": (_case_shadowed_storage, "x.pt", (3,)),
    "shadowed_detach": (_case_shadowed_detach, "x.pt", (3,)),
    "bytearray_3e9": (_case_bytearray, "x.pt", (3,)),
    "uninitialised": (_case_uninitialised, "x.pt", (3,)),
    "hooks_not_dict": (_case_hooks, "x.pt", (4,)),
    "huge_dim_torch": (_case_huge_dim_torch, "x.pt", (4,)),
    "huge_dim_safetensors": (_case_huge_dim_st, "x.safetensors", (4,)),
    "deep_json": (_case_deep_json, "x.safetensors", (4,)),
    "expanded": (_case_expanded, "x.pt", (0, 1)),
    "header_80_02": (_case_header_80_02, "x.safetensors", (0, 1)),
    "second_data_pkl": (_case_second_data_pkl, "x.pt", (4,)),
    "whole_module": (_case_module, "x.pt", (3,)),
    "escapes": (_case_escapes, "x.pt", (3,)),
}
_FORMATS = ("table", "json", "markdown", "github")


def _clean(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text, text[:300]
    assert "Traceback" not in text
    assert not any(line.startswith("::") and not line.startswith(("::error ", "::warning ", "::notice "))
                   for line in text.splitlines()), text[:300]


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_catalogue_in_every_format_and_normalize(tmp_path: Path, case: str) -> None:
    build, name, codes = CATALOGUE[case]
    path = tmp_path / name
    build(path)
    before = path.read_bytes()
    for fmt in _FORMATS:
        result = run("inspect", path, "--format", fmt)
        assert result.exit_code in codes, (fmt, result.exit_code, result.stderr)
        _clean(result.stdout + result.stderr)
        if fmt == "json":
            validate(json.loads(result.stdout))
    out = tmp_path / f"out_{name}"
    result = run("normalize", path, "-o", out)
    assert result.exit_code in {*codes, 0, 1}, result.stderr
    _clean(result.stdout + result.stderr)
    if result.exit_code not in (0, 1):
        assert not out.exists()
    assert path.read_bytes() == before


_CAP = """
import resource, sys, runpy
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
sys.argv = ["lipaudit", *sys.argv[1:]]
runpy.run_module("lipaudit", run_name="__main__")
"""


def run_capped(args: list[str], cap: int = 3 * 2**30, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI in a child with an address-space cap and a time limit."""
    return subprocess.run([sys.executable, "-c", _CAP.format(cap=cap), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("case", ["shared_list", "shared_dict", "shadowed_storage", "bytearray_3e9", "deep_json"])
def test_resource_cases_stay_small_and_fast(tmp_path: Path, case: str) -> None:
    build, name, codes = CATALOGUE[case]
    path = tmp_path / name
    build(path)
    t0 = time.monotonic()
    everything = ["--key", "/"] if case.startswith("shared") else []  # list every path: the budget must stop it
    proc = run_capped(["inspect", str(path), "-q", *everything])
    if everything:
        codes = (5,)
    assert proc.returncode in codes, proc.stderr
    assert time.monotonic() - t0 < 30
    _clean(proc.stdout + proc.stderr)


def test_uninitialised_memory_never_reaches_the_output(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"w.weight": torch.eye(3), "junk": Reduce(torch.DoubleTensor, 3, 3)}, path)
    out = tmp_path / "out.pt"
    assert run("normalize", path, "-o", out).exit_code == 3
    assert not out.exists()


def test_hidden_container_never_passes_the_gate(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    _case_hidden_items(path)
    result = run("inspect", path, "--fail-above", "1", "--format", "json")
    assert result.exit_code == 3


def test_max_tensors_holds_while_listing(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    d: object = {"w.weight": torch.eye(2)}
    for _ in range(12):
        d = {"a": d, "b": d}  # 4096 paths to one tensor: under the listing budget, over --max-tensors
    torch.save(d, path)
    t0 = time.monotonic()
    code, err = audit(path, "--key", "/", "--max-tensors", "100")
    assert code == 5 and "--max-tensors" in err
    assert time.monotonic() - t0 < 10
