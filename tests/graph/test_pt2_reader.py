"""The .pt2 reader on good and hostile archives: nothing unpickled outside the allowlist, nothing run."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from lipaudit.checkpoint.pt2 import is_pt2, open_pt2
from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError, UsageError
from lipaudit.graph import GraphSettings, inspect_archive
from tests.graph.helpers import FIXTURES

FAST = GraphSettings(measure=False)
SRC = FIXTURES / "residual.pt2"


def _members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _write(dst: Path, members: list[tuple[str, bytes]], compress: set[str] | None = None) -> Path:
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members:
            kind = zipfile.ZIP_DEFLATED if compress and name in compress else zipfile.ZIP_STORED
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")  # zipfile warns on duplicate names
                z.writestr(zipfile.ZipInfo(name), data, compress_type=kind)
    return dst


def _edit_json(path: Path, suffix: str, dst: Path, edit: Any) -> Path:
    out = []
    for name, data in _members(path):
        if name.endswith(suffix):
            doc = json.loads(data)
            edit(doc)
            data = json.dumps(doc).encode()
        out.append((name, data))
    return _write(dst, out)


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def test_reads_weights_like_torch(tmp_path: Path) -> None:
    arch = open_pt2(SRC)
    assert is_pt2(SRC) and arch.model == "model"
    assert torch.equal(arch.weight("lin.weight"), 0.5 * torch.eye(6))
    samples, _ = arch.sample_inputs()
    assert samples is not None and samples[0].shape == (2, 6)


def test_never_calls_torch_export_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("torch.export.load must not be called")

    monkeypatch.setattr(torch.export, "load", boom)
    assert inspect_archive(str(SRC), GraphSettings(measure_work=40)).certified


def test_use_pickle_weight_with_malicious_reduce_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Payload(sentinel), buf)
    members = []
    for name, data in _members(SRC):
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            for meta in doc["config"].values():
                meta["use_pickle"] = True
            data = json.dumps(doc).encode()
        elif name.endswith("data/weights/weight_0"):
            data = buf.getvalue()
        members.append((name, data))
    bad = _write(tmp_path / "bad.pt2", members)
    with pytest.raises(UnsafeInputError) as e:
        inspect_archive(str(bad), FAST)
    assert e.value.exit_code == 3
    assert not sentinel.exists()


def test_malicious_sample_inputs_are_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Payload(sentinel), buf)
    members = [(n, buf.getvalue() if "sample_inputs" in n else d) for n, d in _members(SRC)]
    bad = _write(tmp_path / "bad.pt2", members)
    with pytest.raises(UnsafeInputError):
        inspect_archive(str(bad), GraphSettings(measure_work=40))
    assert not sentinel.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen", "posix.system",
                                    "torch.ops.aten.relu.default; import os"])
def test_hostile_node_target_exits_3(tmp_path: Path, target: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target

    bad = _edit_json(SRC, "models/model.json", tmp_path / "bad.pt2", edit)
    with pytest.raises(UnsafeInputError) as e:
        inspect_archive(str(bad), FAST)
    assert e.value.exit_code == 3


def test_unknown_op_is_an_uncovered_node(tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.mylib.mystery.default"

    odd = _edit_json(SRC, "models/model.json", tmp_path / "odd.pt2", edit)
    r = inspect_archive(str(odd), GraphSettings(measure_work=40))
    assert not r.certified and r.uncovered and "no Lipschitz rule" in r.uncovered[0][1]
    assert r.lipschitz_lower is None and "not measured" in r.lower_note


def test_compressed_member_is_refused(tmp_path: Path) -> None:
    members = _members(SRC)
    bad = _write(tmp_path / "bad.pt2", members, compress={members[0][0]})
    with pytest.raises(ResourceLimitError):
        open_pt2(bad)


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    members = _members(SRC)
    bad = _write(tmp_path / "bad.pt2", [*members, members[0]])
    with pytest.raises(MalformedInputError, match="duplicate"):
        open_pt2(bad)


@pytest.mark.parametrize("cut", [10, 200, 3000, -100, -10])
def test_truncated_archive_is_malformed(tmp_path: Path, cut: int) -> None:
    data = SRC.read_bytes()
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(data[:cut])
    with pytest.raises((MalformedInputError, ResourceLimitError)):
        open_pt2(bad)


def test_view_beyond_the_weight_file_is_refused(tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        meta = doc["config"]["lin.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": 600}, {"as_int": 6}]

    bad = _edit_json(SRC, "model_weights_config.json", tmp_path / "bad.pt2", edit)
    with pytest.raises(MalformedInputError, match="view needs"):
        open_pt2(bad)


def test_stride_zero_bomb_is_refused(tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        meta = doc["config"]["lin.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": 2**20}, {"as_int": 2**10}]
        meta["strides"] = [{"as_int": 0}, {"as_int": 0}]

    bad = _edit_json(SRC, "model_weights_config.json", tmp_path / "bad.pt2", edit)
    with pytest.raises(ResourceLimitError):
        open_pt2(bad)


@pytest.mark.parametrize("edit_name", ["graph", "config", "dtype", "path"])
def test_malformed_json_is_exit_4(tmp_path: Path, edit_name: str) -> None:
    if edit_name == "graph":
        members = [(n, b"{not json" if n.endswith("models/model.json") else d) for n, d in _members(SRC)]
        bad = _write(tmp_path / "bad.pt2", members)
    else:
        def edit(doc: dict[str, Any]) -> None:
            meta = doc["config"]["lin.weight"]
            if edit_name == "config":
                doc["config"] = []
            elif edit_name == "dtype":
                meta["tensor_meta"]["dtype"] = 99
            else:
                meta["path_name"] = "../../etc/passwd"

        bad = _edit_json(SRC, "model_weights_config.json", tmp_path / "bad.pt2", edit)
    with pytest.raises(MalformedInputError) as e:
        inspect_archive(str(bad), FAST)
    assert e.value.exit_code == 4


def test_not_a_file_and_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        open_pt2(tmp_path / "missing.pt2")
    with pytest.raises(MalformedInputError):
        open_pt2(tmp_path)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"PK\x03\x04 nothing else")
    with pytest.raises(MalformedInputError):
        open_pt2(junk)
    plain = _write(tmp_path / "plain.zip", [("a/b.txt", b"hi")])
    assert not is_pt2(plain)
    with pytest.raises(MalformedInputError, match="archive_format"):
        open_pt2(plain)


_VALUES: list[Any] = [None, 0, -1, 1.5, "x", [], {}, [1, 2], {"as_int": -5}, {"as_tensor": {"name": "nope"}}, True,
                      10**12, "torch.ops.aten.relu.default"]


def _mutate(o: Any, rng: Any) -> None:
    if isinstance(o, dict) and o:
        k = rng.choice(list(o))
        r = rng.random()
        if r < 0.2:
            del o[k]
        elif r < 0.5:
            o[k] = json.loads(json.dumps(rng.choice(_VALUES)))
        else:
            _mutate(o[k], rng)
    elif isinstance(o, list) and o:
        i = rng.randrange(len(o))
        r = rng.random()
        if r < 0.2:
            del o[i]
        elif r < 0.4:
            o[i] = json.loads(json.dumps(rng.choice(_VALUES)))
        else:
            _mutate(o[i], rng)


@pytest.mark.parametrize("name", ["unet_core", "resnet_small"])
def test_mutated_json_never_crashes(tmp_path: Path, name: str) -> None:
    """Random edits of the graph and config JSON: a result or one of lipaudit's errors, never another exception."""
    import random

    from lipaudit.errors import LipauditError

    rng = random.Random(12345)
    members = _members(FIXTURES / f"{name}.pt2")
    jsons = [n for n, _ in members if n.endswith(".json")]
    outcomes = set()
    for _ in range(40):
        target = rng.choice(jsons)
        out = []
        for n, d in members:
            if n == target:
                doc = json.loads(d)
                for _ in range(rng.randint(1, 3)):
                    _mutate(doc, rng)
                d = json.dumps(doc).encode()
            out.append((n, d))
        path = _write(tmp_path / "m.pt2", out)
        try:
            r = inspect_archive(str(path), GraphSettings(measure=False))
            outcomes.add("certified" if r.certified else "uncertified")
        except LipauditError as e:
            assert e.exit_code in (2, 3, 4, 5)
            outcomes.add(type(e).__name__)
    assert "MalformedInputError" in outcomes


def test_declared_shapes_must_match_the_ops(tmp_path: Path) -> None:
    """The pooling and upsampling bounds use the declared sizes: a graph lying about them is malformed."""

    def edit(doc: dict[str, Any]) -> None:
        values = doc["graph_module"]["graph"]["tensor_values"]
        values["avg_pool2d"]["sizes"] = [{"as_int": 1}, {"as_int": 1}, {"as_int": 1}, {"as_int": 1}]

    bad = _edit_json(FIXTURES / "unet.pt2", "models/model.json", tmp_path / "bad.pt2", edit)
    with pytest.raises(MalformedInputError, match="declares shapes"):
        inspect_archive(str(bad), FAST)


def test_non_persistent_buffer_is_read_from_the_constants(tmp_path: Path) -> None:
    """torch.export.save keeps a buffer registered with persistent=False among the constants, not
    the weights; torch.export.load reads such a file, so lipaudit must too, and bound x @ c by ||c||."""

    class NonPersistent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("c", torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 100,
                                 persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.c

    model = NonPersistent()
    path = tmp_path / "np.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    r = inspect_archive(str(path), GraphSettings(measure=False))
    truth = float(torch.linalg.matrix_norm(model.c.double(), 2))
    assert r.certified and r.lipschitz_upper is not None
    assert truth <= r.lipschitz_upper <= truth * (1 + 1e-6)


def test_float_arguments_read_the_infinities_torch_export_writes() -> None:
    """torch.export writes inf as the string "Infinity"; a NaN or an unknown entry stays unknown, and
    a list with one never loses it silently."""
    import math

    from lipaudit.graph.model import parse_arg

    assert parse_arg({"as_float": "Infinity"}, "x").value == math.inf
    assert parse_arg({"as_float": "-Infinity"}, "x").value == -math.inf
    assert parse_arg({"as_float": 2}, "x").value == 2.0
    assert parse_arg({"as_float": "NaN"}, "x").kind == "other"
    assert parse_arg({"as_float": True}, "x").kind == "other"
    assert parse_arg({"as_floats": [1.5, "Infinity"]}, "x").value == [1.5, math.inf]
    assert parse_arg({"as_floats": [1.5, "NaN"]}, "x").kind == "other"
