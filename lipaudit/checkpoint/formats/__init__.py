"""The registry of checkpoint formats, tried in order; the first whose sniff accepts a path opens it.

Adding a format is one module with a Format subclass and one entry here (before any format
whose bytes it shares, as a torch.export archive shares the zip of torch-zip).
"""

from __future__ import annotations

from pathlib import Path

from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint.formats.base import Format
from lipaudit.checkpoint.formats.safetensors_format import Safetensors, ShardedSafetensors
from lipaudit.checkpoint.formats.torch_format import TorchLegacy, TorchZip
from lipaudit.errors import MalformedInputError

from lipaudit.checkpoint.folder import Folder, ShardedTorch  # isort: skip  (needs base above)
from lipaudit.checkpoint.formats.pt2_format import Pt2  # isort: skip  (needs base above)

FORMATS: tuple[type[Format], ...] = (
    Folder, ShardedTorch, Pt2, TorchZip, TorchLegacy, Safetensors, ShardedSafetensors,
)


def detect(path: Path, shown: str) -> type[Format]:
    """The format of the file or folder at path, by content."""
    guess = sn.sniff(path, shown)
    for fmt in FORMATS:
        if fmt.sniff(path, guess):
            return fmt
    raise MalformedInputError(f"{shown}: not a PyTorch or safetensors checkpoint", shown)


__all__ = ["FORMATS", "Format", "detect"]
