"""Readers: real layouts (Lightning, Hugging Face snapshots, .bin shards) and the restricted unpickler."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import socket
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lipaudit.checkpoint import open_checkpoint
from lipaudit.checkpoint.unpickler import danger
from lipaudit.errors import MalformedInputError, UnsafeInputError
from tests.conftest import report_of, run, run_json


class StandIn:
    """An object a research checkpoint keeps beside its weights (a config, a tokenizer, ...)."""

    def __init__(self) -> None:
        self.layers = [3, 4, 2]
        self.lr = 0.1
        self.tensor = torch.ones(2)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _lightning(extra: dict[str, object]) -> dict[str, object]:
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in net.state_dict().items()),
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": extra,
        "callbacks": {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": torch.tensor(0.5)}},
    }


def _norms(doc: dict[str, object]) -> dict[str, float]:
    return {x["name"].removeprefix("model."): x["sigma"]["upper"] for x in doc["layers"]}  # type: ignore[attr-defined]


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_checkpoint_with_arbitrary_objects(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "last.ckpt"
    extra = {"cfg": StandIn(), "ns": argparse.Namespace(a=1), "path": Path("/data")}
    ckpt = _lightning(extra)
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    plain = tmp_path / "plain.pt"
    torch.save(ckpt["state_dict"], plain)
    code, refused = run_json(str(path))
    assert code == 3 and f"{StandIn.__module__}.StandIn" in refused["error"]["message"]
    assert "--allow-unknown-classes" in refused["error"]["message"]
    doc = report_of(path, "--allow-unknown-classes")
    assert doc["checkpoint"]["key"] == "state_dict"
    assert _norms(doc) == _norms(report_of(plain))
    [warned] = [f for f in doc["findings"] if f["code"] == "LIP030"]
    assert warned["severity"] == "warning" and f"{StandIn.__module__}.StandIn" in warned["message"]
    assert "Namespace" not in warned["message"] and "PosixPath" not in warned["message"]  # data classes
    reasons = {s["tensor"]: s["reason"] for s in doc["skipped"]}
    assert f"{StandIn.__module__}.StandIn" in reasons["hyper_parameters.cfg"]
    assert "holding 1 tensors" in reasons["hyper_parameters.cfg"]
    assert "argparse.Namespace" in reasons["hyper_parameters.ns"]
    assert "optimizer state" in reasons["optimizer_states"]
    assert report_of(path, "--key", "state_dict", "--allow-unknown-classes")["checkpoint"]["key"] == "state_dict"


def test_data_classes_need_no_flag(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_lightning({"ns": argparse.Namespace(a=1), "path": Path("/data"), "n": np.float64(2.5),
                           "arr": np.arange(3)}), path)
    doc = report_of(path)
    assert not [f for f in doc["findings"] if f["code"] == "LIP030"]
    assert len(doc["layers"]) == 2


def test_omegaconf_hyper_parameters(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"layers": [3, 4, 2], "opt": {"lr": 0.1}})
    path = tmp_path / "omega.ckpt"
    torch.save(_lightning({"cfg": cfg, "sizes": omegaconf.ListConfig([1, 2])}), path)
    doc = report_of(path, "--key", "state_dict")
    reasons = " ".join(s["reason"] for s in doc["skipped"])
    assert "omegaconf.listconfig.ListConfig" in reasons and "omegaconf.dictconfig.DictConfig" in reasons
    assert len(doc["layers"]) == 2


def test_unknown_classes_are_never_imported(tmp_path: Path) -> None:
    mod = types.ModuleType("lipaudit_probe_never_imported")
    exec("class Probe:\n    def __setstate__(self, s):\n        raise SystemExit('ran')\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        probe = mod.Probe()
        probe.x = 1
        path = tmp_path / "probe.pt"
        torch.save({"w.weight": torch.eye(2), "probe": probe}, path)
    finally:
        del sys.modules[mod.__name__]
    assert run_json(str(path))[0] == 3
    doc = report_of(path, "--allow-unknown-classes")
    assert mod.__name__ not in sys.modules
    assert any("lipaudit_probe_never_imported.Probe" in s["reason"] for s in doc["skipped"])


def test_rewriting_a_file_with_unread_objects_keeps_their_pickle(tmp_path: Path) -> None:
    """Objects lipaudit holds only as placeholders are never written back as objects: the zip
    archive's data.pkl is kept byte for byte and only storage records change."""
    import zipfile

    path = tmp_path / "last.ckpt"
    torch.save(_lightning({"cfg": StandIn()}), path)
    out = tmp_path / "out.ckpt"
    assert run("normalize", path, "-o", out).exit_code == 3  # unknown classes: refused unless allowed
    result = run("normalize", path, "-o", out, "--allow-unknown-classes")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(path) as a, zipfile.ZipFile(out) as b:
        [pkl] = [n for n in a.namelist() if n.endswith("data.pkl")]
        assert a.read(pkl) == b.read(pkl) and a.namelist() == b.namelist()


def test_whole_module_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_net(), path)
    code, doc = run_json(str(path))
    assert code == 3 and "model.state_dict()" in doc["error"]["message"]


class _Call:
    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "payload",
    [
        _Call(socket.socket), _Call(pickle.loads, b"x"), _Call(getattr, argparse.Namespace(), "x"),
        _Call(__import__, "os"), _Call(exec, "1"), _Call(os.popen, "true"), _Call(compile, "1", "x", "eval"),
    ],
    ids=["socket", "pickle.loads", "getattr", "__import__", "exec", "popen", "compile"],
)
def test_dangerous_names_refuse_the_file(tmp_path: Path, payload: _Call, legacy: bool) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w.weight": torch.eye(2)}, "hyper_parameters": {"x": payload}}, path,
               _use_new_zipfile_serialization=not legacy)
    code, doc = run_json(str(path), "--key", "state_dict")
    assert code == 3, doc
    assert "nothing was run" in doc["error"]["message"]


def test_danger_list() -> None:
    for module, name in [("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("builtins", "eval"),
                         ("__builtin__", "getattr"), ("runpy", "run_path"), ("importlib", "import_module"),
                         ("socket", "socket"), ("pickle", "loads"), ("torch", "load"), ("numpy", "load"),
                         ("torch.hub", "load"), ("types", "FunctionType")]:
        assert danger(module, name), (module, name)
    for module, name in [("omegaconf.listconfig", "ListConfig"), ("argparse", "Namespace"), ("builtins", "list"),
                         ("pathlib", "PosixPath"), ("typing", "Any"), ("collections", "defaultdict")]:
        assert not danger(module, name), (module, name)


def test_no_plain_unpickling_in_the_package() -> None:
    root = Path(__file__).resolve().parents[2] / "lipaudit"
    banned = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|add_safe_globals|torch\.jit\.load")
    for path in root.rglob("*.py"):
        assert not banned.search(path.read_text(encoding="utf-8")), path


# -- layouts --------------------------------------------------------------------------------


def _split(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    keys = list(sd)
    half = len(keys) // 2
    return {k: sd[k] for k in keys[:half]}, {k: sd[k] for k in keys[half:]}


def test_hugging_face_cache_snapshot(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _net().state_dict().items()}
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    parts = _split(sd)
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(part, str(blobs / f"blob{i}"))
        (snap / name).symlink_to(Path("../../blobs") / f"blob{i}")
        weight_map.update(dict.fromkeys(part, name))
    (blobs / "index").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (snap / "model.safetensors.index.json").symlink_to(Path("../../blobs/index"))
    single = tmp_path / "single.safetensors"
    save_file(sd, str(single))
    doc = report_of(snap)
    assert doc["checkpoint"]["format"] == "safetensors-sharded"
    assert _norms(doc) == _norms(report_of(single))
    os.mkfifo(blobs / "pipe")
    (snap / "model-00002-of-00002.safetensors").unlink()
    (snap / "model-00002-of-00002.safetensors").symlink_to(Path("../../blobs/pipe"))
    code, doc = run_json(str(snap))
    assert code == 4 and "regular file" in doc["error"]["message"]


@pytest.mark.parametrize("legacy", [False, True])
def test_pytorch_model_bin_shards(tmp_path: Path, legacy: bool) -> None:
    sd = _net().state_dict()
    folder = tmp_path / "repo"
    folder.mkdir()
    weight_map: dict[str, str] = {}
    for i, part in enumerate(_split(sd)):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(part, folder / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = tmp_path / "single.pt"
    torch.save(sd, single)
    for where in (folder, folder / "pytorch_model.bin.index.json"):
        doc = report_of(where)
        assert doc["checkpoint"]["format"] == "torch-sharded"
        assert _norms(doc) == _norms(report_of(single))


def test_bin_shard_names_stay_beside_the_index(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    torch.save({"w.weight": torch.eye(2)}, tmp_path / "outside.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w.weight": "../outside.bin"}}))
    with pytest.raises(MalformedInputError, match="plain"):
        open_checkpoint(str(folder))


def test_folder_with_one_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    torch.save(_net().state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    doc = report_of(folder)
    assert doc["checkpoint"]["format"] == "torch-zip" and len(doc["layers"]) == 2


def test_folder_without_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    code, doc = run_json(str(tmp_path))
    assert code == 2
    assert "*.safetensors" in doc["error"]["message"] and ".bin" in doc["error"]["message"]


def test_safetensors_replaced_during_the_run(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    w = torch.randn(4, 4)
    save_file({"w.weight": w}, str(path))
    ckpt = open_checkpoint(str(path))
    other = tmp_path / "other"
    save_file({"x": torch.zeros(1)}, str(other))
    os.replace(other, path)  # a new file under the same name
    assert torch.equal(ckpt.load("w.weight"), w)
    path.unlink()
    os.mkfifo(path)
    assert torch.equal(ckpt.load("w.weight"), w)


def test_attributes_on_a_state_dict_other_than_metadata(tmp_path: Path) -> None:
    sd = _net().state_dict()
    assert hasattr(sd, "_metadata")
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    assert len(report_of(path)["layers"]) == 2  # _metadata is what torch.save writes: accepted
    sd.extra = "x"  # type: ignore[attr-defined]
    torch.save(sd, path)
    with pytest.raises(UnsafeInputError, match="extra"):
        open_checkpoint(str(path))


def test_a_layer_class_named_in_hyper_parameters_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "hp.ckpt"
    torch.save(_lightning({"activation": torch.nn.ReLU, "norm": torch.nn.BatchNorm1d}), path)
    doc = report_of(path)
    assert any("torch.nn.modules.activation.ReLU" in s["reason"] for s in doc["skipped"])


def test_key_errors_escape_checkpoint_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.pt"
    torch.save({"\x1b]0;t\x07\r\n::error::x": {"w.weight": torch.eye(2)}}, path)
    for fmt in ("table", "json", "github"):
        result = run("inspect", path, "--key", "nope\x1b[2J", "--format", fmt)
        assert result.exit_code == 2
        text = result.stdout + result.stderr
        assert "\x1b" not in text and "\r" not in text and "\n::error::x" not in text
