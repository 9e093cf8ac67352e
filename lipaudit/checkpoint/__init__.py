"""Open a checkpoint file or folder and expose its state dict's tensors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lipaudit.checkpoint import safetensors_reader as st
from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, Ignored, TensorInfo
from lipaudit.checkpoint.select import check_size, select_state_dict
from lipaudit.checkpoint.torch_reader import load_torch, tensor_info
from lipaudit.errors import MalformedInputError, ResourceLimitError, UsageError
from lipaudit.text import visible

__all__ = ["Checkpoint", "Ignored", "Limits", "TensorInfo", "open_checkpoint"]


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """layers.2 before layers.10."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _by_prefix(infos: list[TensorInfo], key: str | None, shown: str) -> list[TensorInfo]:
    if key is None or key in ("", "/"):
        return infos
    picked = [i for i in infos if i.key == key or i.key.startswith(key + ".")]
    if not picked:
        raise UsageError(f"{shown}: no tensor name starts with {visible(key, 80)!r}", shown)
    return picked


def _open_torch(path: Path, shown: str, fmt: str, key: str | None, for_writing: bool, limits: Limits) -> Checkpoint:
    # A file being rewritten is read fully: writing over a mapped file kills the process.
    zip_format = fmt == sn.TORCH_ZIP
    root = load_torch(path, shown, zip_format, mmap=zip_format and not for_writing, limits=limits)
    check_size(root, limits, shown)
    sel = select_state_dict(root, key, shown)
    infos = [tensor_info(k, t) for k, t in sel.tensors.items()]
    return Checkpoint(
        path=shown, format=fmt, sha256=sha256_of(path), infos=infos,
        loader=sel.tensors.__getitem__, key=sel.key, ignored=sel.ignored,
        alternatives=sel.alternatives, source=path,
        root=root if for_writing else None, slots=sel.slots if for_writing else {},
    )


def _open_safetensors(path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
    header, _meta = st.read_header(path, shown, limits)
    infos = sorted(st.infos_from_header(header), key=lambda i: natural_key(i.key))
    infos = _by_prefix(infos, key, shown)
    files = st.SafetensorsFiles(st.locations(path, header), shown)
    return Checkpoint(
        path=shown, format=sn.SAFETENSORS, sha256=sha256_of(path), infos=infos,
        loader=files.load, key=key or None, source=path, files={i.key: path for i in infos},
    )


def _open_sharded(path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
    index = path
    if path.is_dir():
        found = st.find_index(path, shown)
        if found is None:
            single = sorted(path.glob("*.safetensors"))
            if len(single) == 1:
                return _open_safetensors(single[0], shown, key, limits)
            raise MalformedInputError(f"{shown}: folder holds no *.safetensors.index.json", shown)
        index = found
    where, _data = st.read_index(index, shown, limits)
    infos: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    places: dict[str, st.Location] = {}
    for shard in dict.fromkeys(where.values()):
        header, _meta = st.read_header(shard, f"{shown}: {shard.name}", limits)
        places.update(st.locations(shard, header))
        for info in st.infos_from_header(header):
            if info.key in seen:
                raise MalformedInputError(f"{shown}: tensor {visible(info.key, 80)!r} is in two shards", shown)
            if where.get(info.key) != shard:
                raise MalformedInputError(
                    f"{shown}: tensor {visible(info.key, 80)!r} in {shard.name} is not mapped there by the index",
                    shown,
                )
            seen[info.key] = shard
            infos.append(info)
    missing = [k for k in where if k not in seen]
    if missing:
        raise MalformedInputError(
            f"{shown}: {len(missing)} tensors in the index are in no shard (first: {visible(missing[0], 80)!r})",
            shown,
        )
    infos = _by_prefix(sorted(infos, key=lambda i: natural_key(i.key)), key, shown)
    files = st.SafetensorsFiles(places, shown)
    return Checkpoint(
        path=shown, format=sn.SHARDED, sha256=sha256_of(index), infos=infos, loader=files.load,
        key=key or None, shards=[p.name for p in dict.fromkeys(where.values())], source=index,
        files=dict(seen),
    )


def open_checkpoint(
    path: str, key: str | None = None, for_writing: bool = False, limits: Limits | None = None
) -> Checkpoint:
    """Recognise the format by content and read the state dict (tensors load on demand)."""
    limits = limits or Limits()
    shown = visible(path, 200)
    p = Path(path)
    fmt = sn.sniff(p, shown)
    if fmt in (sn.TORCH_ZIP, sn.TORCH_LEGACY):
        ckpt = _open_torch(p, shown, fmt, key, for_writing, limits)
    elif fmt == sn.SAFETENSORS:
        ckpt = _open_safetensors(p, shown, key, limits)
    else:
        ckpt = _open_sharded(p, shown, key, limits)
    check_budgets(ckpt.infos, limits, shown)
    return ckpt


def check_budgets(infos: list[TensorInfo], limits: Limits, shown: str) -> None:
    """Logical sizes (numel x itemsize) against the budgets, before any math allocates them."""
    if len(infos) > limits.tensors:
        raise ResourceLimitError(f"{shown}: {len(infos)} tensors, over the limit of {limits.tensors}", shown)
    total = 0
    for info in infos:
        size = info.logical_bytes
        name = visible(info.key, 80)
        if size > limits.tensor_bytes:
            raise ResourceLimitError(
                f"{shown}: tensor {name!r} declares {size} bytes, over the limit of {limits.tensor_bytes} "
                "(--max-tensor-bytes)", shown,
            )
        if info.storage_bytes is not None and size > info.storage_bytes and size > limits.expanded_bytes:
            raise ResourceLimitError(
                f"{shown}: tensor {name!r} declares {size} bytes over a storage of {info.storage_bytes} "
                "(stride 0 or overlapping strides): refused", shown,
            )
        total += size
    if total > limits.total_bytes:
        raise ResourceLimitError(
            f"{shown}: tensors total {total} bytes, over the limit of {limits.total_bytes} (--max-total-bytes)", shown
        )
