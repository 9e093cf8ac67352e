"""Command line: parse, call, render, map outcomes to exit codes (DESIGN §4)."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import click

from lipaudit import __version__
from lipaudit.errors import INTERNAL_EXIT_CODE, LipauditError, OutputError, UsageError
from lipaudit.formats import FORMAT_NAMES, RenderOptions, fmt_bound
from lipaudit.text import visible


class PositiveFloat(click.ParamType):  # type: ignore[type-arg]
    name = "number"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or x < 0 or (x == 0 and not self.allow_zero):
            self.fail(f"{value!r} must be a finite number above 0", param, ctx)
        return x


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, markup=False, emoji=False)


def _fail(err: LipauditError, fmt: str) -> NoReturn:
    from lipaudit.formats.json_format import dumps
    from lipaudit.report import error_document

    if fmt == "json":
        sys.stdout.write(dumps(error_document(__version__, err.code, err.exit_code, err.message, err.path)))
        sys.stdout.flush()
    click.echo(f"lipaudit: error: {err.message}", err=True)
    sys.exit(err.exit_code)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside path, fsync, then rename over it."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{visible(str(path))}: is a folder")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mode = os.stat(path).st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"{visible(str(path))}: cannot write the report ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"),
        console=_stderr_console(), transient=True, disable=not enabled,
    )


class InputSize(click.ParamType):  # type: ignore[type-arg]
    """HxW (every conv with that many spatial axes) or NAME=HxW (one layer)."""

    name = "[NAME=]SIZE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, tuple[int, ...]]:
        if isinstance(value, tuple):
            return value
        name, _, size = str(value).rpartition("=")
        try:
            dims = tuple(int(x) for x in size.lower().split("x"))
        except ValueError:
            self.fail(f"{value!r}: expected a size like 32x32 or layer=32x32", param, ctx)
        if not 1 <= len(dims) <= 3 or min(dims) < 1 or max(dims) > 4096:
            self.fail(f"{value!r}: 1 to 3 sizes between 1 and 4096", param, ctx)
        return (name or "*", dims)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="lipaudit")
def cli() -> None:
    """Audit the Lipschitz constant of PyTorch checkpoints, with proven bounds."""


@cli.command()
@click.argument("path")
@click.option("--method", type=click.Choice(["auto", "exact", "fast"]), default="auto", show_default=True,
              help="Dense layers: exact SVD, or a certified power/Cholesky bracket to --rtol.")
@click.option("--rtol", type=PositiveFloat(), default=None,
              help="Relative width of the brackets [default: 1e-4 dense, 1e-2 convolutions].")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the report to FILE (after the audit succeeded) instead of stdout.")
@click.option("--fail-above", type=PositiveFloat(allow_zero=True), default=None,
              help="Exit 1 if the network's Lipschitz upper bound exceeds X.")
@click.option("--fail-layer-above", type=PositiveFloat(allow_zero=True), default=None,
              help="Exit 1 if any layer's norm upper bound exceeds X.")
@click.option("--key", default=None, help="Entry holding the state dict (e.g. model, ema; '/' for all).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the power iteration starts.")
@click.option("--bn-eps", type=PositiveFloat(), default=1e-5, show_default=True, help="BatchNorm eps.")
@click.option("--input-size", "input_sizes", type=InputSize(), multiple=True,
              help="Input size of the convolutions (32x32, or layer=32x32; repeatable): adds their exact "
                   "circular-padding norm and a zero-padding bracket at that size.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def inspect(
    path: str, method: str, rtol: float | None, fmt: str, output: Path | None,
    fail_above: float | None, fail_layer_above: float | None, key: str | None, device: str,
    seed: int, bn_eps: float, input_sizes: tuple[tuple[str, tuple[int, ...]], ...], quiet: bool, debug: bool,
) -> None:
    """Report every layer's operator norm as a proven interval and bound the network."""
    try:
        code = _inspect(path, method, rtol, fmt, output, fail_above, fail_layer_above, key, device,
                        seed, bn_eps, input_sizes, quiet)
    except LipauditError as e:
        _fail(e, fmt)
    except KeyboardInterrupt:
        click.echo("lipaudit: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug: one line and exit 70 unless --debug
        if debug:
            raise
        err = LipauditError(f"internal error: {type(e).__name__}: {visible(str(e), 200)} (rerun with --debug)", path)
        err.exit_code = INTERNAL_EXIT_CODE
        _fail(err, fmt)
    sys.exit(code)


def _inspect(
    path: str, method: str, rtol: float | None, fmt: str, output: Path | None,
    fail_above: float | None, fail_layer_above: float | None, key: str | None, device: str,
    seed: int, bn_eps: float, input_sizes: tuple[tuple[str, tuple[int, ...]], ...], quiet: bool,
) -> int:
    import torch

    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.formats import render
    from lipaudit.report import Settings

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    settings = Settings(
        method=method, rtol=rtol if rtol is not None else 1e-4, conv_rtol=rtol if rtol is not None else 1e-2,
        seed=seed, device=device, key=key, bn_eps=bn_eps, fail_above=fail_above,
        fail_layer_above=fail_layer_above, input_sizes=input_sizes,
    )
    ckpt = open_checkpoint(path, key)
    show_progress = not quiet and sys.stderr.isatty()
    with _progress(show_progress) as bar:
        task = bar.add_task("audit", total=None, layer="")

        def tick(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, layer=visible(name, 60))

        report = audit(ckpt, settings, tick)
    to_tty = output is None and sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 24)).columns if to_tty else 120
    text = render(report, fmt, RenderOptions(width=max(width, 80), color=to_tty))
    if output is not None:
        write_atomic(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if not quiet:
        net = report.network
        errors = sum(f.severity == "error" for f in report.findings)
        click.echo(
            f"lipaudit: {report.checkpoint.path}: {len(report.layers)} layers, network L <= {fmt_bound(report)} "
            f"({'certified' if net.certified else 'not certified'}), {len(report.findings)} findings "
            f"({errors} errors): {'passed' if report.passed else 'FAILED'}",
            err=True,
        )
    return report.exit_code


def main() -> None:
    cli(prog_name="lipaudit")
