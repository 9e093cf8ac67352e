"""Find the state dict inside a nested checkpoint, deterministically."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.checkpoint.model import Ignored
from lipaudit.checkpoint.unpickler import Global, Marker, Opaque, Storage, UnreadTensor
from lipaudit.errors import MalformedInputError, ResourceLimitError, UsageError
from lipaudit.text import visible

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


def check_size(root: object, limits: Limits, shown: str) -> int:
    """Count containers and leaves by identity, without recursion; refuse deep or huge structures.
    Returns the number of distinct nodes."""
    stack: list[tuple[object, int]] = [(root, 0)]
    seen: set[int] = set()
    nodes = 0
    while stack:
        node, depth = stack.pop()
        if not _is_container(node) or id(node) in seen:
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
    return nodes


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
    return _is_mapping(value) and "param_groups" in value and "state" in value  # type: ignore[operator]


def is_tensor(node: object) -> bool:
    """Exactly a tensor or a parameter: subclasses could answer any method as they like."""
    return type(node) is torch.Tensor or type(node) is torch.nn.Parameter


def _is_mapping(node: object) -> bool:
    return type(node) is dict or type(node) is OrderedDict


def _is_sequence(node: object) -> bool:
    return type(node) is list or type(node) is tuple


def _is_container(node: object) -> bool:
    return _is_mapping(node) or _is_sequence(node) or isinstance(node, Opaque)


def _children(node: object) -> Iterator[tuple[object, object]]:
    """Entries read through the built-in type's own methods, never the instance's attributes
    (an attribute named `items` must not hide what load_state_dict would load)."""
    if _is_mapping(node):
        yield from type(node).items(node)  # type: ignore[attr-defined]
    elif _is_sequence(node):
        yield from enumerate(type(node).__iter__(node))  # type: ignore[attr-defined]
    elif isinstance(node, Opaque):
        # Never selected, but counted: every tensor in the file is accounted for.
        yield from enumerate([*node.args, *node.state])


def count_tensors(node: object, depth: int = 0, seen: set[int] | None = None) -> int:
    if is_tensor(node) or isinstance(node, UnreadTensor):
        return 1
    seen = set() if seen is None else seen
    if id(node) in seen or depth > MAX_DEPTH:
        return 0
    seen.add(id(node))
    return sum(count_tensors(v, depth + 1, seen) for _, v in _children(node))


def _name(key: object) -> str:
    if isinstance(key, str):
        return key
    if key is None or type(key) in (int, float, bool):
        return str(key)
    return f"<{type(key).__name__} key>"  # never the str() of an arbitrary object


@dataclass
class _Walk:
    """Budgets of one listing: every path counts, so containers shared through the pickle memo
    cannot multiply the work unseen."""

    limits: Limits
    shown: str
    entries_left: int

    def entry(self) -> None:
        self.entries_left -= 1
        if self.entries_left < 0:
            raise ResourceLimitError(
                f"{self.shown}: listing the containers visits too many entries (containers shared many times "
                "over, or more entries than the budget)", self.shown,
            )


def _flatten(
    node: object,
    prefix: str,
    out: dict[str, torch.Tensor],
    ignored: list[Ignored],
    depth: int,
    slots: dict[str, tuple[Any, Any]],
    walk: _Walk,
    path_ids: frozenset[int] = frozenset(),
) -> None:
    if depth > walk.limits.depth:
        raise ResourceLimitError(f"{walk.shown}: containers nested deeper than {walk.limits.depth} levels", walk.shown)
    path_ids = path_ids | {id(node)}
    for k, v in _children(node):
        walk.entry()
        path = f"{prefix}.{_name(k)}" if prefix else _name(k)
        if is_tensor(v):
            name, n = path, 1
            while name in out:  # non-string keys can collide with string ones
                n += 1
                name = f"{path}~{n}"
            out[name] = v  # type: ignore[assignment]
            slots[name] = (node, k)
            if len(out) > walk.limits.tensors:
                raise ResourceLimitError(
                    f"{walk.shown}: more than {walk.limits.tensors} tensors (--max-tensors)", walk.shown
                )
        elif isinstance(v, UnreadTensor):
            ignored.append(Ignored(path, f"{v.kind} tensor: not read or measured"))
        elif isinstance(v, Storage):
            ignored.append(Ignored(path, "a bare storage, not a tensor: not measured"))
        elif isinstance(v, Marker):
            ignored.append(Ignored(path, f"a reference to {v.qualname}: not a tensor"))
        elif isinstance(v, (Opaque, Global)):
            pass  # listed by unread_objects, with the rest of the file's
        elif _is_optimizer_state(k, v):
            n = count_tensors(v)
            if n:
                ignored.append(Ignored(path, f"optimizer state ({n} tensors): not a layer"))
        elif (_is_mapping(v) or _is_sequence(v)) and id(v) in path_ids:
            ignored.append(Ignored(path, "refers back to a container that holds it (a cycle): not followed"))
        elif _is_mapping(v) or _is_sequence(v):
            _flatten(v, path, out, ignored, depth + 1, slots, walk, path_ids)


def unread_objects(root: object, limits: Limits | None = None) -> dict[str, tuple[list[str], int, int]]:
    """Objects of classes lipaudit never imports, anywhere in the file:
    class -> (the first few paths, how many, tensors they hold)."""
    limits = limits or Limits()
    found: dict[str, tuple[list[str], int, int]] = {}
    stack: list[tuple[object, str, int]] = [(root, "", 0)]
    seen: set[int] = set()
    counted: set[int] = set()  # shared by every count: what many objects share is counted once
    while stack:
        node, path, depth = stack.pop()
        if id(node) in seen or depth > limits.depth:
            continue
        if isinstance(node, (Opaque, Global)):
            seen.add(id(node))
            paths, count, held = found.get(node.qualname, ([], 0, 0))
            if len(paths) < 3:
                paths.append(path or "(root)")
            found[node.qualname] = (paths, count + 1, held + count_tensors(node, 0, counted))
            continue  # what an unread object holds is unread with it
        if _is_mapping(node) or _is_sequence(node):
            seen.add(id(node))
            stack.extend((v, f"{path}.{_name(k)}" if path else _name(k), depth + 1) for k, v in _children(node))
    return found


def _unread_note(qualname: str, paths: list[str], count: int, tensors: int) -> Ignored:
    held = f", holding {tensors} tensors" if tensors else ""
    many = f"{count} objects" if count > 1 else "an object"
    return Ignored(
        paths[0],
        f"{many} of class {visible(qualname, 100)}{held}: not read (lipaudit never imports or calls classes "
        "outside its allowlist)",
    )


def _resolve(root: object, key: str) -> tuple[object, str]:
    """Follow --key: an exact top-level key first, else a path split on '/' or '.'."""
    if key in ("", "/"):
        return root, key
    if _is_mapping(root) and key in root:  # type: ignore[operator]
        return root[key], key  # type: ignore[index]
    node = root
    for sep in ("/", "."):
        node, ok = root, True
        for part in key.split(sep):
            if _is_mapping(node) and part in node:  # type: ignore[operator]
                node = node[part]  # type: ignore[index]
            elif _is_sequence(node) and part.isdigit() and int(part) < len(node):  # type: ignore[arg-type]
                node = node[int(part)]  # type: ignore[index]
            else:
                ok = False
                break
        if ok:
            return node, key
    raise KeyError(key)


def _top_keys(node: object) -> list[str]:
    return [_name(k) for k, v in _children(node) if count_tensors(v)]


def select_state_dict(root: Any, key: str | None, shown: str, limits: Limits | None = None,
                      nodes: int | None = None) -> Selection:
    """Pick the state dict; everything with tensors left out is reported as ignored.
    nodes: distinct nodes in the file (from check_size), which bounds how much listing may visit."""
    limits = limits or Limits()
    ignored: list[Ignored] = []
    alternatives: list[str] = []
    if is_tensor(root):
        return Selection(None, {"tensor": root}, ignored, alternatives, {})
    if isinstance(root, (Opaque, Global)):
        raise MalformedInputError(
            f"{shown}: holds an object of class {visible(root.qualname, 100)}, not a state dict", shown
        )
    if not (_is_mapping(root) or _is_sequence(root)):
        raise MalformedInputError(f"{shown}: holds a {type(root).__name__}, not a state dict", shown)
    if nodes is None:
        nodes = check_size(root, limits, shown)
    # Real files list each entry about once; a pickle that shares one container along many paths
    # would list it once per path, so the listing gets a budget tied to the distinct count.
    walk = _Walk(limits, shown, min(limits.nodes, 16 * nodes + 100_000))
    path: list[str] = []
    node: object = root
    if key is not None:
        try:
            node, _ = _resolve(root, key)
        except KeyError:
            # Keys come from the file: escaped, or they could carry terminal or CI commands.
            keys = ", ".join(repr(visible(k, 60)) for k in _top_keys(root)[:20]) or "none"
            raise UsageError(
                f"{shown}: no entry {visible(key, 80)!r} holds tensors (entries with tensors: {keys})", shown
            ) from None
        if is_tensor(node):
            return Selection(key, {key: node}, ignored, alternatives, {})  # type: ignore[dict-item]
        if not count_tensors(node):
            raise UsageError(f"{shown}: entry {visible(key, 80)!r} holds no tensors", shown)
        path = [key] if key not in ("", "/") else []
    else:
        for _ in range(MAX_DEPTH):
            children = list(_children(node))
            direct = sum(is_tensor(v) for _, v in children)
            candidates = [
                (k, v) for k, v in children
                if (_is_mapping(v) or _is_sequence(v)) and not _is_optimizer_state(k, v) and count_tensors(v)
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
                if is_tensor(v):
                    ignored.append(Ignored(where, "a tensor beside the selected state dict, not in it"))
                    continue
                if isinstance(v, (Opaque, Global)):
                    continue  # listed with the other unread objects below
                n = count_tensors(v)
                if n and _is_optimizer_state(k, v):
                    ignored.append(Ignored(where, f"optimizer state ({n} tensors): not a layer"))
                elif n:
                    alternatives.append(where)
                    hint = f"not selected ({n} tensors); audit it with --key {visible(where, 80)}"
                    ignored.append(Ignored(where, hint))
            path.append(_name(chosen[0]))
            node = chosen[1]
    tensors: dict[str, torch.Tensor] = {}
    slots: dict[str, tuple[Any, Any]] = {}
    if is_tensor(node):
        tensors[path[-1] if path else "tensor"] = node  # type: ignore[assignment]
    else:
        _flatten(node, "", tensors, ignored, 0, slots, walk)
    for qualname, (paths, count, held) in unread_objects(root, limits).items():
        ignored.append(_unread_note(qualname, paths, count, held))
    if not tensors:
        raise MalformedInputError(f"{shown}: no tensors found", shown)
    return Selection(".".join(path) if path else None, tensors, ignored, alternatives, slots)
