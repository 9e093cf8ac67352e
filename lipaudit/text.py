"""Make untrusted text safe to show: no control characters, no escape sequences."""

from __future__ import annotations

import re
import unicodedata

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?")


def visible(text: str, limit: int = 300) -> str:
    """Control and format characters shown as escapes, long text cut."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def clean_message(err: object, limit: int = 160) -> str:
    """First meaningful line of a library's error, without ANSI codes or advice."""
    text = _ANSI.sub("", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "pytorch.org" not in ln]
    return visible(lines[0], limit) if lines else ""


def defang(text: str) -> str:
    """No line may start with '::': GitHub runners read such lines of any output as workflow
    commands, and a checkpoint's names must not be able to issue one (::add-mask::, ::stop-commands::)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("::"):
            lines[i] = line[: len(line) - len(stripped)] + "\\:" + stripped[1:]
    return "\n".join(lines)
