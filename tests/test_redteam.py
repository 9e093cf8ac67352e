"""Red-team checks: certified claims against independent oracles built from the real torch modules."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import spectral_norm as sn_old
from torch.nn.utils import weight_norm as wn_old
from torch.nn.utils.parametrizations import spectral_norm as sn_new
from torch.nn.utils.parametrizations import weight_norm as wn_new

from tests.conftest import run, run_json

REL = 1e-9


def _audit(tmp_path: Path, sd: dict[str, torch.Tensor], *args: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    code, doc = run_json(str(path), *args)
    assert code in (0, 1), code
    return code, doc


def _layers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {lay["tensor"]: lay for lay in doc["layers"]}


def _covered_by_prefix(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for lay in doc["layers"]:
        if lay["in_network_bound"]:
            prefix = lay["tensor"].split(".")[0]
            assert prefix not in out, prefix
            out[prefix] = lay
    return out


def _dense(mod: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """Explicit matrix of the real module (float64, bias off, eval) on one input shape."""
    mod = mod.double().eval()
    n = int(np.prod(in_shape))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bias = getattr(mod, "bias", None)
        if bias is not None:
            bias.zero_()
        y = mod(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape))
    return np.asarray(y.reshape(n, -1).T.numpy())


def _sigma(a: np.ndarray) -> float:
    return float(np.linalg.svd(a, compute_uv=False)[0]) if a.size else 0.0


def _symbol(k: np.ndarray, groups: int = 1, grid: list[int] | None = None) -> tuple[float, float]:
    """(grid maximum, certified upper) of sup_w sigma_max(K^(w)) with the kernel read as `groups` groups."""
    k = np.asarray(k, dtype=np.float64)
    a, b = k.shape[:2]
    ks = k.shape[2:]
    if grid is None:
        grid = [(max(64, 16 * n) if len(ks) == 1 else max(32, 12 * n)) if n > 1 else 1 for n in ks]
    f = np.fft.fftn(k, s=grid, axes=tuple(range(2, 2 + len(ks))))
    f = np.moveaxis(f.reshape(a, b, -1), 2, 0)
    rows = a // groups
    best = max(
        float(np.linalg.svd(f[:, g * rows : (g + 1) * rows, :], compute_uv=False)[:, 0].max()) for g in range(groups)
    )
    tau = np.pi * sum((n - 1) / 2 / m for n, m in zip(ks, grid, strict=True))
    return best, best / (1 - tau**2 / 2)


# ---------------------------------------------------------------- spectral_norm on a square Linear, dim=1


@pytest.mark.parametrize("api", ["old", "new"])
def test_spectral_norm_linear_dim1_square(tmp_path: Path, api: str) -> None:
    """spectral_norm(Linear(2, 2), dim=1): eval weight = W / (v^T W u); the stored u, v do not tell the dim."""
    w0 = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = (sn_old if api == "old" else sn_new)(nn.Linear(2, 2, bias=False), dim=1)
        with torch.no_grad():
            if api == "new":
                p = m.parametrizations.weight
                p.original.copy_(w0)
                p[0]._u.copy_(u)
                p[0]._v.copy_(v)
            else:
                m.weight_orig.copy_(w0)
                m.weight_u.copy_(u)
                m.weight_v.copy_(v)
        m.eval()
        with torch.no_grad():
            m(torch.zeros(1, 2))
            true = _sigma(m.weight.double().numpy())
    assert true == pytest.approx(5.0)
    sd = {f"a.{k}": t.clone() for k, t in m.state_dict().items()}
    code, doc = _audit(tmp_path, sd, "--fail-layer-above", "2")
    (lay,) = [x for x in doc["layers"] if x["in_network_bound"]]
    s = lay["sigma"]
    if s["certified"]:
        assert s["upper"] >= true * (1 - REL), (s, true)
    assert s["lower"] is None or s["lower"] <= true * (1 + REL), (s, true)
    assert code == 1  # the true layer norm 5 is above the gate


@pytest.mark.parametrize("api", ["old", "new"])
@pytest.mark.parametrize(
    ("make", "kw", "shape"),
    [
        (lambda: nn.ConvTranspose1d(2, 2, 1, bias=False), {}, (1, 2, 3)),
        (lambda: nn.Conv2d(2, 2, 1, bias=False), {"dim": 1}, (1, 2, 3, 3)),
        (lambda: nn.ConvTranspose2d(2, 2, 1, bias=False), {"dim": 0}, (1, 2, 3, 3)),
    ],
)
def test_spectral_norm_conv_either_dim(
    tmp_path: Path, api: str, make: Callable[[], nn.Module], kw: dict[str, int], shape: tuple[int, ...]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = (sn_old if api == "old" else sn_new)(make(), **kw)
        w0 = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
        with torch.no_grad():
            if api == "new":
                p = m.parametrizations.weight
                p.original.copy_(w0.reshape(p.original.shape))
                p[0]._u.copy_(torch.tensor([1.0, 0.0]))
                p[0]._v.copy_(torch.tensor([0.0, 1.0]))
            else:
                m.weight_orig.copy_(w0.reshape(m.weight_orig.shape))
                m.weight_u.copy_(torch.tensor([1.0, 0.0]))
                m.weight_v.copy_(torch.tensor([0.0, 1.0]))
        m.eval()
        with torch.no_grad():
            m(torch.zeros(shape))
            true = _sigma(m.weight.double().numpy().reshape(2, 2))
    _, doc = _audit(tmp_path, {f"a.{k}": t.clone() for k, t in m.state_dict().items()})
    (lay,) = [x for x in doc["layers"] if x["in_network_bound"]]
    assert lay["sigma"]["certified"]
    assert lay["sigma"]["upper"] >= true * (1 - REL)


# ---------------------------------------------------------------- trained reparametrizations, stale u / v

_KINDS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lin": (lambda: nn.Linear(4, 4), (4,)),
    "lin_rect": (lambda: nn.Linear(4, 6), (4,)),
    "c1": (lambda: nn.Conv1d(4, 4, 3), (4, 8)),
    "c2": (lambda: nn.Conv2d(4, 4, 3), (4, 5, 5)),
    "ct2": (lambda: nn.ConvTranspose2d(4, 4, 3), (4, 4, 4)),
    "ct1": (lambda: nn.ConvTranspose1d(4, 4, 2), (4, 8)),
}
_APIS: list[tuple[str, dict[str, Any]]] = [
    ("sn_old", {}),
    ("sn_new", {}),
    ("sn_old", {"dim": 1}),
    ("sn_new", {"dim": 1}),
    ("wn_old", {"dim": 0}),
    ("wn_old", {"dim": 1}),
    ("wn_old", {"dim": None}),
    ("wn_new", {"dim": 0}),
    ("wn_new", {"dim": 1}),
    ("wn_new", {"dim": None}),
    ("wn_new", {"dim": -1}),
]
_WRAP = {"sn_old": sn_old, "sn_new": sn_new, "wn_old": wn_old, "wn_new": wn_new}


@pytest.mark.parametrize("seed", [0, 3])
def test_reparametrized_after_sgd(tmp_path: Path, seed: int) -> None:
    """Audited interval must hold for the weight the eval-mode module really uses."""
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    truth: dict[str, tuple[float, float, str]] = {}
    i = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, (make, in_shape) in _KINDS.items():
            for api, kw in _APIS:
                if kind == "lin_rect" and api.startswith("sn") and kw:
                    continue
                m = _WRAP[api](make(), **kw)
                opt = torch.optim.SGD(m.parameters(), lr=0.5)
                m.train()
                for step in range(3):
                    loss = (m(torch.randn(2, *in_shape)) ** 2).sum() * (1 + step)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                m.eval()
                with torch.no_grad():
                    m(torch.randn(1, *in_shape))
                    w = m.weight.detach().double().numpy().copy()
                if kind.startswith("lin"):
                    lo = hi = _sigma(w)
                else:
                    lo = _symbol(w)[0]
                    hi = _symbol(w, groups=w.shape[0])[1]
                for k, t in m.state_dict().items():
                    sd[f"m{i}.{k}"] = t.clone()
                truth[f"m{i}"] = (lo, hi, f"{kind} {api} {kw}")
                i += 1
    _, doc = _audit(tmp_path, sd)
    cov = _covered_by_prefix(doc)
    bad = []
    for name, (lo, hi, what) in truth.items():
        s = cov[name]["sigma"]
        if s["upper"] is None:
            assert not s["certified"]
            continue
        if (s["certified"] and s["upper"] < lo * (1 - REL)) or s["lower"] > hi * (1 + REL):
            bad.append((what, s["lower"], s["upper"], lo))
    assert not bad, bad


# ---------------------------------------------------------------- convolutions vs their dense operators


def _random_conv(rng: random.Random) -> tuple[nn.Module, int, int]:
    d = rng.choice([1, 1, 2, 2, 3])
    transposed = rng.random() < 0.35
    g = rng.choice([1, 1, 2, 3])
    cin, cout = g * rng.choice([1, 2]), g * rng.choice([1, 2, 3])
    k = tuple(rng.choice([1, 2, 3, 4, 5]) if d < 3 else rng.choice([1, 2, 3]) for _ in range(d))
    dil = tuple(rng.choice([1, 1, 2]) for _ in range(d))
    st = tuple(rng.choice([1, 1, 2, 3]) for _ in range(d))
    cls: Any
    if transposed:
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][d - 1]
        pad = tuple(rng.randint(0, dil[j] * (k[j] - 1)) for j in range(d))
        op = tuple(rng.randint(0, max(st[j], dil[j]) - 1) for j in range(d))
        m = cls(cin, cout, k, stride=st, padding=pad, dilation=dil, groups=g, output_padding=op)
    else:
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][d - 1]
        mode = rng.choice(["zeros", "circular"])
        if mode == "circular":  # up to 'same': 2p <= d(k-1)
            pad = tuple(rng.randint(0, dil[j] * (k[j] - 1) // 2) for j in range(d))
        else:
            pad = tuple(rng.randint(0, dil[j] * (k[j] - 1) + 2) for j in range(d))
        m = cls(cin, cout, k, stride=st, padding=pad, dilation=dil, groups=g, padding_mode=mode)
    with torch.no_grad():
        m.weight.mul_(10 ** rng.uniform(-2, 2))
    return m, d, cin


@pytest.mark.parametrize("seed", [1, 2])
def test_conv_upper_holds_for_real_modules(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    mods = {f"l{i}": _random_conv(rng) for i in range(10)}
    sd = {f"{n}.weight": m.weight.detach().clone() for n, (m, _, _) in mods.items()}
    _, doc = _audit(tmp_path, sd)
    lays = _layers(doc)
    checked = 0
    for name, (m, d, cin) in mods.items():
        s = lays[f"{name}.weight"]["sigma"]
        w = sd[f"{name}.weight"].double().numpy()
        assert s["certified"]
        # grouping unknown: the lower end must hold for the finest grouping too
        assert s["lower"] <= _symbol(w, groups=w.shape[0])[1] * (1 + REL)
        for _ in range(2):
            shp = tuple(rng.randint(1, 7 if d < 3 else 4) for _ in range(d))
            try:
                a = _dense(m, (cin, *shp))
            except RuntimeError:  # input too small for this module
                continue
            checked += 1
            assert s["upper"] >= _sigma(a) * (1 - REL), (repr(m), shp, s)
    assert checked >= 8


@pytest.mark.parametrize("pin", [False, True])
def test_at_input_size_brackets(tmp_path: Path, pin: bool) -> None:
    rng = random.Random(7)
    torch.manual_seed(7)
    cases = 0
    for _ in range(5):
        d = rng.choice([1, 2, 2, 3])
        g = rng.choice([1, 2, 3])
        cin, cout = g * rng.choice([1, 2]), g * rng.choice([1, 2])
        k = tuple(rng.choice([1, 2, 3, 4, 5]) if d < 3 else rng.choice([1, 2, 3]) for _ in range(d))
        size = tuple(rng.randint(max(1, (kk - 1) // 2), 7 if d < 3 else 4) for kk in k)
        cls: Any = [nn.Conv1d, nn.Conv2d, nn.Conv3d][d - 1]
        mc = cls(cin, cout, k, padding="same", padding_mode="circular", groups=g, bias=False)
        mz = cls(cin, cout, k, padding="same", groups=g, bias=False)
        mz.weight.data = mc.weight.data.clone()
        args = ["--input-size", "x".join(map(str, size))]
        if pin:
            args += ["--groups", f"c={g}"]
        _, doc = _audit(tmp_path, {"c.weight": mc.weight.detach().clone()}, *args)
        lay = _layers(doc)["c.weight"]
        at = lay["at_input_size"]
        assert at is not None
        tc = _sigma(_dense(mc, (cin, *size)))
        tz = _sigma(_dense(mz, (cin, *size)))
        c, z = at["circular"], at["zero_padding"]
        if c["certified"]:
            assert c["upper"] >= tc * (1 - REL)
        assert c["lower"] <= tc * (1 + REL)
        if z["certified"]:
            assert z["upper"] >= tz * (1 - REL)
        assert z["lower"] <= tz * (1 + REL)
        assert lay["sigma"]["upper"] >= max(tc, tz) * (1 - REL)
        cases += 1
    assert cases == 5


def test_conv_peaked_symbols(tmp_path: Path) -> None:
    """Narrow spectral peaks between grid points; huge and subnormal kernels."""
    rng = np.random.default_rng(1)
    kernels: dict[str, np.ndarray] = {}
    p = np.arange(31)
    for j, w0 in enumerate([0.1234, np.pi / 7 + 1e-3, np.pi - 1e-3]):
        k = np.zeros((2, 2, 31))
        k[0, 0] = np.cos(w0 * p) * np.hanning(31)
        k[1, 1] = np.cos((w0 + 0.05) * p) * np.hanning(31) * 0.999
        kernels[f"peak{j}"] = k
    px = np.arange(9)
    k2 = np.zeros((1, 1, 9, 9))
    k2[0, 0] = np.cos(0.77 * px)[:, None] * np.cos(2.31 * px)[None, :]
    kernels["peak2d"] = k2
    kernels["big2d"] = rng.standard_normal((4, 4, 5, 5)) * 1e200
    kernels["small2d"] = rng.standard_normal((6, 6, 3, 3)) * 1e-200
    kernels["subnormal"] = rng.standard_normal((2, 2, 3)) * 1e-310
    hs = np.zeros((2, 2, 5, 5))
    hs[0, 1, 2, 2], hs[1, 0, 0, 4] = 1e300, -1e300
    kernels["huge_sparse"] = hs
    _, doc = _audit(tmp_path, {f"{n}.weight": torch.from_numpy(k) for n, k in kernels.items()})
    lays = _layers(doc)
    for n, k in kernels.items():
        grid = [4096] if k.ndim == 3 else [256, 256]
        grid = [g if s > 1 else 1 for g, s in zip(grid, k.shape[2:], strict=True)]
        m = _symbol(k, 1, grid)[0]
        s = lays[f"{n}.weight"]["sigma"]
        assert s["certified"] and s["upper"] >= m * (1 - 1e-12), (n, s, m)


# ---------------------------------------------------------------- dense layers


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_linear_extremes_and_dtypes(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i, scale in enumerate([1e-300, 1e-100, 1.0, 1e100, 1e300, 1e-310]):
        for j, shape in enumerate([(7, 7), (3, 9), (40, 30)]):
            sd[f"f{i}_{j}.weight"] = torch.randn(*shape, dtype=torch.float64) * scale
    for i, dt in enumerate([torch.float16, torch.bfloat16, torch.float32]):
        for j, scale in enumerate([1e-4, 1.0, 1e3]):
            sd[f"h{i}_{j}.weight"] = (torch.randn(20, 20) * scale).to(dt)
    sd["ones.weight"] = torch.full((6, 6), 1e300, dtype=torch.float64)
    sd["lowrank.weight"] = torch.outer(torch.randn(50, dtype=torch.float64), torch.randn(30, dtype=torch.float64))
    _, doc = _audit(tmp_path, sd, "--method", method)
    lays = _layers(doc)
    for k, w in sd.items():
        true = _sigma(w.double().numpy())
        s = lays[k]["sigma"]
        assert s["certified"], k
        assert s["upper"] >= true * (1 - 1e-13), (k, s, true)
        assert s["lower"] <= true * (1 + 1e-13), (k, s, true)


def test_linear_fast_near_degenerate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sd: dict[str, torch.Tensor] = {}
    q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    pm, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    for j, s in enumerate(
        [np.r_[1.0, 1 - 1e-9, 1 - 2e-9, rng.uniform(0, 1, 77)], np.r_[1e150, np.full(79, 1e140)], np.full(80, 3.0)]
    ):
        sd[f"d{j}.weight"] = torch.from_numpy(np.ascontiguousarray((q[:, :80] * s) @ pm.T))
    _, doc = _audit(tmp_path, sd, "--method", "fast", "--rtol", "1e-8")
    lays = _layers(doc)
    for k, w in sd.items():
        true = _sigma(w.numpy())
        s = lays[k]["sigma"]
        assert s["certified"] and s["upper"] >= true * (1 - 1e-13) and s["lower"] <= true * (1 + 1e-13)


# ---------------------------------------------------------------- other layers and the network bound


def test_batchnorm_eval_matches_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8)
    bn.running_var.uniform_(0, 1e-4)
    bn.running_var[3] = 0.0
    bn.weight.data.uniform_(-2, 2)
    sd = {f"bn.{k}": t.clone() for k, t in bn.state_dict().items()}
    true = _sigma(_dense(bn, (8,)))
    _, doc = _audit(tmp_path, sd)
    s = _layers(doc)["bn.weight"]["sigma"]
    assert s["certified"] and s["upper"] >= true * (1 - REL) and s["lower"] <= true * (1 + REL)


def _with_gap(gap: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(8, 8) * 0.1, **gap, "z.weight": torch.randn(8, 8) * 0.1}


@pytest.mark.parametrize(
    "sd",
    [
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)).state_dict(),
        nn.Sequential(nn.Linear(8, 8), nn.PReLU(8), nn.Linear(8, 8)).state_dict(),
        nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 8)).state_dict(),
        nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 8)).state_dict(),
        _with_gap({"m.scale": torch.full((8,), 50.0)}),
        _with_gap({"m.weight": torch.randint(-100, 100, (8, 8), dtype=torch.int8)}),
        _with_gap({"m.weight": torch.randn(8, 8, dtype=torch.complex64)}),
        _with_gap({"m.gamma": torch.full((8,), 50.0)}),
        _with_gap({"scale": torch.tensor(100.0)}),
    ],
    ids=["layernorm", "prelu", "rmsnorm", "mha", "scale", "int8", "complex", "gamma", "scalar"],
)
def test_network_not_certified_when_left_out(tmp_path: Path, sd: dict[str, torch.Tensor]) -> None:
    code, doc = _audit(tmp_path, sd, "--fail-above", "1e9")
    assert doc["network"]["certified"] is False
    assert code == 1


@pytest.mark.parametrize("spec", ["c=4", "c=7", "*=4"])
def test_groups_that_do_not_divide_are_refused_not_crashed(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "m.pt"
    torch.save({"c.weight": torch.randn(6, 2, 3, 3)}, path)
    result = run("inspect", str(path), "--groups", spec, "--format", "json", "-q")
    assert result.exit_code in (2, 4), (result.exit_code, result.output[-300:])


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _ResNet(nn.Module):
    """torchvision-style names: conv1, bn1, layer1.0.conv1 ..., fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_Block(4))
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def test_residual_network_not_certified_as_chain(tmp_path: Path) -> None:
    """A certified network bound must be at least the norm of the real network's Jacobian at any point."""
    torch.manual_seed(0)
    net = _ResNet().double().eval()
    with torch.no_grad():
        net.layer1[0].conv2.weight.mul_(1e-3)
    x = torch.randn(3 * 4 * 4, dtype=torch.float64) + 1.0
    jac = torch.autograd.functional.jacobian(lambda z: net(z.reshape(1, 3, 4, 4)).reshape(-1), x)
    lower = _sigma(jac.numpy())
    code, doc = _audit(tmp_path, {k: v.float() for k, v in net.state_dict().items()}, "--fail-above", "0.01")
    assert lower > 0.01
    net_doc = doc["network"]
    if net_doc["certified"]:
        assert net_doc["lipschitz_upper"] >= lower * (1 - 1e-6), (net_doc["lipschitz_upper"], lower)
    assert code == 1
