"""Many checkpoints: shards of the file list, the result cache, and an executor, in one place.

A run over files is: take this shard's part of the sorted list, answer what the cache holds,
send the rest to the executor, store what comes back. Each file's result is an Outcome: the JSON
document a single run writes for it (a report or an error document) and, for a report, the
Report the text formats render."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lipaudit import __version__
from lipaudit.errors import LipauditError, UsageError
from lipaudit.text import visible

if TYPE_CHECKING:
    from lipaudit.cache import Cache
    from lipaudit.executors import Executor
    from lipaudit.report import Report
    from lipaudit.settings import Settings

AuditFn = Callable[..., "Report"]
# (path, its settings, its graph options): each file of a run carries its own, as the
# configuration's overrides are matched per file found
Job = tuple[str, "Settings", Any]
J = TypeVar("J", bound=tuple[Any, ...])


@dataclass(frozen=True)
class Shard:
    """--shard I/N: this run audits the I-th of N parts (1-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        i, sep, n = text.partition("/")
        if not sep or not i.isdigit() or not n.isdigit() or not 1 <= int(i) <= int(n):
            raise UsageError(f"--shard {visible(text)}: expected I/N with 1 <= I <= N (e.g. 2/8)")
        return cls(int(i), int(n))

    def pick(self, files: list[str]) -> list[str]:
        """The files of this shard: every N-th of the sorted list, starting at the I-th. Sorting
        makes the split the same on every machine whatever order the paths were given in; taking
        every N-th spreads neighbours (epochs of one run, shards of one size) over the parts."""
        ordered = sorted(files)
        mine = set(ordered[self.index - 1:: self.count])
        return [f for f in files if f in mine]  # in the run's own order

    def take(self, jobs: list[J]) -> list[J]:
        """The jobs (path first) of this shard, split as pick splits their paths."""
        mine = set(self.pick([j[0] for j in jobs]))
        return [j for j in jobs if j[0] in mine]

    def to_dict(self, files: list[str]) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "files": list(files)}


@dataclass(frozen=True)
class Outcome:
    doc: dict[str, Any]  # the report document, or an error document
    report: Report | None  # None for an error

    @property
    def exit_code(self) -> int:
        if self.report is not None:
            return self.report.exit_code
        return int(self.doc["error"]["exit_code"])

    @property
    def error(self) -> dict[str, Any] | None:
        err: dict[str, Any] | None = self.doc.get("error")
        return err


def failed(e: LipauditError, path: str) -> Outcome:
    from lipaudit.report import error_document

    return Outcome(error_document(__version__, e.code, e.exit_code, visible(e.message, 1000), path), None)


def audit_one(job: Job, *, audit: AuditFn, cwd: str) -> Outcome:
    """One file, where the executor runs it. Module-level and keyword-bound, so that Dask can
    pickle it by reference; errors come back as data (an exception may not unpickle)."""
    import torch

    path, settings, graph = job

    from lipaudit.commands.outcome import internal

    # Several files run side by side (one job each), so each gets one intra-op thread: the thread
    # count decides the order of float sums in BLAS and LAPACK, and fixed, a Dask worker writes the
    # same bits as a local run (on the same kind of CPU). Locally run_files has pinned it already;
    # a worker process is pinned here. A lone file keeps the process's threads, as a plain run does.
    if settings.jobs == 1 and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    if not os.path.isabs(path) and os.path.realpath(os.getcwd()) != os.path.realpath(cwd):
        return failed(UsageError(f"{visible(path)}: a relative path, and this worker runs in another folder "
                                 f"({visible(os.getcwd())}); pass absolute paths", path), path)
    try:
        report = audit(path, settings, None, graph)
    except LipauditError as e:
        return failed(e, path)
    except Exception as e:
        return failed(internal(e, path), path)
    return Outcome(report.to_dict(), report)


def run_files(jobs: list[Job], audit: AuditFn, executor: Executor, cache: Cache | None) -> list[Outcome]:
    """Every file's outcome, in the order of jobs: cache hits first (each file keyed by its own
    settings), the rest through executor."""
    from functools import partial

    out: dict[int, Outcome] = {}
    keys: dict[int, str] = {}
    if cache is not None:
        extras: dict[Any, dict[str, Any] | None] = {}  # one hash of a --graph archive per run
        for i, (path, settings, graph) in enumerate(jobs):
            if graph not in extras:
                extras[graph] = graph_extra(graph)
            more = extras[graph]
            if more is None:  # not cacheable
                continue
            try:
                keys[i] = cache.key(path, settings, more)
            except OSError:  # unreadable: the audit reports it properly
                continue
            hit = cache.get(keys[i], settings)
            if hit is not None:
                out[i] = Outcome(hit.doc, hit.report)
    todo = [i for i in range(len(jobs)) if i not in out]
    job = partial(audit_one, audit=audit, cwd=os.getcwd())
    done: list[Outcome] = []
    if todo:  # a run answered from the cache never imports torch
        from lipaudit.pool import single_threaded

        with single_threaded():  # see audit_one: the thread count decides the bits
            done = executor.map(job, [jobs[i] for i in todo])
    for i, got in zip(todo, done, strict=True):
        path = jobs[i][0]
        if got.report is not None and got.report.tool_version != __version__:
            got = failed(UsageError(f"a worker runs lipaudit {visible(got.report.tool_version)}, this process "
                                    f"{__version__}; install the same version everywhere", path), path)
        out[i] = got
        if cache is not None and got.report is not None and i in keys:
            cache.put(keys[i], got.doc, got.report)
    return [out[i] for i in range(len(jobs))]


def cached_one(path: str, settings: Settings, graph: Any, cache: Cache, compute: Callable[[], Report]) -> Report:
    """One file through the cache, computed here (with its progress bar) on a miss."""
    more = graph_extra(graph)
    key: str | None = None
    if more is not None:
        try:
            key = cache.key(path, settings, more)
        except OSError:
            key = None
    if key is not None:
        hit = cache.get(key, settings)
        if hit is not None:
            return hit.report
    report = compute()
    if key is not None:
        cache.put(key, report.to_dict(), report)
    return report


def graph_extra(graph: Any) -> dict[str, Any] | None:
    """What else changes a report besides the checkpoint and Settings: the --graph archive and the
    measuring options. None for a file audited through --model: the report depends on the user's
    code, which no key sees, so it is never cached."""
    from lipaudit.cache import file_sha256

    if graph is None:
        return {}
    if getattr(graph, "model", None) is not None:
        return None
    sha = None
    if graph.archive is not None:
        try:
            sha = file_sha256(Path(graph.archive))
        except OSError:
            sha = "unreadable"
    return {"graph": graph.archive, "graph_sha256": sha, "measure": graph.measure,
            "measure_work": graph.measure_work}


def outcomes_of(docs: list[dict[str, Any]]) -> list[Outcome]:
    """Reports and error documents read back (from shards), as the run that wrote them had them."""
    from lipaudit.errors import MalformedInputError
    from lipaudit.report_load import BadDocument, report_from_dict

    out = []
    for doc in docs:
        if doc.get("error") is not None:
            out.append(Outcome(doc, None))
            continue
        try:
            out.append(Outcome(doc, report_from_dict(doc)))
        except BadDocument as e:
            path = str(doc.get("checkpoint", {}).get("path", "?"))
            raise MalformedInputError(f"{visible(path)}: a report that does not read back ({e})", path) from None
    return out


def outcome_line(outcome: Outcome) -> str:
    """The line a file gets on stderr: its summary line, or its error."""
    from lipaudit.formats import summary_line

    if outcome.report is not None:
        return summary_line(outcome.report)
    return f"error: {(outcome.error or {}).get('message', '')}"


def verdict(outcomes: list[Outcome]) -> str:
    """The run's verdict over its files: how many errors in how many files, or that all passed. An
    error document (a file that could not be audited) counts as one error."""
    from lipaudit.formats import failing, plural

    errors = failed_files = 0
    for o in outcomes:
        if o.report is None:
            errors += 1
            failed_files += 1
        elif not o.report.passed:
            errors += len(failing(o.report))
            failed_files += 1
    if failed_files:
        return f"Found {plural(errors, 'error')} in {plural(failed_files, 'file')} (of {len(outcomes)} audited)"
    return f"All {len(outcomes)} files passed"


def combined(paths: list[str], outcomes: list[Outcome], fmt: str, options: Any) -> str:
    """Several reports in one format: one document (json, sarif, html), or one part per file with
    the assumptions once at the end."""
    from dataclasses import replace

    from lipaudit.formats import FORMATS, render

    f = FORMATS[fmt]
    if f.one_document:
        return f.render_documents([o.doc for o in outcomes])
    each = replace(options, assumptions=False)
    parts: list[str] = []
    assumptions: list[str] = []
    for path, o in zip(paths, outcomes, strict=True):
        if o.report is None:
            parts.append(f.error_text(str((o.error or {}).get("message", "")), path))
            continue
        parts.append(render(o.report, fmt, each))
        assumptions += [a for a in o.report.network.assumptions if a not in assumptions]
    return "".join(parts) + ("" if options.brief else f.render_assumptions(assumptions, options))


def with_shard(text: str, shard: Shard, files: list[str]) -> str:
    """A several-paths JSON document with the shard it covers, for `lipaudit merge`."""
    import json

    from lipaudit.formats.json_format import dumps

    return dumps({**json.loads(text), "shard": shard.to_dict(files)})
