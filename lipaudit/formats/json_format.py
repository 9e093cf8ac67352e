"""The JSON report (schema_version 1): one object, no NaN or Infinity literals."""

from __future__ import annotations

import json
from typing import Any

from lipaudit.formats import RenderOptions
from lipaudit.report import Report


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=True) + "\n"


def render(report: Report, options: RenderOptions) -> str:
    return dumps(report.to_dict())
