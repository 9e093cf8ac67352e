"""Report -> text. Pure functions: they return a string and never print.

FORMATS is the registry: one entry per output format, naming the module that renders it. Modules
are imported when used, so that `lipaudit --help` does not pay for them (or for torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipaudit.normalize import NormalizeReport
    from lipaudit.report import Layer, Network, Report


@dataclass(frozen=True)
class RenderOptions:
    width: int = 120
    color: bool = False


Renderer = Callable[[Any, RenderOptions], str]


@dataclass(frozen=True)
class Format:
    """An output format: `module.render(report, options)`, and `module.render_normalize` if it has one."""

    name: str
    module: str
    normalize: bool = True
    # The renderer reads the JSON document (report.to_dict()) rather than the Report.
    reads_document: bool = False
    # Several reports make one document (json, sarif) rather than one output per report.
    one_document: bool = False
    # The renderer also takes the frequency responses the audit computed (html).
    heatmaps: int = 0

    def renderer(self, command: str) -> Renderer:
        mod = import_module(self.module)
        fn: Renderer = getattr(mod, "render" if command == "inspect" else "render_normalize")
        if self.heatmaps:
            return lambda report, options: fn(report.to_dict(), report.heatmaps)
        if self.reads_document:
            return lambda report, options: fn(report.to_dict())  # type: ignore[call-arg]
        return fn

    def render_documents(self, docs: list[dict[str, Any]]) -> str:
        """Several inspect reports (or error documents) as one document."""
        from lipaudit import __version__
        from lipaudit.report import SCHEMA_VERSION

        doc = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "lipaudit", "version": __version__},
            "reports": docs,
            "passed": all(d.get("passed") is True for d in docs),
        }
        if self.reads_document:
            fn = import_module(self.module).render
            return fn(doc)  # type: ignore[no-any-return]
        from lipaudit.formats.json_format import dumps

        return dumps(doc)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("table", "lipaudit.formats.table"),
        Format("json", "lipaudit.formats.json_format", one_document=True),
        Format("markdown", "lipaudit.formats.markdown"),
        Format("github", "lipaudit.formats.github"),
        Format("sarif", "lipaudit.formats.sarif", normalize=False, reads_document=True, one_document=True),
        Format("html", "lipaudit.formats.html", normalize=False, reads_document=True, one_document=True,
               heatmaps=4),
    )
}
FORMAT_NAMES = tuple(FORMATS)
NORMALIZE_FORMAT_NAMES = tuple(n for n, f in FORMATS.items() if f.normalize)


def render(report: Report | NormalizeReport, fmt: str, options: RenderOptions | None = None) -> str:
    from lipaudit.report import Report

    command = "inspect" if isinstance(report, Report) else "normalize"
    return FORMATS[fmt].renderer(command)(report, options or RenderOptions())


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


def certified_text(net: Network) -> str:
    """'certified', or 'not certified' with the first reason: the wording never contradicts a finding."""
    if net.certified:
        return "certified"
    why = net.not_certified_because
    return "not certified" + (f": {why[0]}" if why else "")


def ratio_text(layer: Layer) -> str:
    """The operator norm over the reshaped-kernel norm, as a bracket."""
    r = layer.reshape_ratio
    if r is None or r[0] is None or r[1] is None:
        return "-"
    if abs(r[1] - r[0]) <= 0.005 * r[1]:
        return f"{r[1]:.2f}x"
    return f"{r[0]:.2f}-{r[1]:.2f}x"


def middle(text: str, width: int) -> str:
    """Long names shortened in the middle, where they differ least (prefixes and leaf names matter)."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2:]


def how_bounded(net: Network) -> str:
    """'product of 5 layers' for a chain; the graph and its measured lower end for a graph."""
    n = net.layers_counted
    layers = f"{n} layer" if n == 1 else f"{n} layers"
    if net.method == "graph":
        lower = f"; measured lower end {fmt_num(net.lipschitz_lower)}" if net.lipschitz_lower is not None else ""
        return f"over the exported graph, {layers}{lower}"
    assumed = " under --assume chain" if (net.details or {}).get("assumed") else ""
    return (f"product of {layers}{assumed}"
            + (f", {net.layers_not_covered} not covered" if net.layers_not_covered else ""))
