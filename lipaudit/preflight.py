"""Usage errors found before torch is imported or anything is audited.

Wrong paths, a missing or clashing -o, --in-place through a link, a layout normalize cannot
write: each costs the user a full torch start-up and an audit when found late. Everything here
reads names and a few bytes only; the command bodies call it first.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from lipaudit.checkpoint import hf
from lipaudit.errors import OutputError, UsageError
from lipaudit.text import visible

# Files a folder given to inspect is searched for, when it is not itself a checkpoint.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".tar")
# A folder holding one of these (or a *.index.json) is one checkpoint, not a folder of them.
MODEL_FILES = frozenset({"pytorch_model.bin", "model.safetensors"})
# Layouts normalize cannot write yet, with the reason; a layout that becomes writable drops its entry.
# (.bin shards became writable with the zip-record patching of checkpoint/zip_patch.py.)
UNWRITABLE: dict[str, str] = {}


@dataclass
class Found:
    """What the paths named: checkpoints to audit, and what a folder search passed over (and why)."""

    files: list[str] = field(default_factory=list)
    passed_over: list[tuple[str, str]] = field(default_factory=list)
    revision_used: bool = False

    def passed_over_text(self, limit: int = 8) -> str | None:
        """One line naming what was not audited, grouped by reason; None if nothing was."""
        if not self.passed_over:
            return None
        by: dict[str, list[str]] = {}
        for path, why in self.passed_over:
            by.setdefault(why, []).append(path)
        parts = []
        for why, paths in by.items():
            shown = ", ".join(visible(p, 120) for p in paths[:limit])
            more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
            parts.append(f"{why}: {shown}{more}")
        n = len(self.passed_over)
        return f"passed over {n} {'entry' if n == 1 else 'entries'} ({'; '.join(parts)})"


def is_checkpoint_folder(folder: Path) -> bool:
    """A sharded checkpoint (an index) or a model folder with its one weights file."""
    try:
        names = {e.name for e in os.scandir(folder)}
    except OSError:
        return False
    return any(n.endswith(".index.json") for n in names) or bool(names & MODEL_FILES)


def inputs(paths: tuple[str, ...] | list[str], recursive: bool = True, revision: str | None = None) -> Found:
    """Paths as given, globs expanded, Hugging Face roots resolved to a snapshot, and plain
    folders searched (recursively unless told not to) for checkpoints."""
    found = Found()
    for raw in paths:
        hf.refuse_remote(raw)
        matches = sorted(glob.glob(raw)) if glob.has_magic(raw) and not os.path.exists(raw) else [raw]
        if not matches:
            raise UsageError(f"{visible(raw)}: no file matches", raw)
        for path in matches:
            _add(Path(path), path, found, recursive, revision, top=True)
    if revision is not None and not found.revision_used:
        raise UsageError("--revision applies to Hugging Face cache folders (models--ORG--NAME), and none was given")
    found.files = list(dict.fromkeys(found.files))
    return found


def _add(p: Path, shown: str, found: Found, recursive: bool, revision: str | None, top: bool) -> None:
    if not os.path.lexists(p):
        raise UsageError(f"{visible(shown)}: no such file or folder", shown)
    if not p.is_dir():
        if top:
            found.files.append(shown)
        elif p.name.endswith(CHECKPOINT_SUFFIXES) and p.is_file():
            found.files.append(shown)
        else:
            found.passed_over.append((shown, f"not named {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}"))
        return
    if hf.is_root(p):
        snap = hf.snapshot(p, revision, visible(shown))
        found.revision_used = True
        _add(snap, str(Path(shown) / "snapshots" / snap.name), found, recursive, None, top=True)
        return
    if is_checkpoint_folder(p):
        found.files.append(shown)
        return
    if not top and not recursive:
        found.passed_over.append((shown, "a folder (--no-recursive)"))
        return
    before = len(found.files)
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError as err:
        raise UsageError(f"{visible(shown)}: cannot list the folder ({err.strerror or err})", shown) from None
    for entry in entries:
        child = os.path.join(shown, entry.name)
        if entry.name.startswith("."):
            found.passed_over.append((child, "hidden"))
        elif entry.is_dir(follow_symlinks=False) or (entry.is_dir() and hf.is_root(Path(entry.path))):
            _add(Path(entry.path), child, found, recursive, revision, top=False)
        elif entry.is_dir():
            found.passed_over.append((child, "a link to a folder (not followed)"))
        else:
            _add(Path(entry.path), child, found, recursive, revision, top=False)
    if top and len(found.files) == before:
        raise UsageError(
            f"{visible(shown)}: a folder with no checkpoint{'' if recursive else ' at its top level'}: lipaudit "
            "looks for a safetensors index (*.safetensors.index.json, pytorch_model.bin.index.json), one "
            f"pytorch_model.bin or model.safetensors, or files named {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}"
            + (f"; {found.passed_over_text()}" if found.passed_over else ""), shown,
        )


def _same(a: str | Path, b: str | Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_output_over_inputs(files: list[str], output: Path | None) -> None:
    """No report may land on a file of a checkpoint being audited (a shard, its index, a hard link to
    one); a new file beside the shards is fine."""
    from lipaudit.checkpoint.members import refuse_output_onto

    if output is not None:
        refuse_output_onto(files, output)


def normalize_target(path: str, output: Path | None, in_place: bool, dry_run: bool, force: bool) -> Path | None:
    """Where normalize writes; over the input needs --in-place (and no link), over another file --force."""
    src = Path(path)
    if in_place:
        if output is not None and not _same(output, src):
            raise UsageError("--in-place and -o name different files")
        _refuse_links(src)
        return None if dry_run else (src if not src.name.endswith(".index.json") else src.parent)
    if output is None:
        if dry_run:
            return None
        raise UsageError("normalize needs -o OUT (or --in-place, or --dry-run)")
    same = _same(output, src) or (src.name.endswith(".index.json") and _same(output, src.parent))
    if same:
        raise UsageError(f"{visible(str(output))}: is the input; pass --in-place to overwrite it")
    refuse_output_over_inputs([path], output)  # a shard, the index or a hard link to one
    if output.is_file() and not force:
        raise UsageError(f"{visible(str(output))}: exists; pass --force to replace it")
    if output.is_symlink():  # the writer refuses it too (exit 6); said here before any work
        raise OutputError(f"{visible(str(output))}: refusing to write through a symbolic link", str(output))
    return None if dry_run else output


def _refuse_links(src: Path) -> None:
    """--in-place through a link would rewrite a shared blob (a Hugging Face cache entry) or another
    path's file: refuse now rather than after the audit."""
    files = [src]
    folder = src if src.is_dir() else (src.parent if src.name.endswith(".index.json") else None)
    if folder is not None:
        files = [folder, *sorted(p for p in folder.iterdir() if p.name.endswith((*CHECKPOINT_SUFFIXES, ".json")))]
    links = [p for p in files if p.is_symlink()]
    if links:
        raise UsageError(
            f"{visible(str(links[0]))}: --in-place would write through a symbolic link (as in a Hugging Face cache); "
            "write a copy with -o OUT", str(src),
        )


def layout(path: Path) -> str | None:
    """The layout of path as far as names tell it (a few directory entries, no file content)."""
    if path.name.endswith(".bin.index.json"):
        return "torch-sharded"
    if path.is_dir() and not any(path.glob("*.safetensors.index.json")) and any(path.glob("*.bin.index.json")):
        return "torch-sharded"
    return None


def writable(path: str) -> None:
    """Refuse a layout normalize cannot write, before it audits anything."""
    why = UNWRITABLE.get(layout(Path(path)) or "")
    if why is not None:
        raise UsageError(f"{visible(path)}: {why}", path)


def one_input(path: str, revision: str | None) -> str:
    """The one checkpoint a command such as normalize reads: it exists; a Hugging Face cache folder
    becomes its snapshot."""
    hf.refuse_remote(path)
    exists(path)
    if hf.is_root(Path(path)):
        return str(Path(path) / "snapshots" / hf.snapshot(Path(path), revision, visible(path)).name)
    if revision is not None:
        raise UsageError("--revision applies to Hugging Face cache folders (models--ORG--NAME)", path)
    return path


def exists(path: str, what: str = "") -> None:
    if not os.path.lexists(path):
        raise UsageError(f"{what}{visible(path)}: no such file or folder", path)
