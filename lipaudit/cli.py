"""Command line: parse, call, render, map outcomes to exit codes. Thin; torch is imported only
inside command bodies, so `lipaudit --help` starts at once."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lipaudit import __version__, preflight
from lipaudit.commands.outcome import emit
from lipaudit.commands.outcome import fail as _fail
from lipaudit.commands.outcome import guarded as _guarded
from lipaudit.errors import LipauditError, UsageError
from lipaudit.formats import FORMAT_NAMES, FORMATS, NORMALIZE_FORMAT_NAMES, RenderOptions, terminal_options
from lipaudit.text import visible
from lipaudit.types import ConvNorm, Method, Mode, Severity

if TYPE_CHECKING:
    from lipaudit.cache import Cache
    from lipaudit.fanout import Shard
    from lipaudit.report import Report
    from lipaudit.settings import NormalizeSettings, Settings

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


class WriteSpec(click.ParamType):  # type: ignore[type-arg]
    """FORMAT=FILE: one more output of the same audit."""

    name = "FORMAT=FILE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, Path]:
        if isinstance(value, tuple):
            return value
        fmt, sep, path = str(value).partition("=")
        if not sep or not path or fmt not in FORMATS:
            self.fail(f"{value!r}: expected FORMAT=FILE with FORMAT one of {', '.join(FORMATS)}", param, ctx)
        return (fmt, Path(path))


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


_emit = emit


def _options(output: Path | None, **more: bool) -> RenderOptions:
    return terminal_options(output, **more)


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


def _limits(max_tensors: int | None, max_tensor_bytes: int | None, max_total_bytes: int | None,
            allow_unknown_classes: bool = False) -> Any:
    from lipaudit.checkpoint.limits import Limits

    limits = Limits(allow_unknown_classes=allow_unknown_classes)
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
                     help="Safety net for hostile inputs: seconds one layer may take; past it the layer's bound is "
                          "reported as not certified: time budget (LIP015) and gates on it fail."),
        click.option("--conv-points", type=click.IntRange(min=1), default=None,
                     help="Work limit of one convolution's search, in frequency points; past it a looser, "
                          "still certified bound stands (LIP015), the same on every machine "
                          "[default: 1000000]."),
        click.option("--block-work", type=click.FloatRange(min=0), default=None,
                     help="Work of a graph's block bounds, as a multiple of its layers' own work (from shapes, "
                          "the same on every machine); blocks are bounded cheapest first within it, the others "
                          "by the product [default: 0.1]."),
        click.option("--floor-work", type=click.IntRange(min=0), default=None,
                     help="Graphs: network evaluations for the slope floor, the value no bound that sees "
                          "activations only through their slope ranges goes below (0: not searched) "
                          "[default: 200]."),
        click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
                     help="Layers (or files) measured at once [default: the number of CPUs, at most 8]."),
        click.option("--max-tensors", type=click.IntRange(min=1), default=None,
                     help="Most tensors a checkpoint may hold [default: 1000000]."),
        click.option("--max-tensor-bytes", type=ByteSize(), default=None,
                     help="Budget for one tensor's logical size, numel x itemsize [default: 16G]."),
        click.option("--max-total-bytes", type=ByteSize(), default=None,
                     help="Budget for all tensors' logical sizes [default: 256G]."),
        click.option("--allow-unknown-classes", is_flag=True,
                     help="Read a pickle that builds classes outside the allowlist of data classes, keeping them "
                          "inert (finding LIP030), instead of refusing it (exit 3). Only for files you trust."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks of internal errors."),
    )):
        f = opt(f)
    return f


def revision_option(f: Any) -> Any:
    return click.option("--revision", default=None,
                        help="Hugging Face cache folders (models--ORG--NAME): the branch, tag or commit to read "
                             "[default: main]. Remote hf:// paths are not read (no network).")(f)


def _settings(p: dict[str, Any], method: str, **gates: Any) -> Settings:
    from lipaudit.settings import BLOCK_WORK, CONV_POINTS, CONV_RTOL, DENSE_RTOL, FLOOR_WORK, Settings, default_jobs

    rtol = p["rtol"]
    return Settings(
        method=Method(method), rtol=rtol if rtol is not None else DENSE_RTOL,
        conv_rtol=rtol if rtol is not None else CONV_RTOL, seed=p.get("seed", 0), device=_device(p["device"]),
        key=p["key"], bn_eps=p["bn_eps"], input_sizes=tuple(p.get("input_sizes", ())), groups=tuple(p["groups"]),
        limits=_limits(p["max_tensors"], p["max_tensor_bytes"], p["max_total_bytes"], p["allow_unknown_classes"]),
        jobs=p["jobs"] if p["jobs"] is not None else default_jobs(), layer_time_s=p["layer_time_budget"],
        conv_points=p["conv_points"] or CONV_POINTS,
        block_work=p["block_work"] if p.get("block_work") is not None else BLOCK_WORK,
        floor_work=p["floor_work"] if p.get("floor_work") is not None else FLOOR_WORK, **gates,
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
@click.option("--measure-work", type=click.IntRange(min=1), default=200, show_default=True,
              help="Graphs: network evaluations (forward or backward passes) for the measured lower end; a count, "
                   "not seconds, so the number is the same on any machine.")
@click.option("--model", default=None,
              help="MODULE:CALLABLE building your model (imported from your environment, called with no "
                   "arguments): the checkpoint is loaded into it strictly, exported with torch.export at "
                   "--input-shape, and the network is bounded over its real graph. Runs the code you name.")
@click.option("--input-shape", default=None, help="--model: the input shape to export at, like 1x3x64x64.")
@click.option("--assume", type=click.Choice(["chain"]), default=None,
              help="State dicts: assert the covered layers form a plain chain, so their product is certified "
                   "under that assertion (recorded in the report). Without it, or a graph, it is an estimate.")
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
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Search folders given as PATHS in their subfolders too.")
@click.option("-v", "--verbose", is_flag=True, help="List the assumptions behind the network bound.")
@click.option("--write", type=WriteSpec(), multiple=True,
              help="Also write the report as FORMAT to FILE (markdown=summary.md; repeatable), from the same audit.")
@revision_option
@common_options
def inspect(**params: Any) -> None:
    """Report every layer's operator norm as a proven interval and bound the network.

    PATHS are checkpoint files, sharded folders, folders of checkpoints (searched recursively),
    Hugging Face cache folders (models--ORG--NAME, at refs/main or --revision) or globs."""
    _inspect(click.get_current_context(), **params)


def _inspect(ctx: click.Context, paths: tuple[str, ...], fmt: str, output: Path | None, debug: bool, quiet: bool,
             verbose: bool, recursive: bool, revision: str | None, write: tuple[tuple[str, Path], ...],
             graph_archive: str | None, measure: bool, measure_work: int, cache_dir: Path | None = None,
             shard: str | None = None, executor: str = "local", **p: Any) -> None:

    def run() -> int:
        fan = _fanout_options(cache_dir, shard, executor)
        found = preflight.inputs(paths, recursive, revision)
        read = [*found.files, *([graph_archive] if graph_archive else [])]
        preflight.refuse_output_over_inputs(read, output)
        if graph_archive is not None:
            preflight.exists(graph_archive, "--graph ")
        note = found.passed_over_text()
        if note and not quiet:
            click.echo(f"lipaudit: {note}", err=True)
        for _, extra in write:
            preflight.refuse_output_over_inputs(read, extra)
        outputs: Outputs = [(fmt, output, _options(output, verbose=verbose,
                                                       brief=quiet and FORMATS[fmt].quiet_is_summary))]
        outputs += [(f, extra, RenderOptions(verbose=verbose)) for f, extra in write]
        heatmaps = max(FORMATS[f].heatmaps for f, _, _ in outputs)
        jobs = []
        for f in found.files:
            q = _params_for(ctx, f, p)  # --model and --input-shape may be set per path in the config
            graph = GraphOptions(graph_archive, measure, measure_work,
                                 _model_spec(q.get("model"), q.get("input_shape"), graph_archive), debug)
            jobs.append((f, _inspect_settings(q, heatmaps), graph))
        if fan.shard is not None:
            return _inspect_many(fan.shard.take(jobs), outputs, quiet, fan, jobs)
        if len(jobs) == 1 and fan.executor == "local":
            return _inspect_one(*jobs[0], outputs, quiet, fan)
        return _inspect_many(jobs, outputs, quiet, fan)

    _guarded(run, paths[0] if len(paths) == 1 else None, fmt, debug)


def _params_for(ctx: click.Context, path: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options for one checkpoint: [[tool.lipaudit.overrides]] matched on the file found (not on
    the folder or glob given), under whatever the command line set."""
    from lipaudit.config import keep_command_line_gates

    q = given if ctx.obj is None else {k: v for k, v in ctx.obj.params_for(path, ctx).items() if k in given}
    if "ignore" in q:  # configuration may add gates, never silence one the command line set
        q = {**q, "ignore": keep_command_line_gates(q["ignore"], ctx)}
    return q


def _inspect_settings(q: dict[str, Any], heatmaps: int) -> Settings:
    return _settings(
        q, q["method"], fail_above=q["fail_above"], fail_layer_above=q["fail_layer_above"],
        allow_uncertified=q["allow_uncertified"], ignore=tuple(c for group in q["ignore"] for c in group),
        fail_on=Severity(q["fail_on"]), heatmaps=heatmaps,
        assume=(q["assume"],) if q.get("assume") else (),
    )


def expand_paths(paths: tuple[str, ...]) -> list[str]:
    """Paths as given, globs expanded, folders searched for checkpoints (see preflight.inputs)."""
    return preflight.inputs(paths).files


def _model_spec(model: str | None, input_shape: str | None, graph_archive: str | None) -> Any:
    if model is None:
        if input_shape is not None:
            raise UsageError("--input-shape needs --model")
        return None
    from lipaudit.modelcode import ModelSpec, parse_shape

    if input_shape is None:
        raise UsageError("--model needs --input-shape (the shape to export at, like 1x3x64x64)")
    if graph_archive is not None:
        raise UsageError("--model and --graph both give the architecture; pass one")
    return ModelSpec(model, parse_shape(input_shape))


def _audit_path(path: str, settings: Settings, progress: Callable[[int, int, str], None] | None,
                graph: GraphOptions | None = None) -> Report:
    """A .pt2 archive (or a state dict with --graph or --model) is bounded over its graph; anything
    else as a chain."""
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path, settings.key, limits=settings.limits)
    with _strategy(ckpt, graph or GraphOptions()) as by:
        return audit(ckpt, settings, progress, by)


@contextmanager
def _strategy(ckpt: Any, g: GraphOptions) -> Iterator[Any]:
    from lipaudit.bound import strategy
    from lipaudit.checkpoint.pt2 import FORMAT as PT2

    measure = {"measure": g.measure, "measure_work": g.measure_work}
    if g.model is not None:
        from lipaudit.modelcode import exported

        with exported(g.model, ckpt, g.debug) as archive:
            yield strategy("graph", archive=str(archive), keys=[i.key for i in ckpt.infos], load=ckpt.load,
                           shown=ckpt.path, source=g.model.to_dict(), **measure)
    elif g.archive is not None:
        yield strategy("graph", archive=g.archive, keys=[i.key for i in ckpt.infos], load=ckpt.load,
                       shown=ckpt.path, **measure)
    elif ckpt.format == PT2:
        yield strategy("graph", arch=getattr(ckpt.handle, "arch", None), archive=ckpt.path, **measure)
    else:
        yield strategy("chain")


@dataclass(frozen=True)
class GraphOptions:
    archive: str | None = None  # --graph: the exported architecture a state dict is audited on
    measure: bool = True  # run the graph to measure a lower end of the network's constant
    measure_work: int = 200
    model: Any = None  # --model: a lipaudit.modelcode.ModelSpec
    debug: bool = False  # errors from the user's --model code keep their traceback


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


Outputs = list[tuple[str, Path | None, RenderOptions]]  # (format, -o or --write file or stdout, options)
Job = tuple[str, "Settings", GraphOptions]  # (path, its settings, its graph options)


def _inspect_one(path: str, settings: Settings, graph: GraphOptions, outputs: Outputs, quiet: bool,
                 fan: FanoutOptions | None = None) -> int:
    from lipaudit.formats import render, summary_line

    cache = None if fan is None else fan.cache
    with _progress(not quiet, "auditing") as tick:
        if cache is not None:
            from lipaudit.fanout import cached_one

            report = cached_one(path, settings, graph, cache, lambda: _audit_path(path, settings, tick, graph))
        else:
            report = _audit_path(path, settings, tick, graph)
    for fmt, output, options in outputs:
        _emit(render(report, fmt, options), fmt, output)
    if not quiet:
        click.echo(f"lipaudit: {summary_line(report)}", err=True)
        if cache is not None:
            click.echo(f"lipaudit: {cache.stats.line()}", err=True)
    return report.exit_code


def _inspect_many(jobs: list[Job], outputs: Outputs, quiet: bool, fan: FanoutOptions | None = None,
                  every: list[Job] | None = None) -> int:
    """Files in parallel (each with one job) through the cache and the executor; one document, or
    one output per file; the worst exit code. every: with --shard, the whole run's jobs (this
    shard's JSON names their files, for `lipaudit merge`)."""
    from lipaudit.executors import open_executor
    from lipaudit.fanout import combined, outcome_line, run_files, verdict, with_shard

    fan = fan or FanoutOptions()
    whole = jobs if every is None else every
    if len(whole) > 1:  # as a run over all the files would: one job per file when there are several
        jobs = [(path, replace(settings, jobs=1), graph) for path, settings, graph in jobs]
    with open_executor(fan.executor, whole[0][1].jobs if whole else 1) as pool:
        results = run_files(jobs, _audit_path, pool, fan.cache)
    if not quiet:
        for r in results:
            click.echo(f"lipaudit: {outcome_line(r)}", err=True)
        if fan.cache is not None:
            click.echo(f"lipaudit: {fan.cache.stats.line()}", err=True)
    said = verdict(results)
    paths = [path for path, _, _ in jobs]
    for fmt, output, options in outputs:
        text = combined(paths, results, fmt, options)
        if fan.shard is not None and fmt == "json":
            text = with_shard(text, fan.shard, [path for path, _, _ in whole])
        if options.brief:  # --quiet tables: the summary lines are the report
            text += said + "\n"
        _emit(text, fmt, output)
    if not quiet:
        click.echo(f"lipaudit: {said}", err=True)
    return max((r.exit_code for r in results), default=0)


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
              help="Graphs (.pt2, or --model): scale every conv/linear weight by one factor so that the certified "
                   "graph bound of the whole network is at most L; the result is measured again before writing.")
@click.option("--model", default=None,
              help="MODULE:CALLABLE building your model, as for inspect (runs the code you name).")
@click.option("--input-shape", default=None, help="--model: the input shape to export at, like 1x3x64x64.")
@click.option("--format", "fmt", type=click.Choice(NORMALIZE_FORMAT_NAMES), default="table", show_default=True,
              help="Report format.")
@revision_option
@common_options
def normalize(path: str, output: Path | None, target: float, mode: str, conv_norm: str, include: tuple[str, ...],
              exclude: tuple[str, ...], bake: bool, in_place: bool, force: bool, partial: bool, dry_run: bool,
              network_target: float | None, fmt: str, debug: bool, quiet: bool, revision: str | None,
              model: str | None = None, input_shape: str | None = None, **p: Any) -> None:
    """Rescale the covered layers so that each certified norm is at most --target."""

    def run() -> int:
        from lipaudit.settings import NormalizeSettings

        src = preflight.one_input(path, revision)
        dest = preflight.normalize_target(src, output, in_place, dry_run, force)
        if not dry_run:
            preflight.writable(src)
        settings = NormalizeSettings(
            target=target, mode=Mode(mode), conv_norm=ConvNorm(conv_norm), include=include, exclude=exclude,
            bake=bake, partial=partial, audit=_settings(p, "exact"), network_target=network_target,
        )
        graph = GraphOptions(measure=False, model=_model_spec(model, input_shape, None), debug=debug)
        return _normalize(src, dest, settings, fmt, quiet, graph)

    _guarded(run, path, fmt, debug)


def _normalize(path: str, output: Path | None, settings: NormalizeSettings, fmt: str, quiet: bool,
               graph: GraphOptions) -> int:
    from lipaudit.bound.chain import Chain
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.formats import plural, render, verdict_text
    from lipaudit.normalize import normalize as run

    ckpt = open_checkpoint(path, settings.audit.key, for_writing=True, limits=settings.audit.limits)
    why = ckpt.handle.write_refusal(settings.bake) if output is not None else None
    if why is not None:  # said before the audit, not after it
        raise UsageError(why, path)
    with _progress(not quiet, "normalizing") as tick, _strategy(ckpt, graph) as by:
        # per layer, the network bound shown is the chain product unless the graph is asked for
        chosen = by if settings.network_target is not None or graph.model is not None else Chain()
        report = run(ckpt, settings, output, tick, chosen)
    _emit(render(report, fmt, _options(None)), fmt, None)
    if not quiet:
        scaled = sum(c.action == "scaled" for c in report.changes)
        raised = sum(c.raised for c in report.changes)
        where = f"wrote {visible(str(output))}" if report.written else "nothing written"
        up = f" ({raised} raised up to the target)" if raised else ""
        click.echo(f"lipaudit: {visible(report.checkpoint.path)}: {plural(scaled, 'layer')} rescaled{up}, {where}: "
                   f"{verdict_text(report)}", err=True)
    return report.exit_code


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
