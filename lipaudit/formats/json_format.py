"""The JSON report (schema_version 1): one object, no NaN or Infinity literals."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lipaudit.formats import RenderOptions
from lipaudit.report import Report

if TYPE_CHECKING:
    from lipaudit.diff import DiffResult
    from lipaudit.normalize import NormalizeReport


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=True) + "\n"


def render(report: Report | NormalizeReport, options: RenderOptions) -> str:
    return dumps(report.to_dict())


render_normalize = render


def render_diff(d: DiffResult, options: RenderOptions) -> str:
    return dumps(d.to_dict())
