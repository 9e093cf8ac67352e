"""Shared helpers: fixture paths, the CLI runner, schema validation of every JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from lipaudit.cli import cli
from lipaudit.report import schema

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_VALIDATOR = jsonschema.Draft202012Validator(schema())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden from the current output")


def validate(doc: dict[str, Any]) -> dict[str, Any]:
    _VALIDATOR.validate(doc)
    return doc


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    """inspect --format json; the output must be one schema-valid JSON object."""
    result = run("inspect", *args, "--format", "json", "-q")
    doc = json.loads(result.stdout)
    return result.exit_code, validate(doc)


def report_of(path: Path | str, *args: str) -> dict[str, Any]:
    code, doc = run_json(str(path), *args)
    assert code in (0, 1), doc
    return doc


def layer(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [x for x in doc["layers"] if x["name"] == name]
    assert len(found) == 1, [x["name"] for x in doc["layers"]]
    return found[0]


def true_norm(w: torch.Tensor) -> float:
    """Reference: LAPACK SVD in float64, through numpy (a different build from torch's)."""
    return float(np.linalg.norm(w.detach().double().reshape(w.shape[0], -1).numpy(), 2))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
