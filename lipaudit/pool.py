"""Independent jobs (layers, files) run on a pool: one torch thread per worker, the costliest first.

One intra-op thread everywhere, the serial path included: torch's own threads inside the serial
path burn several times the CPU for little gain, and reductions split across a varying number of
threads round differently, so the same layer would not give the same bits with --jobs 1 and 2.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_depth = 0
_saved = 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread while any caller is inside; nested and concurrent callers share it."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved)


# The measured lower end and the slope floor run whole networks with torch's own intra-op threads
# (forward-mode AD keeps global state, so they cannot be split over Python threads); a fixed count,
# not the machine's, keeps their bits the same everywhere.
MEASURE_THREADS = 2


@contextmanager
def fixed_threads(n: int = MEASURE_THREADS) -> Iterator[None]:
    """torch on exactly n threads for the block, or on one inside single_threaded (several audits
    side by side, where changing the count would change theirs)."""
    with _lock:
        nested = _depth > 0
        before = torch.get_num_threads()
        if not nested:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        if not nested:
            with _lock:
                torch.set_num_threads(before)


def shape_cost(shape: Sequence[int]) -> float:
    """A rough work estimate for a weight of that shape, only to start the dearest first: a kernel
    with several taps is searched over frequencies (hundreds of factorisations of the channel
    Gram matrix), a matrix needs one decomposition."""
    if len(shape) < 2:
        return float(math.prod(shape))
    small = min(shape[0], shape[1])
    taps = math.prod(shape[2:])
    return float(math.prod(shape)) * small * (100.0 if taps > 1 else 1.0)


def run_all(
    items: Sequence[T],
    work: Callable[[T], R],
    jobs: int,
    cost: Callable[[T], float] | None = None,
    started: Callable[[int, T], None] | None = None,
) -> list[R]:
    """work(item) for every item, results in the items' order. With several jobs the dearest items
    (by cost) start first, so the longest ones do not come last and leave workers idle.
    started(i, item) is called from this thread as each result is awaited, in the order run."""
    order = list(range(len(items)))
    with single_threaded():
        if jobs <= 1 or len(items) <= 1:
            out: list[R] = []
            for i in order:
                if started:
                    started(i, items[i])
                out.append(work(items[i]))
            return out
        if cost is not None:
            order.sort(key=lambda i: -cost(items[i]))  # stable: ties keep the items' order
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures: dict[int, Future[R]] = {i: pool.submit(work, items[i]) for i in order}
            for i in order:
                if started:
                    started(i, items[i])
                futures[i].result()
            return [futures[i].result() for i in range(len(items))]
