"""Graph bound, chain product and measured lower end of a ResNet-18 exported with torch.export.

Run by hand: python tests/benchmarks/bench_graph.py [--size 224] [--lower-work 400] [--core]
             python tests/benchmarks/bench_graph.py --cost [--repeat 3]
--cost times `lipaudit inspect` on the state dict, on the .pt2 without and with the measured lower
end (issue 18: the .pt2 at most 2x the state dict plus the lower end's budget), in fresh processes.
The architecture is built here (torchvision's resnet18 layout: BasicBlock, [2, 2, 2, 2], width 64)
with random Kaiming-like weights and BatchNorm statistics from fixed seeds, exported at the given
input size, saved, and audited from the file. Prints each number with its time.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lipaudit.graph import GraphSettings, inspect_archive

ROOT = Path(__file__).resolve().parent.parent.parent


def _builders():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_pt2_fixtures", ROOT / "fixtures" / "make_pt2_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_pt2_fixtures"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--lower-work", type=int, default=400)
    ap.add_argument("--core", action="store_true", help="export the core-aten decomposition")
    ap.add_argument("--conv-rtol", type=float, default=1e-2)
    ap.add_argument("--cost", action="store_true", help="time the CLI on the .pt2 against the state dict")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    b = _builders()
    torch.manual_seed(0)
    model = b.ResNet(64, (2, 2, 2, 2), 1000).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, args.size, args.size)
    t0 = time.perf_counter()
    data = b.export_bytes(model, x, args.core)
    t_export = time.perf_counter() - t0
    if args.cost:
        return _cost(model, data, args)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "resnet18.pt2"
        path.write_bytes(data)
        settings = GraphSettings(conv_rtol=args.conv_rtol, measure=True, measure_work=args.lower_work)
        t0 = time.perf_counter()
        r = inspect_archive(str(path), settings)
        total = time.perf_counter() - t0
    print(f"ResNet-18 at {args.size}x{args.size} ({'core aten' if args.core else 'pre-dispatch'}), "
          f"{len(data) / 2**20:.1f} MiB archive, export {t_export:.1f} s")
    print(f"graph bound      : {r.lipschitz_upper:.4g} (log10 {r.log10_upper:.3f}, certified {r.certified}), "
          f"{r.bound_seconds:.1f} s (layer norms + DAG walk)")
    chain = r.chain_log10 if r.chain_log10 is not None else math.nan
    print(f"chain product    : 1e{chain:.3f} (same layer norms, wiring ignored; not a bound for a ResNet)")
    print(f"measured lower   : {r.lipschitz_lower:.4g}, {r.lower_seconds:.1f} s ({r.lower_note})")
    if r.ratio is not None:
        print(f"upper / lower    : {r.ratio:.3g}")
    folded = sum(1 for v in r.layers.values() if v.fused_upper is not None)
    print(f"layers           : {len(r.layers)} ({folded} BatchNorms folded into their conv)")
    print(f"total            : {total:.1f} s")
    return 0


def _cost(model: torch.nn.Module, data: bytes, args: argparse.Namespace) -> int:
    import os
    import statistics
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        pt2, sd = Path(d) / "resnet18.pt2", Path(d) / "resnet18.pt"
        pt2.write_bytes(data)
        torch.save(model.state_dict(), sd)
        base = [sys.executable, "-m", "lipaudit", "inspect", "-q", "--format", "json", "--layer-time-budget", "1e6"]
        runs = {"state dict": [*base, str(sd)], ".pt2, no lower end": [*base, str(pt2), "--no-measure"],
                ".pt2, default": [*base, str(pt2)]}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeat):
            for what, cmd in runs.items():
                t0 = time.perf_counter()
                rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
                times[what].append(time.perf_counter() - t0)
                if rc not in (0, 1):
                    raise SystemExit(f"{what}: exit {rc}")
    med = {k: statistics.median(v) for k, v in times.items()}
    one, five, _ = os.getloadavg()
    print(f"ResNet-18 at {args.size}x{args.size}, medians of {args.repeat}; load {one:.2f} / {five:.2f} "
          f"on {os.cpu_count()} CPUs")
    for what, t in med.items():
        print(f"  {what:20s} {t:7.1f} s  ({', '.join(f'{x:.1f}' for x in times[what])})")
    lower = med[".pt2, default"] - med[".pt2, no lower end"]
    print(f"  .pt2 without the lower end / state dict = {med['.pt2, no lower end'] / med['state dict']:.2f} "
          f"(issue 18: at most 2); the lower end's budget took {lower:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
