"""Golden outputs of the people-facing formats; refresh with pytest --update-golden."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipaudit.audit import audit
from lipaudit.checkpoint import open_checkpoint
from lipaudit.formats import RenderOptions, render
from lipaudit.report import Settings
from tests.conftest import FIXTURES

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("fixture", ["demo_sn_cnn.pt", "conv_bn.pt", "lstm_train_state.pt"])
@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_golden(fixture: str, fmt: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)  # the report shows the path as given
    report = audit(open_checkpoint(f"fixtures/{fixture}"), Settings())
    text = render(report, fmt, RenderOptions(width=120, color=False))
    golden = GOLDEN / f"{Path(fixture).stem}.{fmt}.txt"
    if request.config.getoption("--update-golden"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
