"""A content-addressed cache of audit results (--cache DIR).

An entry's key is the SHA-256 of: every file the checkpoint path reads (each file's own SHA-256,
size and place), the path as given (the report names it), the lipaudit version, the report schema
version, and every setting that can change the report -- all of Settings.to_dict() except `jobs`,
which only decides how many layers are measured at once. So an unchanged file costs one hash.

Entries are written atomically (a temporary file renamed into place) and never trusted as read:
an entry is used only when its key matches, it passes the report schema (when jsonschema is
installed), its digest matches and it converts to a Report that writes the very same document
back. Anything else is ignored and replaced by a fresh audit."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lipaudit import __version__
from lipaudit.errors import UsageError
from lipaudit.report import SCHEMA_VERSION, Report
from lipaudit.report_load import BadDocument, report_from_dict
from lipaudit.settings import Settings
from lipaudit.text import visible

ENTRY_VERSION = 1
CHUNK = 1 << 20
# Results that depended on the clock are not stored: a later run may do better.
CLOCK_CODES = ("LIP015",)
# Larger entries are not ours (a report is kilobytes to a few megabytes).
MAX_ENTRY_BYTES = 256 * 2**20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_of(path: Path) -> Iterator[tuple[str, Path]]:
    """Every regular file a checkpoint path can read, with its place relative to the path.

    A folder is walked whole (symlinks to files followed, as Hugging Face caches use them): a
    superset of what any format reads, so no change the audit could see escapes the key. An index
    file given alone (*.index.json) reads its shards beside it: its folder is walked too."""
    if not path.is_dir():
        yield "", path
        if not path.name.endswith(".index.json"):
            return
        path = path.parent
    for root, dirs, names in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            p = Path(root, name)
            if p.is_file():
                yield str(p.relative_to(path)), p


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    ignored: int = 0  # entries present but not valid
    stored: int = 0

    def line(self) -> str:
        bad = f", {self.ignored} invalid entries ignored" if self.ignored else ""
        return f"cache: {self.hits} hits, {self.misses} misses, {self.stored} stored{bad}"


@dataclass(frozen=True)
class Entry:
    """What the cache hands back: the document as stored, and the Report it converts to."""

    doc: dict[str, Any]
    report: Report


class Cache:
    def __init__(self, folder: Path) -> None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--cache {visible(str(folder))}: not a folder")
        self.folder = folder
        self.stats = Stats()

    def key(self, path: str, settings: Settings, extra: dict[str, Any] | None = None) -> str:
        """The entry's key; extra carries what else changes the report (a --graph archive's hash,
        the measuring options)."""
        files = [[rel, p.stat().st_size, file_sha256(p)] for rel, p in _files_of(Path(path))]
        numbers = settings.to_dict()
        del numbers["jobs"]
        material = {
            "entry": ENTRY_VERSION, "schema": SCHEMA_VERSION, "lipaudit": __version__, "path": path,
            "files": files, "settings": numbers, "heatmaps": settings.heatmaps, "extra": extra or {},
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.folder / f"v{ENTRY_VERSION}" / key[:2] / f"{key}.json"

    def get(self, key: str, settings: Settings) -> Entry | None:
        """The stored result for key, as the current run would report it (its own `jobs`)."""
        f = self._file(key)
        try:
            if f.stat().st_size > MAX_ENTRY_BYTES:
                raise BadDocument("too large")
            entry = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or entry.get("key") != key or entry.get("entry") != ENTRY_VERSION:
                raise BadDocument("not this key's entry")
            doc, labels, maps = entry.get("report"), entry.get("labels"), entry.get("heatmaps")
            if not isinstance(doc, dict) or not isinstance(labels, list) or not isinstance(maps, dict):
                raise BadDocument("missing parts")
            if not all(isinstance(x, str) for x in labels):
                raise BadDocument("labels are not strings")
            if entry.get("digest") != _digest(doc, labels):
                raise BadDocument("contents do not match their digest")
            _check_schema(doc)
            report = report_from_dict(doc, labels, maps, settings.heatmaps)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # BadDocument is a ValueError
            self.stats.ignored += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        report = replace(report, settings=replace(report.settings, jobs=settings.jobs))
        return Entry(report.to_dict(), report)

    def put(self, key: str, doc: dict[str, Any], report: Report) -> None:
        """Store a fresh result, atomically; results that hit a time budget are not stored. A cache
        that cannot be written costs the speed-up, never the audit."""
        if any(f.code in CLOCK_CODES for f in report.findings):
            return
        labels = [x.label for x in report.layers]
        entry = {
            "entry": ENTRY_VERSION, "key": key, "report": doc, "labels": labels, "digest": _digest(doc, labels),
            "heatmaps": {k: _as_list(v) for k, v in report.heatmaps.items()},
        }
        target = self._file(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".entry.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(entry, out, allow_nan=True)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        self.stats.stored += 1


def _digest(doc: dict[str, Any], labels: list[str]) -> str:
    """Catches an entry edited or damaged after writing (a truncated copy, a flipped number that
    still parses); the folder itself is trusted as much as the checkpoints are."""
    return hashlib.sha256(json.dumps([doc, labels], sort_keys=True, allow_nan=False).encode()).hexdigest()


def _as_list(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _check_schema(doc: dict[str, Any]) -> None:
    """The report schema, where jsonschema is installed (the [test] and [dev] extras bring it);
    without it the strict conversion in report_from_dict is the check."""
    validator = _validator()
    if validator is None:
        return
    error = next(iter(validator.iter_errors(doc)), None)
    if error is not None:
        raise BadDocument(f"schema: {error.message[:200]}")


@functools.cache
def _validator() -> Any:
    """Built once per process: compiling the schema costs more than checking an entry."""
    try:
        import jsonschema
    except ImportError:
        return None
    from lipaudit.report import schema

    return jsonschema.Draft202012Validator(schema("inspect"))
