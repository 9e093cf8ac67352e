"""Run an exported graph on an allowlisted set of aten ops, in float64, for constant folding and as
the function whose Jacobian the measured lower end differentiates (lipaudit/graph/lower.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lipaudit.checkpoint.pt2 import DTYPES
from lipaudit.graph.model import Arg, Graph, Node
from lipaudit.text import clean_message

# Ops the interpreter may call: pure functions of their arguments (no in-place variants, no I/O).
ALLOWED: frozenset[str] = frozenset("""
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution
linear addmm mm matmul bmm baddbmm addmv mv t transpose permute view _unsafe_view reshape flatten unflatten
squeeze unsqueeze contiguous clone alias detach lift_fresh_copy _to_copy to type_as view_as reshape_as expand
expand_as broadcast_to repeat tile repeat_interleave flip roll movedim swapaxes numpy_T mT pixel_shuffle
pixel_unshuffle channel_shuffle slice select narrow split split_with_sizes chunk unbind tensor_split diagonal
index_select index gather cat concat concatenate stack hstack vstack pad constant_pad_nd reflection_pad1d
reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d replication_pad3d _pad_circular
relu relu6 leaky_relu prelu _prelu_kernel gelu silu mish sigmoid hardsigmoid hardswish hardtanh tanh elu selu
celu softplus logsigmoid softsign tanhshrink hardshrink softshrink threshold erf sin cos atan abs neg clamp
clip clamp_min clamp_max maximum minimum where add sub rsub mul div true_divide pow exp log sqrt rsqrt
reciprocal square sum mean amax amin max min logsumexp softmax _softmax log_softmax _log_softmax
batch_norm _native_batch_norm_legit_no_training native_batch_norm _native_batch_norm_legit layer_norm
native_layer_norm group_norm native_group_norm rms_norm instance_norm dropout native_dropout feature_dropout
alpha_dropout feature_alpha_dropout max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d
_upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_trilinear3d
upsample_bicubic2d scaled_dot_product_attention embedding copy slice_scatter select_scatter
empty zeros ones full arange scalar_tensor zeros_like ones_like full_like empty_like new_zeros new_ones
new_full new_empty iota eq ne lt le gt ge floor ceil round remainder fmod floor_divide bitwise_and bitwise_or
logical_and logical_not logical_or sign einsum var std var_mean
""".split())

_FACTORIES = {"empty", "empty_like", "new_empty"}  # uninitialised memory: filled with zeros here


class CannotRun(Exception):
    """A node the interpreter will not or cannot run."""


def _dtype(code: int) -> torch.dtype:
    dt = DTYPES.get(code)
    if dt is None:
        raise CannotRun(f"dtype code {code}")
    return torch.float64 if dt.is_floating_point else dt


def resolve(node: Node) -> Callable[..., Any]:
    """The aten overload for an allowlisted op name; nothing else is ever looked up."""
    if node.namespace != "aten" or node.op not in ALLOWED:
        raise CannotRun(f"{node.target} is not on the interpreter's allowlist")
    packet = getattr(torch.ops.aten, node.op)
    if node.overload not in packet.overloads():
        raise CannotRun(f"{node.target}: unknown overload")
    fn: Callable[..., Any] = getattr(packet, node.overload)
    return fn


def _value(a: Arg, env: dict[str, torch.Tensor]) -> Any:
    if a.kind == "tensor":
        if a.value not in env:
            raise CannotRun(f"tensor {a.value} has no value")
        return env[a.value]
    if a.kind in ("tensors", "opt_tensors"):
        out: list[torch.Tensor | None] = []
        for v in a.value:
            if v is None:
                out.append(None)
            elif v in env:
                out.append(env[v])
            else:
                raise CannotRun(f"tensor {v} has no value")
        return out
    if a.kind in ("int", "ints", "float", "floats", "bool", "bools", "str", "none"):
        return a.value
    if a.kind == "dtype":
        return _dtype(int(a.value))
    if a.kind == "ignore":
        return None
    raise CannotRun("an argument of an unsupported kind")


def run_node(node: Node, env: dict[str, torch.Tensor]) -> None:
    """Evaluate one node into env (float dtypes become float64)."""
    fn = resolve(node)
    train = node.arg("training") or node.arg("train")
    if train is not None and train.kind == "bool" and train.value:
        raise CannotRun("training-mode op")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for (name, a), pos in zip(node.args, node.positional, strict=True):
        v = _value(a, env)
        if pos and not kwargs:
            args.append(v)
        else:
            kwargs[name] = v
    try:
        if node.op == "copy" and len(args) >= 2:
            # aten.copy has neither forward- nor reverse-mode derivatives; this is the same value
            out = args[1].to(args[0].dtype).expand_as(args[0]).clone()
        else:
            out = fn(*args, **kwargs)
    except Exception as e:  # a graph whose values do not fit its ops
        raise CannotRun(f"{node.target}: {type(e).__name__}: {clean_message(e, 100)}") from None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    names = node.outputs
    if len(outs) < len([n for n in names if n is not None]):
        raise CannotRun(f"{node.target}: fewer outputs than the graph names")
    for n, v in zip(names, outs, strict=False):
        if n is None or not isinstance(v, torch.Tensor):
            continue
        if node.op in _FACTORIES:
            v = torch.zeros_like(v)
        if v.is_floating_point() and v.dtype != torch.float64:
            v = v.to(torch.float64)
        env[n] = v


class Evaluator:
    """Values of the graph's constant tensors (parameters, buffers, lifted constants, and nodes
    computed from them only), on demand and memoised."""

    def __init__(self, graph: Graph, load: Callable[[str], torch.Tensor]) -> None:
        self.graph = graph
        self.load = load
        self.env: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}

    def value(self, name: str) -> torch.Tensor | None:
        if name in self.env:
            return self.env[name]
        if name in self.failed:
            return None
        try:
            if name in self.graph.params or name in self.graph.constants:
                t = self.load(name)
                self.env[name] = t.to(torch.float64) if t.is_floating_point() else t
                return self.env[name]
            node = self.graph.producer.get(name)
            if node is None:
                raise CannotRun("not a constant")
            for dep in node.tensor_inputs():
                if self.value(dep) is None:
                    raise CannotRun(f"input {dep} has no value")
            run_node(node, self.env)
        except CannotRun as e:
            self.failed[name] = str(e)
            return None
        return self.env.get(name)


def check_shapes(graph: Graph, meta: Callable[[str], torch.Tensor]) -> tuple[list[str], list[str]]:
    """Run the graph on meta tensors (shapes only, no data) and compare every tensor's shape with the
    one the archive declares: the size-aware rules trust those. Returns (mismatched, unverified) names."""
    env: dict[str, torch.Tensor] = {}
    for name in list(graph.params) + list(graph.constants):
        env[name] = meta(name)
    for name in graph.inputs:
        shape = graph.shapes.get(name) or graph.hints.get(name)
        if shape is None:
            continue
        try:
            env[name] = torch.empty(shape, dtype=_dtype(graph.dtypes.get(name, 7)), device="meta")
        except CannotRun:
            continue
    mismatched: list[str] = []
    unverified: list[str] = []
    for node in graph.nodes:
        outs = [o for o in node.outputs if o is not None]
        if not outs:
            continue
        try:
            run_node(node, env)
        except CannotRun:
            unverified.append(node.name)
            continue
        for o in outs:
            if o in env and not env[o].is_meta:  # factories make cpu tensors; keep everything shapes-only
                env[o] = env[o].to("meta")
            if o not in graph.consumers and o not in graph.outputs:
                continue  # unused outputs (batch norm's saved statistics) are declared loosely
            declared = graph.shapes.get(o) or graph.hints.get(o)
            got = env.get(o)
            if got is None:
                continue
            if declared is not None and tuple(got.shape) != declared:
                mismatched.append(o)
    return mismatched, unverified


def network_function(graph: Graph, consts: Evaluator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """f(inputs) = all float outputs, flattened and concatenated."""
    for n in graph.nodes:
        if n.outputs and any(o is not None for o in n.outputs):
            resolve(n)  # every node must be runnable

    def f(inputs: list[torch.Tensor]) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        for name in list(graph.params) + list(graph.constants):
            v = consts.value(name)
            if v is not None:
                env[name] = v
        for name, x in zip(graph.inputs, inputs, strict=True):
            env[name] = x
        for n in graph.nodes:
            if any(o is not None for o in n.outputs):
                run_node(n, env)
        outs = [env[o].reshape(-1) for o in graph.outputs if o in env and env[o].is_floating_point()]
        if not outs:
            raise CannotRun("the graph has no float output")
        return torch.cat(outs)

    return f
