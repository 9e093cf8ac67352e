"""Layer recognition and the weight a model really uses at inference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import layer, report_of, true_norm


def _save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    return path


def _trained_sn(module: nn.Module, x: torch.Tensor, api: str) -> nn.Module:
    """Apply spectral norm, run a few training steps so u, v drift, then switch to eval."""
    torch.manual_seed(0)
    if api == "old":
        module = nn.utils.spectral_norm(module)
    else:
        module = nn.utils.parametrizations.spectral_norm(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    for _ in range(3):
        module(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    module.eval()
    return module


@pytest.mark.parametrize("api", ["old", "new"])
@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: nn.Linear(6, 9), torch.randn(4, 6)),
        (lambda: nn.Conv2d(3, 5, 3), torch.randn(2, 3, 7, 7)),
        (lambda: nn.Conv1d(4, 4, 5), torch.randn(2, 4, 9)),
        (lambda: nn.ConvTranspose2d(4, 6, 3), torch.randn(2, 4, 5, 5)),
        (lambda: nn.ConvTranspose2d(5, 5, 2), torch.randn(2, 5, 5, 5)),  # square: both layouts fit
    ],
)
def test_spectral_norm_audits_the_eval_weight(tmp_path: Path, api: str, make, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    m = _trained_sn(make(), x, api)
    with torch.no_grad():
        m(x)  # the old API recomputes its weight attribute in a forward pre-hook
        used = m.weight.detach().clone()  # what eval-mode forward multiplies by
    doc = report_of(_save(tmp_path, {f"layer.{k}": v for k, v in m.state_dict().items()}))
    [entry] = doc["layers"]
    assert entry["parametrization"] == "spectral_norm"
    assert entry["name"] == "layer"
    assert len(entry["uses"]) == 3
    if used.ndim == 2:
        assert entry["sigma"]["upper"] == pytest.approx(true_norm(used), rel=1e-5)
    else:
        transposed = isinstance(m, nn.ConvTranspose2d)
        mat = used.transpose(0, 1) if transposed else used
        if any("layout ambiguous" in n for n in entry["notes"]):  # square: u, v do not tell the layout
            assert entry["reshape_sigma"] >= true_norm(mat) * (1 - 1e-6)
        else:
            assert entry["reshape_sigma"] == pytest.approx(true_norm(mat), rel=1e-6)


def test_ambiguous_spectral_norm_layout_is_conservative(tmp_path: Path) -> None:
    """Square ConvTranspose whose u no longer matches either layout: take the larger weight."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 5, 2, 2, generator=g)
    u = torch.nn.functional.normalize(torch.randn(5, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(20, generator=g), dim=0)
    doc = report_of(_save(tmp_path, {"t.weight_orig": w, "t.weight_u": u, "t.weight_v": v}))
    [entry] = doc["layers"]
    w, u, v = w.double(), u.double(), v.double()
    ests = [abs(float(u @ w.movedim(d, 0).reshape(5, -1) @ v)) for d in (0, 1)]
    d = min((0, 1), key=lambda i: ests[i])
    assert any("ambiguous" in n for n in entry["notes"])
    assert entry["reshape_sigma"] == pytest.approx(true_norm(w.movedim(d, 0)) / ests[d], rel=1e-9)


@pytest.mark.parametrize("api", ["old", "new"])
def test_weight_norm_audits_the_eval_weight(tmp_path: Path, api: str) -> None:
    torch.manual_seed(2)
    wn = nn.utils.weight_norm if api == "old" else nn.utils.parametrizations.weight_norm
    with pytest.warns(FutureWarning) if api == "old" else _nothing():
        m = wn(nn.Linear(5, 7))
    with torch.no_grad():
        m.weight_g.mul_(3.0) if api == "old" else m.parametrizations.weight.original0.mul_(3.0)
        if api == "new":
            used = m.weight.detach().clone()
        else:
            used = m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)
    doc = report_of(_save(tmp_path, dict(m.state_dict())))
    [entry] = doc["layers"]
    assert entry["parametrization"] == "weight_norm"
    assert entry["sigma"]["upper"] == pytest.approx(true_norm(used), rel=1e-6)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_batchnorm_is_a_diagonal_factor(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -4.0, 0.5, 2.0, 1.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.01, 1.0, 1.0, 1.0]))
    doc = report_of(_save(tmp_path, {f"bn.{k}": v for k, v in bn.state_dict().items()}))
    entry = layer(doc, "bn")
    pairs = zip(bn.weight.tolist(), bn.running_var.tolist(), strict=True)
    expected = max(abs(g) / math.sqrt(v + 1e-5) for g, v in pairs)
    assert entry["kind"] == "batchnorm"
    assert entry["sigma"]["upper"] == pytest.approx(expected, rel=1e-12)
    assert entry["in_network_bound"]
    reasons = {s["tensor"]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"bn.bias", "bn.running_mean", "bn.num_batches_tracked"}
    doc2 = report_of(_save(tmp_path, {f"bn.{k}": v for k, v in bn.state_dict().items()}), "--bn-eps", "0.01")
    assert layer(doc2, "bn")["sigma"]["upper"] < entry["sigma"]["upper"]


def test_kinds_from_names_and_shapes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    sd = {
        "emb.weight": torch.randn(30, 8, generator=g),
        "lstm.weight_ih_l0": torch.randn(32, 8, generator=g),
        "lstm.weight_hh_l0_reverse": torch.randn(32, 8, generator=g),
        "attn.in_proj_weight": torch.randn(24, 8, generator=g),
        "attn.out_proj.weight": torch.randn(8, 8, generator=g),
        "blk.q_proj.weight": torch.randn(8, 8, generator=g),
        "ln.weight": torch.randn(8, generator=g),
        "act.prelu.weight": torch.tensor([0.25, -1.5]),
        "c1.weight": torch.randn(4, 2, 3, generator=g),
        "c2.weight": torch.randn(4, 2, 3, 3, generator=g),
        "c3.weight": torch.randn(4, 2, 3, 3, 3, generator=g),
        "pos_embed": torch.randn(1, 5, 8, generator=g),
        "fc.weight": torch.randn(3, 8, generator=g),
    }
    doc = report_of(_save(tmp_path, sd))
    kinds = {x["name"]: (x["kind"], x["in_network_bound"]) for x in doc["layers"]}
    assert kinds == {
        "emb": ("embedding", False),
        "lstm.weight_ih_l0": ("rnn", False),
        "lstm.weight_hh_l0_reverse": ("rnn", False),
        "attn": ("linear", False),
        "attn.out_proj": ("linear", True),
        "blk.q_proj": ("linear", False),
        "ln": ("norm", False),
        "act.prelu": ("other", True),
        "c1": ("conv1d", True),
        "c2": ("conv2d", True),
        "c3": ("conv3d", True),
        "fc": ("linear", True),
    }
    assert layer(doc, "act.prelu")["sigma"]["upper"] == 1.5
    assert layer(doc, "ln")["sigma"]["upper"] is None
    assert [s["tensor"] for s in doc["skipped"]] == ["pos_embed"]
    for x in doc["layers"]:
        if x["kind"] in ("linear", "rnn", "embedding"):
            assert x["sigma"]["upper"] == pytest.approx(true_norm(sd[x["tensor"]]), rel=1e-12)
            assert x["reshape_sigma"] is None


def test_prefix_collisions_keep_the_original_names(tmp_path: Path) -> None:
    w = torch.eye(3)
    doc = report_of(_save(tmp_path, {"module.fc.weight": w, "fc.weight": 2 * w}))
    assert sorted(x["name"] for x in doc["layers"]) == ["fc", "module.fc"]


def test_nan_weights_are_a_finding_not_a_number(tmp_path: Path) -> None:
    w = torch.ones(3, 3)
    w[1, 1] = float("nan")
    doc = report_of(_save(tmp_path, {"a.weight": w, "b.weight": torch.eye(3)}))
    a = layer(doc, "a")
    assert a["sigma"]["upper"] is None and a["sigma"]["lower"] is None
    assert doc["network"]["lipschitz_upper"] is None
    assert doc["network"]["log10_lipschitz_upper"] is None
    assert not doc["network"]["certified"]
    assert any(f["code"] == "LIP004" and f["tensor"] == "a.weight" for f in doc["findings"])
    assert doc["passed"] is False


def test_zero_weight_gives_a_zero_bound(tmp_path: Path) -> None:
    doc = report_of(_save(tmp_path, {"a.weight": torch.zeros(3, 4), "b.weight": torch.eye(3)}))
    assert layer(doc, "a")["sigma"]["upper"] == 0.0
    assert doc["network"]["lipschitz_upper"] == 0.0
    assert doc["network"]["log10_lipschitz_upper"] is None
    assert any(f["code"] == "LIP007" for f in doc["findings"])


def test_tied_weights_are_measured_once(tmp_path: Path) -> None:
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(9))
    doc = report_of(_save(tmp_path, {"enc.weight": w, "dec.weight": w, "other.weight": torch.eye(5)}))
    enc, dec = layer(doc, "enc"), layer(doc, "dec")
    assert enc["sigma"] == dec["sigma"]
    assert dec["tensor"] == "dec.weight" and any("tied to enc.weight" in n for n in dec["notes"])
    assert doc["network"]["lipschitz_upper"] == pytest.approx(enc["sigma"]["upper"] ** 2, rel=1e-12)
