"""Error classes, one per exit code (README, "Exit codes")."""

from __future__ import annotations


class LipauditError(Exception):
    """An expected failure: a one-line message and a documented exit code."""

    exit_code = 70
    code = "internal"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class UsageError(LipauditError):
    exit_code = 2
    code = "usage"


class UnsafeInputError(LipauditError):
    exit_code = 3
    code = "unsafe_input"


class MalformedInputError(LipauditError):
    exit_code = 4
    code = "malformed_input"


class ResourceLimitError(LipauditError):
    exit_code = 5
    code = "resource_limit"


class OutputError(LipauditError):
    exit_code = 6
    code = "output"


INTERNAL_EXIT_CODE = 70
