"""Block bounds (composite maps, the loop transformation) against dense references: explicit
matrices built by pushing basis vectors through the torch ops, every diagonal of activation slopes
at the vertices of the slope box, float64 LAPACK SVD, and float64 autograd Jacobians."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipaudit.graph import GraphSettings, inspect_archive
from lipaudit.graph.tighten import Act, Lin, chain_bound, compose, plus_identity, rebalance
from lipaudit.spectral.dense import exact_norm
from tests.graph.helpers import export_to, jacobian_norm


def _sigma(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def _norm(w: Lin) -> float:
    """The infinite-grid norm, here by LAPACK on the dense matrix over a large zero-padded window
    (a lower value; tests compare with it only where the bound must be above it)."""
    if w.d == 0:
        return exact_norm(w.kernel).upper
    from lipaudit.graph import rules

    return rules.conv_norm(w.kernel, w.stride, (1,) * w.d, 1, 1e-4).upper


def _dense_conv(k: torch.Tensor, stride: int, pad: int, n: int, groups: int = 1) -> torch.Tensor:
    """The zero-padded conv on an n x n grid as a matrix, by pushing basis vectors through F.conv2d."""
    c_in = k.shape[1] * groups
    eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    out = F.conv2d(eye, k, stride=stride, padding=pad, groups=groups)
    return out.reshape(out.shape[0], -1).T


@pytest.mark.parametrize(("sa", "sb", "tail"), [(1, 1, "conv"), (2, 1, "conv"), (1, 2, "conv"), (2, 2, "conv"),
                                              (1, 1, "pointwise"), (2, 1, "pointwise"), (2, 1, "diagonal")])
def test_compose_is_the_sequential_infinite_convolution(sa: int, sb: int, tail: str) -> None:
    g = torch.Generator().manual_seed(sa * 10 + sb)
    ka = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    kb = torch.randn(5, 4, 3, 2, generator=g, dtype=torch.float64)
    if tail == "pointwise":  # a 1x1 map after a (matrix product route)
        kb = kb[:, :, :1, :1].contiguous()
    elif tail == "diagonal":  # BatchNorm after a (row scaling route)
        kb = torch.diag(torch.randn(4, generator=g, dtype=torch.float64)).reshape(4, 4, 1, 1)
    a = Lin(ka, (sa, sa), (0, 0), (), True)
    b = Lin(kb, (sb, sb), (0, 0), (), True)
    c = compose(b, a)
    x = torch.randn(2, 3, 23, 23, generator=g, dtype=torch.float64)
    want = F.conv2d(F.conv2d(x, ka, stride=sa), kb, stride=sb)
    got = F.conv2d(x, c.kernel, stride=c.stride)
    h, w = min(want.shape[2], got.shape[2]), min(want.shape[3], got.shape[3])
    assert torch.allclose(want[..., :h, :w], got[..., :h, :w], atol=1e-10)


def test_plus_identity_adds_the_centre_tap() -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 3, 9, 9, generator=g, dtype=torch.float64)
    res = plus_identity(Lin(k, (1, 1), (1, 1), (), True), 1.0)
    got = F.conv2d(x, res.kernel, padding=res.pad)
    assert torch.allclose(got, x + F.conv2d(x, k, padding=1), atol=1e-12)
    # a pad outside the kernel widens it; y[n] = sum_u K[u] x[n + u - pad] on the infinite grid
    far = plus_identity(Lin(k, (1, 1), (3, 0), (), True), 0.5)
    assert far.kernel.shape[2] == 4

    def apply(kernel: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
        margin = 6
        z = F.conv2d(F.pad(x, (margin,) * 4), kernel)
        return z[..., margin - pad[0] : margin - pad[0] + 9, margin - pad[1] : margin - pad[1] + 9]

    assert torch.allclose(apply(far.kernel, far.pad), x + 0.5 * apply(k, (3, 0)), atol=1e-12)


def _vertices(h: int, a: float, b: float) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in itertools.product((a, b), repeat=h)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slope", [(0.0, 1.0), (0.1, 1.0), (0.0, 0.25), (-1.0, 1.0)])
def test_loop_transformation_is_above_every_slope_diagonal(seed: int, slope: tuple[float, float]) -> None:
    """sup over Lambda in the slope box of ||W2 Lambda W1|| is attained at a vertex (convexity):
    the bound must be above all of them, and never above the product."""
    g = torch.Generator().manual_seed(seed)
    h = 7
    w1 = torch.randn(h, 5, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, h, generator=g, dtype=torch.float64)
    act = Act(slope[0], slope[1], "a")
    product, upper, _ = chain_bound([Lin(w1, (), (), (), False), act, Lin(w2, (), (), (), False)], False, _norm)
    truth = max(_sigma(w2 @ torch.diag(lam) @ w1) for lam in _vertices(h, *slope))
    assert upper >= truth * (1 - 1e-9)
    assert upper <= product * (1 + 1e-12)
    assert product == pytest.approx(_sigma(w1) * _sigma(w2) * max(abs(slope[0]), abs(slope[1])))


@pytest.mark.parametrize("seed", range(6))
def test_residual_and_two_activations_above_every_vertex(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    n, h1, h2 = 4, 5, 4
    w1 = torch.randn(h1, n, generator=g, dtype=torch.float64) * 0.7
    w2 = torch.randn(h2, h1, generator=g, dtype=torch.float64) * 0.7
    w3 = torch.randn(n, h2, generator=g, dtype=torch.float64) * 0.7
    # uneven channel scales, as BatchNorm leaves them: rebalancing must keep the bound above the truth
    w1 = w1 * torch.logspace(-1, 1, h1, dtype=torch.float64).reshape(-1, 1)
    w2 = w2 / torch.logspace(-1, 1, h1, dtype=torch.float64).reshape(1, -1)
    items: list[Lin | Act] = [Lin(w1, (), (), (), False), Act(0, 1, "a"), Lin(w2, (), (), (), False),
                              Act(0, 1, "b"), Lin(w3, (), (), (), False)]
    product, upper, loop = chain_bound(items, True, _norm)
    balanced = rebalance(items)
    assert balanced is not None
    _, upper2, _ = chain_bound(balanced, True, _norm)
    eye = torch.eye(n, dtype=torch.float64)
    truth = max(_sigma(eye + w3 @ torch.diag(l2) @ w2 @ torch.diag(l1) @ w1)
                for l1 in _vertices(h1, 0, 1) for l2 in _vertices(h2, 0, 1))
    assert min(upper, upper2) >= truth * (1 - 1e-9)
    assert upper <= product * (1 + 1e-12)
    assert loop or upper == product
    assert upper2 < upper


def test_rebalanced_rule_measures_no_second_whole_chain() -> None:
    """The scalings cancel inside the whole chain's composite: the rebalanced rule asks for the
    original's (one key, so one measurement), and next to an identity map nothing is rebalanced."""
    from lipaudit.graph.tighten import Block, evaluate, identity
    from lipaudit.spectral import Interval

    g = torch.Generator().manual_seed(7)
    w1 = Lin(torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), (1, 1), (1, 1), (), True, key="w1")
    w2 = Lin(torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 6).reshape(1, -1, 1, 1),
             (1, 1), (1, 1), (), True, key="w2")
    asked: list[str] = []

    def record(w: Lin) -> Interval:
        asked.append(w.key)
        return Interval(1.0, 1.0, "x", "x", True)

    blk = Block("x", "y", ("a",), [w1, Act(0, 1, "r"), w2], True, False)
    evaluate(blk, record)
    wholes = [k for k in asked if k.startswith("I+")]
    assert len(wholes) == 1 and len(asked) == len(set(asked))
    assert any(k.startswith("bal") for k in asked)  # the rebalanced maps themselves are still measured
    # an activation at the end: [W, act, I] leaves nothing to rebalance
    assert rebalance([w1, Act(0, 1, "r"), identity(6, 2, w1.kernel)]) is None
    # the composite it reuses is the rebalanced chain's own, up to rounding
    bal = rebalance([w1, Act(0, 1, "r"), w2])
    assert bal is not None
    ours = compose(bal[2], Lin(bal[0].kernel * 0.5, (1, 1), (1, 1), (), True))
    theirs = compose(w2, Lin(w1.kernel * 0.5, (1, 1), (1, 1), (), True))
    assert torch.allclose(ours.kernel, theirs.kernel, rtol=1e-12, atol=1e-12)


class _Inverted(nn.Module):
    """An inverted residual block with padding, a depthwise conv and a stride option."""

    def __init__(self, c: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(),
            nn.Conv2d(2 * c, 2 * c, 3, stride, 1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(),
            nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
    return model.eval()


@torch.no_grad()
def _dense_block(model: _Inverted, n: int, lam1: torch.Tensor, lam2: torch.Tensor) -> torch.Tensor:
    """The block's difference map with the given slope diagonals, as a dense matrix (eval BN folded)."""
    mats: list[torch.Tensor] = []
    size = n
    for conv, bn in ((model.body[0], model.body[1]), (model.body[3], model.body[4]), (model.body[6], model.body[7])):
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        k = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        m = _dense_conv(k, conv.stride[0], conv.padding[0], size, conv.groups)
        size = (size + 2 * conv.padding[0] - k.shape[-1]) // conv.stride[0] + 1
        mats.append(m)
    out = mats[2] @ torch.diag(lam2) @ mats[1] @ torch.diag(lam1) @ mats[0]
    if model.residual:
        out = out + torch.eye(out.shape[0], dtype=torch.float64)
    return out


@pytest.mark.parametrize(("stride", "residual", "seed"), [(1, True, 0), (1, True, 1), (2, False, 2), (1, False, 3)])
def test_exported_block_bound_above_dense_slope_diagonals(tmp_path: Path, stride: int, residual: bool,
                                                          seed: int) -> None:
    c, n = 3, 6
    model = _randomise(_Inverted(c, stride, residual), seed)
    x = torch.randn(1, c, n, n)
    r = inspect_archive(str(export_to(tmp_path / "b.pt2", model, x)), GraphSettings(measure=False))
    assert r.lipschitz_upper is not None
    blocks = [b for b in r.blocks if b["used"]]
    assert blocks, r.blocks
    assert blocks[-1]["rule"] == "loop transformation"
    g = torch.Generator().manual_seed(seed)
    h = 2 * c * n * n
    h2 = 2 * c * ((n - 1) // stride + 1) ** 2
    worst = 0.0
    for _ in range(40):
        lam1 = (torch.rand(h, generator=g) < 0.5).double()
        lam2 = (torch.rand(h2, generator=g) < 0.5).double()
        worst = max(worst, _sigma(_dense_block(model, n, lam1, lam2)))
    worst = max(worst, _sigma(_dense_block(model, n, torch.ones(h, dtype=torch.float64),
                                           torch.ones(h2, dtype=torch.float64))))
    assert r.lipschitz_upper >= worst * (1 - 1e-9)
    assert r.lipschitz_upper >= jacobian_norm(model, x.double()) * (1 - 1e-9)


@pytest.mark.parametrize("core", [False, True])
def test_never_looser_than_the_walk_without_blocks(tmp_path: Path, core: bool) -> None:
    from lipaudit.graph import load_archive
    from lipaudit.graph.bound import bound_graph

    torch.manual_seed(0)
    model = _randomise(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                     _Inverted(6, 1, True), _Inverted(6, 2, False), nn.Conv2d(6, 4, 3)), 5)
    x = torch.randn(1, 3, 10, 10)
    loaded = load_archive(str(export_to(tmp_path / "n.pt2", model, x, core)))
    s = GraphSettings()
    plain = bound_graph(loaded.graph, loaded.evaluator(), s.rtol, s.conv_rtol, s.seed, blocks=False)
    tight = bound_graph(loaded.graph, loaded.evaluator(), s.rtol, s.conv_rtol, s.seed)
    assert tight.outputs["input"] <= plain.outputs["input"] + 1e-12
    assert tight.outputs["input"] < plain.outputs["input"] - 0.05
    assert 10 ** tight.outputs["input"] >= jacobian_norm(model, x.double()) * (1 - 1e-9)


def test_an_operator_digest_follows_its_weight() -> None:
    """The digest is kept on the operator; a copy with another weight must not carry it over."""
    import dataclasses

    from lipaudit.graph.ops.base import LinearOp, weight_digest

    op = LinearOp("dense", torch.ones(2, 3, dtype=torch.float64), "x", ())
    first = op.digest()
    assert first == weight_digest(torch.ones(2, 3, dtype=torch.float32))  # float64 bytes either way
    other = dataclasses.replace(op, weight=torch.zeros(2, 3, dtype=torch.float64))
    assert other.digest() != first and op.digest() == first

