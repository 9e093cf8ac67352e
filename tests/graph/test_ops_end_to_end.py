"""Less common ops through export: certified bounds hold against eager Jacobians, and ops with no
global constant (or not continuous) leave the network uncertified with a reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    r = inspect_archive(str(export_to(tmp_path / "odd.pt2", model, x, core)), GraphSettings(measure_work=40))
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
    r = inspect_archive(str(dyn), GraphSettings(measure_work=40))
    static = inspect_archive(str(export_to(tmp_path / "s.pt2", model, x)), FAST)
    assert r.certified and r.log10_upper == pytest.approx(static.log10_upper, abs=1e-12)
    assert r.lipschitz_lower is not None


# -- rules that used to certify a bound below the truth (issue: graph rules that are false) ---------


class Gate(nn.Module):
    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.l = nn.Linear(3, 3)
        with torch.no_grad():
            self.l.weight.mul_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        return torch.sigmoid(h) * h if self.order == "sigmoid_first" else h * torch.sigmoid(h)


@pytest.mark.parametrize("order", ["sigmoid_first", "h_first"])
@pytest.mark.parametrize("core", [False, True])
def test_silu_product_takes_its_factor_from_the_right_operand(tmp_path: Path, order: str, core: bool) -> None:
    torch.manual_seed(1)
    model = Gate(order).eval()
    r = inspect_archive(str(export_to(tmp_path / "g.pt2", model, torch.randn(2, 3), core)), FAST)
    assert r.certified and r.lipschitz_upper is not None
    w = model.l.weight.detach().double()
    b = model.l.bias.detach().double()
    # a point where every h_i sits at the steepest slope of h sigmoid(h) (h ~ 2.4)
    steep = torch.linalg.lstsq(w, (torch.full((3,), 2.3994, dtype=torch.float64) - b).unsqueeze(1)).solution
    points = [steep.reshape(1, 3)] + [torch.randn(1, 3, dtype=torch.float64) * 3 for _ in range(4)]
    for p in points:
        assert jacobian_norm(model, p) <= r.lipschitz_upper


class Heads(nn.Module):
    """x @ W with W of shape (H, d, e): x is copied to every head."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@pytest.mark.parametrize(("x_shape", "w_shape"), [((5, 4), (6, 4, 3)), ((6, 5, 4), (6, 4, 3)),
                                                  ((2, 1, 5, 4), (1, 3, 4, 2)), ((4,), (3, 4, 2))])
def test_batched_constant_operand_counts_the_copies(tmp_path: Path, x_shape: tuple[int, ...],
                                                    w_shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    model = Heads(w_shape).eval()
    x = torch.randn(*x_shape)
    r = inspect_archive(str(export_to(tmp_path / "h.pt2", model, x)), FAST)
    assert r.certified and r.lipschitz_upper is not None
    truth = jacobian_norm(model, x.double())  # linear: the same everywhere
    assert truth <= r.lipschitz_upper <= truth * (1 + 1e-3)


class ClampWide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.linspace(-1, 1, 12).reshape(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=self.lo, max=self.lo + 5)


def test_clamp_with_a_tensor_bound_wider_than_x(tmp_path: Path) -> None:
    model = ClampWide().eval()
    r = inspect_archive(str(export_to(tmp_path / "c.pt2", model, torch.randn(4))), FAST)
    assert r.certified and r.lipschitz_upper is not None
    truth = jacobian_norm(model, torch.full((4,), 2.0, dtype=torch.float64))  # inside every interval
    assert truth == pytest.approx(3**0.5) and truth <= r.lipschitz_upper <= truth * (1 + 1e-6)


class Odd2(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l(x)
        if self.kind == "half":
            return y.half().float()
        if self.kind == "celu":
            return F.celu(y, -0.5)
        if self.kind == "softplus":
            return F.softplus(y, beta=1.0, threshold=1.0)
        if self.kind == "softplus_default":
            return F.softplus(y)
        if self.kind == "mutate_then_read":
            z = y.relu_()
            return z + y * 2
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind", ["half", "celu", "softplus", "softplus_default"])
@pytest.mark.parametrize("core", [False, True])
def test_rounding_unbounded_and_jumping_ops_are_uncovered(tmp_path: Path, kind: str, core: bool) -> None:
    torch.manual_seed(0)
    r = inspect_archive(str(export_to(tmp_path / "o.pt2", Odd2(kind).eval(), torch.randn(2, 4), core)), FAST)
    assert not r.certified and r.log10_upper is None and r.uncovered


def test_in_place_update_read_afterwards_is_never_underestimated(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Odd2("mutate_then_read").eval()
    r = inspect_archive(str(export_to(tmp_path / "m.pt2", model, torch.randn(2, 4))), FAST)
    if r.certified:  # the export may have made it functional; then the bound must hold
        assert r.lipschitz_upper is not None
        for _ in range(3):
            assert jacobian_norm(model, torch.randn(2, 4, dtype=torch.float64)) <= r.lipschitz_upper


# -- in-place activations in a real export ----------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.skip = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2ish(nn.Module):
    """MobileNetV2's published structure, narrow: in-place ReLU6 everywhere, inverted residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 4), InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 2, 4), InvertedResidual(16, 16, 1, 4),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def test_mobilenet_v2_with_in_place_relu6_is_certified(tmp_path: Path) -> None:
    import io
    import warnings

    torch.manual_seed(0)
    model = MobileNetV2ish().eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    path = tmp_path / "mbv2.pt2"
    path.write_bytes(buf.getvalue())
    from lipaudit.graph import load_archive

    ops_seen = {n.op for n in load_archive(str(path)).graph.nodes}
    assert "hardtanh_" in ops_seen  # the in-place spelling real exports carry
    r = inspect_archive(str(path), FAST)
    assert not r.uncovered, r.uncovered[:3]
    assert r.certified and r.lipschitz_upper is not None
    for _ in range(2):
        point = torch.randn(1, 3, 64, 64, generator=gen, dtype=torch.float64)
        assert jacobian_norm(model, point) <= r.lipschitz_upper


# -- sizes checked before anything is allocated ---------------------------------------------------


class Filler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.full((4,), 2.0)


def _edit(src: Path, dst: Path, edit: Any) -> Path:
    import json
    import zipfile

    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members:
            if name.endswith("models/model.json"):
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            z.writestr(zipfile.ZipInfo(name), data)
    return dst


def test_a_huge_factory_node_is_a_resource_limit(tmp_path: Path) -> None:
    from lipaudit.errors import ResourceLimitError

    src = export_to(tmp_path / "f.pt2", Filler().eval(), torch.randn(4))

    def edit(doc: dict[str, Any]) -> None:
        for n in doc["graph_module"]["graph"]["nodes"]:
            if "full" in n["target"]:
                n["inputs"][0]["arg"] = {"as_ints": [100_000, 100_000, 100]}

    bad = _edit(src, tmp_path / "bad.pt2", edit)
    with pytest.raises(ResourceLimitError) as e:
        inspect_archive(str(bad), GraphSettings(measure_work=40))
    assert e.value.exit_code == 5


def test_a_huge_declared_input_is_a_resource_limit(tmp_path: Path) -> None:
    from lipaudit.errors import ResourceLimitError

    src = export_to(tmp_path / "f.pt2", nn.Linear(4, 4).eval(), torch.randn(2, 4))

    def edit(doc: dict[str, Any]) -> None:
        g = doc["graph_module"]["graph"]
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if "user_input" in spec:
                name = spec["user_input"]["arg"]["as_tensor"]["name"]
                g["tensor_values"][name]["sizes"] = [{"as_int": 10**6}, {"as_int": 10**6}]

    bad = _edit(src, tmp_path / "bad.pt2", edit)
    with pytest.raises(ResourceLimitError) as e:
        inspect_archive(str(bad), GraphSettings(measure_work=40))
    assert e.value.exit_code == 5
