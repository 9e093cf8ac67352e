"""Command line: parse, call, render, map outcomes to exit codes. Thin; torch is imported only
inside command bodies, so `lipaudit --help` starts at once."""

from __future__ import annotations

import glob
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lipaudit import __version__
from lipaudit.commands.outcome import fail as _fail
from lipaudit.commands.outcome import guarded as _guarded
from lipaudit.commands.outcome import write_report
from lipaudit.errors import LipauditError, UsageError
from lipaudit.formats import FORMAT_NAMES, FORMATS, NORMALIZE_FORMAT_NAMES, RenderOptions
from lipaudit.text import defang, visible
from lipaudit.types import ConvNorm, Method, Mode, Severity

if TYPE_CHECKING:
    from lipaudit.cache import Cache
    from lipaudit.fanout import Shard
    from lipaudit.report import Report
    from lipaudit.settings import NormalizeSettings, Settings

# Files a folder given to inspect is searched for, when it is not itself a checkpoint.
CHECKPOINT_GLOBS = ("*.pt", "*.pth", "*.bin", "*.ckpt", "*.safetensors", "*.pt2", "*.tar")
# A plain progress line on stderr this often when stderr is not a terminal (CI logs).
PLAIN_PROGRESS_S = 10.0


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


class Groups(click.ParamType):  # type: ignore[type-arg]
    """NAME=N: the layer's groups (NAME may be * for every convolution)."""

    name = "NAME=N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        name, sep, n = str(value).rpartition("=")
        if not sep or not name or not n.isdigit() or int(n) < 1:
            self.fail(f"{value!r}: expected NAME=N with N >= 1 (NAME may be *)", param, ctx)
        return (name, int(n))


class Codes(click.ParamType):  # type: ignore[type-arg]
    """LIP003,LIP011: finding codes."""

    name = "CODES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        from lipaudit.findings import RULES

        if isinstance(value, tuple):
            return value
        codes = tuple(c.strip().upper() for c in str(value).split(",") if c.strip())
        unknown = [c for c in codes if c not in RULES]
        if unknown:
            self.fail(f"unknown finding code {', '.join(map(visible, unknown))}", param, ctx)
        return codes


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, markup=False, emoji=False)


def _emit(text: str, fmt: str, output: Path | None) -> None:
    # A line starting with :: is a workflow command to GitHub runners: names must not make one.
    if fmt != "github":
        text = defang(text)
    if output is not None:
        write_report(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _options(output: Path | None) -> RenderOptions:
    import shutil

    to_tty = output is None and sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 24)).columns if to_tty else 120
    return RenderOptions(width=max(width, 80), color=to_tty)


@contextmanager
def _progress(enabled: bool, what: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient bar on a terminal; a plain line every 10 s otherwise (CI logs); nothing with -q."""
    if not enabled:
        yield lambda done, total, name: None
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[layer]}"), console=_stderr_console(), transient=True)
        with bar:
            task = bar.add_task(what, total=None, layer="")
            yield lambda done, total, name: bar.update(task, completed=done, total=total, layer=visible(name, 60))
        return
    state = {"done": 0, "total": 0, "name": ""}
    stop = threading.Event()
    t0 = time.monotonic()

    def ticker() -> None:
        while not stop.wait(PLAIN_PROGRESS_S):
            click.echo(f"lipaudit: {what}: {state['done']}/{state['total']} layers, {time.monotonic() - t0:.0f} s"
                       f"{', at ' + visible(str(state['name']), 60) if state['name'] else ''}", err=True)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        yield lambda done, total, name: state.update(done=done, total=total, name=name)
    finally:
        stop.set()
        thread.join()


def _device(device: str) -> str:
    if device == "cpu":  # no torch needed to say so: a run answered from --cache never imports it
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


def _limits(max_tensors: int | None, max_tensor_bytes: int | None, max_total_bytes: int | None) -> Any:
    from lipaudit.checkpoint.limits import Limits

    limits = Limits()
    if max_tensors is not None:
        limits = replace(limits, tensors=max_tensors)
    if max_tensor_bytes is not None:
        limits = replace(limits, tensor_bytes=max_tensor_bytes)
    if max_total_bytes is not None:
        limits = replace(limits, total_bytes=max_total_bytes)
    return limits


def common_options(f: Any) -> Any:
    """Options both commands share: budgets, jobs, device, key, eps, quiet, debug."""
    for opt in reversed((
        click.option("--key", default=None, help="Entry holding the state dict (e.g. model, ema; '/' for all; "
                     "a name prefix for safetensors)."),
        click.option("--rtol", type=PositiveFloat(), default=None,
                     help="Relative width of the brackets [default: 1e-4 dense, 1e-2 convolutions]."),
        click.option("--bn-eps", type=PositiveFloat(), default=1e-5, show_default=True, help="BatchNorm eps."),
        click.option("--groups", "groups", type=Groups(), multiple=True,
                     help="A convolution's groups, NAME=N (NAME may be * for all; repeatable). The shape does not "
                          "tell it; without it lower ends hold for every grouping."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                     help="Where the float64 linear algebra runs."),
        click.option("--layer-time-budget", type=PositiveFloat(), default=120.0, show_default=True,
                     help="Seconds one layer's search may take; past it a looser, still certified bound stands "
                          "(finding LIP015)."),
        click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
                     help="Layers (or files) measured at once [default: the number of CPUs, at most 8]."),
        click.option("--max-tensors", type=click.IntRange(min=1), default=None,
                     help="Most tensors a checkpoint may hold [default: 1000000]."),
        click.option("--max-tensor-bytes", type=ByteSize(), default=None,
                     help="Budget for one tensor's logical size, numel x itemsize [default: 16G]."),
        click.option("--max-total-bytes", type=ByteSize(), default=None,
                     help="Budget for all tensors' logical sizes [default: 256G]."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks of internal errors."),
    )):
        f = opt(f)
    return f


def _settings(p: dict[str, Any], method: str, **gates: Any) -> Settings:
    from lipaudit.settings import CONV_RTOL, DENSE_RTOL, Settings, default_jobs

    rtol = p["rtol"]
    return Settings(
        method=Method(method), rtol=rtol if rtol is not None else DENSE_RTOL,
        conv_rtol=rtol if rtol is not None else CONV_RTOL, seed=p.get("seed", 0), device=_device(p["device"]),
        key=p["key"], bn_eps=p["bn_eps"], input_sizes=tuple(p.get("input_sizes", ())), groups=tuple(p["groups"]),
        limits=_limits(p["max_tensors"], p["max_tensor_bytes"], p["max_total_bytes"]),
        jobs=p["jobs"] if p["jobs"] is not None else default_jobs(), layer_time_s=p["layer_time_budget"], **gates,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="lipaudit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Audit the Lipschitz constant of PyTorch checkpoints, with proven bounds.

    Defaults come from [tool.lipaudit] in the nearest pyproject.toml and LIPAUDIT_* variables;
    options on the command line win."""
    from lipaudit.config import load_config

    try:
        cfg = load_config()
    except LipauditError as e:
        _fail(e, _format_in(sys.argv[1:]))
    ctx.obj = cfg
    if ctx.default_map is None:  # a caller's own default_map (tests, embedding) stands
        ctx.default_map = {name: cfg.default_map(cmd) for name, cmd in cli.commands.items()}


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--method", type=click.Choice([m.value for m in Method]), default="auto", show_default=True,
              help="Dense layers: exact SVD, or a certified Lanczos/Cholesky bracket to --rtol; auto picks by size.")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="table", show_default=True,
              help="Report format (stdout, or -o).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the report to FILE (after the audit succeeded) instead of stdout.")
@click.option("--fail-above", type=PositiveFloat(allow_zero=True), default=None,
              help="Exit 1 if the network's Lipschitz upper bound exceeds X (or is not certified).")
@click.option("--fail-layer-above", type=PositiveFloat(allow_zero=True), default=None,
              help="Exit 1 if any layer's norm upper bound exceeds X (or is not certified).")
@click.option("--allow-uncertified", is_flag=True,
              help="Let the gates pass on bounds that are not proofs (estimates, uncovered layers, non-chains).")
@click.option("--ignore", type=Codes(), multiple=True, help="Leave out findings with these codes (LIP003,LIP011).")
@click.option("--fail-on", type=click.Choice([s.value for s in (Severity.ERROR, Severity.WARNING)]),
              default="error", show_default=True, help="Lowest finding severity that fails the run (exit 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Lanczos starts.")
@click.option("--graph", "graph_archive", type=click.Path(dir_okay=False), default=None,
              help="A torch.export .pt2 archive of the architecture: bound the state dict over its real graph "
                   "(parameters matched by name).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Graphs: run the network to measure a lower end of its Lipschitz constant.")
@click.option("--measure-seconds", type=PositiveFloat(), default=20.0, show_default=True,
              help="Time for the measured lower end.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reuse results from DIR for files whose contents, lipaudit version and settings are unchanged "
                   "(one hash per file); store new ones there.")
@click.option("--shard", default=None, metavar="I/N",
              help="Audit only the I-th of N parts of the sorted file list (a CI matrix, a Slurm array); "
                   "combine the JSON reports with `lipaudit merge`.")
@click.option("--executor", default="local", show_default=True, metavar="local|dask://HOST:PORT",
              help="Where the files are audited: threads here, or a dask.distributed scheduler (lipaudit[dask]).")
@click.option("--input-size", "input_sizes", type=InputSize(), multiple=True,
              help="Input size of the convolutions (32x32, or layer=32x32; repeatable): adds their exact "
                   "circular-padding norm and a zero-padding bracket at that size.")
@common_options
def inspect(**params: Any) -> None:
    """Report every layer's operator norm as a proven interval and bound the network.

    PATHS are checkpoint files, sharded folders, folders of checkpoints or globs."""
    ctx = click.get_current_context()
    if ctx.obj is not None and len(params["paths"]) == 1:  # [[tool.lipaudit.overrides]] for that path
        params = ctx.obj.params_for(params["paths"][0], ctx)
    _inspect(**params)


def _inspect(paths: tuple[str, ...], method: str, fmt: str, output: Path | None, fail_above: float | None,
             fail_layer_above: float | None, allow_uncertified: bool, ignore: tuple[tuple[str, ...], ...],
             fail_on: str, debug: bool, quiet: bool, graph_archive: str | None, measure: bool,
             measure_seconds: float, cache_dir: Path | None = None, shard: str | None = None,
             executor: str = "local", **p: Any) -> None:

    def run() -> int:
        fan = _fanout_options(cache_dir, shard, executor)
        settings = _settings(
            p, method, fail_above=fail_above, fail_layer_above=fail_layer_above,
            allow_uncertified=allow_uncertified, ignore=tuple(c for group in ignore for c in group),
            fail_on=Severity(fail_on), heatmaps=FORMATS[fmt].heatmaps,
        )
        files = expand_paths(paths)
        _refuse_input_as_output(files, output)
        graph = GraphOptions(graph_archive, measure, measure_seconds)
        if fan.shard is not None:
            return _inspect_many(fan.shard.pick(files), settings, fmt, output, quiet, graph, fan, files)
        if len(files) == 1 and fan.executor == "local":
            return _inspect_one(files[0], settings, fmt, output, quiet, graph, fan)
        return _inspect_many(files, settings, fmt, output, quiet, graph, fan)

    _guarded(run, paths[0] if len(paths) == 1 else None, fmt, debug)


def expand_paths(paths: tuple[str, ...]) -> list[str]:
    """Paths as given, globs expanded, plain folders replaced by the checkpoints inside them."""
    out: list[str] = []
    for raw in paths:
        matches = sorted(glob.glob(raw)) if glob.has_magic(raw) and not os.path.exists(raw) else [raw]
        if not matches:
            raise UsageError(f"{visible(raw)}: no file matches")
        for path in matches:
            if os.path.isdir(path) and not _is_checkpoint_folder(Path(path)):
                inside = sorted({str(f) for g in CHECKPOINT_GLOBS for f in Path(path).glob(g) if f.is_file()})
                if not inside:
                    raise UsageError(
                        f"{visible(path)}: a folder with no checkpoint: lipaudit looks for a safetensors index "
                        "(*.safetensors.index.json, pytorch_model.bin.index.json), one pytorch_model.bin or "
                        f"model.safetensors, or files named {', '.join(CHECKPOINT_GLOBS)}"
                    )
                out.extend(inside)
            else:
                out.append(path)
    return list(dict.fromkeys(out))


def _is_checkpoint_folder(folder: Path) -> bool:
    """A sharded checkpoint (an index) or a model folder with its one weights file."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return any(n.endswith(".index.json") for n in names) or bool(
        names & {"pytorch_model.bin", "model.safetensors"})


def _refuse_input_as_output(files: list[str], output: Path | None) -> None:
    if output is None:
        return
    for f in files:
        if os.path.realpath(output) == os.path.realpath(f) or (output.exists() and _same_file(output, Path(f))):
            raise UsageError(f"{visible(str(output))}: is a checkpoint being audited; -o would overwrite it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _audit_path(path: str, settings: Settings, progress: Callable[[int, int, str], None] | None,
                graph: GraphOptions | None = None) -> Report:
    """A .pt2 archive (or a state dict with --graph) is bounded over its graph; anything else as a chain."""
    from lipaudit.audit import audit
    from lipaudit.bound import strategy
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.checkpoint.pt2 import FORMAT as PT2

    ckpt = open_checkpoint(path, settings.key, limits=settings.limits)
    g = graph or GraphOptions()
    measure = {"measure": g.measure, "measure_seconds": g.measure_seconds}
    if g.archive is not None:
        by = strategy("graph", archive=g.archive, keys=[i.key for i in ckpt.infos], load=ckpt.load,
                      shown=ckpt.path, **measure)
    elif ckpt.format == PT2:
        by = strategy("graph", archive=path, **measure)
    else:
        by = strategy("chain")
    return audit(ckpt, settings, progress, by)


@dataclass(frozen=True)
class GraphOptions:
    archive: str | None = None  # --graph: the exported architecture a state dict is audited on
    measure: bool = True  # run the graph to measure a lower end of the network's constant
    measure_seconds: float = 20.0


@dataclass(frozen=True)
class FanoutOptions:
    cache: Cache | None = None
    shard: Shard | None = None
    executor: str = "local"


def _fanout_options(cache_dir: Path | None, shard: str | None, executor: str) -> FanoutOptions:
    """--cache, --shard, --executor, checked before anything is imported or audited."""
    from lipaudit.cache import Cache
    from lipaudit.executors import check_spec
    from lipaudit.fanout import Shard

    return FanoutOptions(None if cache_dir is None else Cache(cache_dir),
                         None if shard is None else Shard.parse(shard), check_spec(executor))


def _summary(report: Report) -> str:
    from lipaudit.formats import fmt_bound

    net = report.network
    errors = sum(f.severity == "error" for f in report.findings)
    return (f"lipaudit: {visible(report.checkpoint.path)}: {len(report.layers)} layers, network L <= "
            f"{fmt_bound(report)} ({'certified' if net.certified else 'not certified'}), {len(report.findings)} "
            f"findings ({errors} errors): {'passed' if report.passed else 'FAILED'}")


def _inspect_one(path: str, settings: Settings, fmt: str, output: Path | None, quiet: bool,
                 graph: GraphOptions, fan: FanoutOptions | None = None) -> int:
    from lipaudit.formats import render

    with _progress(not quiet, "auditing") as tick:
        if fan is not None and fan.cache is not None:
            from lipaudit.fanout import cached_one, graph_extra

            extra = graph_extra(graph.archive, graph.measure, graph.measure_seconds)
            report = cached_one(path, settings, fan.cache, extra, lambda: _audit_path(path, settings, tick, graph))
        else:
            report = _audit_path(path, settings, tick, graph)
    _emit(render(report, fmt, _options(output)), fmt, output)
    if not quiet:
        click.echo(_summary(report), err=True)
        if fan is not None and fan.cache is not None:
            click.echo(f"lipaudit: {fan.cache.stats.line()}", err=True)
    return report.exit_code


def _inspect_many(files: list[str], settings: Settings, fmt: str, output: Path | None, quiet: bool,
                  graph: GraphOptions, fan: FanoutOptions | None = None, every: list[str] | None = None) -> int:
    """Files in parallel (each with one job); one document, or one output per file; the worst exit code.
    every: with --shard, the whole run's files (this shard's JSON names them, for `lipaudit merge`)."""
    from lipaudit.executors import open_executor
    from lipaudit.fanout import graph_extra, run_files
    from lipaudit.formats import render

    fan = fan or FanoutOptions()
    # as a run over all the files would: one job per file when there are several
    one = replace(settings, jobs=1) if len(every or files) > 1 else settings
    with open_executor(fan.executor, settings.jobs) as pool:
        results = run_files(files, _audit_path, one, graph, pool, fan.cache,
                            lambda: graph_extra(graph.archive, graph.measure, graph.measure_seconds))
    parts: list[str] = []
    for path, r in zip(files, results, strict=True):
        if r.report is None:
            msg = str(r.doc["error"]["message"])
            parts.append(_error_text(fmt, msg, path))
            if not quiet:
                click.echo(f"lipaudit: error: {msg}", err=True)
            continue
        parts.append(render(r.report, fmt, _options(output)))
        if not quiet:
            click.echo(_summary(r.report), err=True)
    if not quiet and fan.cache is not None:
        click.echo(f"lipaudit: {fan.cache.stats.line()}", err=True)
    f = FORMATS[fmt]
    docs = [r.doc for r in results]
    if fan.shard is not None and fmt == "json":
        from lipaudit.fanout import with_shard

        _emit(with_shard(f.render_documents(docs), fan.shard, every or files), fmt, output)
    else:
        _emit(f.render_documents(docs) if f.one_document else "".join(parts), fmt, output)
    return max((r.exit_code for r in results), default=0)


def _error_text(fmt: str, message: str, path: str) -> str:
    if fmt == "github":
        from lipaudit.formats.github import escape_data

        return f"::error title=lipaudit::{escape_data(message)}\n"
    if fmt == "markdown":
        from lipaudit.formats.markdown import md

        return f"### lipaudit: {md(path)}\n\n**error**: {md(message)}\n\n"
    return f"lipaudit: {visible(path)}: error: {message}\n"


@cli.command()
@click.argument("path")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the rescaled checkpoint (a folder for sharded input).")
@click.option("--target", type=PositiveFloat(), default=1.0, show_default=True,
              help="Largest allowed certified norm per covered layer.")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="divide", show_default=True,
              help="divide: every covered layer to the target (layers below it are raised); clip: only layers "
                   "above it.")
@click.option("--conv-norm", type=click.Choice([c.value for c in ConvNorm]), default="operator", show_default=True,
              help="operator: the certified bound; reshape: what torch's spectral_norm divides by (not certified).")
@click.option("--include", multiple=True, help="Only layers whose name or key matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Leave layers whose name or key matches this glob (repeatable).")
@click.option("--bake", is_flag=True, help="Replace spectral-norm parametrized layers by plain weights.")
@click.option("--in-place", is_flag=True, help="Overwrite the input (atomically).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--partial", is_flag=True,
              help="Write even when a covered layer cannot be brought to the target (it is reported, exit 1).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--network-target", type=PositiveFloat(), default=None,
              help="torch.export .pt2 archives: scale the covered layers evenly (in log space) so that the certified "
                   "graph bound of the whole network is at most L.")
@click.option("--format", "fmt", type=click.Choice(NORMALIZE_FORMAT_NAMES), default="table", show_default=True,
              help="Report format.")
@common_options
def normalize(path: str, output: Path | None, target: float, mode: str, conv_norm: str, include: tuple[str, ...],
              exclude: tuple[str, ...], bake: bool, in_place: bool, force: bool, partial: bool, dry_run: bool,
              network_target: float | None, fmt: str, debug: bool, quiet: bool, **p: Any) -> None:
    """Rescale the covered layers so that each certified norm is at most --target."""

    def run() -> int:
        from lipaudit.settings import NormalizeSettings

        if network_target is not None:
            dest = _output_path(path, output, in_place, dry_run, force)
            return _normalize_graph(path, dest, target, mode, network_target, _settings(p, "exact"), in_place,
                                    dry_run, fmt, quiet)

        settings = NormalizeSettings(
            target=target, mode=Mode(mode), conv_norm=ConvNorm(conv_norm), include=include, exclude=exclude,
            bake=bake, partial=partial, audit=_settings(p, "exact"),
        )
        return _normalize(path, _output_path(path, output, in_place, dry_run, force), settings, fmt, quiet)

    _guarded(run, path, fmt, debug)


def _output_path(path: str, output: Path | None, in_place: bool, dry_run: bool, force: bool) -> Path | None:
    """Where the result goes; writing over the input needs --in-place, over another file --force."""
    src = Path(path)
    if in_place:
        if output is not None and os.path.realpath(output) != os.path.realpath(src):
            raise UsageError("--in-place and -o name different files")
        return None if dry_run else (src if not src.name.endswith(".index.json") else src.parent)
    if output is None:
        if dry_run:
            return None
        raise UsageError("normalize needs -o OUT (or --in-place, or --dry-run)")
    same = os.path.realpath(output) == os.path.realpath(src) or (output.exists() and _same_file(output, src))
    if same or (src.name.endswith(".index.json") and os.path.realpath(output) == os.path.realpath(src.parent)):
        raise UsageError(f"{visible(str(output))}: is the input; pass --in-place to overwrite it")
    if output.is_file() and not force:
        raise UsageError(f"{visible(str(output))}: exists; pass --force to replace it")
    return None if dry_run else output


def _normalize(path: str, output: Path | None, settings: NormalizeSettings, fmt: str, quiet: bool) -> int:
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.formats import render
    from lipaudit.normalize import normalize as run

    ckpt = open_checkpoint(path, settings.audit.key, for_writing=True, limits=settings.audit.limits)
    why = ckpt.handle.write_refusal(settings.bake) if output is not None else None
    if why is not None:  # said before the audit, not after it
        raise UsageError(why, path)
    with _progress(not quiet, "normalizing") as tick:
        report = run(ckpt, settings, output, tick)
    _emit(render(report, fmt, _options(None)), fmt, None)
    if not quiet:
        scaled = sum(c.action == "scaled" for c in report.changes)
        raised = sum(c.raised for c in report.changes)
        where = f"wrote {visible(str(output))}" if report.written else "nothing written"
        up = f" ({raised} raised up to the target)" if raised else ""
        click.echo(f"lipaudit: {visible(report.checkpoint.path)}: {scaled} layers rescaled{up}, {where}: "
                   f"{'passed' if report.passed else 'FAILED'}", err=True)
    return report.exit_code


def _normalize_graph(path: str, output: Path | None, target: float, mode: str, network_target: float,
                     settings: Settings, in_place: bool, dry_run: bool, fmt: str, quiet: bool) -> int:
    """--network-target: one factor for every covered weight of a .pt2 archive, from its graph bound."""
    from lipaudit.formats.json_format import dumps
    from lipaudit.graph import GraphSettings
    from lipaudit.graph.normalize import normalize_archive

    result = normalize_archive(path, None if output is None else str(output), target, mode, network_target,
                               GraphSettings.from_settings(settings, measure=False), in_place, dry_run)
    doc = result.to_dict()
    after = result.after if result.after is not None else result.before
    passed = after.certified and after.log10_upper is not None and after.log10_upper <= math.log10(network_target)
    if fmt == "json":
        _emit(dumps({**doc, "passed": bool(passed or dry_run)}), fmt, None)
    else:
        before_up, after_up = result.before.to_dict()["lipschitz_upper"], after.to_dict()["lipschitz_upper"]
        _emit(f"lipaudit normalize {visible(path)}: graph bound {before_up} -> {after_up} "
              f"(target {network_target:g}); {len(result.changes)} layers; "
              f"{'written to ' + visible(str(result.written)) if result.written else 'nothing written'}\n", fmt, None)
    return 0 if passed or dry_run else 1


def _format_in(argv: list[str]) -> str:
    """The --format a command line asked for, read without click (for its own usage errors)."""
    for i, a in enumerate(argv):
        if a == "--format" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--format="):
            return a.split("=", 1)[1]
    return "table"


def _register() -> None:
    from lipaudit.commands.diff import diff
    from lipaudit.commands.merge import merge

    cli.add_command(diff)
    cli.add_command(merge)


_register()


def main() -> None:
    argv = sys.argv[1:]
    try:
        cli.main(args=argv, prog_name="lipaudit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("lipaudit: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        fmt = _format_in(argv)
        if fmt in ("json", "sarif", "github"):
            _fail(UsageError(e.format_message()), fmt)
        e.show()
        sys.exit(UsageError.exit_code)
    sys.exit(0)
