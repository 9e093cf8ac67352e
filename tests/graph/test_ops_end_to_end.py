"""Less common ops through export: certified bounds hold against eager Jacobians, and ops with no
global constant (or not continuous) leave the network uncertified with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipaudit.checkpoint import Edits, open_checkpoint
from lipaudit.graph import GraphSettings, inspect_archive
from tests.graph.helpers import FIXTURES, export_to, jacobian_norm

FAST = GraphSettings(measure=False)


class Odd(nn.Module):
    """Grouped, depthwise, dilated and strided convs; pooling with ceil_mode and count_include_pad=False;
    reflect and circular padding; nearest upsampling; max of two branches; a constant mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.c = nn.Conv2d(8, 4, 2, stride=2, padding_mode="circular", padding=1)
        self.b = nn.Conv1d(4, 4, 3, padding=1)
        self.register_buffer("mask", torch.linspace(-2, 2, 4).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.a(x))
        y = F.pad(y, (1, 1, 2, 1), mode="reflect")
        y = F.elu(self.dw(y), 0.7)
        y = F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        y = F.interpolate(self.c(y), scale_factor=3, mode="nearest")
        y = torch.maximum(y * self.mask, F.hardtanh(y)) / 2
        z = self.b(y.mean(-1))
        return torch.cat([y.flatten(1), z.mean(-1) - y.sum((2, 3))], 1)


@pytest.mark.parametrize("core", [False, True])
def test_odd_ops_bound_holds(tmp_path: Path, core: bool) -> None:
    torch.manual_seed(0)
    model = Odd().eval()
    x = torch.randn(1, 4, 11, 9)
    r = inspect_archive(str(export_to(tmp_path / "odd.pt2", model, x, core)), GraphSettings(measure_seconds=3.0))
    assert r.certified, r.uncovered
    assert r.lipschitz_upper is not None
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        assert jacobian_norm(model, torch.randn(x.shape, generator=gen, dtype=torch.float64)) <= r.lipschitz_upper
    assert r.lipschitz_lower is not None and r.lipschitz_lower <= r.lipschitz_upper


class Discrete(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l(x)
        if self.kind == "where":
            return torch.where(y > 0, y, y + 1)
        if self.kind == "round":
            return torch.round(y)
        if self.kind == "int":
            return y.to(torch.int64).to(torch.float32)
        if self.kind == "gate":
            return y * torch.sigmoid(self.l(y))
        if self.kind == "div":
            return y / (y.abs() + 1)
        if self.kind == "exp":
            return torch.exp(y)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["where", "round", "int", "gate", "div", "exp"])
@pytest.mark.parametrize("core", [False, True])
def test_no_global_constant_is_never_certified(tmp_path: Path, kind: str, core: bool) -> None:
    torch.manual_seed(0)
    path = export_to(tmp_path / "d.pt2", Discrete(kind).eval(), torch.randn(2, 4), core)
    r = inspect_archive(str(path), FAST)
    assert not r.certified and r.log10_upper is None and r.uncovered
    assert all(reason for _, reason in r.uncovered)


def test_argmax_output_is_not_a_zero_bound(tmp_path: Path) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x).argmax(-1)

    r = inspect_archive(str(export_to(tmp_path / "h.pt2", Head().eval(), torch.randn(2, 4))), FAST)
    assert not r.certified and r.log10_upper is None


def test_pt2_as_a_checkpoint_format(tmp_path: Path) -> None:
    ckpt = open_checkpoint(str(FIXTURES / "unet.pt2"))
    assert ckpt.format == "pt2"
    keys = [i.key for i in ckpt.infos]
    assert "enc.weight" in keys and "up.weight" in keys
    w = ckpt.load("mid.weight")
    ckpt.write(Edits(values={"mid.weight": w * 0.5}), tmp_path / "o.pt2")
    again = open_checkpoint(str(tmp_path / "o.pt2"))
    assert torch.equal(again.load("mid.weight"), w * 0.5)
    assert torch.equal(again.load("enc.weight"), ckpt.load("enc.weight"))
    import zipfile

    a, b = zipfile.ZipFile(FIXTURES / "unet.pt2"), zipfile.ZipFile(tmp_path / "o.pt2")
    differ = [n for n in a.namelist() if a.read(n) != b.read(n)]
    assert len(differ) == 1 and "/data/weights/" in differ[0]


def test_dynamic_batch_gets_the_static_bound(tmp_path: Path) -> None:
    import io
    import warnings

    from torch.export import Dim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("b")},))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    dyn = tmp_path / "dyn.pt2"
    dyn.write_bytes(buf.getvalue())
    r = inspect_archive(str(dyn), GraphSettings(measure_seconds=1.0))
    static = inspect_archive(str(export_to(tmp_path / "s.pt2", model, x)), FAST)
    assert r.certified and r.log10_upper == pytest.approx(static.log10_upper, abs=1e-12)
    assert r.lipschitz_lower is not None
