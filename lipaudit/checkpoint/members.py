"""Which files on disk belong to a checkpoint, so that no output lands on one of them."""

from __future__ import annotations

import os
from pathlib import Path

from lipaudit.errors import UsageError
from lipaudit.text import visible


def owned_files(path: Path) -> list[Path]:
    """The file itself; for a folder or a shard index, the folder and every file in it (shards,
    index, configuration): all of it is the checkpoint a report must not replace."""
    if path.is_dir():
        folder = path
    elif path.name.endswith(".index.json"):
        folder = path.parent
    else:
        return [path]
    try:
        inside = [p for p in folder.iterdir() if not p.is_dir()]
    except OSError:
        inside = []
    return [path, folder, *inside]


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def refuse_output_onto(inputs: list[str], output: Path) -> None:
    """UsageError (exit 2) when output is, or links to, a file of a checkpoint being read."""
    for raw in inputs:
        for f in owned_files(Path(raw)):
            if _same(output, f):
                raise UsageError(
                    f"{visible(str(output))}: belongs to the checkpoint {visible(raw)} being read; "
                    "the output would overwrite it"
                )
