"""--model MODULE:CALLABLE end to end: the user's module, loaded strictly, exported and bounded over
its graph; the certified bound held against float64 Jacobian norms of the real module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run, validate
from tests.models.small import make, make_spectral

SHAPE = (1, 3, 16, 16)
ARGS = ("--input-shape", "1x3x16x16", "--format", "json", "-q", "--measure-work", "40")


def _jacobian_lower(model: torch.nn.Module, seed: int, steps: int = 30) -> float:
    """max over a few points of ||J(x)||_2, by power iteration on J^T J with autograd in float64:
    each value is a Jacobian norm at a point, so it is a lower bound on the Lipschitz constant."""
    m = model.double().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(3):
        x = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
        v = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
        v /= v.norm()
        for _ in range(steps):
            _, jv = torch.func.jvp(m, (x,), (v,))
            _, vjp = torch.func.vjp(m, x)
            (w,) = vjp(jv)
            v = w / w.norm()
        _, jv = torch.func.jvp(m, (x,), (v,))
        best = max(best, float(jv.norm()))
    return best


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "w.pt"
    torch.save(make().state_dict(), path)
    return path


def test_model_bounds_the_real_graph(weights: Path) -> None:
    result = run("inspect", weights, "--model", "tests.models.small:make", *ARGS)
    assert result.exit_code == 0, result.output
    doc = validate(json.loads(result.stdout))
    net = doc["network"]
    assert net["method"] == "graph" and net["certified"], net["not_certified_because"]
    assert net["details"]["source"] == {"model": "tests.models.small:make", "input_shape": list(SHAPE)}
    measured = _jacobian_lower(make(), seed=3)
    assert 0 < measured <= net["lipschitz_upper"]
    assert net["lipschitz_lower"] is None or net["lipschitz_lower"] <= net["lipschitz_upper"]
    # the residual block is bounded by 1 + L_f, not by the product of every layer (reported alongside)
    chain = net["details"]["chain_log10_product"]
    assert chain is not None and math.log10(net["lipschitz_upper"]) <= chain + 1e-9
    assert {x["name"] for x in doc["layers"]} >= {"stem", "block.conv1", "block.conv2", "head"}


def test_the_same_weights_without_model_are_an_estimate(weights: Path) -> None:
    result = run("inspect", weights, "--format", "json", "-q")
    net = json.loads(result.stdout)["network"]
    assert net["method"] == "chain" and not net["certified"]
    assert "the wiring is not known (export the model, or pass --model)" in net["not_certified_because"]


def test_spectral_norm_modules_load(tmp_path: Path) -> None:
    path = tmp_path / "sn.pt"
    model = make_spectral()
    with torch.no_grad():
        model(torch.randn(*SHAPE))
    torch.save(model.state_dict(), path)
    result = run("inspect", path, "--model", "tests.models.small:make_spectral", *ARGS)
    assert result.exit_code == 0, result.output
    doc = validate(json.loads(result.stdout))
    net = doc["network"]
    assert [x["parametrization"] for x in doc["layers"] if x["name"] == "head"] == ["spectral_norm"]
    # the weight is formed in the graph from u, v and W (mv, vdot, div): all of them have rules
    assert net["certified"] and not net["uncovered"], net["not_certified_because"]
    loaded = make_spectral()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert _jacobian_lower(loaded, seed=4) <= net["lipschitz_upper"]


def test_mismatched_keys_exit_2_naming_them(tmp_path: Path) -> None:
    sd = make().state_dict()
    sd["extra.weight"] = torch.zeros(2, 2)
    del sd["head.weight"]
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    result = run("inspect", path, "--model", "tests.models.small:make", "--input-shape", "1x3x16x16", "-q")
    assert result.exit_code == 2
    assert "missing keys: head.weight" in result.stderr and "unexpected keys: extra.weight" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("target", "says"), [
    ("no_such_module_xyz:make", "cannot import no_such_module_xyz"),
    ("tests.models.small:nothing", "has no nothing"),
    ("tests.models.small:broken", "tests.models.small:broken() failed (RuntimeError: cannot build this model)"),
    ("tests.models.small", "expected MODULE:CALLABLE"),
])
def test_errors_from_user_code_are_one_line(weights: Path, target: str, says: str) -> None:
    result = run("inspect", weights, "--model", target, "--input-shape", "1x3x16x16", "-q")
    assert result.exit_code == 2 and says in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_export_failure_is_exit_2(weights: Path) -> None:
    result = run("inspect", weights, "--model", "tests.models.small:make", "--input-shape", "1x5x16x16", "-q")
    assert result.exit_code == 2 and "torch.export" in result.stderr and "Traceback" not in result.output


def test_model_needs_an_input_shape(weights: Path) -> None:
    result = run("inspect", weights, "--model", "tests.models.small:make", "-q")
    assert result.exit_code == 2 and "--input-shape" in result.stderr


def test_model_from_the_current_folder_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  weights: Path) -> None:
    """The current folder is importable (like uvicorn app:main); [tool.lipaudit] names the model."""
    (tmp_path / "mynet_for_lipaudit.py").write_text(
        "from tests.models.small import make\n\ndef build():\n    return make()\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.lipaudit]\nmodel = "mynet_for_lipaudit:build"\ninput-shape = "1x3x16x16"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    from lipaudit.cli import main

    monkeypatch.setattr("sys.argv", ["lipaudit", "inspect", str(weights), "--format", "json", "-q",
                                     "--no-measure"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 0


def test_normalize_to_a_network_target_with_model(tmp_path: Path, weights: Path) -> None:
    """normalize --model --network-target writes the state dict (torch format, through the registry)
    whose certified graph bound, measured again, is at most the target; one schema for the report."""
    import jsonschema

    from lipaudit.report import schema

    out = tmp_path / "o.pt"
    result = run("normalize", weights, "-o", out, "--model", "tests.models.small:make", "--input-shape",
                 "1x3x16x16", "--network-target", "0.25", "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator(schema("normalize")).validate(doc)
    assert doc["network"]["method"] == "graph" and doc["network"]["target"] == 0.25
    assert doc["network"]["certified"] and doc["network"]["after"]["lipschitz_upper"] <= 0.25
    again = run("inspect", out, "--model", "tests.models.small:make", *ARGS)
    net = json.loads(again.stdout)["network"]
    assert net["certified"] and net["lipschitz_upper"] <= 0.25 * (1 + 1e-9)
    model = make()
    model.load_state_dict(torch.load(out, weights_only=True))
    assert _jacobian_lower(model, seed=5) <= net["lipschitz_upper"]


def test_network_target_needs_a_graph(tmp_path: Path, weights: Path) -> None:
    result = run("normalize", weights, "-o", tmp_path / "o.pt", "--network-target", "1", "-q")
    assert result.exit_code == 2 and "needs the network's graph" in result.stderr
    assert not (tmp_path / "o.pt").exists()


def test_model_with_inverted_residuals_uses_block_rules(tmp_path: Path) -> None:
    """A MobileNetV2-style network through --model: every inverted residual and the head's chain
    (which ends in an activation before the pooling) is bounded as a block, and the bound stays
    above float64 Jacobian norms of the real module."""
    from tests.models.mobilenet import MobileNetV2

    torch.manual_seed(0)
    model = MobileNetV2().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path = tmp_path / "mb.pt"
    torch.save(model.state_dict(), path)
    result = run("inspect", path, "--model", "tests.models.mobilenet:MobileNetV2", *ARGS)
    assert result.exit_code == 0, result.output
    net = validate(json.loads(result.stdout))["network"]
    assert net["certified"], net["not_certified_because"]
    blocks = net["details"]["blocks"]
    used = [b for b in blocks if b["used"]]
    assert sum(b["residual"] for b in used) == 4, blocks
    assert any(b["nodes"][-1].startswith("hardtanh") and not b["residual"] for b in used), blocks
    assert all(b["rule"] == "loop transformation" for b in used), blocks
    # a residual block's own branch is not listed (nor measured) beside it
    assert len({(b["entry"], tuple(b["nodes"])) for b in blocks}) == len(blocks)
    branches = {(b["entry"], tuple(b["nodes"][:-1])) for b in blocks if b["residual"]}
    assert not any((b["entry"], tuple(b["nodes"])) in branches for b in blocks if not b["residual"])
    assert net["lipschitz_upper"] >= _jacobian_lower(model, seed=5) * (1 - 1e-9)
    assert math.log10(net["lipschitz_upper"]) < net["details"]["chain_log10_product"] - 4
