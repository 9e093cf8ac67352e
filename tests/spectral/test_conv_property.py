"""Property test: certified conv intervals against the explicit operator of the real torch module.

CI runs a bounded number of examples; LIPAUDIT_LONG=1 runs many more (by hand), LIPAUDIT_EXAMPLES=N
exactly N."""

from __future__ import annotations

import math
import os
import warnings

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lipaudit.spectral.conv import circular_interval, conv_interval, same_padding, zero_padded_lower
from tests.spectral.conv_reference import module_matrix, op_norm

LONG = os.environ.get("LIPAUDIT_LONG") == "1"
EXAMPLES = int(os.environ.get("LIPAUDIT_EXAMPLES", 3000 if LONG else 40))

_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOG_RANGE = {"fp64": 300, "fp32": 30, "fp16": 3, "bf16": 30}


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    d = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    ks = tuple(draw(st.integers(1, 4)) for _ in range(d))
    dilation = draw(st.integers(1, 2))
    transposed = draw(st.booleans())
    mode = "zeros" if transposed else draw(st.sampled_from(["zeros", "same", "circular"]))
    stride = 1 if mode == "same" else draw(st.integers(1, 2))
    max_size = {1: 9, 2: 5, 3: 3}[d]
    size = tuple(draw(st.integers(1, max_size)) for _ in range(d))
    padding: int | str = "same" if mode == "same" else draw(st.integers(0, 3))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    dtype = draw(st.sampled_from(list(_DTYPES)))
    log_scale = draw(st.integers(-_LOG_RANGE[dtype], _LOG_RANGE[dtype]))
    seed = draw(st.integers(0, 2**31 - 1))
    return {"d": d, "groups": groups, "c_in": c_in, "c_out": c_out, "ks": ks, "dilation": dilation,
            "transposed": transposed, "mode": mode, "stride": stride, "size": size, "padding": padding,
            "output_padding": output_padding, "dtype": dtype, "log_scale": log_scale, "seed": seed}


def _module(c: dict[str, object]) -> torch.nn.Module:
    d = int(c["d"])  # type: ignore[call-overload]
    kw = {"stride": c["stride"], "dilation": c["dilation"], "groups": c["groups"], "bias": False}
    if c["transposed"]:
        cls = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)[d - 1]
        return cls(c["c_in"], c["c_out"], c["ks"], padding=c["padding"],  # type: ignore[arg-type]
                   output_padding=c["output_padding"], **kw)
    cls2 = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[d - 1]
    mode = "circular" if c["mode"] == "circular" else "zeros"
    return cls2(c["c_in"], c["c_out"], c["ks"], padding=c["padding"], padding_mode=mode, **kw)  # type: ignore[arg-type]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(c=configs())
def test_certified_upper_above_the_real_module(c: dict[str, object]) -> None:
    m = _module(c)
    size = tuple(c["size"])  # type: ignore[call-overload]
    ks = tuple(c["ks"])  # type: ignore[call-overload]
    dil = int(c["dilation"])  # type: ignore[call-overload]
    pad = c["padding"]
    if c["mode"] == "circular":
        assume(isinstance(pad, int) and pad <= min(size))
    # the module must produce an output at this size
    if c["transposed"]:
        assume(all(isinstance(pad, int) and (n - 1) * int(c["stride"]) - 2 * pad + dil * (k - 1)  # type: ignore[call-overload]
                   + int(c["output_padding"]) + 1 > 0 for n, k in zip(size, ks, strict=True)))  # type: ignore[call-overload]
    else:
        p = 0 if pad == "same" else int(pad)  # type: ignore[call-overload]
        assume(all(n + 2 * p - dil * (k - 1) > 0 or pad == "same" for n, k in zip(size, ks, strict=True)))
    g = torch.Generator().manual_seed(int(c["seed"]))  # type: ignore[call-overload]
    base = torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
    dtype = _DTYPES[str(c["dtype"])]
    stored = (base * 10.0 ** int(c["log_scale"])).to(dtype).double()  # type: ignore[call-overload]
    assume(bool(torch.isfinite(stored).all()))
    # the truth at a power-of-two rescale of the stored weight (exact), scaled back by linearity
    e = math.frexp(float(stored.abs().max()))[1] if bool(torch.any(stored != 0)) else 0
    unit = stored * 2.0 ** (-e) if abs(e) < 1000 else stored * 2.0 ** (-e // 2) * 2.0 ** (-(e - e // 2))
    m = m.double()
    with torch.no_grad():
        m.weight.copy_(unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        truth_unit = op_norm(module_matrix(m, int(c["c_in"]), size))  # type: ignore[call-overload]
    groups = int(c["groups"])  # type: ignore[call-overload]

    def back(x: float) -> float:
        return x * 2.0 ** (-e) if abs(e) < 1000 else x * 2.0 ** (-e // 2) * 2.0 ** (-(e - e // 2))

    overpad = (c["mode"] == "circular" and isinstance(pad, int)
               and any(2 * pad > dil * (k - 1) for k in ks))
    if overpad:
        assert isinstance(pad, int)
        for grp in (groups, None):
            iv = circular_interval(stored, size, [(pad, pad)] * len(size), stride=int(c["stride"]),  # type: ignore[call-overload]
                                   dilation=dil, groups=grp)
            assert back(iv.upper) >= truth_unit
            assert math.isfinite(iv.upper)
        iv = circular_interval(stored, size, [(pad, pad)] * len(size), stride=int(c["stride"]),  # type: ignore[call-overload]
                               dilation=dil, groups=groups)
        assert back(iv.lower) <= truth_unit * (1 + 1e-9)
        return
    for grp in (groups, None):
        iv = conv_interval(stored, 1e-2, groups=grp)
        assert iv.certified and math.isfinite(iv.upper)
        assert iv.lower <= iv.upper
        assert back(iv.upper) >= truth_unit
        if bool(torch.any(stored != 0)):
            assert iv.upper > 0
    if c["mode"] == "same":
        for grp in (groups, None):
            lo = zero_padded_lower(stored, size, same_padding(ks, dil), dilation=dil, groups=grp)
            assert back(lo) <= truth_unit * (1 + 1e-9)
