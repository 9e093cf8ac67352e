"""A rich table for people; every name from the checkpoint is shown as plain text."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lipaudit.formats import (
    RenderOptions,
    bound_text,
    diff_verdict,
    fmt_log10,
    fmt_num,
    middle,
    plural,
    ratio_text,
    rise_text,
    summary_line,
    verdict_text,
)
from lipaudit.report import Finding, Layer, Report

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult
    from lipaudit.normalize import NormalizeReport
from lipaudit.text import visible

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _certified(layer: Layer) -> Text:
    if layer.sigma.upper is None:
        return Text("-")
    return Text("yes", style="green") if layer.sigma.certified else Text("est", style="yellow")


def _bullets(console: Console, rows: list[Text]) -> None:
    """A list whose wrapped lines keep their indent."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=3, justify="right")
    grid.add_column(overflow="fold")
    for row in rows:
        grid.add_row("-", row)
    console.print(grid)


def _console(buf: io.StringIO, options: RenderOptions) -> Console:
    return Console(
        file=buf, width=options.width, force_terminal=options.color, no_color=not options.color,
        color_system="standard" if options.color else None, markup=False, emoji=False,
        highlight=False, legacy_windows=False,
    )


def _findings(console: Console, findings: tuple[Finding, ...]) -> None:
    if not findings:
        return
    console.print(Text("Findings:", style="bold"))
    rows = []
    for f in findings:
        row = Text(f"{f.code} {f.severity}", style=_SEVERITY_STYLE.get(f.severity, ""))
        row.append(" ")
        if f.tensor:
            row.append(visible(f.tensor) + ": ")
        row.append(visible(f.message, 1000))
        rows.append(row)
    _bullets(console, rows)


def _strip(text: str) -> str:
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def render_normalize(report: NormalizeReport, options: RenderOptions) -> str:
    buf = io.StringIO()
    console = _console(buf, options)
    head = Text(f"lipaudit {report.tool_version} normalize  ", style="bold")
    head.append(visible(report.checkpoint.path))
    head.append(f" -> {visible(report.output)}" if report.output else " (dry run)")
    console.print(head)
    st = report.settings
    console.print(Text(f"target {st.target:g}, mode {st.mode}, conv norm {st.conv_norm}"
                       + (", bake" if st.bake else "")))
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, justify in (("layer", "left"), ("kind", "left"), ("action", "left"), ("before", "right"),
                         ("after", "right"), ("scale", "right"), ("why", "left")):
        t.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in report.changes:
        action = "raised" if c.raised else c.action
        t.add_row(Text(middle(visible(c.name), 40)), Text(c.kind), Text(action), Text(fmt_num(c.before)),
                  Text(fmt_num(c.after)), Text(fmt_num(c.scale)), Text(visible(c.reason)))
    console.print(t)
    line = Text("Network Lipschitz bound: ", style="bold")
    line.append(f"{fmt_log10(report.log10_before)} -> {fmt_log10(report.log10_after)}", style="bold")
    line.append(f"  ({'certified' if report.certified else 'not certified'})")
    console.print(line)
    _findings(console, report.findings)
    console.print(Text("written" if report.written else "nothing written", style="bold"))
    if not report.passed:
        console.print(Text(verdict_text(report), style="bold red"))
    return _strip(buf.getvalue())


def render_assumptions(items: list[str], options: RenderOptions) -> str:
    """The assumptions behind the network bounds, once for a run (or a hint without --verbose)."""
    buf = io.StringIO()
    console = _console(buf, options)
    if options.verbose:
        console.print(Text("Assumptions:", style="bold"))
        _bullets(console, [Text(a) for a in items])
    else:
        console.print(Text(f"The network bound rests on {plural(len(items), 'assumption')} (--verbose lists them)."))
    return _strip(buf.getvalue())


def render(report: Report, options: RenderOptions) -> str:
    if options.brief:
        return summary_line(report) + "\n"
    buf = io.StringIO()
    console = _console(buf, options)
    ck = report.checkpoint
    head = Text(f"lipaudit {report.tool_version}  ", style="bold")
    head.append(visible(ck.path))
    console.print(head)
    details = (f"{ck.format}, {plural(ck.tensors, 'tensor')}, {ck.parameters:,} "
               f"parameter{'' if ck.parameters == 1 else 's'}, sha256 {ck.sha256[:12]}")
    console.print(Text(details + (f", key {visible(ck.key)}" if ck.key else "")))

    name_width = max(16, options.width - 100)
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, justify in (
        ("layer", "left"), ("kind", "left"), ("shape", "left"), ("sigma lower", "right"),
        ("sigma upper", "right"), ("cert", "left"), ("reshape", "right"), ("ratio", "right"), ("in L", "left"),
    ):
        t.add_column(col, justify=justify, overflow="fold", no_wrap=col == "layer")  # type: ignore[arg-type]
    for x in report.layers:
        t.add_row(
            Text(middle(visible(x.name), name_width)),
            Text(x.label or x.kind),
            Text("x".join(map(str, x.shape))),
            Text(fmt_num(x.sigma.lower)),
            Text(fmt_num(x.sigma.upper)),
            _certified(x),
            Text(fmt_num(x.reshape_sigma)),
            Text(ratio_text(x)),
            Text("yes" if x.in_network_bound else "no"),
        )
    console.print(t)

    net = report.network
    line = Text("Network Lipschitz bound: ", style="bold")
    line.append(bound_text(net), style="bold" if net.certified else "yellow")
    console.print(line)
    _findings(console, report.findings)
    if report.skipped:
        reasons: dict[str, int] = {}
        for s in report.skipped:
            reasons[s.reason.split(":")[0]] = reasons.get(s.reason.split(":")[0], 0) + 1
        summary = ", ".join(f"{visible(k, 60)} {n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        console.print(Text(f"Skipped {plural(len(report.skipped), 'tensor')} ({summary}); see --format json for each."))
    out = _strip(buf.getvalue())
    if options.assumptions and net.assumptions:
        out += render_assumptions(list(net.assumptions), options)
    buf = io.StringIO()
    _console(buf, options).print(Text(verdict_text(report), style="bold green" if report.passed else "bold red"))
    return out + _strip(buf.getvalue())


def render_diff(d: DiffResult, options: RenderOptions) -> str:
    buf = io.StringIO()
    console = _console(buf, options)
    console.print(Text(f"lipaudit diff: {visible(d.old.path)} -> {visible(d.new.path)}", style="bold"))
    console.print(Text(
        f"network Lipschitz bound: {fmt_log10(d.old.log10_upper)} -> {fmt_log10(d.new.log10_upper)} "
        f"({rise_text(d.network_rise_pct)}){'' if d.new.certified else ', new bound not certified'}"
    ))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("layer", "left"), ("kind", "left"), ("status", "left"), ("old upper", "right"),
                          ("new upper", "right"), ("change", "right")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    limit = d.max_increase_pct
    for x in d.layers:
        over = limit is not None and x.rise_pct is not None and x.rise_pct > limit
        table.add_row(
            Text(middle(visible(x.name), max(16, options.width - 70))), Text(x.kind), Text(x.status),
            Text(fmt_num(x.old_upper)), Text(fmt_num(x.new_upper)),
            Text(rise_text(x.rise_pct), style="bold red" if over else ""),
        )
    console.print(table)
    if d.added or d.removed:
        console.print(Text(f"{plural(len(d.added), 'layer')} added, {len(d.removed)} removed"))
    for v in d.violations:
        console.print(Text(f"- {visible(v, 1000)}", style="red"))
    console.print(Text(diff_verdict(d), style="bold red" if not d.passed else "green"))
    return _strip(buf.getvalue())
