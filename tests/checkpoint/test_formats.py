"""Formats recognised by content; nested containers; keys; bad files give the right exit code."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lipaudit.checkpoint import open_checkpoint
from lipaudit.errors import MalformedInputError, UnsafeInputError, UsageError
from tests.conftest import FIXTURES, layer, report_of, run, run_json, true_norm


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(8, 4, generator=g),
        "fc1.bias": torch.randn(8, generator=g),
        "fc2.weight": torch.randn(3, 8, generator=g),
    }


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("mlp.pt", "torch-zip"),
        ("mlp_legacy.pt", "torch-legacy"),
        ("mlp.safetensors", "safetensors"),
        ("mlp_sharded", "safetensors-sharded"),
        ("mlp_sharded/model.safetensors.index.json", "safetensors-sharded"),
    ],
)
def test_every_format_gives_the_same_numbers(name: str, fmt: str) -> None:
    doc = report_of(FIXTURES / name)
    ref = report_of(FIXTURES / "mlp.pt")
    assert doc["checkpoint"]["format"] == fmt
    assert [x["sigma"]["upper"] for x in doc["layers"]] == [x["sigma"]["upper"] for x in ref["layers"]]
    assert doc["network"]["lipschitz_upper"] == ref["network"]["lipschitz_upper"]


def test_extension_does_not_matter(tmp_path: Path) -> None:
    lying = tmp_path / "weights.safetensors"
    torch.save(_state(), lying)
    assert report_of(lying)["checkpoint"]["format"] == "torch-zip"
    other = tmp_path / "weights.pt"
    save_file(_state(), str(other))
    assert report_of(other)["checkpoint"]["format"] == "safetensors"


def test_bf16_is_upcast(fixtures: Path) -> None:
    doc = report_of(fixtures / "mlp_bf16.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(fixtures / "mlp_bf16.safetensors"))
    for x in doc["layers"]:
        assert x["dtype"] == "bfloat16"
        assert x["sigma"]["upper"] == pytest.approx(true_norm(sd[x["tensor"]]), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64])
def test_low_and_high_precision_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    for path, save in ((tmp_path / "a.pt", lambda p: torch.save({"l.weight": w}, p)),
                       (tmp_path / "a.st", lambda p: save_file({"l.weight": w}, str(p)))):
        save(path)
        doc = report_of(path)
        assert doc["layers"][0]["sigma"]["upper"] == pytest.approx(true_norm(w.double()), rel=1e-12)


def test_training_checkpoint_picks_the_model_and_ignores_optimizer(fixtures: Path) -> None:
    doc = report_of(fixtures / "lstm_train_state.pt")
    assert doc["checkpoint"]["key"] == "model_state_dict"
    assert any("optimizer state" in s["reason"] and s["tensor"] == "optimizer_state_dict" for s in doc["skipped"])
    assert not any("exp_avg" in x["tensor"] for x in doc["layers"])
    names = [x["name"] for x in doc["layers"]]
    assert "out" in names and "embed" in names  # module. stripped for display
    assert layer(doc, "out")["tensor"] == "module.out.weight"  # original key kept


@pytest.mark.parametrize(
    "container",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}},
        lambda sd: {"epoch": 1, "net": sd, "opt": {"state": {}, "param_groups": []}},
        lambda sd: {"checkpoint": {"model_state_dict": sd}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {"weights": sd, "step": torch.tensor(5)},
    ],
)
def test_nested_layouts_find_the_same_layers(tmp_path: Path, container) -> None:  # type: ignore[no-untyped-def]
    sd = _state()
    path = tmp_path / "c.pt"
    torch.save(container(sd), path)
    doc = report_of(path)
    assert [x["name"] for x in doc["layers"]] == ["fc1", "fc2"]
    assert doc["layers"][0]["sigma"]["upper"] == pytest.approx(true_norm(sd["fc1.weight"]), rel=1e-12)


def test_ema_and_model_side_by_side(tmp_path: Path) -> None:
    sd = _state()
    ema = {k: v * 2 for k, v in sd.items()}
    path = tmp_path / "c.pt"
    torch.save({"model": sd, "ema": ema}, path)
    doc = report_of(path)
    assert doc["checkpoint"]["key"] == "model"
    assert any(f["code"] == "LIP008" and "ema" in f["message"] for f in doc["findings"])
    assert any(s["tensor"] == "ema" and "--key ema" in s["reason"] for s in doc["skipped"])
    doc2 = report_of(path, "--key", "ema")
    assert doc2["checkpoint"]["key"] == "ema"
    assert doc2["layers"][0]["sigma"]["upper"] == pytest.approx(2 * doc["layers"][0]["sigma"]["upper"], rel=1e-12)


def test_missing_key_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"model": _state()}, path)
    code, doc = run_json(str(path), "--key", "nope")
    assert code == 2 and doc["error"]["code"] == "usage"
    assert "model" in doc["error"]["message"]


def test_key_selects_a_prefix_in_safetensors(tmp_path: Path) -> None:
    sd = _state()
    path = tmp_path / "c.safetensors"
    save_file({**{f"gen.{k}": v.clone() for k, v in sd.items()}, **{f"disc.{k}": v for k, v in sd.items()}}, str(path))
    doc = report_of(path, "--key", "disc")
    assert [x["tensor"] for x in doc["layers"]] == ["disc.fc1.weight", "disc.fc2.weight"]


def test_every_tensor_is_accounted_for(fixtures: Path) -> None:
    names = ("demo_sn_cnn.pt", "sn_new_api.pt", "lstm_train_state.pt", "tiny_transformer.safetensors", "conv_bn.pt")
    for name in names:
        doc = report_of(fixtures / name)
        used = [k for x in doc["layers"] for k in x["uses"]]
        skipped = [s["tensor"] for s in doc["skipped"]]
        ckpt = open_checkpoint(str(fixtures / name))
        keys = [i.key for i in ckpt.infos]
        assert sorted(used + [s for s in skipped if s in keys]) == sorted(keys), name
        assert len(set(used)) == len(used)


def test_non_float_and_odd_tensors_are_skipped_with_reasons(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({
        "fc.weight": torch.randn(3, 3),
        "ids.weight": torch.arange(6).reshape(2, 3),
        "empty.weight": torch.zeros(0, 4),
        "scale": torch.tensor(2.0),
        "flag": torch.tensor([True]),
        "cplx.weight": torch.randn(2, 2, dtype=torch.complex64),
        "sparse.weight": torch.eye(3).to_sparse(),
    }, path)
    doc = report_of(path)
    reasons = {s["tensor"]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"ids.weight", "empty.weight", "scale", "flag", "cplx.weight", "sparse.weight"}
    assert "int64" in reasons["ids.weight"] and "empty" in reasons["empty.weight"]
    assert "sparse" in reasons["sparse.weight"] and "complex" in reasons["cplx.weight"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:  # type: ignore[type-arg]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", 4),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", 4),
        (b"<!DOCTYPE html><html><body>404</body></html>", 4),
        (b"hello world, not a checkpoint", 4),
        (b"PK\x03\x04garbage", 4),
        (b"\x80\x02garbage", 4),
        (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), 4),
        (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), 4),
        (_safetensors({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), 4),
        (_safetensors({"__metadata__": {"a": 1}}), 4),
        (_safetensors({}, length=2**40)[:40], 4),
        (struct.pack("<Q", 10) + b"{\"a\": [1, 2", 4),
    ],
)
def test_bad_files_exit_with_the_documented_code(tmp_path: Path, data: bytes, code: int) -> None:
    path = _write(tmp_path / "bad.pt", data)
    result = run("inspect", path, "--format", "json")
    assert result.exit_code == code, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["error"]["exit_code"] == code
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_duplicate_names_in_safetensors_header(tmp_path: Path) -> None:
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = b'{"a": ' + entry + b', "a": ' + entry + b"}"
    path = _write(tmp_path / "dup.safetensors", struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(MalformedInputError, match="duplicate"):
        open_checkpoint(str(path))


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil(sentinel)}, path, _use_new_zipfile_serialization=not legacy)
    result = run("inspect", path)
    assert result.exit_code == 3
    assert not sentinel.exists()
    assert "weights_only" not in result.stderr


def test_torch_force_no_weights_only_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil(sentinel)}, path)
    with pytest.raises(UnsafeInputError):
        open_checkpoint(str(path))
    assert not sentinel.exists()


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; we only need its file
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafeInputError, match="TorchScript"):
        open_checkpoint(str(path))


def test_fifo_and_folder_without_index(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(MalformedInputError, match="regular file"):
        open_checkpoint(str(fifo))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UsageError, match="looks for"):
        open_checkpoint(str(empty))
    with pytest.raises(UsageError):
        open_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "C:x.safetensors",
                                    "model.bin"])
def test_sharded_index_cannot_leave_its_folder(tmp_path: Path, target: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": target}}))
    with pytest.raises(MalformedInputError):
        open_checkpoint(str(tmp_path))


def test_sharded_index_consistency(tmp_path: Path) -> None:
    sd = _state()
    save_file(sd, str(tmp_path / "s1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    mapping = {**{k: "s1.safetensors" for k in sd}, "extra.weight": "s1.safetensors"}
    index.write_text(json.dumps({"weight_map": mapping}))
    with pytest.raises(MalformedInputError, match="in no shard"):
        open_checkpoint(str(tmp_path))
    index.write_text(json.dumps({"weight_map": {"fc1.weight": "s1.safetensors"}}))
    with pytest.raises(MalformedInputError, match="not mapped"):
        open_checkpoint(str(tmp_path))
    index.write_text(json.dumps({"weight_map": {k: "missing.safetensors" for k in sd}}))
    with pytest.raises((MalformedInputError, UsageError)):
        open_checkpoint(str(tmp_path))
