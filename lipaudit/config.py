"""Settings from [tool.lipaudit] in pyproject.toml and LIPAUDIT_* environment variables.

Precedence: command line > environment > per-path override > [tool.lipaudit]. The file read is
the nearest pyproject.toml, from the start folder upward, that holds a [tool.lipaudit] table
(as ruff finds its settings); a pyproject.toml without one is passed over.
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lipaudit.errors import UsageError
from lipaudit.text import visible

if TYPE_CHECKING:
    import click

ENV_PREFIX = "LIPAUDIT_"


def _number(key: str, value: object, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a number")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"expected a finite number above 0, got {value!r}")
    return x


def _words(value: object) -> list[str]:
    """A list of strings; a string is split at commas (how the environment spells lists)."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        return [v for v in items if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("expected a list of strings")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a string")
    return value


def _choice(*allowed: str) -> Callable[[str, object], str]:
    def check(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return check


def _codes(key: str, value: object) -> list[str]:
    codes = [c.upper() for c in _words(value)]
    for c in codes:
        if not (c.startswith("LIP") and c[3:].isdigit()):
            raise ValueError(f"{c!r} is not a finding code like LIP003")
    return codes


def _sizes(key: str, value: object) -> list[str]:
    sizes = _words(value)
    for s in sizes:
        dims = s.rpartition("=")[2].lower().split("x")
        if not all(d.isdigit() and 1 <= int(d) <= 4096 for d in dims) or not 1 <= len(dims) <= 3:
            raise ValueError(f"{s!r} is not a size like 32x32 or layer=32x32")
    return sizes


# key -> check(key, raw value) returning the value in the type the option takes
CHECKS: dict[str, Callable[[str, object], Any]] = {
    "fail-above": lambda k, v: _number(k, v, allow_zero=True),
    "fail-layer-above": lambda k, v: _number(k, v, allow_zero=True),
    "fail-on": _choice("error", "warning"),
    "ignore": _codes,
    "include": lambda k, v: _words(v),
    "exclude": lambda k, v: _words(v),
    "rtol": lambda k, v: _number(k, v, allow_zero=False),
    "input-size": _sizes,
    "method": _choice("auto", "exact", "fast"),
    "format": _choice("table", "json", "markdown", "github", "sarif", "html"),
    "assume": _choice("chain"),
    "model": lambda k, v: _text(v),
    "input-shape": lambda k, v: _text(v),
}


@dataclass(frozen=True)
class Override:
    """Settings for checkpoints whose path matches one of the globs."""

    paths: tuple[str, ...]
    values: Mapping[str, Any]

    def matches(self, relative: str) -> bool:
        name = PurePosixPath(relative).name
        for pattern in self.paths:
            pattern = pattern.removeprefix("./")
            # a glob without a slash matches the file name at any depth, as in .gitignore
            if fnmatch.fnmatchcase(relative, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern)):
                return True
        return False


@dataclass(frozen=True)
class Config:
    """What was read: values keyed as in the file ("fail-above"), already checked."""

    source: Path | None = None  # the pyproject.toml, if one held [tool.lipaudit]
    file_values: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    env_values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Any]:
        """File values under environment values."""
        return {**self.file_values, **self.env_values}

    def for_path(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The values for one checkpoint: every matching override in file order, the
        environment still on top. Globs are relative to the pyproject.toml's folder."""
        root = self.source.parent if self.source is not None else Path.cwd()
        relative = _relative(Path(path), root)
        merged = dict(self.file_values)
        for o in self.overrides:
            if relative is not None and o.matches(relative):
                merged.update(o.values)
        merged.update(self.env_values)
        return merged

    def default_map(self, command: click.Command) -> dict[str, Any]:
        """For click's ctx.default_map: values keyed by the command's parameter names, found
        through the option spelled --KEY. Keys the command has no option for are left out."""
        return _by_param(self.values, command)

    def params_for(self, path: str | os.PathLike[str], ctx: click.Context) -> dict[str, Any]:
        """ctx.params with the per-path values applied where the command line did not set them."""
        from click.core import ParameterSource

        params = dict(ctx.params)
        for name, value in _by_param(self.for_path(path), ctx.command).items():
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
                continue
            param = next(p for p in ctx.command.params if p.name == name)
            params[name] = param.type_cast_value(ctx, value)
        return params


def _relative(path: Path, root: Path) -> str | None:
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return None  # outside the project: only the top-level settings apply


def _by_param(values: Mapping[str, Any], command: click.Command) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        for param in command.params:
            if f"--{key}" in getattr(param, "opts", ()) and param.name is not None:
                multiple = getattr(param, "multiple", False) or param.nargs == -1
                # a list for a repeatable option; "a,b" for an option that takes one string
                out[param.name] = value if multiple or not isinstance(value, list) else ",".join(value)
    return out


def _check(values: Mapping[str, object], where: str) -> dict[str, Any]:
    out = {}
    for key, raw in values.items():
        check = CHECKS.get(key)
        if check is None:
            known = ", ".join(sorted([*CHECKS, "overrides"]))
            raise UsageError(f"{where}: unknown key {visible(key, 80)!r} (known: {known})")
        try:
            out[key] = check(key, raw)
        except ValueError as e:
            raise UsageError(f"{where}: {key}: {e}") from None
    return out


def find_pyproject(start_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The nearest pyproject.toml upward from start_dir that has a [tool.lipaudit] table."""
    folder = Path(os.path.abspath(start_dir))
    for candidate in (folder, *folder.parents):
        path = candidate / "pyproject.toml"
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: not valid TOML ({e})") from None
        tool = data.get("tool")
        if isinstance(tool, dict) and "lipaudit" in tool:
            table = tool["lipaudit"]
            if not isinstance(table, dict):
                raise UsageError(f"{path}: [tool.lipaudit] must be a table")
            return path, table
    return None


def _overrides(raw: object, where: str) -> tuple[Override, ...]:
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise UsageError(f"{where}: overrides must be an array of tables ([[tool.lipaudit.overrides]])")
    out = []
    for i, o in enumerate(raw):
        here = f"{where} overrides[{i}]"
        paths = o.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise UsageError(f"{here}: needs paths = [\"glob\", ...]")
        rest = {k: v for k, v in o.items() if k != "paths"}
        if "overrides" in rest:
            raise UsageError(f"{here}: overrides do not nest")
        out.append(Override(tuple(paths), _check(rest, here)))
    return tuple(out)


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """LIPAUDIT_FAIL_ABOVE=3 -> {"fail-above": 3.0}; lists are comma-separated. Variables that
    name no setting are left alone (other tools may share the prefix)."""
    checked: dict[str, Any] = {}
    for key in CHECKS:
        name = ENV_PREFIX + key.upper().replace("-", "_")
        if env.get(name, "").strip():
            checked.update(_check({key: env[name].strip()}, name))
    return checked


def load_config(
    start_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read [tool.lipaudit] (nearest pyproject.toml upward from start_dir, default the current
    folder) and the LIPAUDIT_* variables of env (default os.environ). Bad values and unknown
    keys raise UsageError naming them."""
    env = os.environ if env is None else env
    from_env = env_values(env)
    found = find_pyproject(Path.cwd() if start_dir is None else start_dir)
    if found is None:
        return Config(env_values=from_env)
    path, table = found
    where = f"{path}: [tool.lipaudit]"
    top = {k: v for k, v in table.items() if k != "overrides"}
    overrides = _overrides(table["overrides"], where) if "overrides" in table else ()
    return Config(source=path, file_values=_check(top, where), overrides=overrides, env_values=from_env)
