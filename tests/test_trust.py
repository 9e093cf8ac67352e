"""Certified claims against the real torch modules: each case once produced a false certificate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import layer, report_of, run, run_json, true_norm


def _save(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "m.pt") -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _eval_weight(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        m(x)  # the old API forms its weight in a forward pre-hook
        return m.weight.detach().clone()


def _dense_conv_norm(conv: nn.Module, shape: tuple[int, ...]) -> float:
    """||A||_2 of the module as a linear map on inputs of that shape (bias removed): basis vectors
    pushed through the real module."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    conv = conv.double().eval()
    with torch.no_grad():
        zero = conv(torch.zeros(1, *shape, dtype=torch.float64))
        cols = (conv(eye) - zero).reshape(n, -1).T
    return float(torch.linalg.matrix_norm(cols, ord=2))


# 1. spectral_norm on a square Linear: dim 0 by default, dim 1 if asked; the interval must hold either way.
@pytest.mark.parametrize("api", ["old", "new"])
def test_square_linear_spectral_norm_holds_for_its_layout(tmp_path: Path, api: str) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(6, 6)
    m = nn.utils.spectral_norm(lin) if api == "old" else nn.utils.parametrizations.spectral_norm(lin)
    x = torch.randn(8, 6)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(5):  # big steps leave u, v stale
        m(x).pow(3).sum().backward()
        opt.step()
        opt.zero_grad()
    used = _eval_weight(m, x)
    doc = report_of(_save(tmp_path, {f"fc.{k}": v for k, v in m.state_dict().items()}))
    entry = layer(doc, "fc")
    sigma = entry["sigma"]
    truth = true_norm(used)
    assert sigma["lower"] <= truth <= sigma["upper"]
    if not any("ambiguous" in n for n in entry["notes"]):  # u lined up with W v in one layout only
        assert sigma["upper"] == pytest.approx(truth, rel=1e-3)  # widened for float32 rounding of u^T W v


def test_hand_set_square_spectral_norm(tmp_path: Path) -> None:
    w = torch.tensor([[1.0, 10.0], [0.0, 1.0]])
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([1.0, 0.0])
    m = nn.utils.spectral_norm(nn.Linear(2, 2, bias=False))
    m.load_state_dict({"weight_orig": w, "weight_u": u, "weight_v": v})
    used = _eval_weight(m, torch.randn(1, 2))
    doc = report_of(_save(tmp_path, {f"fc.{k}": t for k, t in m.state_dict().items()}))
    assert layer(doc, "fc")["sigma"]["upper"] >= true_norm(used)


def test_negative_sigma_is_a_valid_weight(tmp_path: Path) -> None:
    """u^T W v < 0 flips the sign of the weight; its norm is still ||W|| / |u^T W v|."""
    torch.manual_seed(0)
    m = nn.utils.spectral_norm(nn.Linear(4, 3))
    sd = m.state_dict()
    sd["weight_u"] = -sd["weight_u"]
    m.load_state_dict(sd)
    used = _eval_weight(m, torch.randn(1, 4))
    doc = report_of(_save(tmp_path, {f"fc.{k}": t for k, t in sd.items()}))
    sigma = layer(doc, "fc")["sigma"]
    assert sigma["certified"] and sigma["upper"] >= true_norm(used)
    assert sigma["upper"] == pytest.approx(true_norm(used), rel=1e-4)


def test_square_conv_spectral_norm_covers_both_layouts(tmp_path: Path) -> None:
    torch.manual_seed(4)
    conv = nn.utils.spectral_norm(nn.Conv2d(4, 4, 3))
    sd = conv.state_dict()
    sd["weight_u"] = torch.randn(4)  # stale: neither layout lines up
    conv.load_state_dict(sd)
    x = torch.randn(1, 4, 6, 6)
    used = _eval_weight(conv, x)
    plain = nn.Conv2d(4, 4, 3, padding=2, bias=False)
    plain.weight.data = used
    doc = report_of(_save(tmp_path, {f"c.{k}": t for k, t in sd.items()}))
    assert layer(doc, "c")["sigma"]["upper"] >= _dense_conv_norm(plain, (4, 6, 6))


# 2. weight_norm(dim=None): a 0-d g.
@pytest.mark.parametrize("api", ["old", "new"])
def test_weight_norm_dim_none_is_audited(tmp_path: Path, api: str) -> None:
    torch.manual_seed(5)
    lin = nn.Linear(5, 7)
    if api == "old":
        with pytest.warns(FutureWarning):
            m = nn.utils.weight_norm(lin, dim=None)
    else:
        m = nn.utils.parametrizations.weight_norm(lin, dim=None)
    with torch.no_grad():
        (m.weight_g if api == "old" else m.parametrizations.weight.original0).fill_(16.0)
    used = _eval_weight(m, torch.randn(1, 5))
    path = _save(tmp_path, {f"fc.{k}": t for k, t in m.state_dict().items()})
    doc = report_of(path)
    entry = layer(doc, "fc")
    assert entry["parametrization"] == "weight_norm" and entry["in_network_bound"]
    assert entry["sigma"]["upper"] >= true_norm(used)
    assert doc["network"]["lipschitz_upper"] >= true_norm(used)
    assert run("inspect", path, "--fail-above", "1", "-q").exit_code == 1


# 6. every assumption is true as written
def test_assumptions_state_pooling_and_padding_limits(tmp_path: Path) -> None:
    doc = report_of(Path("fixtures/demo_sn_cnn.pt"))
    text = " ".join(doc["network"]["assumptions"])
    assert "do not overlap" in text and "count_include_pad=True" in text
    assert "2p <= d(k-1)" in text
    assert "1-Lipschitz (ReLU" in text and "max pooling)" not in text


# 7. unrecognised weights make the bound uncertified, with a finding
@pytest.mark.parametrize(
    "extra",
    [
        {"mix.W": torch.randn(8, 8) * 5},
        {"head.w": torch.eye(8) * 500},
        {"q.weight": torch.randint(-100, 100, (8, 8), dtype=torch.int8)},
        {"block1.kernel": torch.randn(8, 8, dtype=torch.complex64)},
    ],
)
def test_unknown_weight_uncertifies(tmp_path: Path, extra: dict[str, torch.Tensor]) -> None:
    sd = {"fc.weight": torch.eye(8) * 0.5, **extra}
    path = _save(tmp_path, sd)
    code, doc = run_json(path, "--fail-above", "1")
    assert not doc["network"]["certified"]
    assert any(f["code"] == "LIP016" and f["tensor"] == next(iter(extra)) for f in doc["findings"])
    assert code == 1 and any(f["code"] == "LIP017" for f in doc["findings"])


def test_no_layer_is_not_certified(tmp_path: Path) -> None:
    path = _save(tmp_path, {"something": torch.zeros(3, dtype=torch.int64)})
    code, doc = run_json(path, "--fail-above", "1")
    assert not doc["network"]["certified"] and code == 1
    assert any(f["code"] == "LIP019" for f in doc["findings"])


# 8. float32 rounding of spectral_norm's own u^T W v
def test_spectral_norm_float32_rounding_is_covered(tmp_path: Path) -> None:
    torch.manual_seed(6)
    n = 64
    w = torch.randn(n, n)
    v = torch.randn(n)
    v /= v.norm()
    wv = w @ v
    u = torch.randn(n)
    u -= (u @ wv) / (wv @ wv) * wv  # nearly orthogonal to W v: u^T W v is mostly rounding
    u += 1e-4 * wv / wv.norm()
    u /= u.norm()
    m = nn.utils.spectral_norm(nn.Linear(n, n, bias=False))
    m.load_state_dict({"weight_orig": w, "weight_u": u, "weight_v": v})
    used = _eval_weight(m, torch.randn(1, n))
    doc = report_of(_save(tmp_path, {f"fc.{k}": t for k, t in m.state_dict().items()}))
    sigma = layer(doc, "fc")["sigma"]
    if sigma["upper"] is not None:
        assert sigma["upper"] >= true_norm(used)
    else:
        assert not doc["network"]["certified"]


# 9. a multi-dimensional LayerNorm is a norm layer, not a matrix
def test_multidim_layernorm_is_not_a_linear(tmp_path: Path) -> None:
    ln = nn.LayerNorm([1, 264])
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.09)
    sd = {"fc.weight": torch.randn(264, 264) / 20, **{f"ln.{k}": v for k, v in ln.state_dict().items()}}
    doc = report_of(_save(tmp_path, sd))
    entry = layer(doc, "ln")
    assert entry["kind"] == "norm" and not entry["in_network_bound"]
    assert not doc["network"]["certified"]


# 10. grouped and depthwise kernels: the interval holds for every grouping
def test_depthwise_kernel_interval_holds_for_every_grouping(tmp_path: Path) -> None:
    torch.manual_seed(7)
    c, k = 12, 31
    dw = nn.Conv1d(c, c, k, groups=c, padding=k // 2, bias=False)
    full = nn.Conv1d(1, c, k, padding=k // 2, bias=False)
    full.weight.data = dw.weight.data.clone()
    doc = report_of(_save(tmp_path, {"dw.weight": dw.weight.data}))
    sigma = layer(doc, "dw")["sigma"]
    # The depthwise layer's norm on an unbounded input: max over channels and frequencies of |k^(w)|,
    # on a grid fine enough that the Bernstein factor 1 / (1 - tau^2 / 2) is 1 + 2e-5.
    n = 8192
    spectrum = torch.fft.rfft(dw.weight.data.double().reshape(c, k), n=n).abs().max().item()
    tau = math.pi * (k - 1) / 2 / n
    depthwise_sup = spectrum / (1 - tau * tau / 2)
    one_to_c = _dense_conv_norm(full, (1, 64))
    assert sigma["lower"] <= depthwise_sup
    assert sigma["upper"] >= max(spectrum, one_to_c)
    assert layer(doc, "dw")["grouping"]["known"] is False


def test_groups_option_pins_the_grouping(tmp_path: Path) -> None:
    torch.manual_seed(8)
    c, k = 8, 5
    dw = nn.Conv1d(c, c, k, groups=c, padding=k // 2, bias=False)
    path = _save(tmp_path, {"dw.weight": dw.weight.data})
    code, doc = run_json(path, "--groups", f"dw={c}")
    assert code == 0
    sigma = layer(doc, "dw")["sigma"]
    truth = _dense_conv_norm(dw, (c, 128))
    assert sigma["upper"] >= truth
    assert sigma["upper"] <= truth * 1.05  # the infinite-grid norm is only a little above a long input's


# 11. gates never pass on a bound that is not a proof
def test_gate_fails_on_uncertified_bound_unless_allowed(tmp_path: Path) -> None:
    sd = {"fc.weight": torch.eye(4) * 0.5, "attn.q_proj.weight": torch.eye(4)}
    path = _save(tmp_path, sd)
    code, doc = run_json(path, "--fail-above", "1e6")
    assert code == 1 and any(f["code"] == "LIP017" for f in doc["findings"])
    code, doc = run_json(path, "--fail-above", "1e6", "--allow-uncertified")
    assert code == 0


def test_table_does_not_call_a_non_chain_certified(tmp_path: Path) -> None:
    torch.manual_seed(9)
    sd = {f"head{i}.weight": torch.randn(10, 32) for i in range(3)}
    result = run("inspect", _save(tmp_path, sd))
    assert "LIP011" in result.stdout
    assert "(certified" not in result.stdout + result.stderr and "no certified" in result.stdout


# LIP011: parallel convolutions are not taken for transposed ones; a real transposed chain is fine.
def test_parallel_convs_break_the_chain(tmp_path: Path) -> None:
    torch.manual_seed(10)
    sd = {"embed.weight": torch.randn(100, 48)}
    for i, k in enumerate((3, 4, 5)):
        sd[f"convs.{i}.weight"] = torch.randn(196, 48, k) / 10
    sd["fc.weight"] = torch.randn(2, 588) / 10
    doc = report_of(_save(tmp_path, sd))
    [brk] = [f for f in doc["findings"] if f["code"] == "LIP011"]
    assert brk["tensor"] == "convs.1.weight" and "196" in brk["message"]


def test_transposed_chain_with_batchnorm_is_a_chain(tmp_path: Path) -> None:
    torch.manual_seed(11)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.ConvTranspose2d(6, 3, 3))
    doc = report_of(_save(tmp_path, net.state_dict()))
    assert not any(f["code"] == "LIP011" for f in doc["findings"]), doc["findings"]


def test_tiny_and_huge_float64_weights(tmp_path: Path) -> None:
    for scale in (1e-300, 1e-160, 1e150, 1e300):
        torch.manual_seed(12)
        w = torch.randn(6, 4, dtype=torch.float64)
        k = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        path = _save(tmp_path, {"fc.weight": w * scale, "c.weight": k * scale}, f"s{scale}.pt")
        for method in ("exact", "fast"):
            code, doc = run_json(path, "--method", method)
            assert code == 0, doc
            fc = layer(doc, "fc")["sigma"]
            assert fc["upper"] >= true_norm(w) * scale * (1 - 1e-12)
            assert 0 < layer(doc, "c")["sigma"]["upper"]
