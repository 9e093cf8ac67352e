"""Conv bound timings, run by hand; every ratio compares numbers measured in this same run.

python tests/benchmarks/bench_conv.py [--repeat N] [--rtol R] [--jobs J] [--baseline REV] [--cap S]

1. ResNet-18-width random checkpoint: certified bound vs the reshape SVD of the same layers.
2. 3-D vs 2-D kernels with the same number of taps (random and flat-spectrum/paraunitary): the
   3-D search must not be orders of magnitude slower than 2-D.
3. With --baseline REV: the same kernels through lipaudit/spectral/conv.py as of git revision
   REV (loaded from `git show`), each run in a subprocess capped at --cap seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lipaudit.spectral.conv import conv_bound


def resnet18_convs(seed: int = 0) -> dict[str, torch.Tensor]:
    """The conv kernels of torchvision's resnet18, Kaiming-normal like its init (fan_out, relu)."""
    shapes = {"conv1": (64, 3, 7, 7)}
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride_in = c_in if block == 0 else c
            shapes[f"layer{stage}.{block}.conv1"] = (c, stride_in, 3, 3)
            shapes[f"layer{stage}.{block}.conv2"] = (c, c, 3, 3)
            if block == 0 and stride_in != c:
                shapes[f"layer{stage}.{block}.downsample.0"] = (c, stride_in, 1, 1)
        c_in = c
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        fan_out = shape[0] * shape[2] * shape[3]
        out[name] = torch.randn(*shape, generator=g, dtype=torch.float64) * (2.0 / fan_out) ** 0.5
    return out


def paraunitary(c: int, ks: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """K(z) = Q prod (I - P + P z_axis): sigma_max(K^(w)) = 1 at every w (the flattest spectrum)."""
    g = torch.Generator().manual_seed(seed)
    d = len(ks)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    k = q.reshape(c, c, *([1] * d))
    for axis, size in enumerate(ks):
        for _ in range(size - 1):
            v = torch.randn(c, 1, generator=g, dtype=torch.float64)
            p = (v @ v.T) / float(v.T @ v)
            shape = list(k.shape)
            shape[2 + axis] += 1
            new = torch.zeros(shape, dtype=torch.float64)
            lo = [slice(None)] * (2 + d)
            hi = [slice(None)] * (2 + d)
            lo[2 + axis] = slice(0, shape[2 + axis] - 1)
            hi[2 + axis] = slice(1, shape[2 + axis])
            new[tuple(lo)] += torch.einsum("ab,bc...->ac...", torch.eye(c, dtype=torch.float64) - p, k)
            new[tuple(hi)] += torch.einsum("ab,bc...->ac...", p, k)
            k = new
    return k


def pairs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        ("random 64ch 3x9 (27 taps)", torch.randn(64, 64, 3, 9, generator=g, dtype=torch.float64)),
        ("random 64ch 3x3x3 (27 taps)", torch.randn(64, 64, 3, 3, 3, generator=g, dtype=torch.float64)),
        ("paraunitary 8ch 11x11 (121)", paraunitary(8, (11, 11))),
        ("paraunitary 8ch 5x5x5 (125)", paraunitary(8, (5, 5, 5))),
        ("random 16ch 9x81 (729 taps)", torch.randn(16, 16, 9, 81, generator=g, dtype=torch.float64)),
        ("random 16ch 9x9x9 (729 taps)", torch.randn(16, 16, 9, 9, 9, generator=g, dtype=torch.float64)),
    ]


def _bounds(kernels: list[torch.Tensor], rtol: float, jobs: int) -> list[Any]:
    """As the audit runs them: several layers at once, single-threaded LAPACK in each."""
    if jobs <= 1:
        return [conv_bound(k, rtol) for k in kernels]
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda k: conv_bound(k, rtol), kernels))
    finally:
        torch.set_num_threads(threads)


def _time(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _old_worker(path: str, k: torch.Tensor, rtol: float, queue: Any) -> None:
    spec = importlib.util.spec_from_file_location("old_conv", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_conv"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    t = time.perf_counter()
    res = mod.conv_bound(k, rtol)
    queue.put((time.perf_counter() - t, res.interval.lower, res.interval.upper))


def _old(path: str, k: torch.Tensor, rtol: float, cap: float) -> str:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_old_worker, args=(path, k, rtol, queue))
    proc.start()
    proc.join(cap)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return f"> {cap:.0f} s (stopped)"
    if queue.empty():
        return "failed (see its traceback above)"
    t, lo, up = queue.get()
    return f"{t:8.2f} s  upper/lower {up / lo:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--jobs", type=int, default=2, help="layers at once, as lipaudit inspect --jobs")
    ap.add_argument("--baseline", default=None, help="git revision whose conv.py to time as well")
    ap.add_argument("--cap", type=float, default=120.0, help="seconds per kernel for the baseline")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)

    if not args.skip_resnet:
        kernels = resnet18_convs()
        # the baseline as a user would run it: LAPACK's SVD of each reshaped kernel
        base, _ = _time(lambda: [float(torch.linalg.svdvals(k.reshape(k.shape[0], -1))[0])
                                 for k in kernels.values()], args.repeat)
        cert, results = _time(lambda: _bounds(list(kernels.values()), args.rtol, args.jobs), args.repeat)
        worst = max(r.interval.upper / r.interval.lower for r in results)
        print(f"reshape SVD of {len(kernels)} ResNet-18 conv layers: median {base:.3f} s over {args.repeat} runs")
        print(f"certified bound (rtol {args.rtol:g}): median {cert:.3f} s, worst upper/lower {worst:.5f}")
        print(f"ratio certified / reshape: {cert / base:.1f}x; load average {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs")

    print("\nsame taps, 2-D vs 3-D (single thread, median of --repeat):")
    torch.set_num_threads(1)
    rows = []
    for name, k in pairs():
        t, res = _time(lambda k=k: conv_bound(k, args.rtol), args.repeat)
        iv = res.interval
        rows.append((name, k, t))
        loose = "  LOOSE" if iv.loose else ""
        print(f"  {name:30s} {t:8.2f} s  points {res.points:7d}  upper/lower {iv.upper / iv.lower:.4f} "
              f"({iv.upper_method}){loose}")
    for (n2, _, t2), (n3, _, t3) in itertools.pairwise(rows):
        if "3x3x3" in n3 or "5x5x5" in n3 or "9x9x9" in n3:
            print(f"  ratio 3-D / 2-D: {t3 / t2:6.1f}x  ({n3} vs {n2})")

    if args.baseline:
        src = subprocess.run(["git", "show", f"{args.baseline}:lipaudit/spectral/conv.py"], check=True,
                             capture_output=True, text=True).stdout
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "old_conv.py"
            path.write_text(src)
            print(f"\nbaseline {args.baseline} (single thread, one run each, capped at {args.cap:.0f} s):")
            for name, k, t in rows:
                print(f"  {name:30s} now {t:8.2f} s   baseline {_old(str(path), k, args.rtol, args.cap)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
