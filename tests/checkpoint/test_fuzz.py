"""Structure-aware fuzzing: pickle opcodes and memo references, safetensors header JSON, zip directories.

Each case runs in one long-lived child process that caps its own address space and gives every
case a time limit, so a case that allocates without a budget, hangs or crashes the process is
caught and named. A case passes with an exit code in {0, 1, 3, 4, 5}, within 60 s, with the
process's peak resident memory under 2 GiB, leaving nothing behind. CI runs a few dozen cases;
a long run by hand:

    python -m tests.checkpoint.test_fuzz --cases 100000 [--seed 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DOCUMENTED = {0, 1, 3, 4, 5}  # passed, failed, unsafe, malformed, over a budget
CASE_SECONDS = 60
MEMORY_CAP = 4 * 2**30  # address space: a hard stop, above the RSS limit a case is judged by
RSS_LIMIT = 2 * 2**30

# -- pickle opcodes ------------------------------------------------------------------------

_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
    ("torch", "FloatStorage"), ("torch", "DoubleTensor"), ("torch", "Tensor"), ("builtins", "bytearray"),
    ("builtins", "set"), ("builtins", "getattr"), ("os", "system"), ("posix", "system"), ("subprocess", "Popen"),
    ("builtins", "eval"), ("torch.nn.modules.linear", "Linear"), ("some.unknown", "Thing"), ("_codecs", "encode"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch._utils", "_rebuild_qtensor"), ("torch", "Size"),
    ("torch.utils.collect_env", "run"), ("torch.storage", "_load_from_bytes"), ("pydoc", "pipepager"),
    ("argparse", "Namespace"), ("numpy.core.multiarray", "_reconstruct"), ("torch", "device"),
    ("torch.serialization", "_get_layout"), ("torch", "HalfStorage"), ("torch._utils", "_rebuild_tensor"),
]
_INSERTS = [b"R", b"b", b"s", b"u", b"a", b"e", b"0", b"2", b"(", b"t", b")", b"]", b"}", b"N", b"\x88", b"\x85",
            b"\x86", b"\x87", b"\x81", b"\x92", b"\x93", b"Q", b"K\xff", b"J\xff\xff\xff\x7f", b"\x8c\x01x",
            b"\x95" + struct.pack("<Q", 2**40), b"\x96" + struct.pack("<Q", 2**62), b"\x8e" + struct.pack("<Q", 2**61)]


def _ops(data: bytes) -> list[tuple[str, Any, bytes]]:
    """(name, argument, raw bytes) of each opcode up to STOP."""
    out: list[tuple[str, Any, bytes]] = []
    items = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(items):
        end = items[i + 1][2] if i + 1 < len(items) else pos + 1
        out.append((op.name, arg, data[pos:end]))
    return out


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    try:
        ops = _ops(data)
    except Exception:
        return data
    raw = [r for _, _, r in ops]
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw))
        name = ops[min(i, len(ops) - 1)][0]
        kind = rng.choice(["drop", "dup", "swap", "memo", "int", "global", "insert", "string"])
        if kind == "drop":
            del raw[i]
        elif kind == "dup":
            raw.insert(i, raw[i])
        elif kind == "swap":
            j = rng.randrange(len(raw))
            raw[i], raw[j] = raw[j], raw[i]
        elif kind == "memo":
            # point a memo read or write somewhere else: shared and missing references
            target = rng.choice([0, 1, 2, rng.randrange(256), 2**31 - 1])
            op = rng.choice([b"h", b"q"]) if target < 256 else rng.choice([b"j", b"r"])
            raw[i] = op + (bytes([target]) if target < 256 else struct.pack("<I", target))
        elif kind == "int":
            raw[i] = rng.choice([b"K", b"J"]) + (bytes([rng.randrange(256)]) if rng.random() < 0.5
                                                 else struct.pack("<i", rng.choice([-1, 2**31 - 1, 0, 7])))
            raw[i] = raw[i] if raw[i][0:1] == b"J" else raw[i][:2]
        elif kind == "global":
            raw[i] = _global(*rng.choice(_GLOBALS))
        elif kind == "insert":
            raw.insert(i, rng.choice(_INSERTS))
        elif kind == "string" and name in ("BINUNICODE", "SHORT_BINUNICODE"):
            text = rng.choice(["storage", "0", "1", "cpu", "state_dict", "x" * 300, "\x1b[31m", "../data/0"])
            raw[i] = b"X" + struct.pack("<I", len(text.encode())) + text.encode()
    return b"".join(raw)


# -- containers ----------------------------------------------------------------------------


def _rezip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are among the cases
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def mutate_zip_pickle(data: bytes, rng: random.Random) -> bytes:
    members = _members(data)
    return _rezip([(n, mutate_pickle(d, rng) if n.endswith("data.pkl") else d) for n, d in members])


def mutate_zip_directory(data: bytes, rng: random.Random) -> bytes:
    """Edit the central directory: methods, sizes, offsets, names, entry counts."""
    out = bytearray(data)
    eocd = out.rfind(b"PK\x05\x06")
    cd = out.find(b"PK\x01\x02")
    if eocd < 0 or cd < 0:
        return data
    entries = [i for i in range(cd, eocd) if out[i : i + 4] == b"PK\x01\x02"]
    for _ in range(rng.randint(1, 3)):
        e = rng.choice(entries)
        field = rng.choice([(10, "<H", [8, 12, 99]), (20, "<I", [0, 2**32 - 1, 1 << 20]), (24, "<I", [0, 2**32 - 1]),
                            (42, "<I", [0, 2**32 - 1, len(out)]), (28, "<H", [0, 1, 200])])
        off, fmt, values = field
        struct.pack_into(fmt, out, e + off, rng.choice(values))
    if rng.random() < 0.3:
        struct.pack_into("<H", out, eocd + 10, rng.choice([0, 1, 65535]))
    if rng.random() < 0.3 and len(entries) > 1:  # two entries with the same name
        a, b = rng.sample(entries, 2)
        na, nb = struct.unpack_from("<H", out, a + 28)[0], struct.unpack_from("<H", out, b + 28)[0]
        if na == nb:
            out[b + 46 : b + 46 + nb] = out[a + 46 : a + 46 + na]
    return bytes(out)


def mutate_zip_names(data: bytes, rng: random.Random) -> bytes:
    """Members whose names differ only in case, or extra pickles and records beside the real ones."""
    members = _members(data)
    name, body = rng.choice(members)
    kind = rng.choice(["case", "extra_pkl", "extra_record"])
    prefix = name.split("/")[0]
    if kind == "case":
        members.append((name.upper() if rng.random() < 0.5 else name.swapcase(), body))
    elif kind == "extra_pkl":
        members.append((f"{prefix}/{rng.choice(['Data.pkl', 'DATA.PKL', 'extra.pkl'])}", b"\x80\x02}q\x00."))
    else:
        members.append((f"{prefix}/DATA/{rng.choice(['0', '1'])}", bytes(len(body))))
    rng.shuffle(members)
    return _rezip(members)


def mutate_legacy(data: bytes, rng: random.Random) -> bytes:
    f = io.BytesIO(data)
    starts = []
    try:
        for _ in range(4):
            starts.append(f.tell())
            for _op in pickletools.genops(f):
                pass
    except Exception:
        return data
    main, end = starts[3], f.tell()
    return data[:main] + mutate_pickle(data[main:end], rng) + data[end:]


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        k = rng.choice(names)
        kind = rng.choice(["dtype", "shape", "offsets", "drop", "add", "deep", "meta", "length", "pad"])
        if kind == "dtype":
            header[k]["dtype"] = rng.choice(["F64", "F16", "BF16", "I8", "BOOL", "C64", "f32", "X", 1, None])
        elif kind == "shape":
            header[k]["shape"] = rng.choice([[0, 2**64], [-1], [2**62, 2**62], [1.5], "2", [], [0], [3] * 70])
        elif kind == "offsets":
            s, e = header[k]["data_offsets"]
            header[k]["data_offsets"] = rng.choice([[e, s], [s, e + 4], [-4, e], [s, 2**63], [s], [s, e, 1]])
        elif kind == "drop":
            del header[k]
            names.remove(k)
        elif kind == "add":
            header[rng.choice(["\x1b]0;x\x07", "::error::x", "", k + "~"])] = dict(header[k])
        elif kind == "deep":
            header["__metadata__"] = json.loads("[" * 50 + "]" * 50) if rng.random() < 0.5 else {"x": 1}
        elif kind == "meta":
            header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, [], "x", None])
        elif kind == "length":
            raw = json.dumps(header).encode()
            return struct.pack("<Q", len(raw) + rng.choice([-1, 1, 8, 2**40])) + raw + body
        elif kind == "pad":
            raw = json.dumps(header).encode()
            return struct.pack("<Q", len(raw) + 5) + raw + b"     " + body
        if not names:
            break
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:  # a deeply nested value, past any recursion limit
        raw = raw[:-1] + b', "z": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _seeds() -> dict[str, bytes]:
    seeds = {name: (FIXTURES / name).read_bytes() for name in ("mlp.pt", "mlp_legacy.pt", "mlp.safetensors")}
    import torch

    buf = io.BytesIO()
    sd = collections.OrderedDict([("a.weight", torch.eye(3)), ("b.weight", torch.ones(2, 3))])
    shared = {"x": sd}
    torch.save({"state_dict": sd, "ema": shared, "list": [sd, sd], "step": 3}, buf)
    seeds["shared.pt"] = buf.getvalue()
    return seeds


MUTATORS: dict[str, list[Callable[[bytes, random.Random], bytes]]] = {
    ".pt": [mutate_zip_pickle, mutate_zip_directory, mutate_zip_names, mutate_bytes],
    "legacy": [mutate_legacy, mutate_bytes],
    ".safetensors": [mutate_header, mutate_bytes],
}


def make_case(seeds: dict[str, bytes], seed: int) -> tuple[str, bytes, str]:
    """(file name, bytes, mutator name) for one case, determined by the seed."""
    rng = random.Random(seed)
    name = rng.choice(sorted(seeds))
    kind = "legacy" if "legacy" in name else Path(name).suffix
    mutator = rng.choice(MUTATORS[kind])
    data = seeds[name]
    for _ in range(rng.randint(1, 2)):
        try:
            data = mutator(data, rng)
        except Exception:  # a mutation that does not apply to this damaged input
            break
    return name, data, mutator.__name__


# -- the capped worker ---------------------------------------------------------------------

_WORKER = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from click.testing import CliRunner
from lipaudit.cli import cli

class CaseTimeout(BaseException):
    pass

def alarm(signum, frame):
    raise CaseTimeout()

signal.signal(signal.SIGALRM, alarm)
for line in sys.stdin:
    args = json.loads(line)
    signal.alarm({seconds})
    try:
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        code, text = r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")
    except CaseTimeout:
        code, text = "timeout", ""
    except MemoryError:
        code, text = "memory", ""
    finally:
        signal.alarm(0)
    clean = "\x1b" not in text and "Traceback" not in text
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak so far, in bytes
    print(json.dumps({{"code": code, "clean": clean, "rss": rss}}), flush=True)
"""


class Worker:
    def __init__(self) -> None:
        code = _WORKER.format(cap=MEMORY_CAP, seconds=CASE_SECONDS)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).resolve().parents[2])

    def run(self, args: list[str]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"code": f"died ({self.proc.wait()})", "clean": False}
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait(timeout=30)


def check_case(w: Worker, folder: Path, name: str, data: bytes, normalize: bool) -> dict[str, Any]:
    path = folder / name
    path.write_bytes(data)
    out = folder / f"out_{name}"
    args = ["normalize", str(path), "-o", str(out), "-q"] if normalize else ["inspect", str(path), "--format",
                                                                              "json", "-q"]
    t0 = time.monotonic()
    result = w.run(args)
    result["seconds"] = time.monotonic() - t0
    result["left"] = sorted(p.name for p in folder.iterdir() if p.name not in (name, out.name))
    result["changed"] = path.read_bytes() != data
    if out.exists() and result["code"] not in (0, 1):
        result["left"].append(out.name)
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()
    return result


_SEEDS: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def capped() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), normalize=st.booleans())
def test_structured_fuzz(capped: Worker, tmp_path_factory: pytest.TempPathFactory, seed: int, normalize: bool) -> None:
    if not _SEEDS:
        _SEEDS.update(_seeds())
    name, data, _ = make_case(_SEEDS, seed)
    folder = tmp_path_factory.mktemp("case")
    result = check_case(capped, folder, name, data, normalize)
    assert result["code"] in DOCUMENTED, (seed, normalize, result)
    assert result["clean"] and not result["left"] and not result["changed"], (seed, result)
    assert result.get("rss", 0) < RSS_LIMIT and result["seconds"] < CASE_SECONDS, (seed, result)


def test_overlapping_members_are_read_but_not_patched(capped: Worker, tmp_path: Path) -> None:
    """A case the fuzzer found: the central directory puts one member's data over another's local
    header. torch reads it, so inspect does; writing the first member would break the second, so
    normalize refuses it as malformed (it once wrote the file, failed its own check, exit 70)."""
    import torch

    name, data, _ = make_case(_seeds(), 3988493)
    torch.load(io.BytesIO(data), weights_only=True)
    for sub in ("read", "write"):
        (tmp_path / sub).mkdir()
    assert check_case(capped, tmp_path / "read", name, data, False)["code"] == 0
    result = check_case(capped, tmp_path / "write", name, data, True)
    assert result["code"] == 4 and result["clean"] and not result["left"], result


def test_mutators_change_structure() -> None:
    seeds = _seeds()
    rng = random.Random(0)
    assert mutate_zip_pickle(seeds["mlp.pt"], rng) != seeds["mlp.pt"]
    assert mutate_header(seeds["mlp.safetensors"], rng) != seeds["mlp.safetensors"]
    assert mutate_legacy(seeds["mlp_legacy.pt"], rng) != seeds["mlp_legacy.pt"]
    assert mutate_zip_directory(seeds["mlp.pt"], rng) != seeds["mlp.pt"]
    assert mutate_zip_names(seeds["mlp.pt"], rng) != seeds["mlp.pt"]
    with pytest.raises(pickle.UnpicklingError):
        pickle.Unpickler(io.BytesIO(b"\x80\x02X\x01")).load()  # the reference the mutations aim at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="copy failing inputs here")
    ap.add_argument("--progress", type=int, default=0, help="print a line every N cases")
    opts = ap.parse_args()
    seeds = _seeds()
    histogram: collections.Counter[str] = collections.Counter()
    by_mutator: collections.Counter[str] = collections.Counter()
    failures = 0
    peak = 0.0
    slowest = 0.0
    t0 = time.monotonic()
    w = Worker()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.cases):
            seed = opts.seed * 1_000_003 + i
            name, data, mutator = make_case(seeds, seed)
            normalize = i % 5 == 4
            result = check_case(w, Path(tmp), name, data, normalize)
            histogram[f"{'normalize' if normalize else 'inspect'} {result['code']}"] += 1
            by_mutator[f"{mutator} {result['code']}"] += 1
            peak = max(peak, result.get("rss", 0))
            slowest = max(slowest, result["seconds"])
            bad = (result["code"] not in DOCUMENTED or not result["clean"] or result["left"] or result["changed"]
                   or result.get("rss", 0) >= RSS_LIMIT or result["seconds"] >= CASE_SECONDS)
            if bad:
                failures += 1
                print(f"FAIL seed={seed} {name} {mutator} normalize={normalize}: {result}", flush=True)
                if opts.keep:
                    opts.keep.mkdir(parents=True, exist_ok=True)
                    (opts.keep / f"{seed}_{name}").write_bytes(data)
                if str(result["code"]).startswith("died"):
                    w = Worker()
                elif result.get("rss", 0) >= RSS_LIMIT:  # a fresh process: the peak counts from zero
                    w.close()
                    w = Worker()
            if opts.progress and (i + 1) % opts.progress == 0:
                print(f"{i + 1} cases, {failures} failures, {time.monotonic() - t0:.0f} s", flush=True)
    w.close()
    print(f"{opts.cases} cases in {time.monotonic() - t0:.0f} s, {failures} failures, "
          f"peak RSS {peak / 2**20:.0f} MiB, slowest case {slowest:.1f} s")
    for k, v in sorted(histogram.items()):
        print(f"  {k}: {v}")
    for k, v in sorted(by_mutator.items()):
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
