"""Hugging Face cache roots: `models--org--name/` with `refs/<branch>` naming a folder of `snapshots/`.

No torch and no network: the CLI resolves a root before anything heavy is imported, and a
remote `hf://org/name` is refused (lipaudit reads local files only).
"""

from __future__ import annotations

import re
from pathlib import Path

from lipaudit.errors import UsageError
from lipaudit.text import visible

DEFAULT_REVISION = "main"
# A commit hash or a ref name as the cache stores them; never a path that leaves the root.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
REMOTE = ("hf://", "hf:")


def is_root(path: Path) -> bool:
    """models--org--name with snapshots/ (refs/ is absent when only a commit was fetched)."""
    return path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()


def refuse_remote(raw: str) -> None:
    if raw.startswith(REMOTE):
        raise UsageError(
            f"{visible(raw, 200)}: remote Hugging Face paths are out of scope (lipaudit reads local files and "
            "never uses the network); download first (huggingface-cli download ORG/NAME) and pass the cache "
            "folder models--ORG--NAME or one of its snapshots", raw,
        )


def snapshot(root: Path, revision: str | None, shown: str) -> Path:
    """The snapshot folder revision names: refs/<revision> holds a commit, or revision is one."""
    rev = revision or DEFAULT_REVISION
    if not _REVISION.fullmatch(rev) or ".." in rev:
        raise UsageError(f"--revision {visible(rev, 80)!r}: not a branch, tag or commit name", shown)
    ref = root / "refs" / rev
    commit = rev
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as e:
            raise UsageError(f"{shown}: cannot read refs/{rev} ({e.strerror or e})", shown) from None
        if not _REVISION.fullmatch(commit):
            raise UsageError(f"{shown}: refs/{visible(rev, 80)} does not hold a commit hash", shown)
    folder = root / "snapshots" / commit
    if folder.is_dir():
        return folder
    refs = sorted(p.name for p in (root / "refs").glob("*") if p.is_file()) if (root / "refs").is_dir() else []
    snaps = sorted(p.name[:12] for p in (root / "snapshots").iterdir() if p.is_dir())
    raise UsageError(
        f"{shown}: no snapshot for revision {visible(rev, 80)!r} (refs: {', '.join(refs) or 'none'}; snapshots: "
        f"{', '.join(snaps) or 'none'}); pass --revision", shown,
    )
