"""GitHub Actions workflow commands: one annotation per finding and a summary notice."""

from __future__ import annotations

from lipaudit.formats import RenderOptions, fmt_bound
from lipaudit.report import Report
from lipaudit.text import visible

_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render(report: Report, options: RenderOptions) -> str:
    lines = []
    for f in report.findings:
        where = f"{visible(f.tensor)}: " if f.tensor else ""
        message = escape_data(where + visible(f.message, 1000))
        lines.append(f"::{_LEVEL.get(f.severity, 'notice')} title={escape_property(f.code)}::{message}")
    net = report.network
    summary = (
        f"{visible(report.checkpoint.path)}: network Lipschitz bound L <= {fmt_bound(report)} "
        f"({'certified' if net.certified else 'not certified'}), {len(report.layers)} layers, "
        f"{'passed' if report.passed else 'failed'}"
    )
    lines.append(f"::notice title=lipaudit::{escape_data(summary)}")
    return "\n".join(lines) + "\n"
