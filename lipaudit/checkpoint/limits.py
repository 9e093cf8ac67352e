"""Resource budgets, checked before anything large is allocated."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """1234, 64M, 4G, 1.5T (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 4G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Limits:
    header_bytes: int = 100 * 2**20  # safetensors header, index JSON
    tensors: int = 1_000_000
    tensor_bytes: int = 16 * 2**30  # logical: numel x itemsize
    total_bytes: int = 256 * 2**30
    # A view whose logical size exceeds its storage (stride 0, overlapping strides) is how a
    # 2 KB file declares terabytes; real checkpoints hardly ever hold one, and never a large one.
    expanded_bytes: int = 64 * 2**20
    depth: int = 64
    nodes: int = 10_000_000
    pickle_bytes: int = 1 << 30  # data.pkl of a zip checkpoint: about 100 bytes per tensor
    # --allow-unknown-classes: read objects of classes outside the allowlist as inert placeholders
    # instead of refusing the file. A trust decision, not a budget; kept here because every reader
    # gets these settings.
    allow_unknown_classes: bool = False

    def to_dict(self) -> dict[str, int]:
        return {
            "header_bytes": self.header_bytes,
            "tensors": self.tensors,
            "tensor_bytes": self.tensor_bytes,
            "total_bytes": self.total_bytes,
            "expanded_bytes": self.expanded_bytes,
            "depth": self.depth,
            "nodes": self.nodes,
            "pickle_bytes": self.pickle_bytes,
        }
