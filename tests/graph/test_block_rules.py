"""Every registered block rule (lipaudit/graph/tighten.py RULES) against float64 references on random
exported blocks: the bound a rule gives is never below the Jacobian norm of the real block at random
points, nor below the norm of the block with its activations replaced by any diagonal of slopes from
their ranges (the relaxation every rule's proof covers), zero padding and strides included.

Blocks come from one generator (dense, 1-d and 2-d convolutions with even and odd kernels, strides,
dilation, groups, BatchNorm, sixteen activations, two in a row, residual or not, activations at the
ends), so a rule registered tomorrow is tested here with nothing written by hand. LIPAUDIT_LONG=1
runs 50 examples per rule (or LIPAUDIT_LONG_EXAMPLES) instead of 4."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

from lipaudit.graph import load_archive, rules, tighten
from lipaudit.spectral.dense import exact_norm
from tests.graph.helpers import export_to

LONG = os.environ.get("LIPAUDIT_LONG") == "1"
EXAMPLES = int(os.environ.get("LIPAUDIT_LONG_EXAMPLES", "50")) if LONG else 4

class Fn(nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def _derivative_range(f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """min and max of f' over a fine grid, by autograd in float64 (secant slopes lie between them)."""
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return float(g.min()), float(g.max())


# the test's own slope ranges (min and max of the derivative), not the tool's table
ACTS: dict[str, tuple[Callable[[], nn.Module], float, float]] = {
    "gelu": (nn.GELU, *_derivative_range(nn.functional.gelu)),
    "gelu_tanh": (lambda: nn.GELU("tanh"), *_derivative_range(lambda t: nn.functional.gelu(t, approximate="tanh"))),
    "silu": (nn.SiLU, *_derivative_range(nn.functional.silu)),
    "hardswish": (nn.Hardswish, *_derivative_range(nn.functional.hardswish)),
    "selu": (nn.SELU, *_derivative_range(nn.functional.selu)),
    "atan": (lambda: Fn(torch.atan), *_derivative_range(torch.atan)),
    "erf": (lambda: Fn(torch.erf), *_derivative_range(torch.erf)),
    "logsigmoid": (nn.LogSigmoid, *_derivative_range(nn.functional.logsigmoid)),
    "relu": (nn.ReLU, 0.0, 1.0),
    "relu6": (nn.ReLU6, 0.0, 1.0),
    "leaky": (lambda: nn.LeakyReLU(0.2), 0.2, 1.0),
    "leaky_steep": (lambda: nn.LeakyReLU(3.0), 1.0, 3.0),
    "tanh": (nn.Tanh, 0.0, 1.0),
    "sigmoid": (nn.Sigmoid, 0.0, 0.25),
    "elu": (lambda: nn.ELU(1.5), 0.0, 1.5),
    "hardtanh": (lambda: nn.Hardtanh(-0.5, 2.0), 0.0, 1.0),
    "mish": (nn.Mish, *_derivative_range(nn.functional.mish)),
    "celu": (lambda: nn.CELU(0.5), 0.0, 1.0),
    "softplus": (lambda: nn.Softplus(2.0, threshold=math.inf), 0.0, 1.0),
    "softshrink": (lambda: nn.Softshrink(0.3), 0.0, 1.0),
    "prelu": (lambda: nn.PReLU(1, -0.4), -0.4, 1.0),
    "prelu_steep": (lambda: nn.PReLU(1, 2.0), 1.0, 2.0),
}


class Slopes(nn.Module):
    """An activation replaced by a fixed diagonal of slopes (set before each use)."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        self.lam: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert self.lam is not None
        return z * self.lam


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _spec(draw: st.DataObject) -> tuple[nn.Module, nn.Module, list[Slopes], torch.Tensor]:
    """A random block, its twin with slope diagonals in place of the activations, and an input."""
    d = draw.draw(st.sampled_from([0, 1, 2]))
    residual = draw.draw(st.booleans())
    c = draw.draw(st.integers(1, 4))
    n = draw.draw(st.integers(4, 7))
    maps = draw.draw(st.integers(1 if residual else 2, 3))
    lead = draw.draw(st.booleans())
    trail = draw.draw(st.booleans()) and not residual
    gen = torch.Generator().manual_seed(draw.draw(st.integers(0, 2**31 - 1)))
    scale = draw.draw(st.sampled_from([0.3, 1.0, 3.0]))
    conv = (nn.Conv1d, nn.Conv2d)[max(d, 1) - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d)[max(d, 1) - 1]
    layers: list[nn.Module] = []
    twins: list[nn.Module] = []
    slopes: list[Slopes] = []

    def act() -> None:
        for _ in range(draw.draw(st.sampled_from([1, 1, 1, 2]))):  # sometimes two in a row
            name = draw.draw(st.sampled_from(sorted(ACTS)))
            make, lo, hi = ACTS[name]
            layers.append(make())
            s = Slopes(lo, hi)
            twins.append(s)
            slopes.append(s)

    if lead:
        act()
    width = c
    size = n
    for i in range(maps):
        out = c if (residual and i == maps - 1) else draw.draw(st.integers(1, 5))
        if d == 0:
            lay: nn.Module = nn.Linear(width, out)
        else:
            k = draw.draw(st.sampled_from([1, 2, 3]))
            dil = draw.draw(st.sampled_from([1, 2])) if k > 1 else 1
            if residual:  # shape-preserving: odd kernels, "same" padding, stride 1
                k = 2 * (k // 2) + 1
                stride, pad = 1, dil * (k - 1) // 2
            else:
                stride = draw.draw(st.sampled_from([1, 2]))
                pad = draw.draw(st.integers(0, 1))
            groups = math.gcd(width, out) if draw.draw(st.booleans()) else 1
            lay = conv(width, out, k, stride, pad, dilation=dil, groups=groups, bias=draw.draw(st.booleans()))
            size = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            if size < 1:
                reject()
        with torch.no_grad():
            for p in lay.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale / math.sqrt(max(1, p[0].numel())))
        layers.append(lay)
        twins.append(lay)
        if d > 0 and draw.draw(st.booleans()):
            bn = norm(out).eval()
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(out, generator=gen))
                bn.running_var.copy_(torch.rand(out, generator=gen) * 2 + 0.05)
                bn.weight.copy_(torch.randn(out, generator=gen))
                bn.bias.copy_(torch.randn(out, generator=gen))
            layers.append(bn)
            twins.append(bn)
        width = out
        if i < maps - 1 or trail:
            act()
    body, twin = nn.Sequential(*layers), nn.Sequential(*twins)
    model = (Residual(body) if residual else body).double().eval()
    linear = (Residual(twin) if residual else twin).double().eval()
    shape = (1, c) if d == 0 else (1, c) + (n,) * d
    return model, linear, slopes, torch.randn(shape, generator=gen, dtype=torch.float64)


def _norm(w: tighten.Lin) -> float:
    if w.d == 0:
        return exact_norm(w.kernel).upper
    return rules.conv_norm(w.kernel, w.stride, (1,) * w.d, 1, 1e-3).upper


def _sigma(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda t: f(t).reshape(-1), x)
    return float(np.linalg.svd(jac.reshape(jac.shape[0], -1).numpy(), compute_uv=False)[0])


def _shapes(linear: nn.Module, slopes: list[Slopes], x: torch.Tensor) -> list[torch.Size]:
    seen: list[torch.Size] = []
    hooks = [s.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape)) for s in slopes]
    for s in slopes:
        s.lam = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        linear(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", sorted(tighten.RULES))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_block_rule_above_float64_references(name: str, data: st.DataObject) -> None:
    model, linear, slopes, x = _spec(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_to(Path(tmp) / "b.pt2", model, x)
        loaded = load_archive(str(path))
        found = tighten.blocks(loaded.graph, loaded.evaluator().value)
    whole = [b for b in found if b.entry in loaded.graph.inputs and b.exit in loaded.graph.outputs]
    assert whole, f"no block spans {model}: {[(b.entry, b.exit) for b in found]}"
    blk = whole[0]
    bound, _ = tighten.RULES[name](blk.items, blk.residual, _norm)
    if not math.isfinite(bound):
        return  # the rule declines this block: nothing claimed
    truth = 0.0
    gen = torch.Generator().manual_seed(1)
    for s in (0.1, 1.0, 10.0):
        truth = max(truth, _sigma(model, x * s))
    shapes = _shapes(linear, slopes, x)
    for trial in range(12):
        for s, shape in zip(slopes, shapes, strict=True):
            u = torch.rand(shape, generator=gen, dtype=torch.float64)
            if trial % 2 == 0:  # a vertex of the slope box
                u = (u < 0.5).double()
            s.lam = s.lo + (s.hi - s.lo) * u
        truth = max(truth, _sigma(linear, x))
    assert bound >= truth * (1 - 1e-9), (name, bound, truth, model)


def test_every_rule_is_below_the_product_somewhere() -> None:
    """The registry's rules other than the product earn their place on a block where slopes vary."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(6, 4, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 6, dtype=torch.float64)[:, None]
    w2 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    items: list[tighten.Lin | tighten.Act] = [tighten.Lin(w1, (), (), (), False), tighten.Act(0, 1, "a"),
                                             tighten.Lin(w2, (), (), (), False)]
    product = tighten.RULES["product"](items, True, _norm)[0]
    for name, rule in tighten.RULES.items():
        if name != "product":
            assert rule(items, True, _norm)[0] < product, name


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU("tanh"), nn.SiLU()])
def test_transformer_mlp_is_a_block(tmp_path: Path, act: nn.Module) -> None:
    """x + W2 f(W1 x) with GELU or SiLU, as in a transformer's MLP: bounded as a residual block,
    below the product and above float64 Jacobians."""
    from lipaudit.graph import GraphSettings, inspect_archive

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 8))
    model = Residual(body).double().eval()
    x = torch.randn(1, 8, dtype=torch.float64)
    r = inspect_archive(str(export_to(tmp_path / "mlp.pt2", model.float(), x.float())),
                        GraphSettings(measure=False))
    used = [b for b in r.blocks if b["used"]]
    assert used and used[0]["residual"] and used[0]["rule"] == "loop transformation", r.blocks
    assert r.lipschitz_upper is not None and r.lipschitz_upper < used[0]["product"]
    model = model.double()
    assert r.lipschitz_upper >= max(_sigma(model, x * s) for s in (0.1, 1.0, 3.0)) * (1 - 1e-9)


def test_elu_input_scale_only_scales_the_negative_side(tmp_path: Path) -> None:
    """aten.elu(x, alpha, scale, input_scale) has slope `scale` above 0 whatever input_scale is; a
    range of scale * input_scale (as once assumed) would put this block's bound at 0.3 of the truth."""
    from lipaudit.graph import GraphSettings, inspect_archive

    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        for lay in (first, second):
            lay.weight.copy_(torch.eye(4))
            lay.bias.fill_(5.0)  # every pre-activation positive near x = 0: the Jacobian is I
    model = nn.Sequential(first, Fn(lambda t: torch.ops.aten.elu(t, 1.0, 1.0, 0.3)), second).eval()
    x = torch.zeros(1, 4)
    r = inspect_archive(str(export_to(tmp_path / "elu.pt2", model, x)), GraphSettings(measure=False))
    assert any(b["used"] for b in r.blocks), r.blocks
    assert r.lipschitz_upper is not None and r.lipschitz_upper >= 1.0 - 1e-9
