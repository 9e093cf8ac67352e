"""A dask.distributed cluster (lipaudit[dask]): one task per file, scheduled by Dask.

Workers must see the checkpoints at the same paths as this process (a shared file system) and
run the same lipaudit version; both are checked per task, and a mismatch is an error for that
file, not a wrong report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lipaudit.errors import UsageError
from lipaudit.executors import Executor
from lipaudit.text import visible

T = TypeVar("T")
Item = TypeVar("Item")
# Seconds to reach the scheduler before the run is a usage error.
CONNECT_TIMEOUT_S = 10


class DaskExecutor(Executor):
    def __init__(self, address: str, jobs: int) -> None:
        from distributed import Client

        try:
            self.client: Any = Client(f"tcp://{address}", timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise UsageError(f"--executor dask://{visible(address)}: cannot reach the scheduler ({e})") from None

    def map(self, fn: Callable[[Item], T], items: list[Item]) -> list[T]:
        if not items:
            return []
        # pure=False: a file may change between runs under the same path; never reuse a result
        futures = self.client.map(fn, items, pure=False)
        out: list[T] = self.client.gather(futures)
        return out

    def close(self) -> None:
        self.client.close()
