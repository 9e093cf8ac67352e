"""spectral_norm layouts of square weights: stored u alone never picks the layout (it can be set by hand)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests.conftest import layer, report_of, true_norm


def _eval_weight(m: nn.Module) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        m(torch.zeros(1, 2))  # the old API forms its weight in a forward pre-hook
        return m.weight.detach().clone()


def test_forged_u_cannot_pick_the_other_layout(tmp_path: Path) -> None:
    """u hand-set to line up with W^T v (dim 1) while Linear uses dim 0: the model's weight has norm
    ~101.5, the dim-1 reading ~1.005. The interval must cover the real module's eval weight."""
    w = torch.tensor([[1.0, 10.0], [0.0, 1.0]])
    v = torch.tensor([1.0, 0.0])
    u = nn.functional.normalize(w.T @ v, dim=0)
    m = nn.utils.spectral_norm(nn.Linear(2, 2, bias=False))
    m.load_state_dict({"weight_orig": w, "weight_u": u, "weight_v": v})
    truth = true_norm(_eval_weight(m))
    assert truth > 100
    path = tmp_path / "m.pt"
    torch.save({f"fc.{k}": t for k, t in m.state_dict().items()}, path)
    doc = report_of(path)
    sigma = layer(doc, "fc")["sigma"]
    assert sigma["lower"] <= truth <= sigma["upper"]
    hints = [f for f in doc["findings"] if f["code"] == "LIP024"]
    assert hints and "suggests dim 1" in hints[0]["message"]


def test_default_layout_with_agreeing_u_is_read_alone(tmp_path: Path) -> None:
    """A trained square Linear: dim 0 is torch's default and u agrees, so the interval is tight."""
    torch.manual_seed(7)
    m = nn.utils.spectral_norm(nn.Linear(5, 5))
    x = torch.randn(16, 5)
    for _ in range(30):
        m(x)  # training-mode forwards run the power iteration
    m.eval()
    with torch.no_grad():
        m(torch.zeros(1, 5))
        used = m.weight.detach().clone()
    path = tmp_path / "m.pt"
    torch.save({f"fc.{k}": t for k, t in m.state_dict().items()}, path)
    doc = report_of(path)
    sigma = layer(doc, "fc")["sigma"]
    truth = true_norm(used)
    assert sigma["lower"] <= truth <= sigma["upper"]
    assert sigma["upper"] <= truth * (1 + 1e-3)
    assert not [f for f in doc["findings"] if f["code"] == "LIP024"]


def test_square_conv_transpose_covers_both_layouts(tmp_path: Path) -> None:
    """A ConvTranspose's u lines up with dim 1, not torch's default for a kernel read as a Conv's:
    both layouts stay, and the interval holds the real module's eval weight."""
    torch.manual_seed(8)
    m = nn.utils.spectral_norm(nn.ConvTranspose2d(4, 4, 3))
    x = torch.randn(2, 4, 5, 5)
    for _ in range(30):
        m(x)
    m.eval()
    with torch.no_grad():
        m(x)
        used = m.weight.detach().clone()
    path = tmp_path / "m.pt"
    torch.save({f"t.{k}": t for k, t in m.state_dict().items()}, path)
    doc = report_of(path)
    entry = layer(doc, "t")
    # the matrix spectral_norm normalises (dim 1 for ConvTranspose) has norm 1 in the eval weight
    assert entry["reshape_sigma"] >= true_norm(used.transpose(0, 1)) * (1 - 1e-6)
    msgs = [f["message"] for f in doc["findings"] if f["code"] == "LIP024"]
    assert msgs and "suggests dim 1" in msgs[0]
