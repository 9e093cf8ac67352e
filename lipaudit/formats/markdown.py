"""GitHub-flavoured Markdown, for job summaries and pull-request comments."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lipaudit.formats import (
    RenderOptions,
    bound_text,
    diff_verdict,
    fmt_log10,
    fmt_num,
    plural,
    ratio_text,
    rise_text,
    summary_line,
    verdict_text,
)
from lipaudit.report import Finding, Report

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult
    from lipaudit.normalize import NormalizeReport
from lipaudit.text import visible

# Characters with inline meaning in GitHub Markdown; lines never start with untrusted text.
_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|~&$])")


def md(text: str, limit: int = 300) -> str:
    """Untrusted text as inert Markdown: control characters visible, syntax escaped, and no
    @mention or #reference that GitHub would act on (notify a team, link an issue)."""
    return _SPECIAL.sub(r"\\\1", visible(text, limit)).replace("@", "&#64;").replace("#", "&#35;")


def render_error(message: str, path: str) -> str:
    """A file that could not be audited, as its own section."""
    return f"### lipaudit: {md(path)}\n\n**error**: {md(message)}\n\n"


def render_assumptions(items: list[str], options: RenderOptions) -> str:
    """Once per run, folded: they matter to a reader who asks, not on every report."""
    out = ["", f"<details><summary>Assumptions behind the network bound ({len(items)})</summary>", ""]
    return "\n".join([*out, *(f"- {md(a, 2000)}" for a in items), "", "</details>"]) + "\n"


def render(report: Report, options: RenderOptions) -> str:
    ck, net = report.checkpoint, report.network
    if options.brief:
        return f"- {md(summary_line(report), 2000)}\n"
    out = [
        f"## lipaudit: {md(ck.path)}",
        "",
        f"**Network Lipschitz bound:** {md(bound_text(net), 1000)} - **{md(verdict_text(report), 1000)}**",
        "",
        f"{ck.format}, {plural(ck.tensors, 'tensor')}, {plural(ck.parameters, 'parameter')}, "
        f"sha256 `{ck.sha256[:12]}`"
        + (f", key {md(ck.key)}" if ck.key else ""),
        "",
        "| layer | kind | shape | sigma lower | sigma upper | certified | reshape sigma | ratio | in L |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for x in report.layers:
        cert = "-" if x.sigma.upper is None else ("yes" if x.sigma.certified else "estimate")
        out.append(
            f"| {md(x.name)} | {md(x.label or x.kind)} | {'x'.join(map(str, x.shape))} | {fmt_num(x.sigma.lower)} | "
            f"{fmt_num(x.sigma.upper)} | {cert} | {fmt_num(x.reshape_sigma)} | {ratio_text(x)} | "
            f"{'yes' if x.in_network_bound else 'no'} |"
        )
    out += _blocks(net.details)
    out += _findings(report.findings)
    if report.skipped:
        out += ["", f"<details><summary>Skipped {plural(len(report.skipped), 'tensor')}</summary>", ""]
        out += [f"- {md(s.tensor)}: {md(s.reason)}" for s in report.skipped]
        out += ["", "</details>"]
    text = "\n".join(out) + "\n"
    if options.assumptions and net.assumptions:
        text += render_assumptions(list(net.assumptions), options)
    return text


def _blocks(details: object) -> list[str]:
    """Blocks bounded as a whole, folded: which rule tightened which block, and by how much."""
    blocks = details.get("blocks") if isinstance(details, dict) else None
    if not isinstance(blocks, list) or not blocks:
        return []
    used = sum(1 for b in blocks if isinstance(b, dict) and b.get("used"))
    out = ["", f"<details><summary>{plural(len(blocks), 'block')} bounded as a whole, {used} lowering the bound"
               "</summary>", "", "| block | rule | product | bound | slope floor | state |",
           "|---|---|---:|---:|---:|---|"]
    for b in blocks:
        if not isinstance(b, dict):
            continue
        state = f"skipped: {b['skipped']}" if b.get("skipped") else ("used" if b.get("used") else "not lower")
        out.append(f"| {md(str(b.get('entry')), 80)} to {md(str(b.get('exit')), 80)} | {md(str(b.get('rule')))} | "
                   f"{_number(b.get('product'))} | {_number(b.get('upper'))} | {_number(b.get('floor'))} | "
                   f"{md(state)} |")
    return [*out, "", "</details>"]


def _number(x: object) -> str:
    return fmt_num(float(x)) if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def _findings(findings: tuple[Finding, ...]) -> list[str]:
    if not findings:
        return []
    out = ["", "### Findings", ""]
    for f in findings:
        where = f" {md(f.tensor)}:" if f.tensor else ""
        out.append(f"- **{f.code}** ({f.severity}){where} {md(f.message, 1000)}")
    return out


def render_normalize(report: NormalizeReport, options: RenderOptions) -> str:
    st = report.settings
    out = [
        f"## lipaudit normalize: {md(report.checkpoint.path)}",
        "",
        f"Target {st.target:g}, mode {st.mode}, conv norm {st.conv_norm}{', bake' if st.bake else ''}. "
        f"Network Lipschitz bound {fmt_log10(report.log10_before)} -> {fmt_log10(report.log10_after)} "
        f"({'certified' if report.certified else 'not certified'}); "
        + (f"written to {md(report.output or '')}" if report.written else "nothing written")
        + f" - **{md(verdict_text(report), 1000)}**",
        "",
        "| layer | kind | action | before | after | scale | why |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for c in report.changes:
        out.append(f"| {md(c.name)} | {c.kind} | {c.action} | {fmt_num(c.before)} | {fmt_num(c.after)} | "
                   f"{fmt_num(c.scale)} | {md(c.reason)} |")
    return "\n".join(out + _findings(report.findings)) + "\n"


def render_diff(d: DiffResult, options: RenderOptions) -> str:
    gate = "" if d.max_increase_pct is None else f" - **{md(diff_verdict(d))}**"
    out = [
        f"## lipaudit diff: {md(d.old.path)} -> {md(d.new.path)}",
        "",
        f"**Network Lipschitz bound:** {fmt_log10(d.old.log10_upper)} -> {fmt_log10(d.new.log10_upper)} "
        f"({md(rise_text(d.network_rise_pct))}){'' if d.new.certified else ', new bound not certified'}{gate}",
        "",
        "| layer | kind | status | old upper | new upper | change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for x in d.layers:
        out.append(f"| {md(x.name)} | {md(x.kind)} | {x.status} | {fmt_num(x.old_upper)} | {fmt_num(x.new_upper)} | "
                   f"{md(rise_text(x.rise_pct))} |")
    if d.violations:
        out += ["", "### Gate failures", ""] + [f"- {md(v, 1000)}" for v in d.violations]
    return "\n".join(out) + "\n"
