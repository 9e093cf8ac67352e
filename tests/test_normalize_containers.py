"""normalize of containers lipaudit reads but cannot rebuild as objects: Lightning checkpoints with
hyper-parameters, and pytorch_model-0000x-of-0000y.bin shards. What is not a rescaled weight comes
back byte for byte; rescaled weights are at or under the target by an independent SVD."""

from __future__ import annotations

import argparse
import json
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lipaudit.checkpoint import open_checkpoint
from tests.conftest import report_of, run, true_norm

TOL = 1 + 1e-6


def lightning(path: Path, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 4))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    state = OrderedDict((f"model.{k}", v) for k, v in net.state_dict().items())
    ckpt = {
        "epoch": 7, "global_step": 700, "pytorch-lightning_version": "2.4.0", "state_dict": state,
        # classes a weights-only load would not build: lipaudit keeps them as placeholders when reading
        "hyper_parameters": {"lr": 3e-4, "args": argparse.Namespace(depth=3, name="x"), "act": torch.nn.ReLU,
                             "nested": {"betas": (0.9, 0.999), "sched": [1, 2, 3]}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(16, 8)}},
                              "param_groups": [{"lr": 3e-4, "params": [0, 1, 2, 3, 4, 5]}]}],
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25)}},
    }
    torch.save(ckpt, path)
    return ckpt


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def load_back(path: Path) -> Any:
    """torch itself reads the written file, allowing exactly the classes the file was saved with."""
    with torch.serialization.safe_globals([argparse.Namespace, torch.nn.ReLU]):
        return torch.load(path, weights_only=True)


def test_lightning_with_hyper_parameters_keeps_everything_but_the_weights(tmp_path: Path) -> None:
    src, out = tmp_path / "run.ckpt", tmp_path / "out.ckpt"
    before = lightning(src)
    result = run("normalize", str(src), "-o", str(out), "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    a, b = members(src), members(out)
    assert list(a) == list(b)
    [pkl] = [n for n in a if n.endswith("data.pkl")]
    assert a[pkl] == b[pkl]  # the pickled structure, byte for byte
    changed = {n for n in a if a[n] != b[n]}
    assert changed and all("/data/" in n for n in changed)
    after = load_back(out)
    assert after["hyper_parameters"]["args"] == before["hyper_parameters"]["args"]
    assert after["hyper_parameters"]["act"] is torch.nn.ReLU
    assert after["hyper_parameters"]["nested"] == before["hyper_parameters"]["nested"]
    assert (after["epoch"], after["global_step"]) == (7, 700)
    assert torch.equal(after["optimizer_states"][0]["state"][0]["exp_avg"],
                       before["optimizer_states"][0]["state"][0]["exp_avg"])
    for key, w in after["state_dict"].items():
        old = before["state_dict"][key]
        if key.endswith(".weight"):
            assert true_norm(w) <= TOL  # divide mode: every covered layer at the target
            assert true_norm(w) >= 1 - 1e-3
            ratio = (w.double() / old.double()).flatten()
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # a scalar rescale
        else:
            assert torch.equal(w, old)
    doc = report_of(out, "--assume", "chain")  # a state dict's product is certified only under --assume chain
    assert doc["network"]["certified"] and doc["network"]["lipschitz_upper"] <= TOL


def test_lightning_in_place_and_tied_storage(tmp_path: Path) -> None:
    """A second entry viewing the same storage (an EMA that shares memory) moves with the weight."""
    src = tmp_path / "run.ckpt"
    ckpt = lightning(src)
    ckpt["ema_view"] = ckpt["state_dict"]["model.0.weight"]  # the same tensor object: one storage
    torch.save(ckpt, src)
    pkl_before = {n: v for n, v in members(src).items() if n.endswith("data.pkl")}
    assert run("normalize", str(src), "--in-place", "--key", "state_dict", "-q").exit_code == 0
    assert {n: v for n, v in members(src).items() if n.endswith("data.pkl")} == pkl_before
    after = load_back(src)
    assert after["ema_view"].data_ptr() == after["state_dict"]["model.0.weight"].data_ptr()
    assert true_norm(after["state_dict"]["model.0.weight"]) <= TOL


def test_bake_with_placeholders_is_refused_and_without_bake_written(tmp_path: Path) -> None:
    """--bake replaces weight_orig/u/v by one key, so the pickle itself must change: with objects
    lipaudit only holds as placeholders that is a usage error before the audit (exit 2, nothing
    written); the same file without --bake is written by replacing records."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.utils.spectral_norm(torch.nn.Linear(6, 6)), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3))
    net(torch.randn(2, 6))
    src = tmp_path / "sn.ckpt"
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"args": argparse.Namespace(a=1)}}, src)
    baked = run("normalize", str(src), "-o", str(tmp_path / "baked.ckpt"), "--bake", "-q")
    assert baked.exit_code == 2 and "placeholder" in baked.output and "--bake" in baked.output
    assert "layer" not in baked.stdout  # refused before the audit: no report at all
    assert not (tmp_path / "baked.ckpt").exists()
    plain = run("normalize", str(src), "-o", str(tmp_path / "plain.ckpt"), "-q")
    assert plain.exit_code == 0, plain.output
    assert report_of(tmp_path / "plain.ckpt")["network"]["lipschitz_upper"] <= TOL


def bin_shards(folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face style .bin checkpoint in two shards, with an index."""
    torch.manual_seed(1)
    folder.mkdir()
    sd = {f"layers.{i}.weight": torch.randn(12, 12) * (i + 1) for i in range(4)}
    sd.update({f"layers.{i}.bias": torch.randn(12) for i in range(4)})
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    where = {k: names[0] if int(k.split(".")[1]) < 2 else names[1] for k in sd}
    for name in names:
        torch.save({k: v for k, v in sd.items() if where[k] == name}, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 4 * sum(v.numel() for v in sd.values())}, "weight_map": where}))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return sd


def test_bin_shards_are_rewritten_shard_by_shard(tmp_path: Path) -> None:
    src, out = tmp_path / "model", tmp_path / "normalized"
    sd = bin_shards(src)
    result = run("normalize", str(src), "-o", str(out), "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    for f in src.iterdir():
        if f.suffix == ".bin":
            a, b = members(f), members(out / f.name)
            assert [n for n in a if a[n] != b[n]] and all(a[n] == b[n] for n in a if n.endswith("data.pkl"))
            got = torch.load(out / f.name, weights_only=True)
            for k, w in got.items():
                if k.endswith(".weight"):
                    assert true_norm(w) <= TOL
                else:
                    assert torch.equal(w, sd[k])
        elif f.name.endswith(".index.json"):
            assert (out / f.name).read_bytes() == f.read_bytes()
    doc = report_of(out)
    assert doc["checkpoint"]["format"] == "torch-sharded" and doc["network"]["lipschitz_upper"] <= TOL


def test_bin_shards_in_place(tmp_path: Path) -> None:
    src = tmp_path / "model"
    bin_shards(src)
    keep = (src / "config.json").read_bytes()
    result = run("normalize", str(src), "--in-place", "-q")
    assert result.exit_code == 0, result.output
    assert (src / "config.json").read_bytes() == keep
    assert sorted(p.name for p in src.iterdir()) == sorted(
        ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
         "pytorch_model-00002-of-00002.bin"])
    assert report_of(src)["network"]["lipschitz_upper"] <= TOL


def test_unchanged_bin_shard_is_copied(tmp_path: Path) -> None:
    src, out = tmp_path / "model", tmp_path / "normalized"
    bin_shards(src)
    result = run("normalize", str(src), "-o", str(out), "--include", "layers.0*", "-q")
    assert result.exit_code == 0, result.output
    second = "pytorch_model-00002-of-00002.bin"
    assert (out / second).read_bytes() == (src / second).read_bytes()
    assert open_checkpoint(str(out)).format == "torch-sharded"


def test_legacy_file_with_placeholders_is_refused_before_the_audit(tmp_path: Path) -> None:
    src = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"l.weight": torch.randn(3, 3)}, "args": argparse.Namespace(a=1)}, src,
               _use_new_zipfile_serialization=False)
    result = run("normalize", str(src), "-o", str(tmp_path / "o.ckpt"))
    assert result.exit_code == 2 and "legacy" in result.output and "argparse.Namespace" in result.output
    assert not (tmp_path / "o.ckpt").exists()
    # a dry run writes nothing, so it still plans
    assert run("normalize", str(src), "--dry-run", "-q").exit_code == 0


def test_bake_on_bin_shards_is_refused_before_the_audit(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    torch.manual_seed(3)
    lin = torch.nn.utils.spectral_norm(torch.nn.Linear(5, 5))
    lin(torch.randn(1, 5))
    name = "pytorch_model-00001-of-00001.bin"
    torch.save(lin.state_dict(), src / name)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(lin.state_dict(), name)}))
    result = run("normalize", str(src), "-o", str(tmp_path / "out"), "--bake")
    assert result.exit_code == 2 and "--bake" in result.output
    assert not (tmp_path / "out").exists()
    assert run("normalize", str(src), "-o", str(tmp_path / "out"), "-q").exit_code == 0
