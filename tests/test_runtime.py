"""The malloc thresholds the measurements run under (lipaudit/runtime.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_batches_stop_faulting_fresh_pages() -> None:
    """A 40 MiB buffer allocated and freed 50 times: glibc maps and zeroes each one afresh (about 10,000
    page faults apiece) until tune_malloc raises the thresholds; after it, the heap reuses one."""
    code = (
        "import resource, torch\n"
        "from lipaudit.runtime import tune_malloc\n"
        "def faults():\n"
        "    r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(50):\n"
        "        torch.ones(5 * 2**20, dtype=torch.float64)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r\n"
        "before = faults()\n"
        "ok = tune_malloc()\n"
        "print(before, faults(), ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, ok = int(out[0]), int(out[1]), out[2] == "True"
    if not ok:
        pytest.skip("not glibc")
    assert before > 200_000 and after < before / 10, (before, after)
