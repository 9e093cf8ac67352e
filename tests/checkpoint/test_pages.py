"""Pages of a mapped checkpoint are handed back after a read, without changing any value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lipaudit.checkpoint.pages import _file_mapped, release, release_storage

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm and madvise")


def _rss_pages() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1])


def _mapped(tmp_path: Path, n: int) -> tuple[torch.UntypedStorage, torch.Tensor]:
    path = tmp_path / "x.bin"
    want = torch.randn(n, generator=torch.Generator().manual_seed(0))
    path.write_bytes(want.numpy().tobytes())
    whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=n * 4)
    return whole, want


@linux
def test_release_drops_resident_pages_and_keeps_values(tmp_path: Path) -> None:
    n = 16 * 2**20 // 4
    whole, want = _mapped(tmp_path, n)
    t = torch.empty(0).set_(whole[:], 0, (n,))  # float32 view of the mapping
    assert torch.equal(t, want)  # touches every page
    before = _rss_pages()
    release(t)
    after = _rss_pages()
    assert before - after > 0.9 * n * 4 / 4096
    assert torch.equal(t, want)  # read back from the file


@linux
def test_anonymous_memory_is_never_released() -> None:
    t = torch.randn(4 * 2**20, generator=torch.Generator().manual_seed(1))
    copy = t.clone()
    lo = t.data_ptr()
    assert not _file_mapped(lo, lo + 4096)
    release(t)
    release_storage(torch.Tensor.untyped_storage(t))
    assert torch.equal(t, copy)


@linux
def test_part_of_a_mapping_and_odd_views(tmp_path: Path) -> None:
    n = 8 * 2**20 // 4
    whole, want = _mapped(tmp_path, n)
    t = torch.empty(0).set_(whole[:], 0, (n,))
    part = t[1000 : n - 1000]
    release(part)
    release(t.flip(0))  # negative strides are skipped
    release(t[::3])
    release(t[:10])  # too small to bother
    assert torch.equal(t, want)
