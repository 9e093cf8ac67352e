"""Report -> text. Pure functions: they return a string and never print."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lipaudit.report import Report


@dataclass(frozen=True)
class RenderOptions:
    width: int = 120
    color: bool = False


Renderer = Callable[[Report, RenderOptions], str]


def _registry() -> dict[str, Renderer]:
    from lipaudit.formats import github, json_format, markdown, table

    return {
        "table": table.render,
        "json": json_format.render,
        "markdown": markdown.render,
        "github": github.render,
    }


FORMAT_NAMES = ("table", "json", "markdown", "github")


def render(report: Report, fmt: str, options: RenderOptions | None = None) -> str:
    return _registry()[fmt](report, options or RenderOptions())


def fmt_num(x: float | None, digits: int = 5) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def fmt_bound(report: Report) -> str:
    net = report.network
    if net.log10_upper is None:
        return "unknown"
    if net.upper is not None:
        return fmt_num(net.upper)
    return f"10^{net.log10_upper:.4f}"
