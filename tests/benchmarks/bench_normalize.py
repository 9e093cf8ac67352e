"""normalize against inspect plus a plain read and write of the same file, on real-sized checkpoints.

Run by hand (files go to /tmp, about 2.1 GB):

    python tests/benchmarks/bench_normalize.py            # 90 MB and 400 MB, 3 runs; 1.6 GB once
    python tests/benchmarks/bench_normalize.py --cases st90 --repeat 5

Each command runs as its own process; times include start-up, peak RSS comes from wait4 (this
script imports neither torch nor lipaudit, so its children start small).
"write only" opens the checkpoint and writes it with every matrix scaled by 0.5, values computed
on demand: the writer's own memory and speed, apart from the audit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Maker = Callable[[Path], None]


def _bert(blocks: int, vocab: int, width: int = 768, hidden: int = 3072) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)

    def mat(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    sd = {"embeddings.word_embeddings.weight": mat(vocab, width),
          "embeddings.LayerNorm.weight": torch.ones(width), "embeddings.LayerNorm.bias": torch.zeros(width)}
    for i in range(blocks):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + name + ".weight"] = mat(width, width)
            sd[p + name + ".bias"] = torch.zeros(width)
        sd[p + "attention.output.LayerNorm.weight"] = torch.ones(width)
        sd[p + "attention.output.LayerNorm.bias"] = torch.zeros(width)
        sd[p + "intermediate.dense.weight"] = mat(hidden, width)
        sd[p + "intermediate.dense.bias"] = torch.zeros(hidden)
        sd[p + "output.dense.weight"] = mat(width, hidden)
        sd[p + "output.dense.bias"] = torch.zeros(width)
        sd[p + "output.LayerNorm.weight"] = torch.ones(width)
        sd[p + "output.LayerNorm.bias"] = torch.zeros(width)
    return sd


def _mlp(layers: int, width: int = 1024) -> dict[str, object]:
    import torch

    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(layers):
        sd[f"layers.{i}.weight"] = torch.randn(width, width, generator=g) / width**0.5
        sd[f"layers.{i}.bias"] = torch.zeros(width)
    return {"epoch": 3, "state_dict": sd}


def _save_st(sd: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(path))


def _save_pt(sd: dict[str, object], path: Path) -> None:
    import torch

    torch.save(sd, path)


CASES: dict[str, tuple[str, Maker]] = {
    # a sentence-transformer of about 90 MB
    "st90": ("model.safetensors", lambda p: _save_st(_bert(2, 10000), p)),
    # a training checkpoint of 95 Linear layers 1024x1024, about 400 MB
    "zip400": ("model.pt", lambda p: _save_pt(_mlp(95), p)),
    # 56 BERT blocks, about 1.6 GB
    "st1600": ("model.safetensors", lambda p: _save_st(_bert(56, 1000), p)),
}

_PLAIN = """
import sys
src, dst = sys.argv[1], sys.argv[2]
if src.endswith(".safetensors"):
    from safetensors.torch import load_file, save_file
    save_file(load_file(src), dst)
else:
    import torch
    torch.save(torch.load(src, weights_only=True), dst)
"""

_WRITE_ONLY = """
import sys
from pathlib import Path
from lipaudit.checkpoint import Edits, open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
edits = Edits()
for info in ckpt.infos:
    if info.is_float and len(info.shape) == 2:
        edits.values[info.key] = lambda k=info.key: ckpt.load(k) * 0.5
ckpt.write(edits, Path(sys.argv[2]))
"""


def _run(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 1):  # 1: a gate failed, still a full run
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}: {err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def bench(name: str, repeat: int, folder: Path) -> None:
    filename = CASES[name][0]
    src = folder / f"{name}-{filename}"
    if not src.exists():  # in a child: a parent grown large would pass its peak RSS on to every fork
        subprocess.run([sys.executable, __file__, "--make", name, str(src)], check=True)
    out = folder / f"{name}-out-{filename}"
    out.unlink(missing_ok=True)
    py = sys.executable
    commands = {
        "inspect": [py, "-m", "lipaudit", "inspect", str(src)],
        "plain read+write": [py, "-c", _PLAIN, str(src), str(out)],
        "normalize": [py, "-m", "lipaudit", "normalize", str(src), "-o", str(out), "-q"],
        "write only": [py, "-c", _WRITE_ONLY, str(src), str(out)],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    rss: dict[str, int] = dict.fromkeys(commands, 0)
    for _ in range(repeat):
        for what, args in commands.items():
            wall, peak = _run(args)
            times[what].append(wall)
            rss[what] = max(rss[what], peak)
            out.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = src.stat().st_size
    print(f"\n{name}: {src.name}, {size / 2**20:.0f} MiB, {repeat} run(s), medians")
    for what in commands:
        print(f"  {what:18s} {med[what]:8.2f} s   peak RSS {rss[what] / 2**20:7.0f} MiB")
    base = med["inspect"] + med["plain read+write"]
    print(f"  normalize / (inspect + plain read+write) = {med['normalize'] / base:.2f}")
    print(f"  write only: {size / 2**20 / med['write only']:.0f} MiB/s including start-up and verify")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (st1600 runs once unless named alone)")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "lipaudit-bench")
    ap.add_argument("--make", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        CASES[args.make[0]][1](Path(args.make[1]))
        return
    args.folder.mkdir(exist_ok=True)
    for name in args.cases:
        repeat = 1 if name == "st1600" and len(args.cases) > 1 else args.repeat
        bench(name, repeat, args.folder)


if __name__ == "__main__":
    main()
