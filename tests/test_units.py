"""Module-level tests of planning, the chain strategy and the gates (no CLI, no files)."""

from __future__ import annotations

import torch

from lipaudit.audit import _gates, run_audit
from lipaudit.bound.chain import UNKNOWN_WIRING, Chain, _chain_break
from lipaudit.checkpoint.model import TensorInfo
from lipaudit.kinds import plan_layers
from lipaudit.kinds.channelwise import BatchNorm, Norm
from lipaudit.kinds.conv import Conv2d
from lipaudit.kinds.dense import Attention, Dense
from lipaudit.report import Layer, Network, Sigma
from lipaudit.settings import Settings


def _info(key: str, *shape: int, dtype: str = "float32") -> TensorInfo:
    return TensorInfo(key=key, shape=tuple(shape), dtype=dtype)


def _layer(spec, upper: float = 2.0, certified: bool = True) -> Layer:  # type: ignore[no-untyped-def]
    return Layer(tensor=spec.tensor, name=spec.name, kind=str(spec.kind.kind), shape=spec.shape, dtype=spec.dtype,
                 sigma=Sigma(upper / 2, upper, "x", "x", "x", certified), reshape_sigma=None,
                 in_network_bound=spec.covered, notes=(), uses=spec.uses, parametrization=None, time_s=0.0)


def test_planning_claims_each_tensor_once() -> None:
    infos = [
        _info("conv.weight", 8, 3, 3, 3), _info("conv.bias", 8),
        _info("bn.weight", 8), _info("bn.bias", 8), _info("bn.running_mean", 8), _info("bn.running_var", 8),
        _info("bn.num_batches_tracked", dtype="int64"),
        _info("ln.weight", 1, 16), _info("ln.bias", 1, 16),
        _info("attn.q_proj.weight", 16, 16), _info("fc.weight", 10, 72),
    ]
    plan = plan_layers(infos)
    kinds = {s.name: type(s.kind) for s in plan.layers}
    assert kinds == {"conv": Conv2d, "bn": BatchNorm, "ln": Norm, "attn.q_proj": Attention, "fc": Dense}
    used = [k for s in plan.layers for k in s.uses] + [k for k, _ in plan.skipped]
    assert sorted(used) == sorted(i.key for i in infos)
    assert plan.suspicious == []


def test_unknown_float_and_int8_tensors_are_suspicious() -> None:
    plan = plan_layers([_info("fc.weight", 4, 4), _info("mix.W", 4, 4), _info("q.weight", 4, 4, dtype="int8"),
                        _info("pos.ids", 7, dtype="int64")])
    assert sorted(k for k, _ in plan.suspicious) == ["mix.W", "q.weight"]


def test_weight_norm_with_a_scalar_g_is_planned() -> None:
    plan = plan_layers([_info("fc.weight_g"), _info("fc.weight_v", 5, 7)])
    [spec] = plan.layers
    assert spec.parametrization is not None and spec.parametrization.type == "weight_norm"


def test_chain_product_and_reasons() -> None:
    plan = plan_layers([_info("a.weight", 8, 4), _info("b.weight", 3, 8)])
    layers = [_layer(s) for s in plan.layers]
    b = Chain().bound(layers, plan, Settings())
    assert not b.network.certified and b.network.not_certified_because == (UNKNOWN_WIRING,)
    assert abs(b.network.upper - 4.0) < 1e-12  # type: ignore[operator]
    chain = Settings(assume=("chain",))
    b = Chain().bound(layers, plan, chain)
    assert b.network.certified and abs(b.network.upper - 4.0) < 1e-12  # type: ignore[operator]
    assert b.network.details == {"assumed": ["chain"]} and "--assume chain" in b.network.assumptions[0]
    layers[1] = _layer(plan.layers[1], certified=False)
    b = Chain().bound(layers, plan, chain)
    assert not b.network.certified and "a factor is an estimate" in b.network.not_certified_because


def test_chain_break_names_the_widths() -> None:
    plan = plan_layers([_info("a.weight", 8, 4), _info("b.weight", 3, 5)])
    brk = _chain_break([_layer(s) for s in plan.layers], plan.layers)
    assert brk is not None and brk.tensor == "b.weight" and "gives 8" in brk.message


def test_residual_names_are_hints_not_gates() -> None:
    plan = plan_layers([_info("layer1.0.conv1.weight", 4, 4, 3, 3), _info("layer1.0.conv2.weight", 4, 4, 3, 3)])
    b = Chain().bound([_layer(s) for s in plan.layers], plan, Settings())
    assert not b.network.certified and any(f.code == "LIP011" for f in b.findings)
    assert b.network.not_certified_because == (UNKNOWN_WIRING,)
    b = Chain().bound([_layer(s) for s in plan.layers], plan, Settings(assume=("chain",)))
    assert b.network.certified and {"LIP011", "LIP025"} <= {f.code for f in b.findings}


def test_names_that_match_no_residual_pattern_are_not_certified() -> None:
    """MobileNetV2's names (features.N.conv.M) say nothing; the product is still only an estimate."""
    plan = plan_layers([_info("features.1.conv.0.weight", 4, 4, 3, 3), _info("features.1.conv.1.weight", 4, 4, 3, 3)])
    b = Chain().bound([_layer(s) for s in plan.layers], plan, Settings())
    assert not b.network.certified and UNKNOWN_WIRING in b.network.not_certified_because


def test_gates_fail_closed_on_uncertified_bounds() -> None:
    plan = plan_layers([_info("a.weight", 4, 4)])
    layers = [_layer(plan.layers[0], upper=0.5)]
    net = Network(0.0, False, 1, 0, (), not_certified_because=("because",))
    codes = [f.code for f in _gates(layers, plan.layers, net, Settings(fail_above=10.0))]
    assert codes == ["LIP017"]
    assert _gates(layers, plan.layers, net, Settings(fail_above=10.0, allow_uncertified=True)) == []
    net = Network(2.0, True, 1, 0, ())
    assert [f.code for f in _gates(layers, plan.layers, net, Settings(fail_above=10.0))] == ["LIP001"]


def test_audit_measures_tied_weights_once() -> None:
    import tempfile
    from pathlib import Path

    from lipaudit.checkpoint import open_checkpoint

    w = torch.randn(6, 6)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.pt"
        torch.save({"enc.weight": w, "dec.weight": w}, path)
        report = run_audit(open_checkpoint(str(path)), Settings(jobs=1)).report
    enc, dec = report.layers
    assert enc.sigma == dec.sigma and any("tied to enc.weight" in n for n in dec.notes)
