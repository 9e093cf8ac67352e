"""A state dict audited on an exported architecture: matched by name, its own weights bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lipaudit.errors import UsageError
from lipaudit.graph import GraphSettings, inspect_archive, inspect_state_dict
from tests.graph.helpers import FIXTURES, builders, export_to

FAST = GraphSettings(measure=False)


def _sd(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
def test_state_dict_gets_its_own_bound(tmp_path: Path, prefix: str) -> None:
    b = builders()
    other, x = b.build("unet", seed=5)  # same architecture, other weights
    sd = _sd(other, prefix)
    r = inspect_state_dict(str(FIXTURES / "unet.pt2"), list(sd), sd.__getitem__, "sd.pt", FAST)
    own = inspect_archive(str(export_to(tmp_path / "other.pt2", other, x)), FAST)
    graph_own = inspect_archive(str(FIXTURES / "unet.pt2"), FAST)
    assert r.log10_upper == pytest.approx(own.log10_upper, abs=1e-9)
    assert r.log10_upper != pytest.approx(graph_own.log10_upper, abs=1e-3)


def test_resnet_state_dict_with_buffers(tmp_path: Path) -> None:
    b = builders()
    other, x = b.build("resnet_small", seed=9)
    sd = _sd(other)
    r = inspect_state_dict(str(FIXTURES / "resnet_small_core.pt2"), list(sd), sd.__getitem__, "sd.pt", FAST)
    own = inspect_archive(str(export_to(tmp_path / "o.pt2", other, x, core=True)), FAST)
    assert r.certified and r.log10_upper == pytest.approx(own.log10_upper, abs=1e-9)


def test_missing_and_extra_keys_are_named() -> None:
    model, _ = builders().build("unet")
    sd = _sd(model)
    del sd["mid.weight"]
    sd["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(UsageError) as e:
        inspect_state_dict(str(FIXTURES / "unet.pt2"), list(sd), sd.__getitem__, "sd.pt", FAST)
    assert "mid.weight" in e.value.message and "head.weight" in e.value.message
    assert e.value.exit_code == 2


def test_wrong_shape_is_an_error() -> None:
    model, _ = builders().build("unet")
    sd = _sd(model)
    sd["mid.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(UsageError, match="shape"):
        inspect_state_dict(str(FIXTURES / "unet.pt2"), list(sd), sd.__getitem__, "sd.pt", FAST)


def test_colliding_prefixes_are_an_error() -> None:
    model, _ = builders().build("residual")
    sd = _sd(model)
    sd.update(_sd(model, "module."))
    with pytest.raises(UsageError, match="collide"):
        inspect_state_dict(str(FIXTURES / "residual.pt2"), list(sd), sd.__getitem__, "sd.pt", FAST)
