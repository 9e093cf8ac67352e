"""Rewrite a torch.save zip archive by replacing storage records in place.

The archive is copied as it is and only the bytes of edited storage records change (with their
CRC-32 in the data descriptor and the central directory). data.pkl -- the pickled structure, with
a Lightning checkpoint's hyper-parameters, optimizer state and callbacks -- is never unpickled
into objects lipaudit would have to write back: it comes back byte for byte, so whatever classes
it names stay exactly as they were, and records keep their offsets (and torch's alignment)."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.select import check_size, select_state_dict
from lipaudit.checkpoint.torch_reader import ZipLayout, _storage_pid, check_zip
from lipaudit.checkpoint.unpickler import Storage, unpickle
from lipaudit.errors import MalformedInputError, OutputError
from lipaudit.text import clean_message, visible

_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"


def patchable(path: Path, shown: str, limits: Limits) -> ZipLayout | None:
    """The archive's layout when it can be patched: little-endian records (what torch has
    written for years); None otherwise."""
    layout = check_zip(path, shown, limits)
    order = layout.members.get(layout.prefix + "byteorder")
    if order is not None:
        with open(path, "rb") as f:
            f.seek(order.offset)
            if f.read(min(order.size, 16)) != b"little":
                return None
    return layout


def records_of(path: Path, shown: str, limits: Limits, key: str | None, layout: ZipLayout) -> dict[str, str]:
    """Tensor key of the selected state dict -> the storage record (zip member) it views.

    data.pkl is read once more, over storages mapped from the file, and the state dict selected as
    when the checkpoint was opened; a storage's place in the file names its record."""
    size = layout.size
    whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    base = whole.data_ptr()
    at: dict[int, str] = {}  # offset of a record's data in the file -> its name

    def storage(pid: object) -> Storage:
        dtype, name, _numel = _storage_pid(pid, legacy=False)
        member = f"{layout.prefix}data/{name}"
        m = layout.members.get(member)
        if m is None:
            raise MalformedInputError(f"storage record {visible(member, 80)!r} is missing")
        at[m.offset] = member
        return Storage(whole[m.offset: m.offset + m.size], dtype)

    with open(path, "rb") as f:
        f.seek(layout.members[layout.pickle].offset)
        data = f.read(layout.members[layout.pickle].size)
    with io.BytesIO(data) as pkl:
        root = unpickle(pkl, limits, storage)
    sel = select_state_dict(root, key, shown, limits, check_size(root, limits, shown))
    out: dict[str, str] = {}
    for name, t in sel.tensors.items():
        try:
            ptr = torch.Tensor.untyped_storage(t).data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        member = at.get(ptr - base)
        if member is not None:
            out[name] = member
    return out


def _central_entries(f: IO[bytes], start: int, count: int) -> dict[str, int]:
    """Zip member name -> offset of its central directory entry."""
    out: dict[str, int] = {}
    pos = start
    for _ in range(count):
        f.seek(pos)
        head = f.read(46)
        if len(head) != 46 or head[:4] != _CENTRAL:
            raise MalformedInputError("broken zip central directory")
        n, e, c = struct.unpack("<HHH", head[28:34])
        out[f.read(n).decode("utf-8", "replace")] = pos
        pos += 46 + n + e + c
    return out


def _check_disjoint(source: Path, layout: ZipLayout, infos: dict[str, zipfile.ZipInfo],
                    records: dict[str, Callable[[], bytes]], start_dir: int) -> None:
    """Each record's data must lie clear of every other member (local header to data end) and of the
    central directory: a crafted archive whose members overlap would be corrupted by the patch."""
    spans = sorted((infos[n].header_offset, m.offset + m.size, n) for n, m in layout.members.items())
    for name in records:
        m = layout.members[name]
        lo, hi = m.offset, m.offset + m.size
        if hi > start_dir:
            raise MalformedInputError(f"{source}: zip member {visible(name, 80)!r} runs into the central directory",
                                      str(source))
        for a, b, other in spans:
            if other != name and a < hi and lo < b:
                raise MalformedInputError(f"{source}: zip members {visible(name, 80)!r} and {visible(other, 80)!r} "
                                          "overlap: the archive cannot be rewritten in place", str(source))


def patch_writer(source: Path, layout: ZipLayout,
                 records: dict[str, Callable[[], bytes]]) -> Callable[[IO[bytes]], None]:
    """A writer (for checkpoint.writer.stage) of source with the named records' data replaced by
    what each function returns (the same number of bytes), CRC-32s updated."""

    def write(out: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 24)
            with zipfile.ZipFile(src) as z:
                infos = {i.filename: i for i in z.infolist()}
                central = _central_entries(src, z.start_dir, len(infos))
                _check_disjoint(source, layout, infos, records, z.start_dir)
            for name, value in records.items():
                m, info = layout.members[name], infos[name]
                data = value()
                if len(data) != m.size:
                    raise OutputError(f"record {visible(name, 80)!r}: {len(data)} bytes for {m.size}")
                old, new = info.CRC, zlib.crc32(data)
                out.seek(m.offset)
                out.write(data)
                del data
                # the CRC sits in the local header, or (flag bit 3) in a descriptor after the data
                src.seek(m.offset + m.size)
                after = src.read(8)
                at = m.offset + m.size + (4 if after[:4] == _DESCRIPTOR else 0)
                src.seek(at)
                if struct.unpack("<I", src.read(4))[0] == old and info.flag_bits & 0x8:
                    out.seek(at)
                    out.write(struct.pack("<I", new))
                src.seek(info.header_offset + 14)
                if struct.unpack("<I", src.read(4))[0] == old:
                    out.seek(info.header_offset + 14)
                    out.write(struct.pack("<I", new))
                out.seek(central[name] + 16)
                out.write(struct.pack("<I", new))
            out.seek(0, io.SEEK_END)

    return write


def _crc_ok(path: Path, name: str) -> bool:
    """The member's data matches the CRC of the central directory, and the local header (or the data
    descriptor) agrees with it: what the patch relies on to update the CRC in every place."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(name)
            with z.open(name) as f:
                while f.read(1 << 24):  # zipfile checks the CRC at the end of the member
                    pass
        with open(path, "rb") as f:
            f.seek(info.header_offset + 14)
            local = struct.unpack("<I", f.read(4))[0]
    except (zipfile.BadZipFile, OSError, KeyError, struct.error):
        return False
    return bool(info.flag_bits & 0x8) or local == info.CRC


def _unreadable(path: Path) -> bool:
    """Whether Python's zipfile fails on the archive's own member headers."""
    try:
        with zipfile.ZipFile(path) as z:
            z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError):
        return True
    return False


def check_patched(source: Path, written: Path, layout: ZipLayout, records: dict[str, Callable[[], bytes]],
                  shown: str) -> None:
    """The written archive is the source but for the records: same members at the same places,
    data.pkl byte for byte, each record as intended, every CRC right."""
    try:
        with zipfile.ZipFile(written) as z:
            bad = z.testzip()
            names = [i.filename for i in z.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        # ValueError: a local header whose name does not decode (UnicodeDecodeError)
        if isinstance(e, ValueError) and _unreadable(source):
            raise MalformedInputError(f"{shown}: a member's local header does not read back ({clean_message(e, 80)}); "
                                      "it cannot be rewritten safely", shown) from None
        raise OutputError(f"{shown}: the written archive does not read back ({clean_message(e, 80)})",
                          shown) from None
    if bad is not None:
        if not _crc_ok(source, bad):  # the input's member was already inconsistent
            raise MalformedInputError(f"{shown}: member {visible(bad, 80)!r} fails its CRC check", shown)
        raise OutputError(f"{shown}: the written archive fails its CRC check at {visible(bad, 80)!r}", shown)
    if names != list(layout.members) or written.stat().st_size != layout.size:
        raise OutputError(f"{shown}: the written archive's members moved", shown)
    with open(source, "rb") as a, open(written, "rb") as b:
        for name, m in layout.members.items():
            a.seek(m.offset)
            b.seek(m.offset)
            if name in records:
                if b.read(m.size) != records[name]():
                    raise OutputError(f"{shown}: record {visible(name, 80)!r} was not written as intended", shown)
            else:
                left = m.size
                while left:
                    n = min(left, 1 << 24)
                    if a.read(n) != b.read(n):
                        raise OutputError(f"{shown}: {visible(name, 80)!r} changed, but was not edited", shown)
                    left -= n
