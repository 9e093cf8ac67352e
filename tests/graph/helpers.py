"""Shared helpers for the graph tests: the fixture builders and in-process exports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"


def builders() -> ModuleType:
    name = "make_pt2_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES / "make_pt2_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def export_to(path: Path, model: torch.nn.Module, x: torch.Tensor, core: bool = False) -> Path:
    path.write_bytes(builders().export_bytes(model, x, core))
    return path


def jacobian_norm(model: torch.nn.Module, x: torch.Tensor) -> float:
    """||J(x)||_2 in eager mode, float64, by the full Jacobian and LAPACK (numpy)."""
    import numpy as np

    m = model.double().eval()
    jac = torch.autograd.functional.jacobian(lambda t: m(t).reshape(-1), x.double())
    mat = jac.reshape(jac.shape[0], -1).numpy()
    return float(np.linalg.svd(mat, compute_uv=False)[0])
