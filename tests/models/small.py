"""A small residual CNN: a strided stem with BatchNorm, a residual block with a grouped conv,
pooling and a linear head. `make` builds it with seeded random weights."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))


class Small(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        return self.head(torch.flatten(self.pool(x), 1))


def make() -> nn.Module:
    """Seeded weights, with BatchNorm statistics away from the identity so folding matters."""
    torch.manual_seed(0)
    m = Small()
    with torch.no_grad():
        for bn in (m.bn, m.block.bn1, m.block.bn2):
            bn.running_var.uniform_(0.2, 3.0)
            bn.running_mean.normal_()
            bn.weight.uniform_(0.5, 2.0)
    return m.eval()


def make_spectral() -> nn.Module:
    """The same network with spectral_norm on its head (parametrized modules must load too)."""
    m = make()
    m.head = nn.utils.parametrizations.spectral_norm(m.head)
    return m.eval()


def broken() -> nn.Module:
    raise RuntimeError("cannot build this model")
