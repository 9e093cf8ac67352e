"""lipaudit's reader against torch.load(weights_only=True), on checkpoints of every torch API and era
that can be made here: whatever torch's weights-only loader reads, lipaudit reads with the same
tensors, bit for bit, in the same place; where torch refuses, lipaudit refuses or reads the
objects inertly, as its allowlist says."""

from __future__ import annotations

import argparse
import collections
import math
import subprocess
import sys
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.torch_reader import load_torch
from lipaudit.checkpoint.unpickler import Global, Opaque, data_class
from lipaudit.errors import LipauditError, UnsafeInputError
from tests.test_hostile import Reduce, _typed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(ours: object, theirs: object, where: str = "") -> None:
    """Assert lipaudit's object equals torch's: containers, keys, leaves, tensors bit for bit."""
    if isinstance(theirs, torch.Tensor):
        assert type(ours) is type(theirs), where
        assert isinstance(ours, torch.Tensor)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        assert ours.stride() == theirs.stride() and ours.storage_offset() == theirs.storage_offset(), where
        assert ours.requires_grad == theirs.requires_grad, where
        assert torch.equal(_bits(ours), _bits(theirs)), where
        return
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for k in theirs:
            same(ours[k], theirs[k], f"{where}/{k}")
        return
    if isinstance(theirs, (list, tuple)) and type(theirs) in (list, tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):  # type: ignore[call-overload]
            same(a, b, f"{where}/{i}")
        return
    assert type(ours) is type(theirs), (where, type(ours), type(theirs))
    if isinstance(theirs, float) and math.isnan(theirs):
        assert isinstance(ours, float) and math.isnan(ours), where
    else:
        assert ours == theirs, where


def inert(node: object) -> list[object]:
    """Every Opaque or Global in what lipaudit read."""
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, (Opaque, Global)):
            out.append(n)
        elif isinstance(n, dict):
            stack.extend(dict.values(n))
        elif isinstance(n, (list, tuple)):
            stack.extend(n)
    return out


# -- the corpus --------------------------------------------------------------------------------

def _net_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 5))
    net(torch.randn(2, 3, 6, 6))  # running stats, num_batches_tracked
    return net.state_dict()


def _odd_tensors(f8: bool = True) -> dict[str, object]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "transposed": base.t(), "slice": base[1:, 2:5], "offset": base.reshape(-1)[5:11], "tied": base,
        "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.zeros(0, 3), "bool": torch.ones(3) > 0,
        "int8": torch.arange(-4, 4, dtype=torch.int8), "bf16": torch.randn(3, 3).bfloat16(),
        "half": torch.tensor([65504.0, -0.0, float("inf")], dtype=torch.float16),
        "nan": torch.tensor([float("nan"), 1.0]), "complex": torch.randn(2, 2, dtype=torch.complex64),
        "i64": torch.tensor([2**62, -1]), "uint8": torch.arange(5, dtype=torch.uint8),
        # torch's own legacy reader cannot load float8 (its storage type has no dtype)
        **({"f8": torch.randn(4).to(torch.float8_e4m3fn)} if f8 else {}),
    }


def _extra_state() -> dict[str, object]:
    return {"epoch": 7, "lr": 1e-3, "name": "run-1", "flag": True, "none": None, "tuple": (1, 2.5, "x"),
            "bytes": b"\x00\xff", "set": {1, 2}, "complex": 1 - 2j, "size": torch.Size([2, 3]),
            "dtype": torch.float16, "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
            "layout": torch.strided, "nested": {"a": [1, {"b": (2,)}]}, "counter": collections.Counter("aab")}


def _parameters() -> dict[str, object]:
    w = torch.nn.Parameter(torch.randn(3, 3))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    hooked = torch.randn(2, 2, requires_grad=True)
    hooked.register_hook(lambda g: g)
    return {"w.weight": w, "w.bias": frozen, "hooked": hooked}


def _optimizer() -> dict[str, object]:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict()}


def _old_style() -> dict[str, object]:
    # what 2018 files hold: OrderedDict([[k, v], ...]), _rebuild_tensor, hooks None
    t = torch.randn(2, 3)
    v1 = Reduce(torch._utils._rebuild_tensor, _typed(t), 0, (2, 3), (3, 1))
    v2 = Reduce(torch._utils._rebuild_tensor_v2, _typed(t.clone()), 0, (3, 2), (1, 3), False, None)
    return {"sd": Reduce(collections.OrderedDict, [["a.weight", v1], ["b.weight", v2]])}


def _numpy_extra() -> dict[str, object]:
    return {"state_dict": _net_state(), "np_scalar": np.float64(0.5), "np_int": np.int64(3),
            "np_array": np.arange(6, dtype=np.float32).reshape(2, 3)}


_FABRIC = ("lightning_fabric", "lightning_fabric.utilities", "lightning_fabric.utilities.data")


def _lightning_like() -> dict[str, object]:
    hp = sys.modules[_FABRIC[-1]].AttributeDict(lr=0.1, layers=[3, 4])
    return {"epoch": 2, "global_step": 20, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in _net_state().items()}, "hyper_parameters": hp,
            "hparams_ns": argparse.Namespace(depth=3), "path": Path("/data/x"),
            "optimizer_states": [_optimizer()["optimizer"]], "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": torch.tensor(0.5)}}}


SaveFn = Callable[[Path], None]


def _with_fake_lightning(inner: SaveFn) -> SaveFn:
    """Lightning's AttributeDict, as pickle names it, without installing Lightning."""

    def save(path: Path) -> None:
        mod = types.ModuleType(_FABRIC[-1])
        exec("class AttributeDict(dict):\n    pass\n", mod.__dict__)
        mod.AttributeDict.__module__ = _FABRIC[-1]
        added = [n for n in _FABRIC if n not in sys.modules]
        for name in _FABRIC[:-1]:
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules[_FABRIC[-1]] = mod
        try:
            inner(path)
        finally:
            for name in added:
                del sys.modules[name]

    return save


def _save(obj: Callable[[], object], **kw: object) -> SaveFn:
    def save(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(obj(), path, **kw)  # type: ignore[arg-type]

    return save


def _relocate(inner: SaveFn, location: bytes) -> SaveFn:
    """Storages saved on the CPU, their location rewritten as a CUDA machine's torch.save writes it."""

    def save(path: Path) -> None:
        inner(path)
        old = b"X\x03\x00\x00\x00cpu"
        new = b"X" + len(location).to_bytes(4, "little") + location
        if zipfile.is_zipfile(path):
            tmp = path.with_suffix(".tmp")
            with zipfile.ZipFile(path) as a, zipfile.ZipFile(tmp, "w") as b:
                for info in a.infolist():
                    data = a.read(info.filename)
                    b.writestr(info.filename, data.replace(old, new) if info.filename.endswith("data.pkl") else data)
            tmp.replace(path)
        else:
            path.write_bytes(path.read_bytes().replace(old, new))

    return save


def _big_endian(inner: SaveFn) -> SaveFn:
    def save(path: Path) -> None:
        inner(path)
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(path) as a, zipfile.ZipFile(tmp, "w") as b:
            for info in a.infolist():
                data = a.read(info.filename)
                if info.filename.endswith("/byteorder"):
                    data = b"big"
                b.writestr(info.filename, data)
        tmp.replace(path)

    return save


def corpus() -> dict[str, SaveFn]:
    cases: dict[str, SaveFn] = {}
    for era, kw in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        odd = _odd_tensors if era == "zip" else (lambda: _odd_tensors(f8=False))
        cases[f"{era}_state_dict"] = _save(_net_state, **kw)
        cases[f"{era}_odd_tensors"] = _save(odd, **kw)
        cases[f"{era}_extra_state"] = _save(lambda: {"state_dict": _net_state(), "extra": _extra_state()}, **kw)
        cases[f"{era}_parameters"] = _save(_parameters, **kw)
        cases[f"{era}_optimizer"] = _save(_optimizer, **kw)
        cases[f"{era}_old_style"] = _save(_old_style, **kw)
        cases[f"{era}_numpy"] = _save(_numpy_extra, **kw)
        cases[f"{era}_lightning"] = _with_fake_lightning(_save(_lightning_like, **kw))
        cases[f"{era}_cuda"] = _relocate(_save(_net_state, **kw), b"cuda:0")
        cases[f"{era}_cuda1"] = _relocate(_save(odd, **kw), b"cuda:1")
        cases[f"{era}_tensor_root"] = _save(lambda: torch.randn(3, 4), **kw)
        cases[f"{era}_list_root"] = _save(lambda: [_net_state(), _net_state()], **kw)
    for protocol in (2, 3, 4, 5):
        cases[f"protocol{protocol}"] = _save(lambda: {"state_dict": _net_state(), "extra": _extra_state()},
                                             pickle_protocol=protocol)
        cases[f"legacy_protocol{protocol}"] = _save(lambda: _odd_tensors(f8=False), pickle_protocol=protocol,
                                                    _use_new_zipfile_serialization=False)
    cases["no_byteorder"] = _save(_odd_tensors, _disable_byteorder_record=True)
    cases["big_endian"] = _big_endian(_save(_odd_tensors))
    return cases


CORPUS = corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_reads_what_torch_weights_only_reads(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.pt"
    CORPUS[name](path)
    try:
        theirs: object = torch.load(path, weights_only=True, map_location="cpu")
        refused = None
    except Exception as e:  # torch's weights-only loader refuses what it does not know
        theirs, refused = None, e
    fmt = sn.sniff(path, name)
    try:
        ours = load_torch(path, name, fmt == sn.TORCH_ZIP, mmap=fmt == sn.TORCH_ZIP, limits=Limits())
    except LipauditError as e:
        assert refused is not None, f"torch reads {name}, lipaudit refused: {e.message}"
        assert isinstance(e, UnsafeInputError), e.message
        return
    if refused is None:
        assert not inert(ours.root), name
        assert not ours.classes.built
        same(ours.root, theirs)
    else:
        # torch refused (a class off its list, or opcodes of protocols 3 to 5 it does not implement);
        # lipaudit built nothing but allowlisted data classes, inertly
        kept = inert(ours.root)
        assert all(data_class(o.qualname) for o in kept if isinstance(o, Opaque)), name
        assert not ours.classes.built


def test_the_corpus_covers_both_outcomes(tmp_path: Path) -> None:
    """Some files torch reads and some it refuses: both branches above run."""
    outcomes = set()
    for name in ("zip_state_dict", "zip_numpy", "legacy_lightning"):
        path = tmp_path / f"{name}.pt"
        CORPUS[name](path)
        try:
            torch.load(path, weights_only=True, map_location="cpu")
            outcomes.add("read")
        except Exception:
            outcomes.add("refused")
    assert outcomes == {"read", "refused"}


# -- real files: the LPIPS weights ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The six .pth files of the lpips wheel; skipped when the wheel cannot be fetched (offline)."""
    folder = tmp_path_factory.mktemp("lpips")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                               "lpips==0.1.4", "-d", str(folder)], capture_output=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("pip could not run")
    wheels = list(folder.glob("lpips-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip("the lpips wheel could not be fetched (offline?)")
    with zipfile.ZipFile(wheels[0]) as z:
        names = [n for n in z.namelist() if n.endswith(".pth")]
        z.extractall(folder, names)
    return sorted(folder / n for n in names)


def test_lpips_weights_read_as_torch_reads_them(lpips_weights: list[Path]) -> None:
    assert len(lpips_weights) == 6
    for path in lpips_weights:
        theirs = torch.load(path, weights_only=True, map_location="cpu")
        fmt = sn.sniff(path, path.name)
        ours = load_torch(path, path.name, fmt == sn.TORCH_ZIP, mmap=fmt == sn.TORCH_ZIP)
        same(ours.root, theirs, str(path))
        assert not ours.classes.built and not ours.classes.referenced


def test_lpips_weights_audit(lpips_weights: list[Path]) -> None:
    from tests.conftest import report_of

    for path in lpips_weights:
        doc = report_of(path)
        assert doc["layers"], path
