"""lipaudit merge REPORTS...: the JSON reports of `inspect --shard I/N --format json`, one per
shard, combined into the document one run over all the files writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lipaudit.commands.outcome import guarded, write_report
from lipaudit.errors import MalformedInputError, UsageError
from lipaudit.text import visible

FORMATS = ("json", "sarif", "html")
# A shard's report is kilobytes per checkpoint; anything far larger is not one we wrote.
MAX_REPORT_BYTES = 1 << 30


def _read(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_REPORT_BYTES:
            raise MalformedInputError(f"{visible(path)}: larger than any shard report", path)
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{visible(path)}: no such file", path) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedInputError(f"{visible(path)}: not a JSON report ({type(e).__name__})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shard"), dict) or not isinstance(doc.get("reports"), list):
        raise MalformedInputError(
            f"{visible(path)}: not a shard report (write one with inspect --shard I/N --format json)", path)
    return doc


def _check_entries(doc: dict[str, Any], path: str) -> None:
    """Each entry is a report or an error document: by the schema where jsonschema is installed."""
    try:
        import jsonschema
    except ImportError:
        if not all(isinstance(d, dict) and ("checkpoint" in d or "error" in d) for d in doc["reports"]):
            raise MalformedInputError(f"{visible(path)}: an entry is neither a report nor an error", path) from None
        return
    from lipaudit.report import schema

    plain = {k: v for k, v in doc.items() if k != "shard"}
    try:
        jsonschema.validate(plain, schema("inspect"))
    except jsonschema.ValidationError as e:
        raise MalformedInputError(f"{visible(path)}: not a valid report ({visible(e.message, 200)})", path) from None


def merge_documents(docs: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], int]:
    """The document a single run over every shard's files writes, and its exit code.

    The shards must name the same file list and count, each index once; every shard's reports
    are its part of that list, in order."""
    from lipaudit.fanout import Shard

    first_path, first = docs[0]
    count, files = first["shard"].get("count"), first["shard"].get("files")
    if not isinstance(count, int) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise MalformedInputError(f"{visible(first_path)}: a broken shard record", first_path)
    versions = {d.get("tool", {}).get("version") for _, d in docs}
    if len(versions) != 1:
        raise UsageError(f"the shards were written by different lipaudit versions ({', '.join(map(str, versions))})")
    by_index: dict[int, list[Any]] = {}
    for path, d in docs:
        s = d["shard"]
        if s.get("count") != count or s.get("files") != files:
            raise UsageError(f"{visible(path)}: a shard of another run (its file list or count differs from "
                             f"{visible(first_path)}'s)", path)
        i = s.get("index")
        if not isinstance(i, int) or not 1 <= i <= count:
            raise MalformedInputError(f"{visible(path)}: a broken shard index", path)
        if i in by_index:
            raise UsageError(f"shard {i}/{count} is given twice", path)
        mine = Shard(i, count).pick(files)
        if len(d["reports"]) != len(mine):
            raise MalformedInputError(f"{visible(path)}: {len(d['reports'])} reports for {len(mine)} files", path)
        _check_entries(d, path)
        by_index[i] = d["reports"]
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise UsageError(f"shards missing: {', '.join(f'{i}/{count}' for i in missing)}")
    where: dict[str, Any] = {}
    for i, reports in by_index.items():
        where.update(zip(Shard(i, count).pick(files), reports, strict=True))
    reports = [where[f] for f in files]
    codes = [int(r["error"]["exit_code"]) if r.get("error") else (0 if r.get("passed") is True else 1)
             for r in reports]
    code = max(codes, default=0)
    if len(reports) == 1:  # one file: a single run writes its report alone
        return reports[0], code
    return {
        "schema_version": first.get("schema_version"),
        "tool": first.get("tool"),
        "reports": reports,
        "passed": all(r.get("passed") is True for r in reports),
    }, code


@click.command()
@click.argument("reports", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="json", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the merged report to FILE instead of stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def merge(reports: tuple[str, ...], fmt: str, output: Path | None, quiet: bool, debug: bool) -> None:
    """Combine the JSON reports of `inspect --shard I/N --format json` (one per shard, any order) into
    the report one run over all the files gives; the exit code is that run's."""

    def run() -> int:
        from lipaudit.fanout import outcome_line, outcomes_of, verdict
        from lipaudit.formats import FORMATS as REGISTRY
        from lipaudit.formats.json_format import dumps

        doc, code = merge_documents([(p, _read(p)) for p in reports])
        outcomes = outcomes_of(doc["reports"] if "reports" in doc else [doc])
        f = REGISTRY[fmt]
        if fmt == "json":
            text = dumps(doc)
        elif "reports" in doc:
            text = f.render_documents(doc["reports"])
        else:
            from importlib import import_module

            text = import_module(f.module).render(doc)
        if output is not None:
            write_report(output, text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if not quiet:  # as the single run says it: a line per file, then the verdict
            for o in outcomes:
                click.echo(f"lipaudit: {outcome_line(o)}", err=True)
            click.echo(f"lipaudit: merged {len(reports)} shards: {verdict(outcomes)}", err=True)
        return code

    guarded(run, None, fmt, debug)
