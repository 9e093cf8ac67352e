"""Command line: parse, call, render, map outcomes to exit codes (DESIGN §4)."""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import replace
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
    elif fmt == "github":
        from lipaudit.formats.github import escape_data

        click.echo(f"::error title=lipaudit::{escape_data(err.message)}")
    click.echo(f"lipaudit: error: {err.message}", err=True)
    sys.exit(err.exit_code)


def write_report(path: Path, text: str) -> None:
    """Atomically: a temporary file beside path, fsynced, renamed over it."""
    from lipaudit.checkpoint.writer import stage, writer_of

    staged = stage(path, writer_of(text.encode("utf-8")))
    try:
        staged.commit()
    except OSError as e:
        staged.discard()
        raise OutputError(f"{visible(str(path))}: cannot write the report ({e.strerror or e})") from None


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"),
        console=_stderr_console(), transient=True, disable=not enabled,
    )


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from lipaudit.checkpoint.limits import parse_bytes

        if isinstance(value, int):
            return value
        try:
            n = parse_bytes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if n <= 0:
            self.fail(f"{value!r} must be above 0", param, ctx)
        return n


def limit_options(f: Any) -> Any:
    """--jobs and the budgets checked before allocating: --max-tensors, --max-tensor-bytes, --max-total-bytes."""
    f = click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
                     help="Layers measured at once [default: the number of CPUs, at most 8].")(f)
    f = click.option("--max-total-bytes", type=ByteSize(), default=None,
                     help="Budget for all tensors' logical sizes [default: 256G].")(f)
    f = click.option("--max-tensor-bytes", type=ByteSize(), default=None,
                     help="Budget for one tensor's logical size, numel x itemsize [default: 16G].")(f)
    f = click.option("--max-tensors", type=click.IntRange(min=1), default=None,
                     help="Most tensors a checkpoint may hold [default: 1000000].")(f)
    return f


def _limits(max_tensors: int | None, max_tensor_bytes: int | None, max_total_bytes: int | None) -> Any:
    from dataclasses import replace as with_

    from lipaudit.checkpoint.limits import Limits

    limits = Limits()
    if max_tensors is not None:
        limits = with_(limits, tensors=max_tensors)
    if max_tensor_bytes is not None:
        limits = with_(limits, tensor_bytes=max_tensor_bytes)
    if max_total_bytes is not None:
        limits = with_(limits, total_bytes=max_total_bytes)
    return limits


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
@limit_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def inspect(
    path: str, method: str, rtol: float | None, fmt: str, output: Path | None,
    fail_above: float | None, fail_layer_above: float | None, key: str | None, device: str,
    seed: int, bn_eps: float, input_sizes: tuple[tuple[str, tuple[int, ...]], ...],
    max_tensors: int | None, max_tensor_bytes: int | None, max_total_bytes: int | None, jobs: int | None,
    quiet: bool, debug: bool,
) -> None:
    """Report every layer's operator norm as a proven interval and bound the network."""

    def run() -> int:
        settings = _settings(method, rtol, device, seed, key, bn_eps, fail_above, fail_layer_above, input_sizes,
                             _limits(max_tensors, max_tensor_bytes, max_total_bytes), jobs)
        return _inspect(path, settings, fmt, output, quiet)

    _guarded(run, path, fmt, debug)


def _inspect(path: str, settings: Any, fmt: str, output: Path | None, quiet: bool) -> int:
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.formats import render

    ckpt = open_checkpoint(path, settings.key, limits=settings.limits)
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
        write_report(output, text)
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


@cli.command()
@click.argument("path")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the rescaled checkpoint (a folder for sharded input).")
@click.option("--target", type=PositiveFloat(), default=1.0, show_default=True,
              help="Largest allowed certified norm per covered layer.")
@click.option("--mode", type=click.Choice(["divide", "clip"]), default="divide", show_default=True,
              help="divide: every covered layer to the target; clip: only layers above it.")
@click.option("--conv-norm", type=click.Choice(["operator", "reshape"]), default="operator", show_default=True,
              help="operator: the certified bound; reshape: what torch's spectral_norm divides by (not certified).")
@click.option("--include", multiple=True, help="Only layers whose name or key matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Leave layers whose name or key matches this glob (repeatable).")
@click.option("--bake", is_flag=True, help="Replace spectral-norm parametrized layers by plain weights.")
@click.option("--in-place", is_flag=True, help="Overwrite the input (atomically).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="table", show_default=True)
@click.option("--key", default=None, help="Entry holding the state dict.")
@click.option("--rtol", type=PositiveFloat(), default=None, help="As for inspect.")
@click.option("--bn-eps", type=PositiveFloat(), default=1e-5, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@limit_options
@click.option("-q", "--quiet", is_flag=True)
@click.option("--debug", is_flag=True)
def normalize(
    path: str, output: Path | None, target: float, mode: str, conv_norm: str, include: tuple[str, ...],
    exclude: tuple[str, ...], bake: bool, in_place: bool, dry_run: bool, fmt: str, key: str | None,
    rtol: float | None, bn_eps: float, device: str, max_tensors: int | None, max_tensor_bytes: int | None,
    max_total_bytes: int | None, jobs: int | None, quiet: bool, debug: bool,
) -> None:
    """Rescale the covered layers so that each certified norm is at most --target."""
    from lipaudit.normalize import NormalizeSettings

    def run() -> int:
        limits = _limits(max_tensors, max_tensor_bytes, max_total_bytes)
        settings = NormalizeSettings(
            target=target, mode=mode, conv_norm=conv_norm, include=include, exclude=exclude, bake=bake,
            audit=_settings("exact", rtol, device, 0, key, bn_eps, None, None, (), limits, jobs),
        )
        return _normalize(path, output, in_place, dry_run, settings, fmt, quiet)

    _guarded(run, path, fmt, debug)


def _guarded(run: Any, path: str, fmt: str, debug: bool) -> NoReturn:
    """Map every outcome to its exit code; a bug is one line and 70 unless --debug."""
    try:
        code = run()
    except LipauditError as e:
        _fail(e, fmt)
    except KeyboardInterrupt:
        click.echo("lipaudit: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        err = LipauditError(f"internal error: {type(e).__name__}: {visible(str(e), 200)} (rerun with --debug)", path)
        err.exit_code = INTERNAL_EXIT_CODE
        _fail(err, fmt)
    sys.exit(code)


def _output_path(path: str, output: Path | None, in_place: bool, dry_run: bool) -> Path | None:
    """Where the result goes; writing over the input needs --in-place."""
    src = Path(path)
    if in_place:
        if output is not None and os.path.realpath(output) != os.path.realpath(src):
            raise UsageError("--in-place and -o name different files")
        return src if not src.name.endswith(".index.json") else src.parent
    if output is None:
        if dry_run:
            return None
        raise UsageError("normalize needs -o OUT (or --in-place, or --dry-run)")
    same = os.path.realpath(output) == os.path.realpath(src)
    if not same and output.exists() and src.exists():
        try:
            same = os.path.samefile(output, src)
        except OSError:
            same = False
    if same or (src.name.endswith(".index.json") and os.path.realpath(output) == os.path.realpath(src.parent)):
        raise UsageError(f"{visible(str(output))}: is the input; pass --in-place to overwrite it")
    return output


def _normalize(
    path: str, output: Path | None, in_place: bool, dry_run: bool, settings: Any, fmt: str, quiet: bool
) -> int:
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.formats import render
    from lipaudit.normalize import normalize as plan
    from lipaudit.normalize import write_output

    target = _output_path(path, output, in_place, dry_run)
    ckpt = open_checkpoint(path, settings.audit.key, for_writing=True, limits=settings.audit.limits)
    report, edits = plan(ckpt, settings)
    written = False
    if target is not None and not dry_run:
        write_output(ckpt, edits, target)
        written = True
    report = replace(report, output=None if target is None else str(target), written=written)
    to_tty = sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 24)).columns if to_tty else 120
    sys.stdout.write(render(report, fmt, RenderOptions(width=max(width, 80), color=to_tty)))
    sys.stdout.flush()
    if not quiet:
        scaled = sum(c.action == "scaled" for c in report.changes)
        where = f"wrote {visible(str(target))}" if written else "dry run, nothing written"
        click.echo(f"lipaudit: {report.checkpoint.path}: {scaled} layers rescaled, {where}: "
                   f"{'passed' if report.passed else 'FAILED'}", err=True)
    return report.exit_code


def _settings(
    method: str, rtol: float | None, device: str, seed: int, key: str | None, bn_eps: float,
    fail_above: float | None, fail_layer_above: float | None, input_sizes: tuple[tuple[str, tuple[int, ...]], ...],
    limits: Any, jobs: int | None,
) -> Any:
    import torch

    from lipaudit.report import Settings

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return Settings(
        method=method, rtol=rtol if rtol is not None else 1e-4, conv_rtol=rtol if rtol is not None else 1e-2,
        seed=seed, device=device, key=key, bn_eps=bn_eps, fail_above=fail_above,
        fail_layer_above=fail_layer_above, input_sizes=input_sizes, limits=limits,
        jobs=jobs if jobs is not None else max(1, min(8, os.cpu_count() or 1)),
    )


def main() -> None:
    cli(prog_name="lipaudit")
