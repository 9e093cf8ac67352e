"""The exported program's graph as plain data: nodes, named tensors, shapes, signature."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError
from lipaudit.text import visible

_ATEN = re.compile(r"^torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)$")
_ATEN_NO_OVERLOAD = re.compile(r"^torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
# Names that only appear in a target to run code: such an archive is refused, not audited.
_HOSTILE = re.compile(
    r"(^|[.\s(])(os|posix|nt|subprocess|builtins|__builtin__|sys|shutil|importlib|runpy|pickle|marshal|socket|"
    r"ctypes|pty|code|codeop|webbrowser|multiprocessing|eval|exec|compile|__import__|getattr|setattr|open|"
    r"system|popen|spawn)([.\s(]|$)"
)
_SYMBOLIC = ("_operator.", "math.", "torch.sym_", "torch._sym_")


# the dtype codes of float tensors in an archive's graph: half, float, double, bfloat16
FLOAT_CODES = (6, 7, 8, 13)

@dataclass(frozen=True)
class Arg:
    """One argument: kind is tensor, tensors, opt_tensors, int, ints, float, floats, bool, bools, str,
    none, dtype or other; value holds names for tensors."""

    kind: str
    value: Any


@dataclass(frozen=True)
class Node:
    name: str
    target: str
    namespace: str  # aten, higher_order, ...; "" when not a torch op
    op: str  # aten op name without overload, e.g. conv2d
    overload: str
    args: tuple[tuple[str, Arg], ...]
    positional: tuple[bool, ...]
    outputs: tuple[str | None, ...]

    def arg(self, name: str, index: int | None = None) -> Arg | None:
        for i, (n, a) in enumerate(self.args):
            if n == name or (index is not None and i == index and n == ""):
                return a
        return None  # a named argument left out takes its default: never another argument's value

    def tensor_inputs(self) -> list[str]:
        out: list[str] = []
        for _, a in self.args:
            if a.kind == "tensor":
                out.append(a.value)
            elif a.kind in ("tensors", "opt_tensors"):
                out.extend(v for v in a.value if v is not None)
        return out


@dataclass
class Graph:
    nodes: list[Node]
    shapes: dict[str, tuple[int, ...] | None]  # fixed shapes only
    dtypes: dict[str, int]
    params: dict[str, str]  # graph tensor name -> state-dict name (parameters and buffers)
    param_kinds: dict[str, str]  # state-dict name -> parameter | buffer
    constants: dict[str, str]  # graph tensor name -> lifted constant name
    inputs: list[str]  # user inputs
    outputs: list[str]  # user outputs (tensor names)
    dims: dict[str, tuple[int | str, ...]] = field(default_factory=dict)  # symbolic sizes as their expression
    hints: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the example sizes
    producer: dict[str, Node] = field(default_factory=dict)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # node name -> position

    def index(self) -> None:
        self.producer = {}
        self.consumers = {}
        self.order = {}
        for i, n in enumerate(self.nodes):
            self.order[n.name] = i
            for o in n.outputs:
                if o is not None:
                    self.producer[o] = n
            for t in n.tensor_inputs():
                self.consumers.setdefault(t, []).append(n)


def _names(x: Any) -> list[str | None]:
    if isinstance(x, list):
        return [None if not isinstance(t, dict) or "name" not in t else str(t["name"]) for t in x]
    return []


def _float(v: object) -> float | None:
    """A float argument: a JSON number, or the strings torch.export writes for infinities (a NaN
    argument stays unknown)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return {"Infinity": math.inf, "-Infinity": -math.inf}.get(v) if isinstance(v, str) else None


def parse_arg(raw: Any, shown: str) -> Arg:
    if not isinstance(raw, dict) or len(raw) != 1:
        return Arg("other", None)
    (kind, v), = raw.items()
    if kind == "as_tensor" and isinstance(v, dict) and "name" in v:
        return Arg("tensor", str(v["name"]))
    if kind == "as_tensors":
        return Arg("tensors", _names(v))
    if kind == "as_optional_tensors" and isinstance(v, list):
        return Arg("opt_tensors", [str(t["as_tensor"]["name"]) if isinstance(t, dict) and "as_tensor" in t else None
                                   for t in v])
    if kind == "as_optional_tensor" and isinstance(v, dict):
        return Arg("tensor", str(v["as_tensor"]["name"])) if "as_tensor" in v else Arg("none", None)
    if kind in ("as_int", "as_sym_int") :
        if isinstance(v, dict):
            v = v.get("as_int")
        return Arg("int", v) if isinstance(v, int) and not isinstance(v, bool) else Arg("other", None)
    if kind in ("as_ints", "as_sym_ints"):
        vals = [x.get("as_int") if isinstance(x, dict) else x for x in v] if isinstance(v, list) else None
        if vals is not None and all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            return Arg("ints", list(vals))
        return Arg("other", None)
    if kind in ("as_float", "as_sym_float"):
        if isinstance(v, dict):
            v = v.get("as_float")
        f = _float(v)
        return Arg("float", f) if f is not None else Arg("other", None)
    if kind == "as_floats" and isinstance(v, list):
        fs = [_float(x) for x in v]
        return Arg("floats", [f for f in fs if f is not None]) if None not in fs else Arg("other", None)
    if kind in ("as_bool", "as_sym_bool"):
        return Arg("bool", bool(v)) if isinstance(v, bool) else Arg("other", None)
    if kind == "as_bools" and isinstance(v, list):
        return Arg("bools", [bool(x) for x in v])
    if kind == "as_string" and isinstance(v, str):
        return Arg("str", v)
    if kind == "as_none":
        return Arg("none", None)
    if kind == "as_scalar_type" and isinstance(v, int):
        return Arg("dtype", v)
    if kind in ("as_memory_format", "as_layout", "as_device"):
        return Arg("ignore", v)
    if kind == "as_graph":
        return Arg("graph", None)
    return Arg("other", None)


def check_target(target: str, shown: str) -> tuple[str, str, str]:
    """(namespace, op, overload) of a torch op target; ("", "", "") for other harmless targets.
    A target that names code execution is refused."""
    m = _ATEN.match(target)
    if m:
        return m.group(1), m.group(2), m.group(3)
    m = _ATEN_NO_OVERLOAD.match(target)
    if m:
        return m.group(1), m.group(2), "default"
    if target.startswith(_SYMBOLIC) and not _HOSTILE.search(target.split(".", 1)[1]):
        return "", "", ""
    if _HOSTILE.search(target) or not re.fullmatch(r"[A-Za-z0-9_.]{1,200}", target):
        raise UnsafeInputError(f"{shown}: node target {visible(target, 80)!r} names code outside torch ops; refused",
                               shown)
    return "", "", ""


def _dims(meta: Any) -> tuple[tuple[int | str, ...], tuple[int, ...] | None] | None:
    """Sizes with symbolic ones as their expression text, and the example (hint) sizes."""
    sizes = meta.get("sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, list):
        return None
    out: list[int | str] = []
    hint: list[int] | None = []
    for s in sizes:
        v = s.get("as_int") if isinstance(s, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out.append(v)
            if hint is not None:
                hint.append(v)
            continue
        e = s.get("as_expr") if isinstance(s, dict) else None
        if not isinstance(e, dict) or not isinstance(e.get("expr_str"), str):
            return None
        out.append("sym:" + e["expr_str"][:200])
        h = e.get("hint")
        h = h.get("as_int") if isinstance(h, dict) else h
        if hint is not None and isinstance(h, int) and not isinstance(h, bool) and h >= 0:
            hint.append(h)
        else:
            hint = None
    return tuple(out), (tuple(hint) if hint is not None else None)


def parse_graph(program: dict[str, Any], shown: str, max_nodes: int = 10_000_000) -> Graph:
    """Build the Graph from the program JSON; targets are strings, never resolved."""
    try:
        gm = program["graph_module"]
        g = gm["graph"]
        sig = gm["signature"]
        raw_nodes = g["nodes"]
        values = g.get("tensor_values", {})
    except (KeyError, TypeError):
        raise MalformedInputError(f"{shown}: the graph JSON lacks nodes or signature", shown) from None
    if not isinstance(raw_nodes, list) or not isinstance(values, dict):
        raise MalformedInputError(f"{shown}: the graph JSON has malformed nodes", shown)
    if len(raw_nodes) > max_nodes:
        raise ResourceLimitError(f"{shown}: {len(raw_nodes)} graph nodes, over the limit of {max_nodes}", shown)
    shapes: dict[str, tuple[int, ...] | None] = {}
    dims: dict[str, tuple[int | str, ...]] = {}
    hints: dict[str, tuple[int, ...]] = {}
    for k, v in values.items():
        parsed = _dims(v)
        shapes[str(k)] = None
        if parsed is None:
            continue
        dims[str(k)] = parsed[0]
        if parsed[1] is not None:
            hints[str(k)] = parsed[1]
        if all(isinstance(d, int) for d in parsed[0]):
            shapes[str(k)] = tuple(int(d) for d in parsed[0])
    dtypes = {str(k): int(v.get("dtype", 0)) for k, v in values.items() if isinstance(v, dict)
              and isinstance(v.get("dtype", 0), int)}
    nodes: list[Node] = []
    for i, rn in enumerate(raw_nodes):
        if not isinstance(rn, dict) or not isinstance(rn.get("target"), str):
            raise MalformedInputError(f"{shown}: graph node {i} is malformed", shown)
        target = rn["target"]
        ns, op, overload = check_target(target, shown)
        args: list[tuple[str, Arg]] = []
        positional: list[bool] = []
        for a in rn.get("inputs", []) or []:
            if not isinstance(a, dict):
                raise MalformedInputError(f"{shown}: graph node {i} has a malformed input", shown)
            args.append((str(a.get("name", "")), parse_arg(a.get("arg"), shown)))
            positional.append(a.get("kind", 1) == 1)
        outs: list[str | None] = []
        for o in rn.get("outputs", []) or []:
            a = parse_arg(o, shown)
            if a.kind == "tensor":
                outs.append(a.value)
            elif a.kind in ("tensors", "opt_tensors"):
                outs.extend(a.value)
            else:
                outs.append(None)
        name = next((o for o in outs if o is not None), f"node_{i}")
        nodes.append(Node(name, target, ns, op, overload, tuple(args), tuple(positional), tuple(outs)))
    params: dict[str, str] = {}
    kinds: dict[str, str] = {}
    constants: dict[str, str] = {}
    inputs: list[str] = []
    for spec in sig.get("input_specs", []) or []:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise MalformedInputError(f"{shown}: malformed input spec", shown)
        (kind, v), = spec.items()
        if not isinstance(v, dict):
            raise MalformedInputError(f"{shown}: malformed input spec", shown)
        arg = v.get("arg", {})
        tname = arg.get("name") if isinstance(arg, dict) else None
        if kind == "parameter":
            params[str(tname)] = str(v.get("parameter_name"))
            kinds[str(v.get("parameter_name"))] = "parameter"
        elif kind == "buffer":
            params[str(tname)] = str(v.get("buffer_name"))
            kinds[str(v.get("buffer_name"))] = "buffer"
        elif kind == "tensor_constant":
            constants[str(tname)] = str(v.get("tensor_constant_name"))
        elif kind == "user_input":
            a = parse_arg(arg, shown)
            if a.kind == "tensor":
                inputs.append(a.value)
    outputs: list[str] = []
    for spec in sig.get("output_specs", []) or []:
        if isinstance(spec, dict) and "user_output" in spec:
            a = parse_arg(spec["user_output"].get("arg"), shown)
            if a.kind == "tensor":
                outputs.append(a.value)
    graph = Graph(nodes, shapes, dtypes, params, kinds, constants, inputs, outputs, dims, hints)
    graph.index()
    return graph
