"""Brackets [measured lower, certified upper] on small trained networks exported at 64x64.

Run by hand: python tests/benchmarks/bench_bracket.py [--steps 300] [--work 400] [--threads 2]
Builds and trains tests/models/mobilenet.py's MobileNetV2-style network and small ResNet on
synthetic data (fixed seeds, CPU), exports them with torch.export, and prints per network: the
product of the layer norms, the previous graph bound (the walk without block bounds), the new
certified upper end, the measured lower end, their ratio, the slope floor (lipaudit/graph/relax.py:
no certificate that sees activations only through their slope ranges goes below it) and the times,
then each used block's bound against its own floor.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from lipaudit.graph import GraphSettings, load_archive  # noqa: E402
from lipaudit.graph.bound import bound_graph  # noqa: E402
from lipaudit.graph.lower import measure  # noqa: E402
from lipaudit.graph.relax import block_floors, slope_floor  # noqa: E402
from tests.models.mobilenet import build, export  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", type=int, default=400)  # the README's numbers; the audit's default is 200
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = GraphSettings()
    for name in ("mobilenet", "resnet"):
        if args.only and name != args.only:
            continue
        t0 = time.perf_counter()
        data = export(build(name, args.steps))
        t_train = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}.pt2"
            path.write_bytes(data)
            loaded = load_archive(str(path))
            t0 = time.perf_counter()
            old = bound_graph(loaded.graph, loaded.evaluator(), s.rtol, s.conv_rtol, s.seed, blocks=False)
            t_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            new = bound_graph(loaded.graph, loaded.evaluator(), s.rtol, s.conv_rtol, s.seed)
            t_new = time.perf_counter() - t0
            samples, _ = loaded.archive.sample_inputs()
            t0 = time.perf_counter()
            low = measure(loaded.graph, loaded.evaluator(), samples, args.work, s.seed)
            t_low = time.perf_counter() - t0
            floor = slope_floor(loaded.graph, loaded.evaluator(), samples, args.work, s.seed)
            own = block_floors(loaded.graph, loaded.evaluator(), list(new.blocks), args.work // 2, s.seed)
        up = new.outputs["input"]
        lo = math.log10(low.lower) if low.lower else math.nan
        used = [b for b in new.blocks if b["used"]]
        rules = sorted({b["rule"] for b in used})
        prev = old.outputs["input"]
        print(f"{name}: trained {t_train:.0f} s; product 1e{new.chain_log10:.2f}; previous graph 1e{prev:.2f} "
              f"({t_old:.1f} s); new upper 1e{up:.2f} ({t_new:.1f} s, {len(used)} blocks: {', '.join(rules)}); "
              f"lower {low.lower:.4g} ({low.work} evaluations, start {low.best_start}, {t_low:.1f} s); "
              f"ratio 1e{up - lo:.2f}; slope floor {floor.value or math.nan:.4g} ({floor.seconds:.1f} s): "
              f"upper / floor 1e{up - math.log10(floor.value or math.nan):.2f}, "
              f"floor / lower 1e{math.log10(floor.value or math.nan) - lo:.2f}")
        floored = [b for b in new.blocks if (b["entry"], b["exit"]) in own]
        ups = math.prod(b["upper"] for b in floored)
        lows = math.prod(own[(b["entry"], b["exit"])] for b in floored)
        print(f"  {len(floored)} used blocks: bound / floor from "
              f"{min((b['upper'] / own[(b['entry'], b['exit'])] for b in floored), default=math.nan):.2f} to "
              f"{max((b['upper'] / own[(b['entry'], b['exit'])] for b in floored), default=math.nan):.2f}; "
              f"product of their bounds {ups:.3g}, of their floors {lows:.3g} (inside blocks {ups / lows:.3g}x; "
              f"network floor {floor.value or math.nan:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
