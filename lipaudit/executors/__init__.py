"""Where the files of one `inspect` run are audited: one interface, one registry.

An executor maps a picklable function over file paths and returns the results in order. `local`
runs them on threads of this process; `dask://HOST:PORT` sends them to a dask.distributed
scheduler (the optional extra lipaudit[dask]). A new engine is one module and one entry in
EXECUTORS. Specs are parsed without importing the engine or torch, so a bad --executor is a
usage error at once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib import import_module
from typing import Any, TypeVar

from lipaudit.errors import UsageError
from lipaudit.text import visible

T = TypeVar("T")
Item = TypeVar("Item")


class Executor(ABC):
    """Runs fn over items; results come back in the order of items."""

    @abstractmethod
    def map(self, fn: Callable[[Item], T], items: list[Item]) -> list[T]:
        """fn(item) for every item."""

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release what the executor holds (connections, threads)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# scheme -> (module, class name, what it needs installed or None)
EXECUTORS: dict[str, tuple[str, str, str | None]] = {
    "local": ("lipaudit.executors.local", "LocalExecutor", None),
    "dask": ("lipaudit.executors.dask_executor", "DaskExecutor", "distributed"),
}


def check_spec(spec: str) -> str:
    """The spec, checked: `local` or `SCHEME://ADDRESS` with a registered scheme whose engine is
    installed. Cheap: nothing is imported or connected."""
    from importlib.util import find_spec

    scheme, sep, address = spec.partition("://")
    if scheme not in EXECUTORS or (scheme == "local") == bool(sep):
        known = ", ".join("local" if s == "local" else f"{s}://HOST:PORT" for s in EXECUTORS)
        raise UsageError(f"--executor {visible(spec)}: expected one of {known}")
    if sep and not address:
        raise UsageError(f"--executor {visible(spec)}: no address after {scheme}://")
    needs = EXECUTORS[scheme][2]
    if needs is not None and find_spec(needs) is None:
        raise UsageError(f"--executor {visible(spec)}: {needs} is not installed; pip install 'lipaudit[{scheme}]'")
    return spec


def open_executor(spec: str, jobs: int) -> Executor:
    """The executor a checked spec names; jobs is how many items local runs at once."""
    scheme, _, address = check_spec(spec).partition("://")
    module, name, _ = EXECUTORS[scheme]
    cls: Any = getattr(import_module(module), name)
    made: Executor = cls(address, jobs)
    return made
