"""The one place every command maps an outcome to output and exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click

from lipaudit import __version__
from lipaudit.errors import INTERNAL_EXIT_CODE, LipauditError, OutputError, ResourceLimitError
from lipaudit.text import defang, visible


def fail(err: LipauditError, fmt: str) -> NoReturn:
    """One line on stderr; with --format json (or sarif) still one JSON object on stdout."""
    from lipaudit.formats import FORMATS

    message = visible(err.message, 1000)
    f = FORMATS.get(fmt)
    if f is not None and f.error_document:
        from lipaudit.formats.json_format import dumps
        from lipaudit.report import error_document

        sys.stdout.write(dumps(error_document(__version__, err.code, err.exit_code, message, err.path)))
        sys.stdout.flush()
    elif f is not None and f.error_on_stdout:
        sys.stdout.write(f.error_text(message, err.path or ""))
        sys.stdout.flush()
    click.echo(f"lipaudit: error: {message}", err=True)
    sys.exit(err.exit_code)


def internal(e: BaseException, path: str | None) -> LipauditError:
    """An exception no module expected: out of memory is a resource limit (5), anything else a bug (70)."""
    if isinstance(e, MemoryError):
        return ResourceLimitError("out of memory", path)
    err = LipauditError(f"internal error: {type(e).__name__}: {visible(str(e), 200)} (rerun with --debug)", path)
    err.exit_code = INTERNAL_EXIT_CODE
    return err


def guarded(run: Callable[[], int], path: str | None, fmt: str, debug: bool) -> NoReturn:
    """Run a command body; a bug is one line and 70 unless --debug."""
    try:
        code = run()
    except LipauditError as e:
        fail(e, fmt)
    except KeyboardInterrupt:
        click.echo("lipaudit: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        fail(internal(e, path), fmt)
    sys.exit(code)


def emit(text: str, fmt: str, output: Path | None) -> None:
    """Every command's output goes out here: to -o (atomically) or stdout. A line starting with ::
    is a workflow command to GitHub runners, so no name may start one, in any command's output; the
    github format's own lines are commands, their names escaped by the renderer."""
    if fmt != "github":
        text = defang(text)
    if output is not None:
        write_report(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def write_report(path: Path, text: str) -> None:
    """Atomically: a temporary file beside path, fsynced, renamed over it."""
    from lipaudit.checkpoint.writer import stage, writer_of

    staged = stage(path, writer_of(text.encode("utf-8")))
    try:
        staged.commit()
    except OSError as e:
        staged.discard()
        raise OutputError(f"{visible(str(path))}: cannot write the report ({e.strerror or e})") from None
