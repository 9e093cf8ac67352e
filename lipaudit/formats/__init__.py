"""Report -> text. Pure functions: they return a string and never print."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lipaudit.report import Report

if TYPE_CHECKING:
    from lipaudit.normalize import NormalizeReport


@dataclass(frozen=True)
class RenderOptions:
    width: int = 120
    color: bool = False


Renderer = Callable[[Any, RenderOptions], str]


def _registry(kind: str) -> dict[str, Renderer]:
    from lipaudit.formats import github, json_format, markdown, table

    if kind == "normalize":
        return {
            "table": table.render_normalize,
            "json": json_format.render,
            "markdown": markdown.render_normalize,
            "github": github.render_normalize,
        }
    return {"table": table.render, "json": json_format.render, "markdown": markdown.render, "github": github.render}


FORMAT_NAMES = ("table", "json", "markdown", "github")


def render(report: Report | NormalizeReport, fmt: str, options: RenderOptions | None = None) -> str:
    kind = "inspect" if isinstance(report, Report) else "normalize"
    return _registry(kind)[fmt](report, options or RenderOptions())


def fmt_log10(log10: float | None) -> str:
    from lipaudit.report import from_log10

    if log10 is None:
        return "unknown"
    value = from_log10(log10)
    return fmt_num(value) if value is not None else f"10^{log10:.4f}"


def fmt_num(x: float | None, digits: int = 5) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def fmt_bound(report: Report) -> str:
    return fmt_log10(report.network.log10_upper)
