"""Many checkpoints: shards of the file list, the result cache, and an executor, in one place.

A run over files is: take this shard's part of the sorted list, answer what the cache holds,
send the rest to the executor, store what comes back. Each file's result is an Outcome: the JSON
document a single run writes for it (a report or an error document) and, for a report, the
Report the text formats render."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipaudit import __version__
from lipaudit.errors import LipauditError, UsageError
from lipaudit.text import visible

if TYPE_CHECKING:
    from lipaudit.cache import Cache
    from lipaudit.executors import Executor
    from lipaudit.report import Report
    from lipaudit.settings import Settings

AuditFn = Callable[..., "Report"]


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


def audit_one(path: str, *, audit: AuditFn, settings: Settings, graph: Any, cwd: str) -> Outcome:
    """One file, where the executor runs it. Module-level and keyword-bound, so that Dask can
    pickle it by reference; errors come back as data (an exception may not unpickle)."""
    import torch

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


def run_files(files: list[str], audit: AuditFn, settings: Settings, graph: Any, executor: Executor,
              cache: Cache | None, extra: Callable[[], dict[str, Any]]) -> list[Outcome]:
    """Every file's outcome, in the order of files: cache hits first, the rest through executor."""
    from functools import partial

    out: dict[int, Outcome] = {}
    keys: dict[int, str] = {}
    if cache is not None:
        more = extra()
        for i, path in enumerate(files):
            try:
                keys[i] = cache.key(path, settings, more)
            except OSError:  # unreadable: the audit reports it properly
                continue
            hit = cache.get(keys[i], settings)
            if hit is not None:
                out[i] = Outcome(hit.doc, hit.report)
    todo = [i for i in range(len(files)) if i not in out]
    job = partial(audit_one, audit=audit, settings=settings, graph=graph, cwd=os.getcwd())
    with _one_thread(bool(todo) and settings.jobs == 1):
        done = executor.map(job, [files[i] for i in todo])
    for i, got in zip(todo, done, strict=True):
        if got.report is not None and got.report.tool_version != __version__:
            got = failed(UsageError(f"a worker runs lipaudit {visible(got.report.tool_version)}, this process "
                                    f"{__version__}; install the same version everywhere", files[i]), files[i])
        out[i] = got
        if cache is not None and got.report is not None and i in keys:
            cache.put(keys[i], got.doc, got.report)
    return [out[i] for i in range(len(files))]


@contextmanager
def _one_thread(pin: bool) -> Iterator[None]:
    """One intra-op thread in this process while files run side by side (see audit_one), and the
    caller's count back afterwards, for callers that embed lipaudit."""
    if not pin:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cached_one(path: str, settings: Settings, cache: Cache, extra: dict[str, Any],
               compute: Callable[[], Report]) -> Report:
    """One file through the cache, computed here (with its progress bar) on a miss."""
    try:
        key: str | None = cache.key(path, settings, extra)
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


def graph_extra(archive: str | None, measure: bool, measure_seconds: float) -> dict[str, Any]:
    """What else changes a report besides the checkpoint and Settings: the --graph archive and
    the measuring options."""
    from lipaudit.cache import file_sha256

    sha = None
    if archive is not None:
        try:
            sha = file_sha256(Path(archive))
        except OSError:
            sha = "unreadable"
    return {"graph": archive, "graph_sha256": sha, "measure": measure, "measure_seconds": measure_seconds}


def with_shard(text: str, shard: Shard, files: list[str]) -> str:
    """A several-paths JSON document with the shard it covers, for `lipaudit merge`."""
    import json

    from lipaudit.formats.json_format import dumps

    return dumps({**json.loads(text), "shard": shard.to_dict(files)})
