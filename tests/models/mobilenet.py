"""Small trained test networks: a MobileNetV2-style network (inverted residuals, ReLU6, BatchNorm,
linear bottlenecks) and a small ResNet, trained for a few hundred steps on synthetic data from fixed
seeds, so the bracket benchmarks and tests run on weights shaped by training, not at random init.

Regenerate the exports with `python tests/models/mobilenet.py OUTDIR` (CPU, about a minute each)."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _cbr(cin, hidden, 1, 1)
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden)
        layers += _cbr(hidden, cout, 1, 1, act=False)  # the linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout at a small width: (expand, channels, repeats, stride)."""

    SETTING = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 2, 2), (4, 64, 1, 1))

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        feats: list[nn.Module] = [nn.Sequential(*_cbr(3, 16, 3, 2))]
        cin = 16
        for t, c, n, s in self.SETTING:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(nn.Sequential(*_cbr(cin, 128, 1, 1)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_cbr(cin, cout, 3, stride)[:2], nn.ReLU(), *_cbr(cout, cout, 3, 1, act=False))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """A small ResNet: stem, [1, 1, 1] basic blocks at widths 16, 32, 64, average pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Basic(16, 16, 1), Basic(16, 32, 2), Basic(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def synthetic(n: int, size: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images from smooth class prototypes plus noise: a task a small network learns in a few
    hundred steps."""
    protos = nn.functional.interpolate(torch.randn(classes, 3, 8, 8, generator=gen), size=size, mode="bilinear",
                                       align_corners=False)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = protos[y] + 0.5 * torch.randn(n, 3, size, size, generator=gen)
    return x, y


def train(model: nn.Module, steps: int = 300, size: int = 64, seed: int = 0, batch: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = synthetic(2048, size, 10, gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=4e-5)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        del step
    return model.eval()


def build(name: str, steps: int = 300) -> nn.Module:
    torch.manual_seed(1)
    model: nn.Module = MobileNetV2() if name == "mobilenet" else ResNet()
    return train(model, steps)


def export(model: nn.Module, size: int = 64) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
        ep = torch.export.export(model.eval(), (x,))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    return buf.getvalue()


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(".")
    torch.set_num_threads(2)
    for name in ("mobilenet", "resnet"):
        (out / f"{name}_trained.pt2").write_bytes(export(build(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
