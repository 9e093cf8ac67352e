"""Auditing an exported CNN or attention block without the measured lower end imports neither torch's compiler stack
nor sympy (about 1 s a process): the shapes check and the block cost model run on registered
shapes-only stand-ins (graph/ops/meta.py). The lower end's forward mode imports them anyway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"

_PROBE = """
import sys
from lipaudit.cli import main
src, dst = sys.argv[1:3]
sys.argv = ["lipaudit", "inspect", "-q", "--format", "json", "--no-measure", "-j", "1", src, "-o", dst]
try:
    main()
except SystemExit as e:
    assert e.code in (0, 1), e.code
heavy = sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)
print("heavy:" + ",".join(heavy))
"""


@pytest.mark.parametrize("name", ["resnet_small.pt2", "resnet_small_core.pt2", "unet.pt2", "mlp_act_core.pt2",
                                  "diag_conv_bn.pt2", "concat.pt2", "attention.pt2", "attention_core.pt2"])
def test_no_compiler_stack_for_a_cnn(name: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(FIXTURES / name), str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy:\n" in out.stdout, out.stdout
    assert (tmp_path / "r.json").stat().st_size > 0
