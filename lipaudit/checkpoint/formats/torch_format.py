"""PyTorch checkpoints: the zip archive of torch.save, and the legacy pickle stream."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from lipaudit.checkpoint import sniff as sn
from lipaudit.checkpoint import writer, zip_patch
from lipaudit.checkpoint.formats.base import Format, sha256_of
from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Checkpoint, StorageId, tensor_identity
from lipaudit.checkpoint.pages import release, release_storage
from lipaudit.checkpoint.select import check_size, select_state_dict
from lipaudit.checkpoint.torch_reader import ZipLayout, load_torch, tensor_info
from lipaudit.checkpoint.unpickler import Global, Marker, Opaque, Storage, UnreadTensor
from lipaudit.checkpoint.writer import Edits, Pending, Staged
from lipaudit.errors import MalformedInputError, OutputError
from lipaudit.text import visible


class _Staged(Pending):
    def __init__(self, files: list[Staged], root: object) -> None:
        super().__init__(files)
        self.root = root  # what the staged file must read back as


def parametrized(key: str) -> bool:
    """A key of a parametrized weight, which --bake replaces: spectral_norm's weight_orig, or the
    parametrizations form's original."""
    return key.endswith("_orig") or ".parametrizations." in key


def placeholder_in(root: object) -> str | None:
    """What the first placeholder reachable through containers stands for, if any."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Opaque | Global):
            return f"an object of class {visible(node.qualname, 100)}"
        if isinstance(node, UnreadTensor):
            return f"a {node.kind} tensor"
        if isinstance(node, Marker | Storage):
            return "a bare type or storage reference"
        if isinstance(node, dict):
            stack.extend(dict.keys(node))
        stack.extend(_children(node))
    return None


def record_bytes(tensors: list[torch.Tensor], keys: list[str], edits: Edits) -> bytes:
    """A storage record's new bytes: a copy of the stored ones (the tensors view the record, as
    read) with each edited view overwritten by its new value."""
    source = torch.Tensor.untyped_storage(tensors[0])
    copy = source.clone()  # type: ignore[no-untyped-call]
    release_storage(source)
    for t, key in zip(tensors, keys, strict=True):
        with torch.no_grad():
            _view_on(copy, t).copy_(edits.value(key).to(t.dtype))
    raw: bytes = _bytes_tensor(copy).numpy().tobytes()
    return raw


class _Patched(Pending):
    def __init__(self, files: list[Staged], layout: ZipLayout, records: dict[str, Callable[[], bytes]]) -> None:
        super().__init__(files)
        self.layout = layout
        self.records = records


def check_records(source: Path, written: Path, layout: ZipLayout, records: dict[str, Callable[[], bytes]],
                  key: str | None, edits: Edits, shown: str, limits: Limits) -> None:
    """A patched archive: the same archive but for the records, and it reads back (with lipaudit's
    own reader) with every edited tensor holding its new value."""
    zip_patch.check_patched(source, written, layout, records, shown)
    root = load_torch(written, shown, True, mmap=True, limits=limits).root
    got = select_state_dict(root, key, shown, limits, check_size(root, limits, shown)).tensors
    for k in edits.values:
        t = got.get(k)
        want = edits.value(k)
        if t is None or not writer.same_bits(t, want.to(t.dtype)):
            raise OutputError(f"{shown}: {visible(k, 80)!r} does not read back as written", shown)
        release(t)


class TorchFormat(Format):
    """Shared by both torch formats: the unpickled object, the selected tensors and their containers."""

    zip_format: ClassVar[bool]

    def __init__(self, path: Path, shown: str, root: object, tensors: dict[str, torch.Tensor],
                 slots: dict[str, tuple[Any, Any]], limits: Limits) -> None:
        self.path = path
        self.shown = shown
        self.root = root
        self.tensors = tensors
        self.slots = slots
        self.limits = limits

    @classmethod
    def sniff(cls, path: Path, guess: str) -> bool:
        return guess == cls.name

    @classmethod
    def open(cls, path: Path, shown: str, key: str | None, limits: Limits) -> Checkpoint:
        # Mapping the zip is safe even for --in-place: the output is a new file renamed over this one.
        loaded = load_torch(path, shown, cls.zip_format, mmap=cls.zip_format, limits=limits)
        root = loaded.root
        nodes = check_size(root, limits, shown)
        sel = select_state_dict(root, key, shown, limits, nodes)  # budgets enforced while listing
        handle = cls(path, shown, root, sel.tensors, sel.slots, limits)
        handle.asked_key = key  # the records of a zip archive are found again by the same selection
        return Checkpoint(
            path=shown, sha256=sha256_of(path), infos=[tensor_info(k, t) for k, t in sel.tensors.items()],
            handle=handle, key=sel.key, ignored=sel.ignored, alternatives=sel.alternatives,
            notes=loaded.classes.notes(),
        )

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def storage_identity(self, key: str) -> StorageId | None:
        return tensor_identity(self.tensors.get(key))

    asked_key: str | None = None

    def write_refusal(self, bake: bool) -> str | None:
        """Objects lipaudit holds only as placeholders can stay in a zip archive whose pickle is kept
        byte for byte; anything that needs a new pickle (a legacy file, --bake's new keys) cannot
        hold them."""
        held = placeholder_in(self.root)
        if held is None:
            return None
        why = None
        if not self.zip_format:
            why = "a legacy (pre-1.6) torch file is rewritten as a whole pickle"
        elif bake and any(parametrized(k) for k in self.tensors):
            why = "--bake replaces parametrized weights by new keys, which needs a new pickle"
        elif zip_patch.patchable(self.path, self.shown, self.limits) is None:
            why = "a big-endian archive is rewritten as a whole pickle"
        if why is None:
            return None
        return (f"{self.shown}: {why}, and the file holds {held}, which lipaudit keeps only as an inert placeholder; "
                "save the state dict alone (torch.save(model.state_dict(), path)) and normalize that")

    def stage(self, edits: Edits, target: Path) -> Pending:
        patch = self.patch_plan(edits)
        if patch is not None:
            layout, records = patch
            return _Patched([writer.stage(target, zip_patch.patch_writer(self.path, layout, records))], layout,
                            records)
        root = self._edited(edits)

        def write(f: IO[bytes]) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.save(root, f, _use_new_zipfile_serialization=self.zip_format)

        return _Staged([writer.stage(target, write)], root)

    def verify(self, edits: Edits, pending: Pending) -> None:
        if isinstance(pending, _Patched):
            [staged] = pending.files
            check_records(self.path, Path(staged.readable_path), pending.layout, pending.records, self.asked_key,
                          edits, self.shown, self.limits)
            return
        assert isinstance(pending, _Staged)
        [staged] = pending.files
        got = load_torch(Path(staged.readable_path), self.shown, self.zip_format, mmap=self.zip_format,
                         limits=self.limits).root
        why = difference(pending.root, got)
        if why is not None:
            raise OutputError(f"{self.shown}: the written file does not read back as intended ({why})", self.shown)

    def patch_plan(self, edits: Edits) -> tuple[ZipLayout, dict[str, Callable[[], bytes]]] | None:
        """A zip archive whose edits only change values is written by replacing the edited storage
        records, the pickled rest kept byte for byte (Lightning hyper-parameters, optimizer state,
        any class the file names). None where that cannot be done: legacy files, new keys (--bake)."""
        if not self.zip_format or edits.replaced or not edits.values:
            return None
        layout = zip_patch.patchable(self.path, self.shown, self.limits)
        if layout is None:
            return None
        where = zip_patch.records_of(self.path, self.shown, self.limits, self.asked_key, layout)
        if any(k not in where for k in edits.values):
            return None
        by_record: dict[str, list[str]] = {}
        for key in edits.values:
            by_record.setdefault(where[key], []).append(key)
        return layout, {r: partial(record_bytes, [self._plain(k) for k in keys], keys, edits)
                        for r, keys in by_record.items()}

    def _edited(self, edits: Edits) -> object:
        """A copy of the unpickled object with the edits applied; the original is left as read.

        Containers are copied and tensors are shared, except those on an edited storage: that
        storage is copied once, edited, and every tensor viewing it (tied weights) moves to the copy.
        """
        copies: dict[int, torch.UntypedStorage] = {}  # data_ptr of an edited storage -> its new copy
        spans: dict[int, list[tuple[int, int, str]]] = {}  # edited byte ranges per storage
        for key in edits.values:
            t = self._plain(key)
            s = torch.Tensor.untyped_storage(t)
            if s.nbytes() == 0 or t.numel() == 0:
                continue
            size = t.element_size()
            start = int(t.storage_offset()) * size
            stop = start + size * (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)))
            for a, b, other in spans.setdefault(s.data_ptr(), []):
                if start < b and a < stop:  # two edits would write the same bytes
                    raise OutputError(
                        f"{self.shown}: edits of {visible(key, 80)!r} and {visible(other, 80)!r} overlap", self.shown
                    )
            spans[s.data_ptr()].append((start, stop, key))
        for key in edits.values:
            t = self.tensors[key]
            value = edits.value(key)
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{key}: new value has shape {tuple(value.shape)}, not {tuple(t.shape)}")
            s = torch.Tensor.untyped_storage(t)
            if s.nbytes() == 0 or t.numel() == 0:
                continue
            new = value.to(t.dtype)
            whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == s.nbytes()
            if whole and new.is_contiguous() and new.storage_offset() == 0 and new.layout == torch.strided:
                ns = torch.Tensor.untyped_storage(new)
                if ns.nbytes() == s.nbytes() and ns.device == s.device:
                    copies[s.data_ptr()] = ns  # the value's own storage is the new one; nothing to copy
                    continue
            if s.data_ptr() not in copies:
                copies[s.data_ptr()] = s.clone()  # type: ignore[no-untyped-call]
            view = _view_on(copies[s.data_ptr()], t)
            try:
                with torch.no_grad():
                    view.copy_(new)
            except RuntimeError:  # an expanded or self-overlapping view, as stored in the file
                raise MalformedInputError(
                    f"{self.shown}: cannot write {visible(key, 80)!r}: several of its elements share memory", self.shown
                ) from None
        swap: dict[int, torch.Tensor] = {}
        for t in _tensors_in(self.root):
            try:
                s = torch.Tensor.untyped_storage(t)
            except (RuntimeError, NotImplementedError, TypeError):
                continue
            if s.nbytes() and s.data_ptr() in copies:
                swap[id(t)] = _like(t, _view_on(copies[s.data_ptr()], t))
        memo: dict[int, object] = {}
        root = _copy(self.root, swap, memo)
        for new_key, (value, olds) in edits.replaced.items():
            self._replace(memo, new_key, value, olds)
        return root

    def _plain(self, key: str) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise ValueError(f"no tensor {key!r} to edit")
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
            raise OutputError(
                f"{self.shown}: cannot rewrite {visible(key, 80)!r} (not a plain dense tensor)", self.shown
            )
        return t

    def _replace(self, memo: dict[int, object], new_key: str, value: torch.Tensor, olds: tuple[str, ...]) -> None:
        """new_key takes the place of the first of olds in their (copied) container; the others go."""
        container, first = self.slots[olds[0]]
        # the container's keys are the flat keys less the path of the container itself
        prefix = olds[0][: len(olds[0]) - len(str(first))]
        copied = memo.get(id(container))
        if (
            not isinstance(copied, dict)
            or any(self.slots[k][0] is not container for k in olds)
            or not new_key.startswith(prefix)
        ):
            raise OutputError(f"{visible(new_key)}: cannot replace tensors kept in different containers")
        gone = {self.slots[k][1] for k in olds}
        kind = type(copied)  # the class's own methods: OrderedDict keeps its order apart from dict's
        items = list(kind.items(copied))
        kind.clear(copied)
        for k, v in items:
            if k == first:
                copied[new_key[len(prefix):]] = value
            elif k not in gone:
                copied[k] = v


class TorchZip(TorchFormat):
    name = sn.TORCH_ZIP
    zip_format = True


class TorchLegacy(TorchFormat):
    name = sn.TORCH_LEGACY
    zip_format = False


def _view_on(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype).set_(storage, like.storage_offset(), like.shape, like.stride())


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if type(old) is torch.nn.Parameter:
        return torch.nn.Parameter(new, requires_grad=old.requires_grad)
    return new.requires_grad_(old.requires_grad) if old.requires_grad else new


def _children(node: object) -> list[object]:
    """Read through the builtin types' own methods: an instance attribute cannot hide entries."""
    if isinstance(node, dict):
        return list(dict.values(node))
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return []


def _tensors_in(root: object) -> list[torch.Tensor]:
    """Every tensor reachable through containers, each once (shared containers are walked once)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.Tensor):
            out.append(node)
        else:
            stack.extend(_children(node))
    return out


def _copy(node: object, swap: dict[int, torch.Tensor], memo: dict[int, object]) -> object:
    """Copy the containers (sharing and cycles kept), swap tensors, share every other leaf."""
    if isinstance(node, torch.Tensor):
        return swap.get(id(node), node)
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, dict) and type(node) in (dict, OrderedDict, defaultdict):
        new: Any = defaultdict(node.default_factory) if isinstance(node, defaultdict) else type(node)()
        memo[id(node)] = new
        for k, v in dict.items(node):
            new[k] = _copy(v, swap, memo)
        if hasattr(node, "__dict__"):
            new.__dict__.update(vars(node))  # e.g. a state dict's _metadata
        return new
    if type(node) is list:
        out: list[object] = []
        memo[id(node)] = out
        out.extend(_copy(v, swap, memo) for v in node)
        return out
    if type(node) is tuple:
        items = tuple(_copy(v, swap, memo) for v in node)
        return memo.setdefault(id(node), items)
    return node


def _bytes_tensor(s: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(s)


def _same_leaf(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # objects whose == does not give a truth value
        return repr(a) == repr(b)


def _exotic_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta
    if a.is_quantized:
        return b.is_quantized and writer.same_bits(a.int_repr(), b.int_repr()) and writer.same_bits(
            a.dequantize(), b.dequantize()
        )
    if a.layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return writer.same_bits(a.to_dense(), b.to_dense())
    return True  # nested and other layouts: dtype and shape were compared


def difference(expected: object, got: object) -> str | None:
    """Where got differs from expected: structure, keys, leaves, tensor bytes and views, storage sharing."""
    stack: list[tuple[object, object, str]] = [(expected, got, "")]
    pairs: dict[int, int] = {}  # id of an expected container -> id of its counterpart
    storages: dict[int, int] = {}  # data_ptr of an expected storage -> data_ptr of its counterpart
    while stack:
        e, g, where = stack.pop()
        here = visible(where or "/", 80)
        if isinstance(e, torch.Tensor):
            if type(e) is not type(g) or not isinstance(g, torch.Tensor):
                return f"{here}: not a tensor of the same type"
            if e.dtype != g.dtype or e.shape != g.shape or e.layout != g.layout or e.requires_grad != g.requires_grad:
                return f"{here}: dtype, shape or layout"
            if e.layout != torch.strided or e.is_quantized or e.is_nested or e.is_meta:
                if not _exotic_same(e, g):
                    return f"{here}: values"
                continue
            if e.stride() != g.stride() or e.storage_offset() != g.storage_offset():
                return f"{here}: view"
            se, sg = torch.Tensor.untyped_storage(e), torch.Tensor.untyped_storage(g)
            if se.nbytes() != sg.nbytes():
                return f"{here}: storage size"
            if se.nbytes() == 0:
                continue
            known = storages.get(se.data_ptr())
            if known is None:
                if not torch.equal(_bytes_tensor(se), _bytes_tensor(sg)):
                    return f"{here}: values"
                storages[se.data_ptr()] = sg.data_ptr()
            elif known != sg.data_ptr():
                return f"{here}: storage sharing"
            continue
        is_container = isinstance(e, (dict, list)) or type(e) is tuple
        if not is_container:
            if not _same_leaf(e, g):
                return f"{here}: value"
            continue
        if id(e) in pairs:
            if pairs[id(e)] != id(g):
                return f"{here}: container sharing"
            continue
        pairs[id(e)] = id(g)
        if type(e) is not type(g):
            return f"{here}: container type"
        if isinstance(e, dict):
            assert isinstance(g, dict)
            keys = list(dict.keys(e))
            if keys != list(dict.keys(g)) or [type(k) for k in keys] != [type(k) for k in dict.keys(g)]:
                return f"{here}: keys"
            attrs = dict(getattr(e, "__dict__", {}))
            if set(attrs) != set(getattr(g, "__dict__", {})):
                return f"{here}: attributes"
            if attrs:  # a state dict's _metadata (versions that load_state_dict acts on)
                stack.append((attrs, dict(vars(g)), f"{where}/@attributes"))
            stack.extend((dict.__getitem__(e, k), dict.__getitem__(g, k), f"{where}/{k}") for k in keys)
        else:
            assert isinstance(e, (list, tuple)) and isinstance(g, (list, tuple))
            if len(e) != len(g):
                return f"{here}: length"
            stack.extend((a, b, f"{where}/{i}") for i, (a, b) in enumerate(zip(e, g, strict=True)))
    return None
