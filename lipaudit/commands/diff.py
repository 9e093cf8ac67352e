"""lipaudit diff OLD NEW: compare two checkpoints or JSON reports, and gate on the rise."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from lipaudit import __version__
from lipaudit.errors import INTERNAL_EXIT_CODE, LipauditError, OutputError
from lipaudit.text import visible

FORMATS = ("table", "json", "markdown", "github")


class Percent(click.ParamType):  # type: ignore[type-arg]
    name = "PCT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from lipaudit.diff import parse_percent

        if isinstance(value, float):
            return value
        try:
            return parse_percent(str(value))
        except LipauditError as e:
            self.fail(e.message, param, ctx)


def _fail(err: LipauditError, fmt: str) -> NoReturn:
    if fmt == "json":
        from lipaudit.report import error_document

        doc = error_document(__version__, err.code, err.exit_code, err.message, err.path)
        import json

        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    elif fmt == "github":
        from lipaudit.formats.diff_render import escape_data

        click.echo(f"::error title=lipaudit diff::{escape_data(err.message)}")
    click.echo(f"lipaudit: error: {err.message}", err=True)
    sys.exit(err.exit_code)


def audit_to_dict(key: str | None, method: str, rtol: float | None) -> Any:
    """audit_path for the diff: open the checkpoint, audit it, return Report.to_dict()."""

    def run(path: str) -> dict[str, Any]:
        from lipaudit.audit import audit
        from lipaudit.checkpoint import open_checkpoint
        from lipaudit.report import Settings

        base = Settings()
        given: dict[str, Any] = {"key": key, "jobs": max(1, min(8, os.cpu_count() or 1))}
        # the field's own type (a str or a str enum) reads the choice
        given["method"] = type(base.method)(method)
        if rtol is not None:
            given.update(rtol=rtol, conv_rtol=rtol)
        settings = Settings(**given)
        return audit(open_checkpoint(path, key, limits=settings.limits), settings).to_dict()

    return run


def _write(path: Path, text: str) -> None:
    from lipaudit.checkpoint.writer import stage, writer_of

    staged = stage(path, writer_of(text.encode("utf-8")))
    try:
        staged.commit()
    except OSError as e:
        staged.discard()
        raise OutputError(f"{visible(str(path))}: cannot write the report ({e.strerror or e})") from None


@click.command()
@click.argument("old")
@click.argument("new")
@click.option("--max-increase", type=Percent(), default=None,
              help="Exit 1 if the network bound or any layer's upper bound rises by more than PCT (10% or 10).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the diff to FILE (after both audits succeeded) instead of stdout.")
@click.option("--key", default=None, help="Entry holding the state dict, for checkpoint inputs.")
@click.option("--method", type=click.Choice(["auto", "exact", "fast"]), default="auto", show_default=True,
              help="Dense-layer method, for checkpoint inputs.")
@click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Relative width of the brackets, for checkpoint inputs.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def diff(
    old: str, new: str, max_increase: float | None, fmt: str, output: Path | None, key: str | None, method: str,
    rtol: float | None, quiet: bool, debug: bool,
) -> None:
    """Compare two checkpoints (or two JSON reports from inspect --format json), layer by layer and
    for the network. Layers are matched by tensor key, then by name."""
    from lipaudit.diff import diff_paths
    from lipaudit.formats.diff_render import render

    try:
        result = diff_paths(old, new, audit_to_dict(key, method, rtol), max_increase, __version__)
        to_tty = output is None and sys.stdout.isatty()
        width = shutil.get_terminal_size((120, 24)).columns if to_tty else 120
        text = render(result, fmt, max(width, 80), to_tty)
        if output is not None:
            _write(output, text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except LipauditError as e:
        _fail(e, fmt)
    except KeyboardInterrupt:
        click.echo("lipaudit: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        err = LipauditError(f"internal error: {type(e).__name__}: {visible(str(e), 200)} (rerun with --debug)", old)
        err.exit_code = INTERNAL_EXIT_CODE
        _fail(err, fmt)
    if not quiet:
        click.echo(f"lipaudit: diff {visible(old)} -> {visible(new)}: {len(result.violations)} gate failures: "
                   f"{'passed' if result.passed else 'FAILED'}", err=True)
    sys.exit(result.exit_code)
