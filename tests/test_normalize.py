"""normalize: what is written is at or under the target, everything else is kept bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lipaudit.report import schema
from tests.conftest import FIXTURES, report_of, run, true_norm

_NORMALIZE = jsonschema.Draft202012Validator(schema("normalize"))
TOL = 1 + 1e-6


def normalize(*args: Any) -> tuple[int, dict[str, Any]]:
    result = run("normalize", *[str(a) for a in args], "--format", "json", "-q")
    doc = json.loads(result.stdout)
    if "error" in doc and doc["error"] is not None:
        return result.exit_code, doc
    _NORMALIZE.validate(doc)
    return result.exit_code, doc


def sha(path: Path) -> str:
    if path.is_dir():
        return "".join(sha(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the file, optimizer state included, by a flat path."""
    if path.is_dir() or path.suffix == ".safetensors":
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out
    flat: dict[str, torch.Tensor] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}/{i}")

    walk(torch.load(path, weights_only=True), "")
    return flat


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


@pytest.mark.parametrize(
    "name",
    [
        "mlp.pt",
        "mlp_legacy.pt",
        "mlp.safetensors",
        "mlp_bf16.safetensors",
        "mlp_sharded",
        "conv_bn.pt",
        "lstm_train_state.pt",
        "tiny_transformer.safetensors",
    ],
)
def test_written_layers_are_under_the_target_and_the_rest_is_untouched(tmp_path: Path, name: str) -> None:
    src = copy(FIXTURES / name, tmp_path / name)
    before_hash = sha(src)
    out = tmp_path / ("out" if src.is_dir() else f"out{src.suffix}")
    code, doc = normalize(src, "-o", out)
    assert code == 0, doc
    assert sha(src) == before_hash  # the input is untouched
    audited = report_of(out, "--method", "exact")
    for x in audited["layers"]:
        if x["in_network_bound"] and x["kind"] != "other":
            assert x["sigma"]["upper"] <= TOL, x
    changed = {k for c in doc["layers"] for k in c["written"]}
    old, new = tensors_of(src), tensors_of(out)
    assert list(old) == list(new)  # key set and order
    for key, tensor in old.items():
        leaf = key.lstrip("/").split("/")[-1]
        if leaf in changed or key.lstrip("/") in changed:
            assert new[key].dtype == tensor.dtype and new[key].shape == tensor.shape
        else:
            assert same_bits(tensor, new[key]), key


def test_optimizer_state_and_counters_survive(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    assert normalize(FIXTURES / "lstm_train_state.pt", "-o", out)[0] == 0
    a = torch.load(FIXTURES / "lstm_train_state.pt", weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a["epoch"] == b["epoch"] and list(a) == list(b)
    assert a["optimizer_state_dict"]["param_groups"] == b["optimizer_state_dict"]["param_groups"]


def test_second_pass_is_a_no_op(tmp_path: Path) -> None:
    for name in ("mlp.pt", "conv_bn.pt", "mlp_bf16.safetensors"):
        once, twice = tmp_path / f"1{name}", tmp_path / f"2{name}"
        assert normalize(FIXTURES / name, "-o", once)[0] == 0
        code, doc = normalize(once, "-o", twice)
        assert code == 0
        assert all(c["action"] == "unchanged" for c in doc["layers"]), doc["layers"]
        a, b = tensors_of(once), tensors_of(twice)
        assert all(same_bits(a[k], b[k]) for k in a)


def test_clip_leaves_small_layers_alone(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    code, doc = normalize(FIXTURES / "mlp.pt", "-o", out, "--mode", "clip")
    assert code == 0
    actions = {c["name"]: c["action"] for c in doc["layers"]}
    assert actions == {"0": "scaled", "2": "unchanged", "4": "unchanged"}
    a, b = tensors_of(FIXTURES / "mlp.pt"), tensors_of(out)
    assert same_bits(a["/2.weight"], b["/2.weight"]) and same_bits(a["/4.weight"], b["/4.weight"])
    assert true_norm(b["/0.weight"]) <= TOL


def test_target_other_than_one(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    assert normalize(FIXTURES / "conv_bn.pt", "-o", out, "--target", "0.5")[0] == 0
    doc = report_of(out)
    assert all(x["sigma"]["upper"] <= 0.5 * TOL for x in doc["layers"])
    assert all(x["sigma"]["upper"] >= 0.5 * 0.98 for x in doc["layers"])


def test_bf16_torch_checkpoint(tmp_path: Path) -> None:
    sd = {
        k: v.to(torch.bfloat16)
        for k, v in torch.load(FIXTURES / "conv_bn.pt", weights_only=True).items()
        if v.is_floating_point()
    }
    src, out = tmp_path / "bf16.pt", tmp_path / "o.pt"
    torch.save(sd, src)
    assert normalize(src, "-o", out)[0] == 0
    doc = report_of(out, "--method", "exact")
    assert all(x["dtype"] == "bfloat16" and x["sigma"]["upper"] <= TOL for x in doc["layers"])


def test_safetensors_metadata_is_kept_and_records_the_run(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    assert normalize(FIXTURES / "mlp.safetensors", "-o", out, "--target", "2")[0] == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    record = json.loads(meta["lipaudit"])
    assert record["target"] == 2.0 and record["mode"] == "divide" and "version" in record


def test_tied_weights_are_scaled_once(tmp_path: Path) -> None:
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    src, out = tmp_path / "tied.pt", tmp_path / "o.pt"
    torch.save({"enc.weight": w, "dec.weight": w}, src)
    code, doc = normalize(src, "-o", out)
    assert code == 0
    assert any(f["code"] == "LIP014" for f in doc["findings"])
    sd = torch.load(out, weights_only=True)
    assert sd["enc.weight"].untyped_storage().data_ptr() == sd["dec.weight"].untyped_storage().data_ptr()
    assert 0.999 <= true_norm(sd["enc.weight"]) <= TOL


def test_spectral_norm_layers(tmp_path: Path) -> None:
    """Dense: u, v set exactly. Conv: not normalisable without --bake; with it, plain weights."""
    out = tmp_path / "o.pt"
    code, doc = normalize(FIXTURES / "demo_sn_cnn.pt", "-o", out)
    assert code == 1
    assert sorted(f["tensor"] for f in doc["findings"] if f["code"] == "LIP012" and f["tensor"]) == [
        f"features.{i}.weight_orig" for i in (0, 2, 4, 6)
    ]
    assert not out.exists() and doc["output"]["written"] is False  # a failing normalize writes nothing
    code, doc = normalize(FIXTURES / "demo_sn_cnn.pt", "-o", out, "--partial")
    assert code == 1 and doc["output"]["written"] is True
    head = report_of(out, "--method", "exact")["layers"][-1]
    assert head["parametrization"] == "spectral_norm" and head["sigma"]["upper"] <= TOL
    baked = tmp_path / "baked.pt"
    code, doc = normalize(FIXTURES / "demo_sn_cnn.pt", "-o", baked, "--bake")
    assert code == 0
    sd = torch.load(baked, weights_only=True)
    assert list(sd)[:2] == ["features.0.bias", "features.0.weight"]  # where weight_orig stood
    assert not any(k.endswith(("_orig", "_u", "_v")) for k in sd)
    audited = report_of(baked, "--method", "exact")
    assert all(x["parametrization"] is None and x["sigma"]["upper"] <= TOL for x in audited["layers"])


def test_new_api_spectral_norm_u_v(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    code, _ = normalize(FIXTURES / "sn_new_api.pt", "-o", out, "--include", "0")
    assert code == 0
    first = report_of(out, "--method", "exact")["layers"][0]
    assert first["sigma"]["upper"] <= TOL and first["sigma"]["upper"] >= 1 - 1e-6


def test_reshape_mode_is_flagged_not_certified(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    code, doc = normalize(FIXTURES / "conv_bn.pt", "-o", out, "--conv-norm", "reshape")
    assert code == 0
    assert any(f["code"] == "LIP013" for f in doc["findings"])
    assert doc["network"]["certified"] is False
    audited = report_of(out)
    convs = [x for x in audited["layers"] if x["kind"] == "conv2d"]
    assert all(abs(x["reshape_sigma"] - 1) < 1e-6 and x["grouping"]["ungrouped_lower"] > 1.1 for x in convs)


def test_include_and_exclude(tmp_path: Path) -> None:
    code, doc = normalize(FIXTURES / "conv_bn.pt", "--dry-run", "--exclude", "1", "--exclude", "4")
    assert code == 0
    assert {c["name"]: c["action"] for c in doc["layers"]} == {
        "0": "scaled",
        "1": "unchanged",
        "3": "scaled",
        "4": "unchanged",
    }
    code, doc = normalize(FIXTURES / "conv_bn.pt", "--dry-run", "--include", "*.weight", "--exclude", "3")
    assert [c["name"] for c in doc["layers"] if c["action"] == "scaled"] == ["0", "1", "4"]


def test_non_finite_and_zero_layers_are_left_alone(tmp_path: Path) -> None:
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    src, out = tmp_path / "m.pt", tmp_path / "o.pt"
    torch.save({"a.weight": bad, "z.weight": torch.zeros(2, 3), "c.weight": 3 * torch.eye(3)}, src)
    code, doc = normalize(src, "-o", out, "--partial")
    assert code == 1
    actions = {c["name"]: c["action"] for c in doc["layers"]}
    assert actions == {"a": "skipped", "z": "unchanged", "c": "scaled"}
    sd = torch.load(out, weights_only=True)
    assert same_bits(sd["a.weight"], bad) and same_bits(sd["z.weight"], torch.zeros(2, 3))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    code, doc = normalize(FIXTURES / "mlp.pt", "-o", out, "--dry-run")
    assert code == 0 and not out.exists() and doc["output"]["written"] is False
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_needs_in_place(tmp_path: Path) -> None:
    src = copy(FIXTURES / "mlp.pt", tmp_path / "m.pt")
    h = sha(src)
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    for target in (src, tmp_path / "." / "m.pt", link):
        code, doc = normalize(src, "-o", target)
        assert code == 2 and doc["error"]["code"] == "usage"
    assert sha(src) == h
    mode = 0o640
    os.chmod(src, mode)
    assert normalize(src, "--in-place")[0] == 0
    assert sha(src) != h and (src.stat().st_mode & 0o777) == mode
    assert all(x["sigma"]["upper"] <= TOL for x in report_of(src, "--method", "exact")["layers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "m.pt"]


def test_in_place_sharded(tmp_path: Path) -> None:
    src = copy(FIXTURES / "mlp_sharded", tmp_path / "shards")
    assert normalize(src, "--in-place")[0] == 0
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (FIXTURES / "mlp_sharded").iterdir())
    assert all(x["sigma"]["upper"] <= TOL for x in report_of(src, "--method", "exact")["layers"])


@pytest.mark.parametrize("where", ["folder", "missing", "symlink"])
def test_bad_output_paths_exit_6(tmp_path: Path, where: str) -> None:
    target = {"folder": tmp_path, "missing": tmp_path / "no" / "o.pt", "symlink": tmp_path / "s.pt"}[where]
    if where == "symlink":
        target.symlink_to(tmp_path / "elsewhere.pt")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, doc = normalize(FIXTURES / "mlp.pt", "-o", target)
    assert code == 6 and doc["error"]["code"] == "output"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    limit, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if mode == "kill":
        import lipaudit.checkpoint.writer as w
        real = w.stage
        def stage(target, write):
            def dying(f):
                f.write(b"x" * limit)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(target, dying)
        w.stage = stage
    from lipaudit.cli import main
    sys.argv = ["lipaudit", "normalize", *sys.argv[3:]]
    main()
""")


@pytest.mark.parametrize("mode", ["fsize", "kill"])
def test_full_disk_or_crash_leaves_nothing(tmp_path: Path, mode: str) -> None:
    src = copy(FIXTURES / "conv_bn.pt", tmp_path / "in.pt")
    h = sha(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for target in (outdir / "o.pt", src):
        extra = ["--in-place"] if target == src else ["-o", str(target)]
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, "2000", mode, str(src), *extra], capture_output=True, text=True, timeout=120
        )
        if mode == "fsize":
            assert proc.returncode == 6, proc.stderr
            assert "Traceback" not in proc.stderr
        else:
            assert proc.returncode == -9
        assert sha(src) == h
        assert list(outdir.iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "out"]


def test_two_runs_writing_the_same_output(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    cmd = [sys.executable, "-m", "lipaudit", "normalize", str(FIXTURES / "conv_bn.pt"), "-o", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert all(x["sigma"]["upper"] <= TOL for x in report_of(out)["layers"])
    assert [p.name for p in tmp_path.iterdir()] == ["o.pt"]


def test_new_file_mode_follows_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    old = os.umask(0o027)
    try:
        assert normalize(FIXTURES / "mlp.safetensors", "-o", out)[0] == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o640


def test_text_formats(tmp_path: Path) -> None:
    for fmt in ("table", "markdown", "github"):
        result = run("normalize", FIXTURES / "conv_bn.pt", "--dry-run", "--format", fmt, "-q")
        assert result.exit_code == 0
        assert "scaled" in result.stdout or "rescaled" in result.stdout


def test_safetensors_written_in_its_own_order(tmp_path: Path) -> None:
    """A file whose header is not in save_file's order keeps its order."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "z.weight": torch.randn(4, 4, generator=g) * 3,
        "a.weight": torch.randn(4, 4, generator=g),
        "m.bias": torch.randn(4, generator=g),
    }
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src))
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    order = ["m.bias", "z.weight", "a.weight"]
    reordered = json.dumps({k: header[k] for k in order}).encode()
    reordered += b" " * (-len(reordered) % 8)
    src.write_bytes(len(reordered).to_bytes(8, "little") + reordered + raw[8 + n :])
    out = tmp_path / "o.safetensors"
    assert normalize(src, "-o", out)[0] == 0
    n2 = int.from_bytes(out.read_bytes()[:8], "little")
    keys = [k for k in json.loads(out.read_bytes()[8 : 8 + n2]) if k != "__metadata__"]
    assert keys == order


def test_integer_keys_expanded_views_and_subnormal_weights_are_written(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    sd = {
        0: {"weight": torch.randn(4, 4, generator=g) * 3},
        5: {"weight": torch.randn(3, 4, generator=g, dtype=torch.float64) * 1e-310},
        "scale": torch.ones(1).expand(3),
    }
    src = tmp_path / "in.pt"
    torch.save(sd, src)
    out = tmp_path / "out.pt"
    code, doc = normalize(src, "-o", out)
    assert code == 0, doc
    got = torch.load(out, weights_only=True)
    assert list(got) == [0, 5, "scale"]
    assert got["scale"].stride() == (0,) and torch.equal(got["scale"], sd["scale"])
    assert true_norm(got[0]["weight"]) <= TOL
    assert bool(torch.isfinite(got[5]["weight"]).all())


_READ_ONLY_CHILD = textwrap.dedent("""
    import os, sys
    real = os.open
    def refuse(path, flags, *args):
        # what a user (not root) gets in a folder without write permission
        if flags & os.O_CREAT or (flags & getattr(os, "O_TMPFILE", 0)) == getattr(os, "O_TMPFILE", -1):
            raise PermissionError(13, "Permission denied")
        return real(path, flags, *args)
    os.open = refuse
    from lipaudit.cli import main
    sys.argv = ["lipaudit", "normalize", *sys.argv[1:]]
    main()
""")


def test_read_only_output_folder_exits_6(tmp_path: Path) -> None:
    for src, out in ((FIXTURES / "mlp.pt", tmp_path / "o.pt"), (FIXTURES / "mlp_sharded", tmp_path / "shards")):
        proc = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_CHILD, str(src), "-o", str(out), "-q"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 6, proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
