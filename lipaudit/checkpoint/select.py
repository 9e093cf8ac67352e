"""Find the state dict inside a nested checkpoint, deterministically."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Ignored
from lipaudit.errors import MalformedInputError, ResourceLimitError, UsageError

# Tried in this order at each level; the first that holds tensors wins.
PREFERRED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "params",
    "weights",
    "ema",
    "model_ema",
    "ema_state_dict",
    "state_dict_ema",
)

_OPTIMIZER = re.compile(
    r"^(optim|optimizer|optimizers|optimizer_state|optimizer_states|optimizer_state_dict|opt|"
    r"opt_[a-z0-9]+|optim_[a-z0-9]+|optimizer_[a-z0-9]+|lr_scheduler|lr_schedulers|scheduler|"
    r"schedulers|scaler|grad_scaler|amp)$",
    re.IGNORECASE,
)

MAX_DEPTH = 64


def check_size(root: object, limits: Limits, shown: str) -> None:
    """Count containers and leaves without recursion; refuse deep or huge structures."""
    stack: list[tuple[object, int]] = [(root, 0)]
    seen: set[int] = set()
    nodes = 0
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            nodes += 1
            continue
        seen.add(id(node))
        nodes += 1
        if depth > limits.depth:
            raise ResourceLimitError(f"{shown}: containers nested deeper than {limits.depth} levels", shown)
        if nodes > limits.nodes:
            raise ResourceLimitError(f"{shown}: more than {limits.nodes} entries", shown)
        stack.extend((v, depth + 1) for _, v in _children(node))
        if nodes + len(stack) > 2 * limits.nodes:
            raise ResourceLimitError(f"{shown}: more than {limits.nodes} entries", shown)


@dataclass
class Selection:
    key: str | None
    tensors: dict[str, torch.Tensor]
    ignored: list[Ignored]
    alternatives: list[str]
    # where each tensor sits: (its container, its key there), for rewriting
    slots: dict[str, tuple[Any, Any]]


def _is_optimizer_state(key: object, value: object) -> bool:
    if isinstance(key, str) and _OPTIMIZER.match(key):
        return True
    return isinstance(value, dict) and "param_groups" in value and "state" in value


def _children(node: object) -> Iterator[tuple[object, object]]:
    if isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, (list, tuple)):
        yield from enumerate(node)


def count_tensors(node: object, depth: int = 0, seen: set[int] | None = None) -> int:
    if isinstance(node, torch.Tensor):
        return 1
    seen = set() if seen is None else seen
    if id(node) in seen or depth > MAX_DEPTH:
        return 0
    seen.add(id(node))
    return sum(count_tensors(v, depth + 1, seen) for _, v in _children(node))


def _name(key: object) -> str:
    return key if isinstance(key, str) else str(key)


def _flatten(
    node: object,
    prefix: str,
    out: dict[str, torch.Tensor],
    ignored: list[Ignored],
    depth: int,
    slots: dict[str, tuple[Any, Any]],
    path_ids: frozenset[int] = frozenset(),
) -> None:
    if depth > MAX_DEPTH:
        raise ResourceLimitError(f"containers nested deeper than {MAX_DEPTH} levels")
    path_ids = path_ids | {id(node)}
    for k, v in _children(node):
        path = f"{prefix}.{_name(k)}" if prefix else _name(k)
        if isinstance(v, torch.Tensor):
            name, n = path, 1
            while name in out:  # non-string keys can collide with string ones
                n += 1
                name = f"{path}~{n}"
            out[name] = v
            slots[name] = (node, k)
        elif _is_optimizer_state(k, v):
            n = count_tensors(v)
            if n:
                ignored.append(Ignored(path, f"optimizer state ({n} tensors): not a layer"))
        elif isinstance(v, (dict, list, tuple)) and id(v) in path_ids:
            ignored.append(Ignored(path, "refers back to a container that holds it (a cycle): not followed"))
        elif isinstance(v, (dict, list, tuple)):
            _flatten(v, path, out, ignored, depth + 1, slots, path_ids)


def _resolve(root: object, key: str) -> tuple[object, str]:
    """Follow --key: an exact top-level key first, else a path split on '/' or '.'."""
    if key in ("", "/"):
        return root, key
    if isinstance(root, dict) and key in root:
        return root[key], key
    node = root
    for sep in ("/", "."):
        node, ok = root, True
        for part in key.split(sep):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                ok = False
                break
        if ok:
            return node, key
    raise KeyError(key)


def _top_keys(node: object) -> list[str]:
    return [_name(k) for k, v in _children(node) if count_tensors(v)]


def select_state_dict(root: Any, key: str | None, shown: str) -> Selection:
    """Pick the state dict; everything with tensors left out is reported as ignored."""
    ignored: list[Ignored] = []
    alternatives: list[str] = []
    if isinstance(root, torch.Tensor):
        return Selection(None, {"tensor": root}, ignored, alternatives, {})
    if not isinstance(root, (dict, list, tuple)):
        raise MalformedInputError(f"{shown}: holds a {type(root).__name__}, not a state dict", shown)
    path: list[str] = []
    node: object = root
    if key is not None:
        try:
            node, _ = _resolve(root, key)
        except KeyError:
            keys = ", ".join(_top_keys(root)[:20]) or "none"
            raise UsageError(
                f"{shown}: no entry {key!r} holds tensors (entries with tensors: {keys})", shown
            ) from None
        if isinstance(node, torch.Tensor):
            return Selection(key, {key: node}, ignored, alternatives, {})
        if not count_tensors(node):
            raise UsageError(f"{shown}: entry {key!r} holds no tensors", shown)
        path = [key] if key not in ("", "/") else []
    else:
        for _ in range(MAX_DEPTH):
            children = list(_children(node))
            direct = sum(isinstance(v, torch.Tensor) for _, v in children)
            candidates = [
                (k, v) for k, v in children
                if not isinstance(v, torch.Tensor) and not _is_optimizer_state(k, v) and count_tensors(v)
            ]
            nested = sum(count_tensors(v) for _, v in candidates)
            if not candidates or (direct and direct >= nested):
                break  # this node is the state dict
            names = [k for k, _ in candidates]
            preferred = [names.index(p) for p in PREFERRED_KEYS if p in names]
            if preferred:
                pick = preferred[0]
            else:
                counts = [count_tensors(v) for _, v in candidates]
                pick = counts.index(max(counts))  # the first of ties
            chosen = candidates[pick]
            prefix = ".".join([*path, ""])
            for k, v in children:
                if k is chosen[0]:  # the very key object: 1 and "1" must not match
                    continue
                where = prefix + _name(k)
                if isinstance(v, torch.Tensor):
                    ignored.append(Ignored(where, "a tensor beside the selected state dict, not in it"))
                    continue
                n = count_tensors(v)
                if n and _is_optimizer_state(k, v):
                    ignored.append(Ignored(where, f"optimizer state ({n} tensors): not a layer"))
                elif n:
                    alternatives.append(where)
                    ignored.append(Ignored(where, f"not selected ({n} tensors); audit it with --key {where}"))
            path.append(_name(chosen[0]))
            node = chosen[1]
    tensors: dict[str, torch.Tensor] = {}
    slots: dict[str, tuple[Any, Any]] = {}
    if isinstance(node, torch.Tensor):
        tensors[path[-1] if path else "tensor"] = node
    else:
        try:
            _flatten(node, "", tensors, ignored, 0, slots)
        except ResourceLimitError as e:
            raise ResourceLimitError(f"{shown}: {e.message}", shown) from None
    if not tensors:
        raise MalformedInputError(f"{shown}: no tensors found", shown)
    return Selection(".".join(path) if path else None, tensors, ignored, alternatives, slots)
