"""Scale benchmarks for issue #6, each against a baseline measured in the same run.

Run by hand (they build large files under a temporary folder):
  python tests/benchmarks/bench_scale.py memory      # 1.6 GB safetensors of 1024x1024 matrices: peak RSS
  python tests/benchmarks/bench_scale.py dense       # BERT-base-shaped matrices: --method exact vs bare LAPACK
  python tests/benchmarks/bench_scale.py resnet50    # certified conv audit vs reshape SVD, ResNet-50 widths
  python tests/benchmarks/bench_scale.py resnet18    # the same at ResNet-18 widths
  python tests/benchmarks/bench_scale.py convs       # both in one run (issue 18: at most 5x and 3x)
  python tests/benchmarks/bench_scale.py wide --matrices 4   # 4096-wide matrices: auto and fast vs LAPACK
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def _child_peak(cmd: list[str]) -> tuple[float, float, int]:
    """Wall time, peak RSS (MiB) of one child process, and its exit code."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"rc = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL).returncode; "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024, int(out[2])


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.safetensors"
        g = torch.Generator().manual_seed(0)
        tensors = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) / 32 for i in range(args.matrices)}
        save_file(tensors, str(path))
        del tensors
        size_mib = path.stat().st_size / 2**20
        t_bare, rss_bare, _ = _child_peak([sys.executable, "-c", "import torch"])
        t, rss, rc = _child_peak([sys.executable, "-m", "lipaudit", "inspect", str(path), "-q", "--format", "json"])
        print(f"file: {size_mib:.0f} MiB, {args.matrices} matrices 1024x1024 float32")
        print(f"baseline (python + import torch): {rss_bare:.0f} MiB peak RSS, {t_bare:.1f} s")
        print(f"lipaudit inspect: exit {rc}, {rss:.0f} MiB peak RSS ({rss / size_mib:.2f}x the file), {t:.1f} s")
        print("issue #6: under 900 MiB")


def dense(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    tensors = {}
    for layer in range(args.layers):
        for j, s in enumerate(shapes):
            tensors[f"encoder.layer.{layer}.m{j}.weight"] = torch.randn(*s, generator=g) / s[1] ** 0.5
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bert.safetensors"
        save_file(tensors, str(path))
        bare, ours = [], []
        from lipaudit.audit import audit
        from lipaudit.checkpoint import open_checkpoint
        from lipaudit.report import Settings

        for _ in range(args.repeat):
            t = time.perf_counter()
            for w in tensors.values():
                torch.linalg.svdvals(w.double())
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            audit(open_checkpoint(str(path)), Settings(method="exact"))
            ours.append(time.perf_counter() - t)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{len(tensors)} matrices (BERT-base shapes), medians of {args.repeat}")
    print(f"bare float64 LAPACK loop (svdvals): {b:.2f} s")
    print(f"lipaudit --method exact (load + audit, no interpreter start): {o:.2f} s = {o / b:.2f}x")
    print("issue #6: at most 1.5x")


def wide(args: argparse.Namespace) -> None:
    """A stack of 4096-wide matrices: auto (exact, Gram eigensolver) and fast (Lanczos + Cholesky)."""
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.report import Settings

    g = torch.Generator().manual_seed(3)
    sd = {f"blocks.{i}.weight": torch.randn(4096, 4096, generator=g) / 64 for i in range(args.matrices)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wide.safetensors"
        save_file(sd, str(path))
        t = time.perf_counter()
        for w in sd.values():
            torch.linalg.svdvals(w.double())
        bare = time.perf_counter() - t
        times = {}
        for method in ("auto", "fast"):
            t = time.perf_counter()
            report = audit(open_checkpoint(str(path)), Settings(method=method, jobs=1))
            times[method] = time.perf_counter() - t
            # a state dict's product is an estimate (the wiring is unknown); each layer is a proof
            assert all(x.sigma.certified for x in report.layers)
    print(f"{len(sd)} matrices 4096x4096 float32")
    print(f"bare float64 LAPACK loop (svdvals): {bare:.1f} s")
    for method, t in times.items():
        print(f"lipaudit --method {method}: {t:.1f} s = {t / bare:.2f}x")
    try:
        import weightwatcher  # noqa: F401
    except ImportError:
        print("WeightWatcher: not installed, no comparison")


def resnet_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """The conv kernels of torchvision's resnet18 (basic blocks) or resnet50 (bottlenecks)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    c_in = 64
    blocks = (2, 2, 2, 2) if depth == 18 else (3, 4, 6, 3)
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        out = width if depth == 18 else 4 * width
        for b in range(count):
            pre = f"layer{stage}.{b}"
            if depth == 18:
                shapes |= {f"{pre}.conv1.weight": (width, c_in, 3, 3), f"{pre}.conv2.weight": (width, width, 3, 3)}
            else:
                shapes |= {f"{pre}.conv1.weight": (width, c_in, 1, 1), f"{pre}.conv2.weight": (width, width, 3, 3),
                           f"{pre}.conv3.weight": (out, width, 1, 1)}
            if b == 0 and (c_in != out or stage > 1):
                shapes[f"{pre}.downsample.0.weight"] = (out, c_in, 1, 1)
            c_in = out
    return shapes


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def _resnet(depth: int, repeat: int, jobs: int | None = None) -> tuple[float, float, int]:
    """Medians of the reshape SVD (torch.linalg.svdvals, as a user would run it, on `jobs` torch
    threads) and of the whole default audit (load, plan, certify, report; `jobs` layers at once)
    of the same saved checkpoint, interleaved."""
    from lipaudit.audit import audit
    from lipaudit.checkpoint import open_checkpoint
    from lipaudit.report import Settings

    g = torch.Generator().manual_seed(2)
    sd = {k: torch.randn(*s, generator=g) * (2 / (s[0] * s[2] * s[3])) ** 0.5
          for k, s in resnet_shapes(depth).items()}
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    torch.set_num_threads(jobs)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"resnet{depth}.pt"
        torch.save(sd, path)
        base, cert, cpu_base, cpu_cert = [], [], [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            for k in sd.values():
                float(torch.linalg.svdvals(k.double().reshape(k.shape[0], -1))[0])
            base.append(time.perf_counter() - t)
            cpu_base.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            # the wall-clock safety net off: on a shared machine it could fire and mark layers
            report = audit(open_checkpoint(str(path)), Settings(jobs=jobs, layer_time_s=1e6))
            cert.append(time.perf_counter() - t)
            cpu_cert.append(time.process_time() - c)
            bad = [(x.name, x.notes) for x in report.layers if not x.sigma.certified]
            assert not bad, bad
        _, rss, rc = _child_peak([sys.executable, "-m", "lipaudit", "inspect", str(path), "-q", "--format", "json",
                                  "--layer-time-budget", "1000000", "--jobs", str(jobs)])
    b, c = statistics.median(base), statistics.median(cert)
    print(f"ResNet-{depth} widths (random, {len(sd)} conv layers), medians of {repeat}, {jobs} jobs; {_load()}")
    print(f"  reshape SVD: {b:.2f} s; certified default audit: {c:.2f} s = {c / b:.2f}x "
          f"(runs: {', '.join(f'{x:.1f}' for x in cert)} s vs {', '.join(f'{x:.2f}' for x in base)} s)")
    cb, cc = statistics.median(cpu_base), statistics.median(cpu_cert)
    print(f"  CPU time (all threads): reshape SVD {cb:.2f} s, audit {cc:.2f} s = {cc / cb:.2f}x")
    print(f"  lipaudit inspect in a fresh process: exit {rc}, peak RSS {rss:.0f} MiB")
    return b, c, jobs


def resnet50(args: argparse.Namespace) -> None:
    _resnet(50, args.repeat, args.jobs)
    print("issue 18: at most 5x")


def resnet18(args: argparse.Namespace) -> None:
    _resnet(18, args.repeat, args.jobs)
    print("issue 18: at most 3x")


def convs(args: argparse.Namespace) -> None:
    print(_load())
    _resnet(18, args.repeat, args.jobs)
    _resnet(50, args.repeat, args.jobs)
    print(f"issue 18: ResNet-50 at most 5x, ResNet-18 at most 3x; {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["memory", "dense", "resnet50", "resnet18", "convs", "wide"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--matrices", type=int, default=400)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=None,
                    help="resnet modes: layers at once, and torch threads of the baseline [default: CPUs, at most 8]")
    args = ap.parse_args()
    torch.set_num_threads(2)
    {"memory": memory, "dense": dense, "resnet50": resnet50, "resnet18": resnet18, "convs": convs,
     "wide": wide}[args.which](args)


if __name__ == "__main__":
    main()
