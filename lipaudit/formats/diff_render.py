"""DiffResult -> text in each output format. Pure functions: they return a string."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable

from lipaudit.diff import DiffResult, LayerDiff, Side
from lipaudit.text import visible

DIFF_FORMATS = ("table", "json", "markdown", "github")
# Characters with inline meaning in GitHub Markdown.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|~&$])")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.5g}"


def _bound(side: Side) -> str:
    x = side.log10_upper
    if x is None:
        return "unknown"
    if x == -math.inf:
        return "0"
    return f"{10.0**x:.5g}" if x < 308 else f"10^{x:.4f}"


def _rise(x: float | None) -> str:
    if x is None:
        return "-"
    return "unbounded" if x == math.inf else f"{x:+.2f}%"


def _verdict(d: DiffResult) -> str:
    if d.max_increase_pct is None:
        return "no gate"
    return "passed" if d.passed else "FAILED"


def _shown(d: DiffResult) -> list[LayerDiff]:
    return list(d.layers)


def _md(text: str, limit: int = 300) -> str:
    return _MD_SPECIAL.sub(r"\\\1", visible(text, limit))


def render_json(d: DiffResult) -> str:
    return json.dumps(d.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def render_table(d: DiffResult, width: int = 120, color: bool = False) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(
        file=buf, width=width, force_terminal=color, no_color=not color, color_system="standard" if color else None,
        markup=False, emoji=False, highlight=False, legacy_windows=False,
    )
    console.print(Text(f"lipaudit diff: {visible(d.old.path)} -> {visible(d.new.path)}", style="bold"))
    console.print(Text(
        f"network Lipschitz bound: {_bound(d.old)} -> {_bound(d.new)} ({_rise(d.network_rise_pct)})"
        f"{'' if d.new.certified else ', new bound not certified'}"
    ))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("layer", "left"), ("kind", "left"), ("status", "left"), ("old upper", "right"),
                          ("new upper", "right"), ("change", "right")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    limit = d.max_increase_pct
    for x in _shown(d):
        over = limit is not None and x.rise_pct is not None and x.rise_pct > limit
        table.add_row(
            Text(visible(x.name, 80)), x.kind, x.status, _num(x.old_upper), _num(x.new_upper),
            Text(_rise(x.rise_pct), style="bold red" if over else ""),
        )
    console.print(table)
    if d.added or d.removed:
        console.print(Text(f"{len(d.added)} added, {len(d.removed)} removed"))
    for v in d.violations:
        console.print(Text(f"- {v}", style="red"))
    gate = "" if limit is None else f" (--max-increase {limit:g}%)"
    console.print(Text(f"{_verdict(d)}{gate}", style="bold red" if not d.passed else "green"))
    return buf.getvalue()


def render_markdown(d: DiffResult) -> str:
    out = [
        f"## lipaudit diff: {_md(d.old.path)} -> {_md(d.new.path)}",
        "",
        f"**Network Lipschitz bound:** {_bound(d.old)} -> {_bound(d.new)} ({_rise(d.network_rise_pct)})"
        + ("" if d.max_increase_pct is None else f" - gate {d.max_increase_pct:g}%: **{_verdict(d).lower()}**"),
        "",
        "| layer | kind | status | old upper | new upper | change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for x in _shown(d):
        out.append(f"| {_md(x.name)} | {x.kind} | {x.status} | {_num(x.old_upper)} | {_num(x.new_upper)} | "
                   f"{_rise(x.rise_pct)} |")
    if d.violations:
        out += ["", "### Gate failures", ""] + [f"- {_md(v, 1000)}" for v in d.violations]
    return "\n".join(out) + "\n"


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(d: DiffResult) -> str:
    file = escape_property(visible(d.new.path))
    lines = [f"::error file={file},title=lipaudit diff::{escape_data(v)}" for v in d.violations]
    summary = (f"{visible(d.old.path)} -> {visible(d.new.path)}: network bound {_bound(d.old)} -> {_bound(d.new)} "
               f"({_rise(d.network_rise_pct)}), {len(d.added)} layers added, {len(d.removed)} removed, {_verdict(d)}")
    lines.append(f"::notice title=lipaudit diff::{escape_data(summary)}")
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[DiffResult], str]] = {
    "table": render_table,
    "json": render_json,
    "markdown": render_markdown,
    "github": render_github,
}


def render(d: DiffResult, fmt: str, width: int = 120, color: bool = False) -> str:
    if fmt == "table":
        return render_table(d, width, color)
    return RENDERERS[fmt](d)
