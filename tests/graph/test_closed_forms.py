"""Graph bounds against closed forms, in both export spellings, and against eager Jacobians."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lipaudit.graph import GraphSettings, inspect_archive
from tests.graph.helpers import FIXTURES, builders, export_to, jacobian_norm

FAST = GraphSettings(measure=False)


@pytest.mark.parametrize("suffix", ["", "_core"])
def test_identity_residual_is_one_plus_a(suffix: str) -> None:
    r = inspect_archive(str(FIXTURES / f"residual{suffix}.pt2"), FAST)
    assert r.certified
    assert r.lipschitz_upper == pytest.approx(1.5, rel=1e-6)
    assert r.lipschitz_upper >= 1.5
    assert r.chain_log10 == pytest.approx(math.log10(0.5), abs=1e-9)  # the chain product misses the skip


@pytest.mark.parametrize("suffix", ["", "_core"])
def test_concat_of_3i_and_4i_is_5(suffix: str) -> None:
    r = inspect_archive(str(FIXTURES / f"concat{suffix}.pt2"), FAST)
    assert r.certified and r.lipschitz_upper == pytest.approx(5.0, rel=1e-6) and r.lipschitz_upper >= 5.0


@pytest.mark.parametrize("suffix", ["", "_core"])
def test_batchnorm_folded_into_diagonal_conv(suffix: str) -> None:
    r = inspect_archive(str(FIXTURES / f"diag_conv_bn{suffix}.pt2"), FAST)
    assert r.certified and r.lipschitz_upper == pytest.approx(1.0, rel=1e-4)
    assert 10**r.chain_log10 == pytest.approx(16.0, rel=1e-4)  # max d / min d = 8 / 0.5
    bn = next(v for v in r.layers.values() if v.kind == "batchnorm")
    assert bn.fused_with == ("conv.weight",) and bn.fused_upper == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("core", [False, True])
def test_pure_linear_chain_is_the_product_matrix_norm(tmp_path: Path, core: bool) -> None:
    model, x = builders().build("linear_chain", seed=3)
    path = export_to(tmp_path / "chain.pt2", model, x, core)
    w = (model.l2.weight.detach().double() @ model.l1.weight.detach().double()).numpy()
    exact = float(np.linalg.svd(w, compute_uv=False)[0])
    r = inspect_archive(str(path), FAST)
    assert r.certified and exact <= r.lipschitz_upper <= exact * (1 + 1e-6)
    separate = [float(np.linalg.svd(m.weight.detach().double().numpy(), compute_uv=False)[0])
                for m in (model.l1, model.l2)]
    assert r.lipschitz_upper < separate[0] * separate[1]


@pytest.mark.parametrize(("name", "shape_seeds"), [("resnet_small", 3), ("unet", 3), ("mlp_act", 3)])
@pytest.mark.parametrize("core", [False, True])
def test_upper_never_below_eager_jacobian(tmp_path: Path, name: str, shape_seeds: int, core: bool) -> None:
    b = builders()
    model, x = b.build(name, seed=1)
    path = export_to(tmp_path / f"{name}.pt2", model, x, core)
    r = inspect_archive(str(path), GraphSettings(measure=True, measure_work=40))
    assert r.certified and r.lipschitz_upper is not None
    gen = torch.Generator().manual_seed(7)
    for _ in range(shape_seeds):
        point = torch.randn(x.shape, generator=gen, dtype=torch.float64) * 2
        assert jacobian_norm(model, point) <= r.lipschitz_upper
    assert r.lipschitz_lower is not None and 0 < r.lipschitz_lower <= r.lipschitz_upper


def test_graph_bound_beats_the_chain_where_batchnorm_folds() -> None:
    r = inspect_archive(str(FIXTURES / "resnet_small.pt2"), FAST)
    assert r.certified and r.chain_log10 is not None and r.log10_upper is not None
    folded = [v for v in r.layers.values() if v.kind == "batchnorm" and v.fused_upper is not None]
    assert folded, "every BatchNorm here follows a conv that feeds only it"
    assert r.dominant_path[0] == "x" and len(r.dominant_path) > 3


@pytest.mark.parametrize("suffix", ["", "_core"])
def test_attention_is_never_certified(suffix: str) -> None:
    r = inspect_archive(str(FIXTURES / f"attention{suffix}.pt2"), FAST)
    assert not r.certified and r.log10_upper is None
    reasons = " ".join(reason for _, reason in r.uncovered)
    assert "product of two input-dependent tensors" in reasons and "LayerNorm" in reasons
    # the covered parts still get bounds: from each uncovered node's output to the network output
    assert any(p["to"] == "output" for p in r.partial)
    d = r.to_dict()
    assert d["lipschitz_upper"] is None and d["uncovered"] and d["method"] == "graph"


def test_to_dict_is_json() -> None:
    import json

    r = inspect_archive(str(FIXTURES / "unet.pt2"), GraphSettings(measure_work=40))
    doc = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert doc["certified"] is True and doc["lipschitz_lower"] <= doc["lipschitz_upper"]
    assert set(doc["layers"]) >= {"enc.weight", "mid.weight", "up.weight", "dec.weight"}
