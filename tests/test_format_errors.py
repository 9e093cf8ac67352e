"""How each format says that a file could not be audited, through the format registry."""

from __future__ import annotations

import json
from pathlib import Path

from lipaudit.formats import FORMATS
from tests.conftest import run

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "fixtures" / "demo_sn_cnn.pt"


def _broken(tmp_path: Path) -> Path:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    return bad


def test_one_broken_file_among_several_in_each_text_format(tmp_path: Path) -> None:
    bad = _broken(tmp_path)
    md = run("inspect", DEMO, bad, "--format", "markdown", "-q").stdout
    assert "### lipaudit:" in md and "**error**:" in md
    gh = run("inspect", DEMO, bad, "--format", "github", "-q").stdout
    assert "::error title=lipaudit::" in gh
    table = run("inspect", DEMO, bad, "--format", "table").stdout
    assert "broken.pt: error:" in table


def test_a_failed_command_writes_what_its_format_reader_expects(tmp_path: Path) -> None:
    bad = _broken(tmp_path)
    for name, f in FORMATS.items():
        result = run("inspect", bad, "--format", name, "-q")
        assert result.exit_code == 4, name
        if f.error_document:
            assert json.loads(result.stdout)["error"]["exit_code"] == 4
        elif f.error_on_stdout:
            assert result.stdout.startswith("::error title=lipaudit::")
        else:
            assert result.stdout == "", name


def test_only_the_table_turns_quiet_into_summary_lines() -> None:
    assert [n for n, f in FORMATS.items() if f.quiet_is_summary] == ["table"]
