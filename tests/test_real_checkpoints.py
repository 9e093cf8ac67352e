"""Real public checkpoints: the MTCNN weights inside the facenet-pytorch wheel (skipped offline)."""

from __future__ import annotations

import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import report_of, true_norm
from tests.spectral.conv_reference import conv_matrix, op_norm

WHEEL = "facenet-pytorch==2.6.0"


@pytest.fixture(scope="session")
def mtcnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("wheel")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(where)],
            check=True, capture_output=True, timeout=120,
        )
        [wheel] = where.glob("*.whl")
        out = {}
        with zipfile.ZipFile(wheel) as z:
            for net in ("pnet", "rnet", "onet"):
                target = where / f"{net}.pt"
                target.write_bytes(z.read(f"facenet_pytorch/data/{net}.pt"))
                out[net] = target
        return out
    except (subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
        pytest.skip(f"cannot fetch {WHEEL} ({type(e).__name__}); offline?")


def _symbol_peak(w: torch.Tensor) -> float:
    """max of sigma_max(K^(w)) on a 64 x 64 frequency grid, refined on a 41 x 41 grid around the
    best point (a lower bound of S, within about 1e-5 of it)."""
    spec = torch.fft.fft2(w, s=(64, 64)).permute(2, 3, 0, 1)
    norms = torch.linalg.matrix_norm(spec, ord=2)
    i, j = divmod(int(torch.argmax(norms)), 64)
    step = 2 * math.pi / 64
    offs = torch.linspace(-step, step, 41, dtype=torch.float64)
    w1 = (2 * math.pi * i / 64 + offs)[:, None, None]
    w2 = (2 * math.pi * j / 64 + offs)[None, :, None]
    p1 = torch.arange(w.shape[2], dtype=torch.float64)
    p2 = torch.arange(w.shape[3], dtype=torch.float64)
    e1 = torch.exp(-1j * w1 * p1)  # (41, 1, k1)
    e2 = torch.exp(-1j * w2 * p2)  # (1, 41, k2)
    sym = torch.einsum("abp,abq,oipq->abio", e1.expand(41, 41, -1), e2.expand(41, 41, -1), w.to(torch.complex128))
    return max(float(norms.max()), float(torch.linalg.matrix_norm(sym, ord=2).max()))


@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_mtcnn_layers_against_references(mtcnn: dict[str, Path], net: str) -> None:
    doc = report_of(mtcnn[net])
    sd = torch.load(mtcnn[net], map_location="cpu", weights_only=True)
    assert doc["checkpoint"]["format"] == "torch-legacy"
    product = 1.0
    for x in doc["layers"]:
        w = sd[x["tensor"]].double()
        up, lo = x["sigma"]["upper"], x["sigma"]["lower"]
        assert x["sigma"]["certified"] and lo <= up
        if x["kind"] == "linear":
            assert math.isclose(up, true_norm(w), rel_tol=1e-6)
        elif x["kind"] == "conv2d":
            size = 10 if w.shape[0] * w.shape[1] <= 512 else 6
            assert up >= op_norm(conv_matrix(w, (size, size)))
            assert up >= op_norm(conv_matrix(w, (size, size), padding=1, circular=True)) if w.shape[-1] == 3 else True
            assert x["reshape_sigma"] == pytest.approx(true_norm(w), rel=1e-9)
            # tight: within 1% of the largest symbol norm on a fine frequency grid (a lower bound of S)
            fine = _symbol_peak(w)
            assert fine <= up <= 1.01 * fine
        elif x["kind"] == "other":  # PReLU
            assert up == max(1.0, float(w.abs().max()))
        product *= up
    assert doc["network"]["lipschitz_upper"] == pytest.approx(product, rel=1e-12)
    # MTCNN's nets end in parallel heads: every factor is a proof, but their product is not a bound.
    assert not doc["network"]["certified"]
    assert [f["code"] for f in doc["findings"] if f["code"] == "LIP011"] == ["LIP011"]
    # The two or three output heads sit side by side, not in a chain: lipaudit says so.
    assert any(f["code"] == "LIP011" for f in doc["findings"])
