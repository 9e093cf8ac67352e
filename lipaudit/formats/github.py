"""GitHub Actions workflow commands: one annotation per finding and a summary notice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lipaudit.findings import RULES
from lipaudit.formats import RenderOptions, diff_verdict, fmt_log10, plural, rise_text, summary_line
from lipaudit.report import Finding, Report

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult
    from lipaudit.normalize import NormalizeReport
from lipaudit.text import visible

_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def render_error(message: str, path: str) -> str:
    """A file that could not be audited: an error annotation (runners read it from stdout)."""
    return f"::error title=lipaudit::{escape_data(message)}\n"


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotations(findings: tuple[Finding, ...], path: str) -> list[str]:
    """One workflow command per finding, on the checkpoint's file, titled by its code."""
    lines = []
    where_file = escape_property(visible(path))
    for f in findings:
        where = f"{visible(f.tensor)}: " if f.tensor else ""
        message = escape_data(where + visible(f.message, 1000))
        title = escape_property(f"{f.code} {RULES[f.code].title}" if f.code in RULES else f.code)
        lines.append(f"::{_LEVEL.get(f.severity, 'notice')} file={where_file},title={title}::{message}")
    return lines


def render_normalize(report: NormalizeReport, options: RenderOptions) -> str:
    lines = _annotations(report.findings, report.checkpoint.path)
    scaled = sum(c.action == "scaled" for c in report.changes)
    summary = (
        f"{visible(report.checkpoint.path)}: {plural(scaled, 'layer')} rescaled to at most {report.settings.target:g}, "
        f"network bound {fmt_log10(report.log10_before)} -> {fmt_log10(report.log10_after)}, "
        + ("written" if report.written else "nothing written")
    )
    lines.append(f"::notice title=lipaudit::{escape_data(summary)}")
    return "\n".join(lines) + "\n"


def render(report: Report, options: RenderOptions) -> str:
    lines = _annotations(report.findings, report.checkpoint.path)
    summary = summary_line(report)
    lines.append(f"::notice title=lipaudit::{escape_data(summary)}")
    return "\n".join(lines) + "\n"


def render_diff(d: DiffResult, options: RenderOptions) -> str:
    file = escape_property(visible(d.new.path))
    lines = [f"::error file={file},title=lipaudit diff::{escape_data(visible(v, 1000))}" for v in d.violations]
    summary = (f"{visible(d.old.path)} -> {visible(d.new.path)}: network bound {fmt_log10(d.old.log10_upper)} -> "
               f"{fmt_log10(d.new.log10_upper)} ({rise_text(d.network_rise_pct)}), {plural(len(d.added), 'layer')} "
               f"added, {len(d.removed)} removed, {diff_verdict(d)}")
    lines.append(f"::notice title=lipaudit diff::{escape_data(summary)}")
    return "\n".join(lines) + "\n"
