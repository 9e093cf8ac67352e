"""Report -> text. Pure functions: they return a string and never print.

FORMATS is the registry: one entry per output format, naming the module that renders it. Modules
are imported when used, so that `lipaudit --help` does not pay for them (or for torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult
    from lipaudit.normalize import NormalizeReport
    from lipaudit.report import Finding, Layer, Network, Report


@dataclass(frozen=True)
class RenderOptions:
    width: int = 120
    color: bool = False
    # The assumptions behind the bound: listed in full (verbose), or left to the caller that prints
    # them once for a whole run of several files (assumptions=False).
    verbose: bool = False
    assumptions: bool = True
    # One summary line instead of the tables (--quiet, for pre-commit hooks).
    brief: bool = False


Renderer = Callable[[Any, RenderOptions], str]


def terminal_options(output: object | None, **more: bool) -> RenderOptions:
    """Width and colour of stdout when it is a terminal and no -o was given; plain 120 columns otherwise."""
    import shutil
    import sys

    to_tty = output is None and sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 24)).columns if to_tty else 120
    return RenderOptions(width=max(width, 80), color=to_tty, **more)


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
    # A failed command still writes one error document on stdout (json, sarif).
    error_document: bool = False
    # A failed command's message also goes to stdout, where the reader looks for it (github).
    error_on_stdout: bool = False
    # -q drops the tables and prints the summary lines as the report (what a pre-commit hook shows).
    quiet_is_summary: bool = False

    def renderer(self, command: str) -> Renderer:
        mod = import_module(self.module)
        if command == "diff":  # every format renders a diff, from the DiffResult itself
            diff_fn: Renderer = mod.render_diff
            return diff_fn
        fn: Renderer = getattr(mod, "render" if command == "inspect" else "render_normalize")
        if self.heatmaps:
            return lambda report, options: fn(report.to_dict(), report.heatmaps)
        if self.reads_document:
            return lambda report, options: fn(report.to_dict())  # type: ignore[call-arg]
        return fn

    def error_text(self, message: str, path: str) -> str:
        """A file that could not be audited, in this format's own words (module.render_error), or
        one plain line."""
        from lipaudit.text import visible

        fn = getattr(import_module(self.module), "render_error", None)
        return str(fn(message, path)) if fn is not None else f"lipaudit: {visible(path)}: error: {message}\n"

    def render_assumptions(self, items: list[str], options: RenderOptions) -> str:
        """The assumptions of a whole run, once; "" for formats that carry them in each report."""
        fn = getattr(import_module(self.module), "render_assumptions", None)
        return "" if fn is None or not items else str(fn(items, options))

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
        Format("table", "lipaudit.formats.table", quiet_is_summary=True),
        Format("json", "lipaudit.formats.json_format", one_document=True, error_document=True),
        Format("markdown", "lipaudit.formats.markdown"),
        Format("github", "lipaudit.formats.github", error_on_stdout=True),
        Format("sarif", "lipaudit.formats.sarif", normalize=False, reads_document=True, one_document=True,
               error_document=True),
        Format("html", "lipaudit.formats.html", normalize=False, reads_document=True, one_document=True,
               heatmaps=4),
    )
}
FORMAT_NAMES = tuple(FORMATS)
NORMALIZE_FORMAT_NAMES = tuple(n for n, f in FORMATS.items() if f.normalize)


def render_diff(d: DiffResult, fmt: str, options: RenderOptions | None = None) -> str:
    """lipaudit diff through the same registry as inspect: every format, one code path."""
    return FORMATS[fmt].renderer("diff")(d, options or RenderOptions())


def render(report: Report | NormalizeReport, fmt: str, options: RenderOptions | None = None) -> str:
    from lipaudit.report import Report

    command = "inspect" if isinstance(report, Report) else "normalize"
    return FORMATS[fmt].renderer(command)(report, options or RenderOptions())


def rise_text(x: float | None) -> str:
    """A diff's relative change of an upper end."""
    if x is None:
        return "-"
    return "unbounded" if x == math.inf else f"{x:+.2f}%"


def diff_verdict(d: DiffResult) -> str:
    if d.max_increase_pct is None:
        return "no gate"
    if d.passed:
        return "passed"
    return f"FAILED: {plural(len(d.violations), 'gate failure')} (--max-increase {d.max_increase_pct:g}%)"


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
    """A long dotted name shortened where it differs least: the words before the last block index
    go first, then the words between it and the leaf are cut to their first letters; indices and
    the leaf stay (encoder.layer.11.attention.output.dense -> …11.atte.outp.dense)."""
    if len(text) <= width:
        return text
    parts = text.split(".")
    numeric = [i for i, x in enumerate(parts) if x.isdigit()]
    last_index = numeric[-1] if numeric else 0
    dropped: set[int] = set()
    for i in (i for i in range(0, last_index) if not parts[i].isdigit()):
        dropped.add(i)
        short = _joined(parts, dropped)
        if len(short) <= width:
            return short
    inner = [i for i in range(last_index + 1, len(parts) - 1) if not parts[i].isdigit()]
    cut = list(parts)
    for keep in range(6, 0, -1):
        for i in inner:
            cut[i] = parts[i][:keep]
        short = _joined(cut, dropped)
        if len(short) <= width:
            return short
    short = _joined(cut, dropped | set(inner))
    if len(short) <= width:
        return short
    keep = width - 1
    return short[: (keep + 1) // 2] + "…" + short[len(short) - keep // 2:]


def _joined(parts: list[str], dropped: set[int]) -> str:
    out: list[str] = []
    for i, x in enumerate(parts):
        if i in dropped:
            if not out or out[-1] != "…":
                out.append("…")
        else:
            out.append(x)
    return ".".join(out).replace("….", "…")


def plural(n: int, word: str, many: str | None = None) -> str:
    """1 layer, 2 layers; 1 entry, 2 entries (many names an irregular plural)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def bound_text(net: Network, subject: str = "") -> str:
    """The network line: a certified bound as "L <= x (certified; how)"; otherwise "no certified
    bound (why)" with the number only as an estimate, so that it cannot be read as a proof."""
    how = how_bounded(net)
    if net.layers_counted == 0:
        return "no network bound (no layer is covered)"
    value = fmt_log10(net.log10_upper)
    if net.certified:
        return f"{subject}L <= {value} (certified; {how})"
    why = net.not_certified_because[0] if net.not_certified_because else "not a proof"
    return f"no certified {subject}bound ({why}); estimate {value} ({how})"


def summary_line(report: Report) -> str:
    """One line per checkpoint: what was audited, the network bound, the verdict and its reason."""
    from lipaudit.text import visible

    errors = sum(f.severity == "error" for f in report.findings)
    return (f"{visible(report.checkpoint.path)}: {plural(len(report.layers), 'layer')}, "
            f"{bound_text(report.network, 'network ')}, {plural(len(report.findings), 'finding')} "
            f"({plural(errors, 'error')}): {verdict_text(report)}")


def failing(report: Report | NormalizeReport) -> list[Finding]:
    """The findings that fail the run under its --fail-on."""
    severities = ("error",) if report.fail_on == "error" else ("error", "warning")
    return [f for f in report.findings if f.severity in severities]


def verdict_text(report: Report | NormalizeReport, limit: int = 160) -> str:
    """PASSED, or FAILED with how many findings failed it and the first one's reason."""
    if report.passed:
        return "PASSED"
    bad = failing(report)
    if not bad:
        return "FAILED"
    first = bad[0]
    reason = f"{first.code}" + (f" {first.tensor}" if first.tensor else "") + f": {first.message}"
    if len(reason) > limit:
        reason = reason[: limit - 3] + "..."
    more = f" (and {plural(len(bad) - 1, 'more')})" if len(bad) > 1 else ""
    kind = "error" if first.severity == "error" else "finding"
    return f"FAILED: {plural(len(bad), kind)}: {reason}{more}"


def how_bounded(net: Network) -> str:
    """'product of 5 layers' for a chain; the graph and its measured lower end for a graph."""
    layers = plural(net.layers_counted, "layer")
    if net.method == "graph":
        lower = f"; measured lower end {fmt_num(net.lipschitz_lower)}" if net.lipschitz_lower is not None else ""
        floor = (net.details or {}).get("slope_floor")
        if isinstance(floor, (int, float)):
            lower += f"; slope floor {fmt_num(float(floor))} (no slope-based bound goes lower)"
        return f"over the exported graph, {layers}{lower}"
    assumed = " under --assume chain" if (net.details or {}).get("assumed") else ""
    return (f"product of {layers}{assumed}"
            + (f", {net.layers_not_covered} not covered" if net.layers_not_covered else ""))
