"""Threads of this process: files in parallel, one job each (the layers inside run one at a time)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lipaudit.executors import Executor

T = TypeVar("T")
Item = TypeVar("Item")


class LocalExecutor(Executor):
    def __init__(self, address: str, jobs: int) -> None:
        self.jobs = max(1, jobs)

    def map(self, fn: Callable[[Item], T], items: list[Item]) -> list[T]:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.jobs, len(items))) as pool:
            return list(pool.map(fn, items))
