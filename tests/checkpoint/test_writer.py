"""Each format's read, write and verify at module level; atomic sharded commits under SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lipaudit.checkpoint import FORMATS, Edits, open_checkpoint
from lipaudit.checkpoint import writer as w
from lipaudit.checkpoint.formats import detect
from lipaudit.checkpoint.formats.safetensors_format import Safetensors, ShardedSafetensors, final_name
from lipaudit.checkpoint.formats.torch_format import TorchLegacy, TorchZip, difference
from lipaudit.errors import OutputError
from tests.conftest import FIXTURES


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(8, 4, generator=g),
        "fc1.bias": torch.randn(8, generator=g),
        "fc2.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16),
    }


def _sharded(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    keys = list(sd)
    parts = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 1}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A loader independent of lipaudit: the index, then each shard it names."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                out[k] = f.get_tensor(k)
    assert sorted(out) == sorted(index["weight_map"])
    return out


@pytest.mark.parametrize(
    "t",
    [torch.tensor(1.5), torch.randn(3, 5).to(torch.bfloat16), torch.randn(4, 6).t(), torch.ones(1).expand(7),
     torch.zeros(0, 3), torch.randn(5).to(torch.float8_e4m3fn), torch.tensor([True, False]),
     torch.randn(3, dtype=torch.complex64).conj(), torch.full((2,), 1e-310, dtype=torch.float64)],
)
def test_byte_view_is_numpy_tobytes_of_the_values(t: torch.Tensor) -> None:
    import numpy as np

    ref = t.resolve_conj().contiguous().reshape(-1)
    want = ref.view(torch.uint8).numpy().tobytes() if ref.numel() else b""
    assert bytes(w.byte_view(t)) == want
    if t.dtype == torch.float64:
        assert np.frombuffer(bytes(w.byte_view(t)), dtype="<f8")[0] == 1e-310


# -- registry and opening -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("mlp.pt", TorchZip), ("mlp_legacy.pt", TorchLegacy), ("mlp.safetensors", Safetensors),
     ("mlp_sharded", ShardedSafetensors), ("mlp_sharded/model.safetensors.index.json", ShardedSafetensors)],
)
def test_detect_by_content(name: str, cls: type) -> None:
    assert detect(FIXTURES / name, name) is cls
    ckpt = open_checkpoint(str(FIXTURES / name))
    assert isinstance(ckpt.handle, cls) and ckpt.format == cls.name


def test_a_registry_entry_is_all_a_new_format_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    import lipaudit.checkpoint.formats as registry

    class Special(TorchZip):
        name = "special-zip"

        @classmethod
        def sniff(cls, path: Path, guess: str) -> bool:
            return guess == "torch-zip" and path.name == "mlp.pt"

    monkeypatch.setattr(registry, "FORMATS", (Special, *FORMATS))
    assert open_checkpoint(str(FIXTURES / "mlp.pt")).format == "special-zip"
    assert open_checkpoint(str(FIXTURES / "conv_bn.pt")).format == "torch-zip"


@pytest.mark.parametrize("name", ["mlp.pt", "mlp_legacy.pt", "mlp.safetensors", "mlp_sharded"])
def test_load_matches_an_independent_reader(name: str) -> None:
    ckpt = open_checkpoint(str(FIXTURES / name))
    path = FIXTURES / name
    if path.is_dir():
        ref = _read_folder(path)
    elif name.endswith(".safetensors"):
        with safe_open(str(path), framework="pt") as f:
            ref = {k: f.get_tensor(k) for k in f.keys()}
    else:
        ref = torch.load(path, weights_only=True)
    assert sorted(i.key for i in ckpt.infos) == sorted(ref)
    for info in ckpt.infos:
        assert _same(ckpt.load(info.key), ref[info.key])


def test_storage_identity_finds_tied_weights_only_in_torch(tmp_path: Path) -> None:
    emb = torch.randn(5, 4)
    sd = {"emb.weight": emb, "head.weight": emb, "other.weight": emb.clone(), "row": emb[1]}
    torch.save(sd, tmp_path / "tied.pt")
    ckpt = open_checkpoint(str(tmp_path / "tied.pt"))
    ids = {k: ckpt.storage_identity(k) for k in sd}
    assert ids["emb.weight"] is not None and ids["emb.weight"] == ids["head.weight"]
    assert ids["other.weight"] != ids["emb.weight"] and ids["row"] != ids["emb.weight"]
    save_file({"a": emb, "b": emb.clone()}, str(tmp_path / "t.safetensors"))
    assert open_checkpoint(str(tmp_path / "t.safetensors")).storage_identity("a") is None


# -- write and verify, per format -----------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_write_keeps_everything_else_and_leaves_the_object_read_alone(tmp_path: Path, legacy: bool) -> None:
    sd = _state()
    root = {"epoch": 7, "lr": float("nan"), "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1}]}}
    src = tmp_path / "in.pt"
    torch.save(root, src, _use_new_zipfile_serialization=not legacy)
    ckpt = open_checkpoint(str(src))
    assert ckpt.format == ("torch-legacy" if legacy else "torch-zip")
    new = sd["fc1.weight"] * 0.25
    ckpt.write(Edits(values={"fc1.weight": lambda: new}), tmp_path / "out.pt")
    assert _same(ckpt.load("fc1.weight"), sd["fc1.weight"])  # nothing read was changed
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["epoch"] == 7 and got["optimizer"] == root["optimizer"]
    assert list(got["state_dict"]) == list(sd)
    assert _same(got["state_dict"]["fc1.weight"], new)
    assert all(_same(got["state_dict"][k], sd[k]) for k in ("fc1.bias", "fc2.weight"))


def test_torch_tied_weights_stay_tied_and_change_together(tmp_path: Path) -> None:
    emb = torch.randn(6, 4)
    torch.save({"emb.weight": emb, "head.weight": emb, "first_row": emb[0]}, tmp_path / "in.pt")
    ckpt = open_checkpoint(str(tmp_path / "in.pt"))
    ckpt.write(Edits(values={"emb.weight": emb * 0.5}), tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert _same(got["emb.weight"], emb * 0.5) and _same(got["head.weight"], emb * 0.5)
    assert got["emb.weight"].untyped_storage().data_ptr() == got["head.weight"].untyped_storage().data_ptr()
    assert _same(got["first_row"], (emb * 0.5)[0])


def test_torch_overlapping_edits_are_refused(tmp_path: Path) -> None:
    base = torch.randn(4, 4)
    torch.save({"w": base, "row": base[2], "col": base[:, 1], "other": base[3]}, tmp_path / "in.pt")
    ckpt = open_checkpoint(str(tmp_path / "in.pt"))
    with pytest.raises(OutputError, match="overlap"):
        ckpt.write(Edits(values={"w": base * 0.5, "row": base[2] * 2}), tmp_path / "out.pt")
    ckpt.write(Edits(values={"row": base[2] * 2, "other": base[3] * 3}), tmp_path / "out.pt")  # disjoint rows
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert _same(got["w"][2], base[2] * 2) and _same(got["w"][3], base[3] * 3) and _same(got["w"][0], base[0])
    assert _same(got["col"], got["w"][:, 1])


def test_torch_expanded_tensor_integer_keys_and_subnormals(tmp_path: Path) -> None:
    tiny = torch.full((4, 4), 1e-310, dtype=torch.float64)
    sd = {0: torch.randn(3, 3), 5: tiny, "scale": torch.ones(1).expand(16)}
    torch.save(sd, tmp_path / "in.pt")
    ckpt = open_checkpoint(str(tmp_path / "in.pt"))
    assert sorted(i.key for i in ckpt.infos) == ["0", "5", "scale"]
    ckpt.write(Edits(values={"5": tiny * 0.5}), tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(got) == [0, 5, "scale"]
    assert _same(got[5], tiny * 0.5) and float(got[5][0, 0]) == 0.5e-310
    assert got["scale"].stride() == (0,) and _same(got["scale"], sd["scale"])


def test_torch_baked_replacement_takes_the_first_slot(tmp_path: Path) -> None:
    sd = {"a.weight_orig": torch.randn(3, 3), "a.weight_u": torch.randn(3), "a.bias": torch.randn(3),
          "a.weight_v": torch.randn(3)}
    torch.save(sd, tmp_path / "in.pt")
    ckpt = open_checkpoint(str(tmp_path / "in.pt"))
    baked = torch.eye(3)
    ckpt.write(Edits(replaced={"a.weight": (baked, ("a.weight_orig", "a.weight_u", "a.weight_v"))}),
               tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(got) == ["a.weight", "a.bias"] and _same(got["a.weight"], baked)
    assert list(torch.load(tmp_path / "in.pt", weights_only=True)) == list(sd)


def test_torch_verify_finds_a_difference() -> None:
    a = {"w": torch.ones(3), "n": 1, "k": [torch.zeros(2)]}
    assert difference(a, {"w": torch.ones(3), "n": 1, "k": [torch.zeros(2)]}) is None
    assert difference(a, {"w": torch.ones(3), "n": 2, "k": [torch.zeros(2)]}) is not None
    assert difference(a, {"w": torch.ones(3), "k": [torch.zeros(2)], "n": 1}) is not None  # key order
    assert difference(a, {"w": torch.ones(3).double(), "n": 1, "k": [torch.zeros(2)]}) is not None
    b = torch.ones(3)
    b[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp
    assert difference(a, {"w": b, "n": 1, "k": [torch.zeros(2)]}) is not None
    assert difference({1: torch.ones(1)}, {"1": torch.ones(1)}) is not None


def test_safetensors_write_streams_in_file_order_with_metadata(tmp_path: Path) -> None:
    sd = _state()
    order = ["fc2.weight", "fc1.bias", "fc1.weight"]
    src = tmp_path / "in.safetensors"
    save_file({k: sd[k] for k in order}, str(src), metadata={"format": "pt"})
    ckpt = open_checkpoint(str(src))
    new = (sd["fc2.weight"].double() * 0.5).to(torch.bfloat16)
    out = tmp_path / "out.safetensors"
    ckpt.write(Edits(values={"fc2.weight": lambda: new}, metadata={"lipaudit": "{}"}), out)
    header = json.loads(out.read_bytes()[8 : 8 + int.from_bytes(out.read_bytes()[:8], "little")])
    assert [k for k in header if k != "__metadata__"] == sorted(order, key=lambda k: header[k]["data_offsets"][0])
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "lipaudit": "{}"}
        assert _same(f.get_tensor("fc2.weight"), new)
        assert _same(f.get_tensor("fc1.weight"), sd["fc1.weight"])
    # into the folder that holds it: the file keeps its name
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(src, folder / "model.safetensors")
    ckpt = open_checkpoint(str(folder))
    ckpt.write(Edits(values={"fc1.bias": torch.zeros(8)}), folder)
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]


def test_safetensors_verify_reads_back_every_tensor(tmp_path: Path) -> None:
    save_file(_state(), str(tmp_path / "in.safetensors"))
    ckpt = open_checkpoint(str(tmp_path / "in.safetensors"))
    edits = Edits(values={"fc1.weight": torch.zeros(8, 4)})
    target = tmp_path / "out.safetensors"
    pending = ckpt.handle.stage(edits, target)
    try:
        ckpt.handle.verify(edits, pending)
        fd = pending.files[0].fd
        size = os.fstat(fd).st_size
        os.pwrite(fd, b"\x7f", size - 1)  # one byte of the last tensor
        with pytest.raises(OutputError, match="does not read back"):
            ckpt.handle.verify(edits, pending)
    finally:
        pending.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_sharded_write_into_a_new_folder_and_in_place(tmp_path: Path) -> None:
    sd = _state()
    src = _sharded(tmp_path / "in", sd)
    ckpt = open_checkpoint(str(src))
    assert ckpt.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    edits = Edits(values={"fc2.weight": torch.zeros(3, 8, dtype=torch.bfloat16)})
    ckpt.write(edits, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in src.iterdir())
    assert _same(_read_folder(tmp_path / "out")["fc2.weight"], torch.zeros(3, 8, dtype=torch.bfloat16))
    untouched = (src / "model-00001-of-00002.safetensors").stat().st_ino
    ckpt.write(edits, src)
    got = _read_folder(src)
    assert _same(got["fc2.weight"], torch.zeros(3, 8, dtype=torch.bfloat16)) and _same(got["fc1.bias"], sd["fc1.bias"])
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert (src / "model-00001-of-00002.safetensors").stat().st_ino == untouched  # not rewritten


def test_sharded_baked_key_updates_the_index(tmp_path: Path) -> None:
    sd = {"a.weight_orig": torch.randn(3, 3), "a.weight_u": torch.randn(3), "b.weight": torch.randn(2, 2)}
    src = _sharded(tmp_path / "in", sd)
    ckpt = open_checkpoint(str(src))
    ckpt.write(Edits(replaced={"a.weight": (torch.eye(3), ("a.weight_orig", "a.weight_u"))}), tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == ["a.weight", "b.weight"]
    assert index["metadata"]["total_size"] == 9 * 4 + 4 * 4
    assert _same(_read_folder(tmp_path / "out")["a.weight"], torch.eye(3))


def test_marker_names_come_off() -> None:
    assert final_name("model-00001-of-00002.lipaudit-0123456789ab.safetensors") == "model-00001-of-00002.safetensors"
    assert final_name("model.safetensors") == "model.safetensors"


# -- file system edges ----------------------------------------------------------------------


def test_setuid_and_setgid_bits_are_not_copied(tmp_path: Path) -> None:
    save_file(_state(), str(tmp_path / "in.safetensors"))
    target = tmp_path / "out.safetensors"
    shutil.copy(tmp_path / "in.safetensors", target)
    os.chmod(target, 0o6750)
    open_checkpoint(str(tmp_path / "in.safetensors")).write(Edits(values={"fc1.bias": torch.ones(8)}), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_unwritable_folder_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so the refusal the kernel gives a user is played here.
    real_open = os.open

    def refuse(path: object, flags: int, *args: object) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1) or flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    save_file(_state(), str(tmp_path / "in.safetensors"))
    ckpt = open_checkpoint(str(tmp_path / "in.safetensors"))
    with pytest.raises(OutputError, match="Permission denied"):
        ckpt.write(Edits(values={"fc1.bias": torch.ones(8)}), tmp_path / "out.safetensors")


# -- sharded --in-place under SIGKILL -------------------------------------------------------

_DRIVER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import torch
    from lipaudit.checkpoint import Edits, open_checkpoint
    from lipaudit.checkpoint import writer

    pristine, work, snaps, mode = (Path(a) for a in sys.argv[1:5])
    target = work if str(mode) == "in-place" else work.parent / "out"
    n = 0
    while True:
        n += 1
        for p in (work, work.parent / "out"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(pristine, work)
        if str(mode) == "over-output":
            shutil.copytree(pristine, target)
        pid = os.fork()
        if pid == 0:
            count = [0]
            def hook(fn):
                def wrapped(*a, **k):
                    count[0] += 1
                    if count[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)
                return wrapped
            for name in ("replace", "link", "unlink", "rename", "fsync", "copy_file_range"):
                setattr(os, name, hook(getattr(os, name)))
            writer._link_anonymous = hook(writer._link_anonymous)
            ckpt = open_checkpoint(str(work))
            edits = Edits(values={i.key: ckpt.load(i.key) * 0.5 for i in ckpt.infos if len(i.shape) == 2})
            ckpt.write(edits, target)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        if not killed and os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"run {n} failed: {status}")
        shutil.copytree(target, snaps / (f"{n:03d}" if killed else "final"))
        if not killed:
            print(n)
            break
""")


@pytest.mark.parametrize("mode", ["in-place", "over-output"])
def test_sharded_write_is_atomic_under_sigkill_at_every_step(tmp_path: Path, mode: str) -> None:
    """Killed at each file-system step in turn, the folder always reads as all old or all new,
    and a later write tidies what the kill left."""
    old = _state(3)
    pristine = _sharded(tmp_path / "pristine", old)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(pristine), str(tmp_path / "work"), str(snaps), mode],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    steps = int(proc.stdout.split()[-1])
    assert steps > 10  # the hooks saw the commit's steps
    new = {k: v * 0.5 if v.dim() == 2 else v for k, v in old.items()}
    names = sorted(p.name for p in pristine.iterdir())
    states = []
    for snap in sorted(snaps.iterdir()):
        got = _read_folder(snap)
        is_old = all(_same(got[k], old[k]) for k in old)
        is_new = all(_same(got[k], new[k]) for k in new)
        assert is_old != is_new, snap.name
        states.append("new" if is_new else "old")
        if snap.name == "final":
            assert sorted(p.name for p in snap.iterdir()) == names
        else:  # the next run repairs whatever the kill left
            open_checkpoint(str(snap)).write(Edits(), snap)
            assert sorted(p.name for p in snap.iterdir()) == names, snap.name
    assert states[0] == "old" and states[-1] == "new" and "new" in states[:-1]


def test_the_package_starts_without_torch() -> None:
    code = "import sys, lipaudit.checkpoint.limits, lipaudit.checkpoint.model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_a_member_whose_crc_was_already_wrong_is_malformed_input(tmp_path: Path) -> None:
    """normalize patches records in place; a member whose stored CRC never matched its data is the
    input's fault (exit 4), not a failed write (exit 6), and nothing is written."""
    import io
    import sys
    import zipfile

    src = tmp_path / "mlp.pt"
    blob = bytearray((Path(__file__).parents[2] / "fixtures" / "mlp.pt").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/1"))  # a bias: copied, not patched
    name_len, extra_len = int.from_bytes(blob[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(blob[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len  # the local header's own lengths (torch pads it)
    blob[start] ^= 0x40  # one bit of the data; the CRC fields stay as they were
    src.write_bytes(bytes(blob))
    out = tmp_path / "out.pt"
    run = subprocess.run([sys.executable, "-m", "lipaudit", "normalize", str(src), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 4, run.stderr
    assert "CRC" in run.stderr and not out.exists()
