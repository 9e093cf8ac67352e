"""lipaudit diff OLD NEW: compare two checkpoints or JSON reports, and gate on the rise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from lipaudit import __version__
from lipaudit.commands.outcome import emit, guarded
from lipaudit.errors import LipauditError
from lipaudit.formats import FORMAT_NAMES
from lipaudit.text import visible


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


def audit_to_dict(key: str | None, method: str, rtol: float | None, allow_unknown_classes: bool = False) -> Any:
    """audit_path for the diff: open the checkpoint, audit it, return Report.to_dict()."""

    def run(path: str) -> dict[str, Any]:
        from lipaudit.audit import audit
        from lipaudit.checkpoint import open_checkpoint
        from lipaudit.checkpoint.limits import Limits
        from lipaudit.report import Settings

        base = Settings()
        given: dict[str, Any] = {"key": key, "jobs": max(1, min(8, os.cpu_count() or 1)),
                                 "limits": Limits(allow_unknown_classes=allow_unknown_classes)}
        # the field's own type (a str or a str enum) reads the choice
        given["method"] = type(base.method)(method)
        if rtol is not None:
            given.update(rtol=rtol, conv_rtol=rtol)
        settings = Settings(**given)
        return audit(open_checkpoint(path, key, limits=settings.limits), settings).to_dict()

    return run


def _readable(path: str) -> None:
    """A FIFO or a device would block the open or the read forever: only files and folders are inputs."""
    from lipaudit.checkpoint.sniff import regular_file_size

    if not os.path.isdir(path):
        regular_file_size(Path(path), visible(path))


@click.command()
@click.argument("old")
@click.argument("new")
@click.option("--max-increase", type=Percent(), default=None,
              help="Exit 1 if the network bound or any layer's upper bound rises by more than PCT (10% or 10).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="table", show_default=True,
              help="Output format (every format inspect has).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the diff to FILE (after both audits succeeded) instead of stdout.")
@click.option("--key", default=None, help="Entry holding the state dict, for checkpoint inputs.")
@click.option("--method", type=click.Choice(["auto", "exact", "fast"]), default="auto", show_default=True,
              help="Dense-layer method, for checkpoint inputs.")
@click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Relative width of the brackets, for checkpoint inputs.")
@click.option("--allow-unknown-classes", is_flag=True,
              help="Read pickles that build classes outside the allowlist, keeping them inert (trusted files only).")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def diff(
    old: str, new: str, max_increase: float | None, fmt: str, output: Path | None, key: str | None, method: str,
    rtol: float | None, allow_unknown_classes: bool, quiet: bool, debug: bool,
) -> None:
    """Compare two checkpoints (or two JSON reports from inspect --format json), layer by layer and
    for the network. Layers are matched by tensor key, then by name."""
    from lipaudit import preflight
    from lipaudit.diff import diff_paths
    from lipaudit.formats import diff_verdict, render_diff, terminal_options

    def run() -> int:
        for path in (old, new):
            preflight.exists(path)
            _readable(path)
        if output is not None:
            preflight.refuse_output_over_inputs([old, new], output)
        audit_path = audit_to_dict(key, method, rtol, allow_unknown_classes)
        result = diff_paths(old, new, audit_path, max_increase, __version__)
        emit(render_diff(result, fmt, terminal_options(output)), fmt, output)
        if not quiet:
            click.echo(f"lipaudit: diff {visible(old)} -> {visible(new)}: {diff_verdict(result)}", err=True)
        return result.exit_code

    guarded(run, old, fmt, debug)
