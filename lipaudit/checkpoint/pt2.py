"""Read and rewrite torch.export archives (.pt2) without unpickling code or running the graph.

The archive is a zip of stored members under one root folder: ``models/<name>.json`` (the graph),
``data/weights/model_weights_config.json`` and raw weight files, ``data/constants/...`` and
``data/sample_inputs/<name>.pt`` (a torch.save file). JSON is parsed here; raw weights are read as
bytes and viewed with the declared dtype, shape, stride and offset after bounds checks. Pickled
payloads go only through torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.sniff import regular_file_size
from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError, UsageError
from lipaudit.text import clean_message, visible

FORMAT = "pt2"

# torch._export.serde.schema.ScalarType values -> dtype
DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 10: torch.complex64, 11: torch.complex128, 12: torch.bool,
    13: torch.bfloat16, 29: torch.float8_e4m3fn, 30: torch.float8_e5m2,
}
_STRIDED = 7  # serde Layout.Strided


@dataclass(frozen=True)
class Payload:
    """One entry of a weights or constants config."""

    name: str
    path_name: str
    is_param: bool
    use_pickle: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def logical_bytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return int(torch.empty(0, dtype=dtype).element_size())


@dataclass
class Pt2Archive:
    """A parsed .pt2 archive; tensors are read on demand."""

    path: Path
    shown: str
    root: str  # member name prefix, e.g. "model/"
    model: str  # program name, e.g. "model"
    members: dict[str, zipfile.ZipInfo]
    program: dict[str, Any]
    weights: dict[str, Payload]
    constants: dict[str, Payload]
    limits: Limits
    ignored: list[str] = field(default_factory=list)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- members ---------------------------------------------------------------------------
    def read_member(self, name: str) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise MalformedInputError(f"{self.shown}: member {visible(name, 80)!r} is missing", self.shown)
        try:
            with zipfile.ZipFile(self.path) as z:
                return z.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise MalformedInputError(f"{self.shown}: broken zip archive ({clean_message(e)})", self.shown) from None

    def weight_member(self, fqn: str) -> str:
        return f"{self.root}data/weights/{self.weights[fqn].path_name}"

    # -- tensors ---------------------------------------------------------------------------
    def weight(self, fqn: str) -> torch.Tensor:
        """A parameter or buffer by its state-dict name."""
        if fqn not in self._cache:
            self._cache[fqn] = self._tensor(self.weights[fqn], "data/weights/")
        return self._cache[fqn]

    def constant(self, fqn: str) -> torch.Tensor:
        key = "\0const:" + fqn
        if key not in self._cache:
            self._cache[key] = self._tensor(self.constants[fqn], "data/constants/")
        return self._cache[key]

    def _tensor(self, p: Payload, folder: str) -> torch.Tensor:
        name = f"{self.root}{folder}{p.path_name}"
        shown = f"{self.shown}: {visible(p.name, 80)!r}"
        if p.use_pickle:
            t = load_pickled(self.read_member(name), shown, self.limits)
            if not isinstance(t, torch.Tensor):
                raise MalformedInputError(f"{shown}: pickled payload is not a tensor", self.shown)
            t = check_loaded(t, shown, self.limits)
            if tuple(t.shape) != p.shape:
                raise MalformedInputError(f"{shown}: pickled tensor has shape {tuple(t.shape)}, "
                                          f"the config says {p.shape}", self.shown)
            return t
        info = self.members.get(name)
        if info is None:
            raise MalformedInputError(f"{shown}: weight file {visible(p.path_name, 80)!r} is missing", self.shown)
        storage = check_view(p, info.file_size, shown, self.limits)
        if p.numel == 0:
            return torch.zeros(p.shape, dtype=p.dtype)
        data = bytearray(self.read_member(name))
        flat = torch.frombuffer(data, dtype=p.dtype, count=storage) if storage else torch.zeros(0, dtype=p.dtype)
        return flat.as_strided(p.shape, p.stride, p.offset).clone()

    def user_inputs(self) -> list[str]:
        specs = self.program["graph_module"]["signature"]["input_specs"]
        out = []
        for s in specs:
            if "user_input" in s:
                arg = s["user_input"]["arg"]
                if "as_tensor" in arg:
                    out.append(str(arg["as_tensor"]["name"]))
        return out

    def sample_inputs(self) -> tuple[list[torch.Tensor] | None, str]:
        """The saved example inputs as tensors (weights_only=True), or None with the reason."""
        name = f"{self.root}data/sample_inputs/{self.model}.pt"
        if name not in self.members:
            return None, "no sample inputs in the archive"
        try:
            obj = load_pickled(self.read_member(name), f"{self.shown}: sample inputs", self.limits)
        except (MalformedInputError, ResourceLimitError) as e:
            return None, f"sample inputs not used ({e.message})"
        tensors: list[torch.Tensor] = []

        def walk(x: Any, depth: int) -> None:
            if depth > 16:
                return
            if isinstance(x, torch.Tensor):
                tensors.append(x)
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y, depth + 1)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y, depth + 1)

        walk(obj, 0)
        return tensors, "sample inputs"


# -- opening -------------------------------------------------------------------------------


def is_pt2(path: Path) -> bool:
    """A zip whose members sit under one folder holding archive_format = pt2."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            marks = [n for n in names if n.endswith("archive_format") and n.count("/") <= 1]
            if not marks:
                return False
            info = z.getinfo(marks[0])
            if info.file_size > 64:
                return False
            return z.read(info).strip() == b"pt2"
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, KeyError):
        return False


def _check_members(infos: list[zipfile.ZipInfo], size: int, shown: str, limits: Limits) -> None:
    names = [m.filename for m in infos]
    if len(set(names)) != len(names):
        raise MalformedInputError(f"{shown}: zip archive has duplicate member names", shown)
    if len(infos) > limits.tensors + 64:
        raise ResourceLimitError(f"{shown}: {len(infos)} zip members, over the limit of {limits.tensors}", shown)
    for m in infos:
        if m.compress_type != zipfile.ZIP_STORED:
            raise ResourceLimitError(
                f"{shown}: compressed zip member {visible(m.filename, 80)!r} "
                f"({m.compress_size} bytes inflating to {m.file_size}): refused", shown,
            )
        if m.file_size > size or m.header_offset + m.file_size > size:
            raise MalformedInputError(f"{shown}: zip member {visible(m.filename, 80)!r} is larger than the file", shown)


def _json(data: bytes, what: str, shown: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ResourceLimitError(f"{shown}: {what} is nested too deeply", shown) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedInputError(f"{shown}: {what} is not valid JSON ({clean_message(e)})", shown) from None


def _int(x: Any, what: str, shown: str) -> int:
    if isinstance(x, dict) and "as_int" in x:
        x = x["as_int"]
    if isinstance(x, bool) or not isinstance(x, int):
        raise MalformedInputError(f"{shown}: {what} is not a fixed integer", shown)
    return x


def _payloads(config: Any, shown: str, what: str, limits: Limits, ignored: list[str]) -> dict[str, Payload]:
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise MalformedInputError(f"{shown}: {what} config is not an object with 'config'", shown)
    entries = config["config"]
    if len(entries) > limits.tensors:
        raise ResourceLimitError(f"{shown}: {len(entries)} {what}, over the limit of {limits.tensors}", shown)
    out: dict[str, Payload] = {}
    for fqn, meta in entries.items():
        name = visible(str(fqn), 80)
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise MalformedInputError(f"{shown}: {what} entry {name!r} is malformed", shown)
        path_name = meta["path_name"]
        if "/" in path_name or "\\" in path_name or path_name in ("", ".", ".."):
            raise MalformedInputError(f"{shown}: {what} entry {name!r} names a path outside its folder", shown)
        if not path_name.startswith(("weight_", "tensor_")):
            # custom or opaque objects: pickles of arbitrary classes; never read
            ignored.append(f"{fqn}: {what} object {path_name} not read")
            continue
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise MalformedInputError(f"{shown}: {what} entry {name!r} has no tensor_meta", shown)
        code = tm.get("dtype")
        if not isinstance(code, int) or code not in DTYPES:
            raise MalformedInputError(f"{shown}: {what} entry {name!r} has an unsupported dtype code {code!r}", shown)
        if tm.get("layout", _STRIDED) != _STRIDED:
            raise MalformedInputError(f"{shown}: {what} entry {name!r} is not a strided tensor", shown)
        sizes = tm.get("sizes")
        strides = tm.get("strides")
        if not isinstance(sizes, list) or not isinstance(strides, list) or len(sizes) != len(strides):
            raise MalformedInputError(f"{shown}: {what} entry {name!r} has malformed sizes or strides", shown)
        if len(sizes) > 64:
            raise MalformedInputError(f"{shown}: {what} entry {name!r} has {len(sizes)} dimensions", shown)
        shape = tuple(_int(s, "a size", shown) for s in sizes)
        stride = tuple(_int(s, "a stride", shown) for s in strides)
        offset = _int(tm.get("storage_offset", {"as_int": 0}), "a storage offset", shown)
        if any(s < 0 for s in shape) or any(s < 0 for s in stride) or offset < 0:
            raise MalformedInputError(f"{shown}: {what} entry {name!r} has a negative size, stride or offset", shown)
        out[str(fqn)] = Payload(
            name=str(fqn), path_name=path_name, is_param=bool(meta.get("is_param", False)),
            use_pickle=bool(meta.get("use_pickle", False)), dtype=DTYPES[code], shape=shape,
            stride=stride, offset=offset,
        )
    return out


def check_view(p: Payload, nbytes: int, shown: str, limits: Limits) -> int:
    """Elements in the record; the view must lie inside it and within the budgets."""
    size = _itemsize(p.dtype)
    if nbytes % size:
        raise MalformedInputError(f"{shown}: weight file holds {nbytes} bytes, not a whole number of "
                                  f"{p.dtype} elements", shown)
    storage = nbytes // size
    logical = p.logical_bytes
    if logical > limits.tensor_bytes:
        raise ResourceLimitError(f"{shown}: declares {logical} bytes, over the limit of {limits.tensor_bytes}", shown)
    if p.numel == 0:
        return storage
    last = p.offset + sum((d - 1) * s for d, s in zip(p.shape, p.stride, strict=True))
    if last >= storage:
        raise MalformedInputError(f"{shown}: the view needs element {last} of a weight file with {storage}", shown)
    if logical > nbytes and logical > limits.expanded_bytes:
        raise ResourceLimitError(
            f"{shown}: declares {logical} bytes over a storage of {nbytes} (stride 0 or overlapping strides): "
            "refused", shown,
        )
    return storage


def open_pt2(path: str | Path, limits: Limits | None = None) -> Pt2Archive:
    """Parse the archive's JSON and configs; read no tensor yet."""
    limits = limits or Limits()
    p = Path(path)
    shown = visible(str(path), 200)
    size = regular_file_size(p, shown)
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise MalformedInputError(f"{shown}: broken zip archive ({clean_message(e)})", shown) from None
    _check_members(infos, size, shown, limits)
    members = {m.filename: m for m in infos}
    marks = [n for n in members if n.endswith("archive_format") and n.count("/") <= 1]
    if len(marks) != 1:
        raise MalformedInputError(f"{shown}: not a torch.export archive (no archive_format)", shown)
    root = marks[0][: -len("archive_format")]
    if any(not n.startswith(root) for n in members):
        raise MalformedInputError(f"{shown}: archive members outside its root folder", shown)
    if any("/code/" in n or n.endswith((".so", ".dll", ".dylib", ".py", ".pyc")) for n in members):
        raise UnsafeInputError(f"{shown}: the archive carries code (compiled or TorchScript); refused", shown)

    arch = Pt2Archive(p, shown, root, "", members, {}, {}, {}, limits)
    if arch.read_member(marks[0]).strip() != b"pt2":
        raise MalformedInputError(f"{shown}: not a torch.export archive (archive_format is not pt2)", shown)
    order = f"{root}byteorder"
    if order in members and arch.read_member(order).strip() not in (b"little", b""):
        raise MalformedInputError(f"{shown}: big-endian archives are not supported", shown)
    models = [n for n in members if n.startswith(f"{root}models/") and n.endswith(".json")]
    if not models:
        raise MalformedInputError(f"{shown}: the archive holds no exported program (models/*.json)", shown)
    if len(models) > 1:
        names = ", ".join(visible(n[len(root) + 7 : -5], 40) for n in sorted(models)[:4])
        raise MalformedInputError(f"{shown}: the archive holds {len(models)} programs ({names}); lipaudit reads one",
                                  shown)
    arch.model = models[0][len(root) + len("models/") : -len(".json")]
    for name in [models[0], f"{root}data/weights/{arch.model}_weights_config.json",
                 f"{root}data/constants/{arch.model}_constants_config.json"]:
        if name in members and members[name].file_size > limits.header_bytes:
            raise ResourceLimitError(f"{shown}: {visible(name, 80)} is {members[name].file_size} bytes, over the "
                                     f"limit of {limits.header_bytes}", shown)
    program = _json(arch.read_member(models[0]), "the graph JSON", shown)
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise MalformedInputError(f"{shown}: the graph JSON has no graph_module", shown)
    gm = program["graph_module"]
    if not isinstance(gm.get("graph"), dict) or not isinstance(gm.get("signature"), dict):
        raise MalformedInputError(f"{shown}: the graph JSON has no graph or signature", shown)
    arch.program = program
    wname = f"{root}data/weights/{arch.model}_weights_config.json"
    if wname not in members:
        if f"{root}data/weights/{arch.model}.pt" in members:
            raise MalformedInputError(f"{shown}: legacy weight layout (one pickle); re-save with torch.export.save",
                                      shown)
        raise MalformedInputError(f"{shown}: the weights config is missing", shown)
    arch.weights = _payloads(_json(arch.read_member(wname), "the weights config", shown), shown, "weight", limits,
                             arch.ignored)
    cname = f"{root}data/constants/{arch.model}_constants_config.json"
    if cname in members:
        arch.constants = _payloads(_json(arch.read_member(cname), "the constants config", shown), shown,
                                   "constant", limits, arch.ignored)
    total = sum(p.logical_bytes for p in arch.weights.values())
    if total > limits.total_bytes:
        raise ResourceLimitError(f"{shown}: weights total {total} bytes, over the limit of {limits.total_bytes}",
                                 shown)
    for folder, table in (("data/weights/", arch.weights), ("data/constants/", arch.constants)):
        for p_ in table.values():
            if p_.use_pickle:
                continue
            info = members.get(f"{root}{folder}{p_.path_name}")
            if info is None:
                raise MalformedInputError(f"{shown}: weight file {visible(p_.path_name, 80)!r} is missing", shown)
            check_view(p_, info.file_size, f"{shown}: {visible(p_.name, 80)!r}", limits)
    return arch


# -- pickled payloads ---------------------------------------------------------------------


def _check_inner_zip(data: bytes, shown: str, limits: Limits) -> None:
    if not data.startswith(b"PK\x03\x04"):
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise MalformedInputError(f"{shown}: broken pickled payload ({clean_message(e)})", shown) from None
    _check_members(infos, len(data), shown, limits)
    if any("/code/" in m.filename or m.filename.endswith(("constants.pkl", "bytecode.pkl")) for m in infos):
        raise UnsafeInputError(f"{shown}: a TorchScript payload (it carries code); refused", shown)


def load_pickled(data: bytes, shown: str, limits: Limits) -> Any:
    """torch.load(weights_only=True) on member bytes; a refused global is unsafe input (exit 3)."""
    _check_inner_zip(data, shown, limits)
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        invariants = torch.sparse.check_sparse_tensor_invariants()  # type: ignore[no-untyped-call]
        with warnings.catch_warnings(), invariants:
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported operand" in text or "Can only" in text or "global" in text:
            raise UnsafeInputError(f"{shown}: refused: the pickle asks for objects outside the allowlist",
                                   shown) from None
        raise MalformedInputError(f"{shown}: malformed pickled payload", shown) from None
    except MemoryError:
        raise ResourceLimitError(f"{shown}: not enough memory for a pickled payload", shown) from None
    except RecursionError:
        raise ResourceLimitError(f"{shown}: pickled payload nested too deeply", shown) from None
    except Exception as e:  # torch raises many types on garbage
        reason = clean_message(e)
        raise MalformedInputError(f"{shown}: malformed pickled payload{f' ({reason})' if reason else ''}",
                                  shown) from None


def check_loaded(t: torch.Tensor, shown: str, limits: Limits) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.is_nested:
        raise MalformedInputError(f"{shown}: pickled tensor is not a plain strided tensor", shown)
    logical = t.numel() * t.element_size()
    if logical > limits.tensor_bytes:
        raise ResourceLimitError(f"{shown}: declares {logical} bytes, over the limit of {limits.tensor_bytes}", shown)
    storage = int(t.untyped_storage().nbytes())
    if logical > storage and logical > limits.expanded_bytes:
        raise ResourceLimitError(f"{shown}: declares {logical} bytes over a storage of {storage}: refused", shown)
    return t.detach()


# -- rewriting ----------------------------------------------------------------------------

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_DESCRIPTOR_SIG = b"PK\x07\x08"


def _data_offset(raw: bytes | bytearray, info: zipfile.ZipInfo, shown: str) -> int:
    head = bytes(raw[info.header_offset : info.header_offset + _LOCAL.size])
    if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise MalformedInputError(f"{shown}: bad local header for {visible(info.filename, 80)!r}", shown)
    fields = _LOCAL.unpack(head)
    return info.header_offset + _LOCAL.size + int(fields[9]) + int(fields[10])


def _central_offsets(raw: bytes | bytearray, start: int) -> dict[str, int]:
    """Offset of each central-directory entry, by member name."""
    out: dict[str, int] = {}
    pos = start
    while pos >= 0 and raw[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", raw[pos + 28 : pos + 34])
        name = bytes(raw[pos + 46 : pos + 46 + n]).decode("utf-8", "replace")
        out[name] = pos
        pos += 46 + n + m + k
    return out


def patched_archive(arch: Pt2Archive, new_bytes: dict[str, bytes]) -> bytes:
    """The archive's bytes with the data of some stored members replaced by equally long data;
    the CRC-32 fields are updated, every other byte is kept."""
    raw = bytearray(arch.path.read_bytes())
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            start = int(z.start_dir)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise MalformedInputError(f"{arch.shown}: broken zip archive ({clean_message(e)})", arch.shown) from None
    central = _central_offsets(raw, start)
    for name, data in new_bytes.items():
        info = arch.members[name]
        if len(data) != info.file_size:
            raise AssertionError("replacement size differs")
        start = _data_offset(raw, info, arch.shown)
        raw[start : start + len(data)] = data
        crc = struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)
        if struct.unpack("<I", raw[info.header_offset + 14 : info.header_offset + 18])[0] != 0 or not (
            info.flag_bits & 0x08
        ):
            raw[info.header_offset + 14 : info.header_offset + 18] = crc
        if info.flag_bits & 0x08:
            end = start + len(data)
            at = end + 4 if raw[end : end + 4] == _DESCRIPTOR_SIG else end
            raw[at : at + 4] = crc
        cd = central.get(name)
        if cd is None:
            raise MalformedInputError(f"{arch.shown}: central directory entry missing for {visible(name, 80)!r}",
                                      arch.shown)
        raw[cd + 16 : cd + 20] = crc
    return bytes(raw)


def weight_edits(arch: Pt2Archive, values: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """New bytes of the raw weight files for new values of some weights (same dtype and shape).

    Weights that share a file are written through their views; two different views of one file
    with different new values would each change the other, so that is refused."""
    by_file: dict[str, list[str]] = {}
    for fqn in values:
        p = arch.weights[fqn]
        if p.use_pickle:
            raise UsageError(f"{arch.shown}: weight {visible(fqn, 80)!r} is pickled; it cannot be rewritten in place",
                             arch.shown)
        by_file.setdefault(p.path_name, []).append(fqn)
    out: dict[str, bytes] = {}
    for path_name, fqns in by_file.items():
        member = f"{arch.root}data/weights/{path_name}"
        sharing = [f for f, q in arch.weights.items() if q.path_name == path_name and not q.use_pickle]
        for other in sharing:
            if other in values:
                continue
            q, p = arch.weights[other], arch.weights[fqns[0]]
            if (q.shape, q.stride, q.offset) != (p.shape, p.stride, p.offset) or q.dtype != p.dtype:
                raise UsageError(
                    f"{arch.shown}: weight {visible(fqns[0], 80)!r} shares its storage with "
                    f"{visible(other, 80)!r} through a different view; refusing to rewrite it", arch.shown,
                )
        data = bytearray(arch.read_member(member))
        for fqn in fqns:
            p = arch.weights[fqn]
            if p.numel == 0:
                continue
            flat = torch.frombuffer(data, dtype=p.dtype, count=len(data) // _itemsize(p.dtype))
            t = values[fqn].detach().to(p.dtype)
            if tuple(t.shape) != p.shape:
                raise AssertionError("shape changed")
            flat.as_strided(p.shape, p.stride, p.offset).copy_(t)
        out[member] = bytes(data)
    return out


def write_to(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write
