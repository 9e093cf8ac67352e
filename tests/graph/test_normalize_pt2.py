"""normalize on .pt2 archives: only weight bytes change, the result loads and runs, targets hold."""

from __future__ import annotations

import math
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lipaudit.errors import OutputError, UsageError
from lipaudit.graph import GraphSettings, inspect_archive
from lipaudit.graph.normalize import normalize_archive
from tests.graph.helpers import FIXTURES, builders, export_to

FAST = GraphSettings(measure=False)


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC matches
        return {i.filename: z.read(i) for i in z.infolist()}


def _load_and_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.load(path)  # our own test file only
        out: torch.Tensor = ep.module()(x)
    return out


@pytest.mark.parametrize("name", ["unet", "resnet_small_core", "mlp_act"])
def test_network_target_holds_and_only_weights_change(tmp_path: Path, name: str) -> None:
    src = FIXTURES / f"{name}.pt2"
    dst = tmp_path / "out.pt2"
    res = normalize_archive(str(src), str(dst), network_target=0.5, settings=FAST)
    assert res.after is not None and res.after.certified
    assert res.after.lipschitz_upper is not None and res.after.lipschitz_upper <= 0.5
    assert res.after.lipschitz_upper >= 0.5 * 0.999  # not needlessly smaller
    old, new = _members(src), _members(dst)
    assert list(old) == list(new)
    changed = {n for n in old if old[n] != new[n]}
    assert changed and all("/data/weights/weight_" in n for n in changed)
    assert all(old[n] == new[n] for n in old if n.endswith((".json", "archive_format", "sample_inputs/model.pt")))
    # one factor for every covered layer, evenly in log space
    assert len({round(c.factor, 12) for c in res.changes}) == 1
    # independently: the bound of a fresh audit, and the file runs
    again = inspect_archive(str(dst), FAST)
    assert again.lipschitz_upper is not None and again.lipschitz_upper <= 0.5
    x = builders().build(name.removesuffix("_core"))[1]
    assert torch.isfinite(_load_and_run(dst, x)).all()


def test_per_layer_divide_sets_each_layer_to_target(tmp_path: Path) -> None:
    dst = tmp_path / "out.pt2"
    res = normalize_archive(str(FIXTURES / "linear_chain.pt2"), str(dst), target=1.0, settings=FAST)
    assert {c.param for c in res.changes} == {"l1.weight", "l2.weight"}
    ep_w = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep_w = dict(torch.export.load(dst).state_dict)
    for key in ("l1.weight", "l2.weight"):
        s = float(np.linalg.svd(ep_w[key].detach().double().numpy(), compute_uv=False)[0])
        assert s == pytest.approx(1.0, rel=1e-5)


def test_clip_leaves_small_layers(tmp_path: Path) -> None:
    src = FIXTURES / "residual.pt2"  # its one layer has norm 0.5
    res = normalize_archive(str(src), str(tmp_path / "o.pt2"), target=1.0, mode="clip", settings=FAST)
    assert res.changes == ()
    assert _members(src) == _members(tmp_path / "o.pt2")


def test_unreachable_network_target_is_a_usage_error(tmp_path: Path) -> None:
    # x + f(x) is at least 1 whatever f is scaled to
    with pytest.raises(UsageError, match="cannot reach"):
        normalize_archive(str(FIXTURES / "residual.pt2"), str(tmp_path / "o.pt2"), network_target=0.5,
                          settings=FAST)
    assert not (tmp_path / "o.pt2").exists()


def test_uncertified_graph_refuses_a_network_target(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not certified"):
        normalize_archive(str(FIXTURES / "attention.pt2"), str(tmp_path / "o.pt2"), network_target=1.0,
                          settings=FAST)


def test_output_errors_leave_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.pt2"
    shutil.copy(FIXTURES / "concat.pt2", src)
    before = src.read_bytes()
    with pytest.raises(UsageError):
        normalize_archive(str(src), str(src), settings=FAST)
    with pytest.raises(OutputError):
        normalize_archive(str(src), str(tmp_path / "missing" / "o.pt2"), settings=FAST)
    link = tmp_path / "link.pt2"
    link.symlink_to(tmp_path / "elsewhere.pt2")
    with pytest.raises(OutputError):
        normalize_archive(str(src), str(link), settings=FAST)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt2", "link.pt2"]


def test_in_place_and_dry_run(tmp_path: Path) -> None:
    src = tmp_path / "in.pt2"
    shutil.copy(FIXTURES / "concat.pt2", src)
    before = src.read_bytes()
    dry = normalize_archive(str(src), None, target=1.0, dry_run=True, settings=FAST)
    assert dry.after is None and src.read_bytes() == before and dry.changes
    normalize_archive(str(src), None, target=1.0, in_place=True, settings=FAST)
    r = inspect_archive(str(src), FAST)
    assert r.lipschitz_upper == pytest.approx(math.sqrt(2), rel=1e-6)  # cat of two norm-1 maps


def test_half_precision_weights_round_trip(tmp_path: Path) -> None:
    model, x = builders().build("mlp_act")
    path = export_to(tmp_path / "h.pt2", model.to(torch.bfloat16), x.to(torch.bfloat16))
    res = normalize_archive(str(path), str(tmp_path / "o.pt2"), network_target=2.0, settings=FAST)
    assert res.after is not None and res.after.lipschitz_upper is not None
    assert res.after.lipschitz_upper <= 2.0
    got = dict(_members(tmp_path / "o.pt2"))
    assert len(got) == len(_members(path))
