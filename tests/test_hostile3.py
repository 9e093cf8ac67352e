"""Hostile inputs, third round: the allowlist of data classes, storages named with two dtypes, zip
member names that differ in case, normalize keeping untouched objects, outputs onto checkpoint
files, unknown dtypes, FIFOs in diff, and configuration that must not silence a command-line gate."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lipaudit.checkpoint.formats.torch_format import difference
from tests.conftest import FIXTURES, run
from tests.test_hostile import Reduce, _rewrite_zip, _typed, audit

ROOT = Path(__file__).resolve().parents[1]


def _report(path: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = run("inspect", path, "--format", "json", "-q", *args)
    return result.exit_code, json.loads(result.stdout)


def _codes(doc: dict[str, object]) -> dict[str, str]:
    return {f["code"]: f["message"] for f in doc["findings"]}  # type: ignore[attr-defined]


# -- 1. the allowlist --------------------------------------------------------------------------

# Callables off the old danger list that run commands when the file is later loaded in full.
RED_TEAM_CALLABLES = [
    ("torch.utils.collect_env", "run"), ("torch.storage", "_load_from_bytes"), ("_osx_support", "_read_output"),
    ("pydoc", "pipepager"), ("imaplib", "IMAP4_stream"), ("uuid", "_get_command_stdout"),
    ("torch.fx.graph_module", "_forward_from_src"),
]


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A pickle of {"w.weight": eye(2) as a plain pickle cannot hold, "x": module.name(arg)}: the
    call alone, which is what matters."""
    return (b"\x80\x02}q\x00X\x01\x00\x00\x00xc" + f"{module}\n{name}\n".encode() + b"X"
            + len(arg).to_bytes(4, "little") + arg.encode() + b"\x85R" + b"s.")


def _with_payload(path: Path, module: str, name: str) -> Path:
    torch.save({"w.weight": torch.eye(2), "x": 0}, path)

    def edit(member: str, data: bytes) -> bytes:
        if not member.endswith("data.pkl"):
            return data
        # replace the value 0 of "x" (K\x00) by a call of module.name("touch pwned")
        call = b"c" + f"{module}\n{name}\n".encode() + b"X\x0b\x00\x00\x00touch pwned\x85R"
        head, sep, tail = data.rpartition(b"X\x01\x00\x00\x00xq")
        assert sep, data
        memo, rest = tail[:1], tail[1:]
        assert rest.startswith(b"K\x00"), rest[:10]
        return head + sep + memo + call + rest[2:]

    out = path.with_name("evil_" + path.name)
    return _rewrite_zip(path, out, edit)


@pytest.mark.parametrize(("module", "name"), RED_TEAM_CALLABLES)
def test_red_team_callables_are_refused(tmp_path: Path, module: str, name: str) -> None:
    evil = _with_payload(tmp_path / "w.pt", module, name)
    for extra in ((), ("--allow-unknown-classes",)):
        code, err = audit(evil, *extra)
        assert code == 3, (module, name, err)
        assert f"{module}.{name}" in err
    assert not (tmp_path / "pwned").exists()


def _unknown_module() -> types.ModuleType:
    mod = types.ModuleType("lipaudit_hostile3_cfg")
    exec("class Config:\n    def __init__(self):\n        self.lr = 0.1\n", mod.__dict__)
    return mod


def test_unknown_class_needs_the_flag(tmp_path: Path) -> None:
    mod = _unknown_module()
    sys.modules[mod.__name__] = mod
    try:
        path = tmp_path / "cfg.pt"
        torch.save({"state_dict": {"w.weight": torch.eye(2) * 3}, "cfg": mod.Config()}, path)
    finally:
        del sys.modules[mod.__name__]
    code, err = audit(path)
    assert code == 3 and "lipaudit_hostile3_cfg.Config" in err and "--allow-unknown-classes" in err
    code, doc = _report(path, "--allow-unknown-classes", "--fail-above", "10", "--assume", "chain")
    assert code == 0 and mod.__name__ not in sys.modules
    assert "lipaudit_hostile3_cfg.Config" in _codes(doc)["LIP030"]
    # a gate on warnings fails on it
    assert _report(path, "--allow-unknown-classes", "--fail-on", "warning")[0] == 1


def test_a_class_only_named_is_listed_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "named.pt"
    torch.save({"state_dict": {"w.weight": torch.eye(2)}, "hparams": {"act": torch.nn.ReLU, "opt": torch.optim.SGD}},
               path)
    code, doc = _report(path)
    assert code == 0
    named = _codes(doc)["LIP031"]
    assert "torch.nn.modules.activation.ReLU" in named and "torch.optim.sgd.SGD" in named
    assert "LIP030" not in _codes(doc)


def test_copyreg_reconstructor_is_refused(tmp_path: Path) -> None:
    # protocol 0/1 pickles build objects through copyreg._reconstructor, which calls __new__ of any class
    for module in ("copyreg", "copy_reg"):
        evil = _with_payload(tmp_path / f"{module}.pt", module, "_reconstructor")
        assert audit(evil, "--allow-unknown-classes")[0] == 3


# -- 2. one storage, two dtypes -----------------------------------------------------------------

def test_one_storage_named_with_two_dtypes(tmp_path: Path) -> None:
    half = torch.full((4,), 65504.0, dtype=torch.float16)
    one = torch.tensor([1.0, 0.0])
    src = tmp_path / "two.pt"
    torch.save({
        "a.weight": Reduce(torch._utils._rebuild_tensor_v2, _typed(half), 0, (2, 2), (2, 1), False,
                           collections.OrderedDict()),
        "b.weight": Reduce(torch._utils._rebuild_tensor_v2, _typed(one), 0, (1, 2), (2, 1), False,
                           collections.OrderedDict()),
    }, src)

    def edit(member: str, data: bytes) -> bytes | None:
        if member.endswith("data/1"):
            return None
        if member.endswith("data.pkl"):
            # the second storage record now names the first storage, as a FloatStorage
            return data.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000")
        return data

    bad = _rewrite_zip(src, tmp_path / "bad.pt", edit)
    code, err = audit(bad)
    assert code == 4 and "two dtypes" in err


# -- 3. zip member names ------------------------------------------------------------------------

@pytest.mark.parametrize("extra", ["mlp/DATA/0", "mlp/Data.pkl", "MLP/data.pkl", "mlp/other.pkl"])
def test_zip_names_torch_could_read_otherwise(tmp_path: Path, extra: str) -> None:
    sentinel = tmp_path / "pwned"
    payload = _global_call("os", "system", f"touch {sentinel}")
    with zipfile.ZipFile(FIXTURES / "mlp.pt") as a, zipfile.ZipFile(tmp_path / "case.pt", "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
        data0 = a.read("mlp/data/0")
        b.writestr(extra, payload if extra.endswith(".pkl") else bytes(len(data0)))
    code, err = audit(tmp_path / "case.pt")
    assert code in (3, 4), err
    assert not sentinel.exists()


# -- 4. normalize keeps what it does not rescale -------------------------------------------------

def test_normalize_keeps_devices_layouts_and_types(tmp_path: Path) -> None:
    path = tmp_path / "extra.pt"
    extra = {"device": torch.device("cuda", 1), "cpu": torch.device("cpu"), "layout": torch.sparse_coo,
             "dtype": torch.bfloat16, "size": torch.Size([3, 4]), "bytes": b"\x00\x01", "set": {1, 2},
             "complex": 1 + 2j, "tuple": (1, "a", None), "qscheme": torch.per_channel_affine}
    torch.save({"state_dict": {"w.weight": torch.eye(3) * 4}, "extra": extra}, path)
    out = tmp_path / "out.pt"
    result = run("normalize", path, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    back = torch.load(out, weights_only=True, map_location="cpu")
    for k, v in extra.items():
        assert type(back["extra"][k]) is type(v) and back["extra"][k] == v, k
    assert back["extra"]["device"].index == 1
    assert torch.linalg.matrix_norm(back["state_dict"]["w.weight"], 2) <= 1.0


def test_read_back_compares_types() -> None:
    assert difference({"d": torch.device("cuda", 1)}, {"d": "cuda"}) is not None
    assert difference({"d": torch.device("cuda", 1)}, {"d": torch.device("cuda", 0)}) is not None
    assert difference({"d": torch.device("cuda", 1)}, {"d": torch.device("cuda", 1)}) is None
    assert difference({"s": torch.Size([2])}, {"s": (2,)}) is not None


# -- 5. no output onto a checkpoint being read ---------------------------------------------------

def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.eye(3) * 2}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.eye(3)}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("target", ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "link"])
def test_no_report_onto_a_shard_or_index(tmp_path: Path, target: str) -> None:
    folder = _sharded(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = folder / target
    if target == "link":
        out = tmp_path / "hard.safetensors"
        os.link(folder / "model-00002-of-00002.safetensors", out)
    for args in (("inspect", folder, "-o", out), ("inspect", folder / "model.safetensors.index.json", "-o", out),
                 ("normalize", folder, "-o", out, "--force"), ("diff", folder, folder, "-o", out)):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    graph = FIXTURES / "linear_chain.pt2"
    copy = tmp_path / "graph.pt2"
    copy.write_bytes(graph.read_bytes())
    assert run("inspect", folder, "--graph", copy, "-o", copy).exit_code == 2
    assert copy.read_bytes() == graph.read_bytes()
    # a new file beside the shards is fine
    assert run("inspect", folder, "-o", folder / "report.txt", "-q").exit_code == 0


# -- 9, 10. dtypes lipaudit cannot read -----------------------------------------------------------

def test_float4_weights_are_skipped_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "f4.pt"
    packed = torch.zeros(4, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    torch.save({"a.weight": packed, "b.weight": torch.eye(4)}, path)
    code, doc = _report(path)
    assert code == 0
    reasons = {s["tensor"]: s["reason"] for s in doc["skipped"]}  # type: ignore[attr-defined]
    assert "float4_e2m1fn_x2" in reasons["a.weight"]
    assert "LIP016" in _codes(doc)
    out = tmp_path / "out.pt"
    result = run("normalize", path, "-o", out, "-q")
    assert result.exit_code in (0, 1), result.stderr
    back = torch.load(out, weights_only=True)
    assert torch.equal(back["a.weight"].view(torch.uint8), packed.view(torch.uint8))


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 4, None, True])
def test_safetensors_dtype_not_a_string(tmp_path: Path, dtype: object) -> None:
    raw = json.dumps({"w.weight": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    assert audit(path)[0] == 4
    assert run("normalize", path, "-o", tmp_path / "out.safetensors").exit_code == 4


# -- 11. diff and FIFOs -----------------------------------------------------------------------------

def test_diff_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in ((fifo, FIXTURES / "mlp.pt"), (FIXTURES / "mlp.pt", fifo)):
        proc = subprocess.run([sys.executable, "-m", "lipaudit", "diff", *map(str, args)], capture_output=True,
                              text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 4, proc.stderr
        assert "not a regular file" in proc.stderr


# -- 12. configuration adds gates, never removes a command-line one ------------------------------

def test_config_cannot_silence_a_command_line_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w.weight": torch.eye(3) * 5}, path)
    (tmp_path / "pyproject.toml").write_text('[tool.lipaudit]\nignore = ["LIP001", "LIP017", "LIP002"]\n')
    monkeypatch.chdir(tmp_path)
    assert run("inspect", path, "-q", "--fail-above", "2").exit_code == 1
    assert run("inspect", path, "-q", "--fail-layer-above", "2").exit_code == 1
    monkeypatch.setenv("LIPAUDIT_IGNORE", "LIP001,LIP017")
    assert run("inspect", path, "-q", "--fail-above", "2").exit_code == 1
    # the caller's own --ignore is the caller's choice
    assert run("inspect", path, "-q", "--fail-above", "2", "--ignore", "LIP001").exit_code == 0
    # a gate set by the configuration itself may be ignored by it
    (tmp_path / "pyproject.toml").write_text('[tool.lipaudit]\nfail-above = 2\nignore = ["LIP003"]\n')
    monkeypatch.delenv("LIPAUDIT_IGNORE")
    assert run("inspect", path, "-q").exit_code == 1


def test_a_tensor_subclass_counts_as_built(tmp_path: Path) -> None:
    mod = types.ModuleType("lipaudit_hostile3_sub")
    exec("import torch\nclass Sub(torch.Tensor):\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        path = tmp_path / "sub.pt"
        torch.save({"w.weight": torch.eye(2), "s": torch.ones(2).as_subclass(mod.Sub)}, path)
    finally:
        del sys.modules[mod.__name__]
    code, err = audit(path)
    assert code == 3 and "lipaudit_hostile3_sub.Sub" in err
    code, doc = _report(path, "--allow-unknown-classes")
    assert code == 0 and "lipaudit_hostile3_sub.Sub" in _codes(doc)["LIP030"]


def test_diff_takes_the_trust_flag(tmp_path: Path) -> None:
    mod = _unknown_module()
    sys.modules[mod.__name__] = mod
    try:
        path = tmp_path / "cfg.pt"
        torch.save({"state_dict": {"w.weight": torch.eye(2) * 3}, "cfg": mod.Config()}, path)
    finally:
        del sys.modules[mod.__name__]
    assert run("diff", path, path, "-q").exit_code == 3
    assert run("diff", path, path, "-q", "--allow-unknown-classes").exit_code == 0


def test_read_back_compares_metadata_and_grad() -> None:
    a: collections.OrderedDict[str, object] = collections.OrderedDict(w=torch.ones(1))
    b: collections.OrderedDict[str, object] = collections.OrderedDict(w=a["w"])
    a._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    b._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    assert difference(a, b) is not None
    b._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    assert difference(a, b) is None
    t = torch.ones(2, requires_grad=True)
    assert difference({"t": t}, {"t": t.detach()}) is not None
