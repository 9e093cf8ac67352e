"""A restricted unpickler: it calls only lipaudit's own tensor builders, and every other name stays inert.

Nothing named by the pickle is imported or called. Known tensor-building names map to checked
re-implementations; a name on the danger list refuses the file; any other name becomes a
`Global` placeholder. Building one (calling, instantiating) gives an `Opaque` record of the
arguments, but only for the data classes of the allowlist (DATA_CLASSES): building any other
class refuses the file unless the caller allows unknown classes, because `torch.load` with
a full (not weights-only) torch.load would run it. Containers are filled through the built-in types' own methods only.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import pickletools
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lipaudit.checkpoint.limits import Limits
from lipaudit.errors import MalformedInputError, ResourceLimitError, UnsafeInputError
from lipaudit.text import visible

# Modules whose every name is refused, and names refused in any module: the pickle names code.
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "runpy", "importlib",
    "pickle", "_pickle", "pickletools", "copy_reg", "marshal", "socket", "_socket", "ssl", "shutil", "ctypes",
    "_ctypes", "code", "codeop", "pty", "multiprocessing", "signal", "webbrowser", "asyncio", "threading",
    "_thread", "tempfile", "io", "_io", "operator", "_operator", "functools", "_functools", "pdb", "bdb", "timeit",
    "trace", "profile", "cProfile", "gc", "inspect", "site", "sysconfig", "platform", "pip", "setuptools",
    "distutils", "zipimport", "pkgutil", "dill", "cloudpickle", "joblib", "http", "urllib", "ftplib", "smtplib",
    "telnetlib", "xmlrpc", "commands", "popen2", "spawn", "glob", "fileinput", "linecache", "tarfile", "zipfile",
    "sqlite3", "dbm", "shelve", "mmap", "resource", "fcntl", "termios", "builtins.eval", "torch.hub", "torch.jit",
    "torch.package", "torch.ops", "torch.classes", "torch.utils.cpp_extension", "torch._dynamo", "torch._inductor",
    "torch.serialization", "torch.multiprocessing", "torch._C", "numpy.f2py",
    "numpy.distutils", "numpy.testing", "numpy.ctypeslib", "numpy.lib.npyio", "numpy.load", "_codecs.open",
    "types.FunctionType", "types.LambdaType", "types.CodeType", "types.MethodType", "types.ModuleType",
    "types.BuiltinFunctionType", "types.new_class", "types.coroutine", "copyreg", "torch.utils.collect_env",
    "torch.storage._load_from_bytes", "torch.fx", "_osx_support", "pydoc", "imaplib", "uuid._get_command_stdout",
})
DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "open", "globals",
    "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview", "__build_class__", "reload",
    "file", "apply",
})
DANGEROUS_NAMES = frozenset({
    "eval", "exec", "system", "popen", "Popen", "spawn", "__import__", "getattr", "setattr", "delattr", "compile",
    "import_module", "run_path", "run_module", "check_output", "check_call", "load", "loads", "execfile",
    "attrgetter", "methodcaller", "__reduce__", "__reduce_ex__", "__setstate__", "__getattribute__",
})


def danger(module: str, name: str) -> bool:
    """Whether module.name is code a checkpoint has no business naming."""
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if prefixes & DANGEROUS_MODULES or f"{module}.{name}" in DANGEROUS_MODULES:
        return True
    if module in ("builtins", "__builtin__") and name in DANGEROUS_BUILTINS:
        return True
    return any(part in DANGEROUS_NAMES for part in name.split("."))


# Classes a checkpoint may build: plain data whose construction runs nothing but its own
# container code. They are still never imported: building one gives an inert Opaque record.
DATA_CLASSES = frozenset({
    "argparse.Namespace",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath", "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath", "pathlib._local.Path", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
    "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
})
# Modules whose every class is such data: numpy's dtype classes, omegaconf's value nodes, and
# the enums Lightning stores in its checkpoints.
DATA_MODULES = frozenset({
    "numpy.dtypes", "omegaconf.nodes", "lightning_fabric.utilities.enums", "lightning.fabric.utilities.enums",
    "pytorch_lightning.utilities.enums", "lightning.pytorch.utilities.enums", "pytorch_lightning.trainer.states",
    "lightning.pytorch.trainer.states",
})


# Allowed builders that make an instance of a class passed as an argument (at this position): a
# tensor subclass, an ndarray subclass. That class counts as built, so it must be allowed too.
INSTANTIATES: dict[str, int] = {
    "torch._tensor._rebuild_from_type_v2": 1,
    "torch._utils._rebuild_wrapper_subclass": 0,
    "numpy.core.multiarray._reconstruct": 0,
    "numpy._core.multiarray._reconstruct": 0,
}


def data_class(qualname: str) -> bool:
    """Whether a checkpoint may build the class (inertly) without --allow-unknown-classes."""
    return qualname in DATA_CLASSES or qualname.rpartition(".")[0] in DATA_MODULES


def unknown_class(qualname: str) -> UnsafeInputError:
    return UnsafeInputError(
        f"the pickle builds an object of class {visible(qualname, 100)}, which is not on lipaudit's allowlist of "
        "data classes; a full (not weights-only) torch.load would call it. Refused, nothing was run; if you trust the "
        "file, pass --allow-unknown-classes to read such objects as inert placeholders"
    )


def unwritable(what: str) -> MalformedInputError:
    """Writing back a placeholder would corrupt the file: refuse, and say what works instead."""
    return MalformedInputError(
        f"the checkpoint holds {what}, which lipaudit keeps only as an inert placeholder, so it cannot rewrite "
        "the file; "
        "save the state dict alone (torch.save(model.state_dict(), path)) and normalize that"
    )


@dataclass(eq=False)
class Global:
    """A name the pickle refers to; never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __reduce_ex__(self, protocol: object) -> Any:
        raise unwritable(f"an object of class {visible(self.qualname, 100)}")


@dataclass(eq=False)
class Opaque:
    """What calling or instantiating a Global would have built, kept as inert data."""

    cls: Global
    args: tuple[Any, ...] = ()
    state: list[Any] = field(default_factory=list)  # BUILD states, items appended or set

    @property
    def qualname(self) -> str:
        return self.cls.qualname

    def __reduce_ex__(self, protocol: object) -> Any:
        raise unwritable(f"an object of class {visible(self.qualname, 100)}")


@dataclass(eq=False)
class UnreadTensor:
    """A tensor kind lipaudit does not rebuild (quantized, sparse, nested, subclass)."""

    kind: str

    def __reduce_ex__(self, protocol: object) -> Any:
        raise unwritable(f"a {self.kind} tensor")


@dataclass(frozen=True)
class Marker:
    """A type the pickle may name but never call: storage types, torch.Tensor, Parameter."""

    qualname: str
    dtype: torch.dtype | None = None

    def __reduce_ex__(self, protocol: object) -> Any:
        raise unwritable(f"a reference to {self.qualname}")


@dataclass
class Storage:
    """A storage the pickle refers to, with the dtype its persistent id declares."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.UntypedStorage.nbytes(self.untyped))

    def __reduce_ex__(self, protocol: object) -> Any:
        raise unwritable("a bare storage")


# Storage type names torch writes in persistent ids, and their dtypes.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8, "QInt8Storage": torch.qint8, "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32, "QUInt4x2Storage": torch.quint4x2, "QUInt2x4Storage": torch.quint2x4,
}

_DTYPES = {
    str(t).removeprefix("torch."): t for t in vars(torch).values() if isinstance(t, torch.dtype)
}
_NO_DIM = 1 << 62  # every size and stride stays far below int64 overflow

_TENSOR_CLASS_NAMES = frozenset(
    f"{c.__module__}.{c.__name__}" for c in torch._tensor_classes
)


def _ints(value: object, what: str, ndim: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(x) is int for x in value):
        raise MalformedInputError(f"tensor {what} is not a tuple of integers")
    if ndim is not None and len(value) != ndim:
        raise MalformedInputError(f"tensor {what} has {len(value)} entries for {ndim} dimensions")
    if len(value) > 64 or any(not 0 <= x < _NO_DIM for x in value):
        raise MalformedInputError(f"tensor {what} out of range")
    return tuple(value)


def checked_shape(shape: tuple[int, ...]) -> int:
    """numel; refuses shapes whose non-zero dimensions multiply past 2^62, even when empty."""
    numel, span = 1, 1
    for d in shape:
        numel *= d
        span *= max(d, 1)
    if span >= _NO_DIM:
        raise MalformedInputError(f"tensor shape {visible(str(shape), 80)} is out of range")
    return numel


def overlapping(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of the view may share memory (stride 0, or overlapping strides)."""
    dims = sorted((s, d) for d, s in zip(size, stride, strict=True) if d > 1)
    reach = 0
    for s, d in dims:
        if s <= reach:
            return True
        reach += (d - 1) * s
    return False


class Builder:
    """Checked versions of torch's tensor rebuild functions, with the run's budgets."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def tensor(self, storage: object, offset: object, size: object, stride: object,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        if not isinstance(storage, Storage):
            raise MalformedInputError("tensor without a storage record")
        dtype = dtype or storage.dtype
        if type(offset) is not int or not 0 <= offset < _NO_DIM:
            raise MalformedInputError("tensor storage offset out of range")
        shape = _ints(size, "size")
        strides = _ints(stride, "stride", len(shape))
        numel = checked_shape(shape)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if storage.nbytes % itemsize:
            raise MalformedInputError("storage size is not a whole number of elements")
        logical = numel * itemsize
        if logical > self.limits.tensor_bytes:
            raise ResourceLimitError(
                f"a tensor declares {logical} bytes, over the limit of {self.limits.tensor_bytes} (--max-tensor-bytes)"
            )
        if numel:
            extent = offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)) + 1
            if extent * itemsize > storage.nbytes:
                raise MalformedInputError("tensor reaches past the end of its storage")
        if numel and logical > storage.nbytes and logical > self.limits.expanded_bytes and overlapping(shape, strides):
            raise ResourceLimitError(
                f"a tensor declares {logical} bytes over a storage of {storage.nbytes} "
                "(stride 0 or overlapping strides): refused"
            )
        return torch.empty(0, dtype=dtype).set_(storage.untyped, offset, shape, strides)

    def rebuild_tensor(self, storage: object, offset: object, size: object, stride: object) -> torch.Tensor:
        return self.tensor(storage, offset, size, stride)

    def rebuild_tensor_v2(self, storage: object, offset: object, size: object, stride: object,
                          requires_grad: object, hooks: object, metadata: object = None) -> torch.Tensor:
        _hooks_and_metadata(hooks, metadata)
        return _grad(self.tensor(storage, offset, size, stride), requires_grad)

    def rebuild_tensor_v3(self, storage: object, offset: object, size: object, stride: object,
                          requires_grad: object, hooks: object, dtype: object, metadata: object = None) -> torch.Tensor:
        _hooks_and_metadata(hooks, metadata)
        if not isinstance(dtype, torch.dtype):
            raise MalformedInputError("tensor dtype is not a dtype")
        return _grad(self.tensor(storage, offset, size, stride, dtype), requires_grad)

    def rebuild_parameter(self, data: object, requires_grad: object, hooks: object) -> torch.Tensor:
        _hooks_and_metadata(hooks, None)
        if type(data) is not torch.Tensor:
            raise MalformedInputError("a parameter without tensor data")
        grad = bool(requires_grad) if type(requires_grad) is bool else False
        return torch.nn.Parameter(data, requires_grad=grad and (data.is_floating_point() or data.is_complex()))

    def rebuild_parameter_with_state(self, data: object, requires_grad: object, hooks: object,
                                     state: object) -> torch.Tensor:
        if state:
            raise UnsafeInputError("a tensor carries instance attributes, which torch.save of weights never writes")
        return self.rebuild_parameter(data, requires_grad, hooks)

    def rebuild_meta(self, dtype: object, size: object, stride: object, requires_grad: object) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype):
            raise MalformedInputError("tensor dtype is not a dtype")
        shape = _ints(size, "size")
        strides = _ints(stride, "stride", len(shape))
        checked_shape(shape)
        return _grad(torch.empty_strided(shape, strides, dtype=dtype, device="meta"), requires_grad)

    def rebuild_from_type(self, func: object, new_type: object, args: object, state: object) -> object:
        plain = ("torch.Tensor", "torch.nn.parameter.Parameter")
        if not isinstance(new_type, Marker) or new_type.qualname not in plain:
            return UnreadTensor("subclass")
        if state:
            raise UnsafeInputError("a tensor carries instance attributes, which torch.save of weights never writes")
        if not isinstance(args, tuple):
            raise MalformedInputError("tensor arguments are not a tuple")
        return self.call(func, args)

    def call(self, func: object, args: tuple[Any, ...]) -> object:
        if isinstance(func, Global) and (func.module.startswith("torch.nn.modules") or func.module == "torch.nn"):
            # naming a layer class (say an activation in hyper-parameters) is fine; building one is not
            raise whole_module(func.qualname)
        method = _CALLS.get(func) if isinstance(func, Global) else None
        if isinstance(func, Global) and method is None:
            return Opaque(func, args)
        if method is None:
            raise UnsafeInputError(f"the pickle calls a {type(func).__name__}, which is not a constructor")
        return method(self, *args)


def _grad(t: torch.Tensor, requires_grad: object) -> torch.Tensor:
    # kept as torch keeps it, so that normalize writes back what it read
    if requires_grad is True and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _hooks_and_metadata(hooks: object, metadata: object) -> None:
    # Hooks are never serialized (torch writes an empty OrderedDict, old versions None); not read.
    if hooks is not None and not isinstance(hooks, dict):
        raise MalformedInputError("tensor backward hooks are not a dict")
    if metadata not in (None, {}) and not (isinstance(metadata, dict) and not any(metadata.values())):
        raise MalformedInputError("tensor metadata (conjugate or negative views) is not supported")


def _unread(kind: str) -> Callable[..., object]:
    return lambda _self, *_args: UnreadTensor(kind)


def _ordered_dict(_self: Builder, *args: object) -> object:
    # Old torch.save wrote a state dict as OrderedDict([[key, tensor], ...]).
    pairs = args[0] if args else ()
    if len(args) > 1 or not isinstance(pairs, (list, tuple)):
        raise MalformedInputError("OrderedDict built from arguments other than a list of pairs")
    out: OrderedDict[Any, Any] = OrderedDict()
    for pair in pairs:
        if type(pair) not in (list, tuple) or len(pair) != 2 or not _plain_key(pair[0]):
            raise MalformedInputError("OrderedDict built from something other than (key, value) pairs")
        OrderedDict.__setitem__(out, pair[0], pair[1])
    return out


def _counter(_self: Builder, *args: object) -> object:
    # collections.Counter(mapping): a dict subclass whose construction only adds up plain keys
    counts = args[0] if args else {}
    if len(args) > 1 or not isinstance(counts, dict) or type(counts) is not dict:
        raise MalformedInputError("collections.Counter built from something other than a dict")
    out: collections.Counter[Any] = collections.Counter()
    for k, v in dict.items(counts):
        if not _plain_key(k):
            raise MalformedInputError(f"a Counter key of type {type(k).__name__}")
        dict.__setitem__(out, k, v)
    return out


def _torch_size(_self: Builder, *args: object) -> object:
    if len(args) != 1:
        raise MalformedInputError("torch.Size with odd arguments")
    return torch.Size(_ints(args[0], "size"))


def _encode(_self: Builder, *args: object) -> object:
    # How protocol 2 spells bytes: _codecs.encode(text, "latin1").
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise MalformedInputError("_codecs.encode with odd arguments")


def _plain(kind: type) -> Callable[..., object]:
    def build(_self: Builder, *args: object) -> object:
        if len(args) == 0:
            return kind()
        if len(args) == 1 and isinstance(args[0], (list, tuple, str, bytes, frozenset, set)):
            if kind is bytearray and isinstance(args[0], str):
                raise MalformedInputError("bytearray from text without an encoding")
            return kind(args[0])
        if kind is bytearray and len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return bytearray(args[0], "latin-1")
        if kind is complex and len(args) == 2 and all(type(a) in (int, float) for a in args):
            return complex(float(args[0]), float(args[1]))  # type: ignore[arg-type]
        # bytearray(3_000_000_000) would allocate before any budget: never called with a number.
        raise UnsafeInputError(f"builtins.{kind.__name__} called with arguments torch.save never writes")

    return build


def _device(_self: Builder, *args: object) -> object:
    # The device itself, not its name: normalize writes back what it read, index included.
    # Tensors are always read on the CPU whatever it says.
    if not 1 <= len(args) <= 2 or not isinstance(args[0], str) or len(args[0]) > 32:
        raise MalformedInputError("torch.device with odd arguments")
    if len(args) == 2 and not (type(args[1]) is int and 0 <= args[1] < 1 << 16):
        raise MalformedInputError("torch.device with an odd index")
    try:
        return torch.device(*args)  # type: ignore[call-overload]
    except (RuntimeError, ValueError, TypeError):
        raise MalformedInputError(f"torch.device of unknown type {visible(args[0], 40)!r}") from None


def _layout(_self: Builder, *args: object) -> object:
    if len(args) == 1 and isinstance(args[0], str):
        layout = getattr(torch, args[0].removeprefix("torch."), None)
        if isinstance(layout, torch.layout):
            return layout
    raise MalformedInputError("torch layout with odd arguments")


_BUILDERS: dict[str, Callable[..., object]] = {
    "torch._utils._rebuild_tensor": Builder.rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": Builder.rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": Builder.rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": Builder.rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": Builder.rebuild_parameter_with_state,
    "torch._utils._rebuild_meta_tensor_no_storage": Builder.rebuild_meta,
    "torch._tensor._rebuild_from_type_v2": Builder.rebuild_from_type,
    "torch._utils._rebuild_qtensor": _unread("quantized"),
    "torch._utils._rebuild_sparse_tensor": _unread("sparse"),
    "torch._utils._rebuild_sparse_csr_tensor": _unread("sparse"),
    "torch._utils._rebuild_nested_tensor": _unread("nested"),
    "torch._utils._rebuild_wrapper_subclass": _unread("subclass"),
    "torch._utils._rebuild_device_tensor_from_numpy": _unread("numpy-backed"),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _unread("device"),
    "torch._utils._rebuild_xla_tensor": _unread("xla"),
    "torch._utils._rebuild_mlc_tensor": _unread("mlc"),
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _counter,
    "torch.Size": _torch_size,
    "torch.device": _device,
    "torch.serialization._get_layout": _layout,
    "_codecs.encode": _encode,
    "builtins.set": _plain(set),
    "builtins.frozenset": _plain(frozenset),
    "builtins.bytearray": _plain(bytearray),
    "builtins.complex": _plain(complex),
}
# The same Global object for a name wherever it appears, so that lookups are by identity.
_KNOWN: dict[str, Global] = {name: Global(*name.rsplit(".", 1)) for name in _BUILDERS}
_CALLS: dict[Global, Callable[..., object]] = {_KNOWN[name]: fn for name, fn in _BUILDERS.items()}

_MARKERS: dict[str, Marker] = {
    "torch.Tensor": Marker("torch.Tensor"),
    "torch.nn.parameter.Parameter": Marker("torch.nn.parameter.Parameter"),
    **{f"torch.{n}": Marker(f"torch.{n}", d) for n, d in STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": Marker("torch.UntypedStorage", torch.uint8),
    "torch.storage.TypedStorage": Marker("torch.TypedStorage", None),
}


def whole_module(qualname: str) -> UnsafeInputError:
    return UnsafeInputError(
        f"a pickled whole model ({visible(qualname, 80)}), not a state dict: loading it would run its code; "
        "re-save model.state_dict() and audit that"
    )


def resolve(module: str, name: str) -> object:
    """What a GLOBAL becomes: a value, a marker, a known builder, or an inert placeholder."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    qualname = f"{module}.{name}"
    if qualname in _MARKERS:
        return _MARKERS[qualname]
    if qualname in _KNOWN:
        return _KNOWN[qualname]
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    if danger(module, name):
        raise UnsafeInputError(f"the pickle names {visible(qualname, 100)}, which is code; refused, nothing was run")
    if qualname in _TENSOR_CLASS_NAMES and qualname not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        raise UnsafeInputError(
            f"the pickle names {visible(qualname, 100)}, a constructor that returns uninitialised memory; "
            "torch.save never writes it"
        )
    if module == "torch" and name.startswith("per_") and isinstance(getattr(torch, name, None), torch.qscheme):
        return getattr(torch, name)  # quantization schemes: plain values
    return Global(module, name)


class Bounded:
    """A file read that never asks for more than remains: a length field of 2^60 in the pickle
    must not allocate 2^60 bytes."""

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        self.size = size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        want = left if n is None or n < 0 else min(n, left)
        data: bytes = self.f.read(want)
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        data: bytes = self.f.readline(min(left, 1 << 20))
        return data

    def tell(self) -> int:
        pos: int = self.f.tell()
        return pos


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's own opcode reader with every opcode that imports, calls or mutates replaced."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    # set up by pickle's load(); declared here for the type checker only
    stack: list[Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]

    def __init__(self, file: Any, limits: Limits, persistent: Callable[[object], object] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.builder = Builder(limits)
        self.limits = limits
        self.persistent = persistent
        self.entries = 0
        self.named: set[str] = set()  # every placeholder name, built or not
        self.built: set[str] = set()  # placeholders built into Opaque objects

    # -- names ---------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise MalformedInputError("a global name that is not text")
        found = resolve(module, name)
        if isinstance(found, Global) and found not in _CALLS:
            self.named.add(found.qualname)
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self.persistent is None:
            raise MalformedInputError("a persistent reference outside a torch checkpoint")
        return self.persistent(pid)

    def _count(self, n: int = 1) -> None:
        self.entries += n
        if self.entries > self.limits.nodes:
            raise ResourceLimitError(f"more than {self.limits.nodes} entries")

    # -- opcodes that call ---------------------------------------------------------------
    def _call(self, func: object, args: object) -> object:
        if not isinstance(args, tuple):
            raise MalformedInputError("call arguments are not a tuple")
        self._count()
        name = func.qualname if isinstance(func, Global) else None
        at = INSTANTIATES.get(name or "")
        if at is not None and len(args) > at and isinstance(args[at], Global):
            self._build(args[at].qualname)  # a full load would make an instance of that class
        result = self.builder.call(func, args)
        if isinstance(result, Opaque):
            self._build(result.qualname)
        return result

    def _build(self, qualname: str) -> None:
        if not data_class(qualname) and not self.limits.allow_unknown_classes:
            raise unknown_class(qualname)
        self.built.add(qualname)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._instantiate_class(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        obj = self._instantiate_class(cls, args)
        if isinstance(obj, Opaque) and kwargs:
            obj.state.append(kwargs)
        self.append(obj)

    def _instantiate_class(self, cls: object, args: object) -> object:
        if isinstance(cls, Marker) and cls.qualname == "torch.nn.parameter.Parameter" and isinstance(args, tuple):
            return self._call(_KNOWN["torch._utils._rebuild_parameter"], (*args[:2], OrderedDict())[:3])
        if isinstance(cls, Global) and cls not in _CALLS:
            return self._call(cls, args)
        raise UnsafeInputError(f"the pickle instantiates a {type(cls).__name__}, which is not an allowed class")

    def load_obj(self) -> None:
        args = self.pop_mark()
        cls = args.pop(0)
        self.append(self._instantiate_class(cls, tuple(args)))

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        self.append(self._instantiate_class(cls, tuple(self.pop_mark())))

    def load_ext1(self) -> None:
        raise MalformedInputError("pickle extension codes are not supported")

    # -- opcodes that change an object ---------------------------------------------------
    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Opaque):
            if isinstance(state, dict) and "_parameters" in state and "_modules" in state:
                raise whole_module(inst.qualname)
            inst.state.append(state)
            return
        if type(inst) is OrderedDict:
            attrs, slots = (state if isinstance(state, tuple) and len(state) == 2 else (state, None))
            if slots or not isinstance(attrs, dict):
                raise MalformedInputError("odd state for an OrderedDict")
            for k, v in dict.items(attrs):
                if k != "_metadata":
                    # torch.save of a state dict sets only _metadata; another attribute (say
                    # `items`) would hide entries from whoever reads the container through it.
                    raise UnsafeInputError(
                        f"an OrderedDict carries the instance attribute {visible(str(k), 60)!r}; refused"
                    )
                inst._metadata = v  # type: ignore[attr-defined]
            return
        if isinstance(inst, (torch.Tensor, UnreadTensor)):
            raise UnsafeInputError("the pickle sets attributes on a tensor; refused")
        raise UnsafeInputError(f"the pickle sets the state of a {type(inst).__name__}; refused")

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    def _extend(self, target: object, items: list[Any]) -> None:
        self._count(len(items))
        if type(target) is list:
            list.extend(target, items)
        elif isinstance(target, Opaque):
            target.state.append(list(items))
        else:
            raise MalformedInputError(f"the pickle appends to a {type(target).__name__}")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set(self.stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._set(self.stack[-1], items)

    def load_dict(self) -> None:
        items = self.pop_mark()
        d: dict[Any, Any] = {}
        self._set(d, items)
        self.append(d)

    def _set(self, target: object, items: list[Any]) -> None:
        self._count(len(items) // 2)
        for k in items[::2]:
            if not _plain_key(k):
                # a tensor as a key compares element-wise: nothing a state dict holds
                raise MalformedInputError(f"a dict key of type {type(k).__name__}")
        if type(target) in (dict, OrderedDict):
            # the class's own method, never an attribute
            setitem: Any = OrderedDict.__setitem__ if type(target) is OrderedDict else dict.__setitem__
            for i in range(0, len(items) - 1, 2):
                setitem(target, items[i], items[i + 1])
        elif isinstance(target, Opaque):
            target.state.append(dict(zip(items[::2], items[1::2], strict=False)))
        else:
            raise MalformedInputError(f"the pickle sets items of a {type(target).__name__}")

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        self._count(len(items))
        if type(target) is set:
            set.update(target, items)
        elif isinstance(target, Opaque):
            target.state.append(list(items))
        else:
            raise MalformedInputError(f"the pickle adds items to a {type(target).__name__}")

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)  # bounded by what the file holds
        if len(data) != n:
            raise MalformedInputError("pickle data was truncated")
        self.append(bytearray(data))


_DISPATCH: Any = RestrictedUnpickler.dispatch
_DISPATCH.update({
    pickle.REDUCE[0]: RestrictedUnpickler.load_reduce,
    pickle.NEWOBJ[0]: RestrictedUnpickler.load_newobj,
    pickle.NEWOBJ_EX[0]: RestrictedUnpickler.load_newobj_ex,
    pickle.OBJ[0]: RestrictedUnpickler.load_obj,
    pickle.INST[0]: RestrictedUnpickler.load_inst,
    pickle.EXT1[0]: RestrictedUnpickler.load_ext1,
    pickle.EXT2[0]: RestrictedUnpickler.load_ext1,
    pickle.EXT4[0]: RestrictedUnpickler.load_ext1,
    pickle.BUILD[0]: RestrictedUnpickler.load_build,
    pickle.APPEND[0]: RestrictedUnpickler.load_append,
    pickle.APPENDS[0]: RestrictedUnpickler.load_appends,
    pickle.SETITEM[0]: RestrictedUnpickler.load_setitem,
    pickle.SETITEMS[0]: RestrictedUnpickler.load_setitems,
    pickle.DICT[0]: RestrictedUnpickler.load_dict,
    pickle.ADDITEMS[0]: RestrictedUnpickler.load_additems,
    pickle.BYTEARRAY8[0]: RestrictedUnpickler.load_bytearray8,
})


_KEY_TYPES = (str, int, float, bool, bytes, type(None), Opaque, Global)


def _plain_key(k: object) -> bool:
    if type(k) is tuple:
        return all(type(x) in _KEY_TYPES for x in k)
    return type(k) in _KEY_TYPES


def globals_named(f: Any, pickles: int = 1) -> list[tuple[str, str]]:
    """Every module/name pair in the next pickles of the file, listed without unpickling."""
    found: list[tuple[str, str]] = []
    try:
        for _ in range(pickles):  # the legacy format is several pickles in a row
            _scan(f, found)
    except (ValueError, EOFError, TypeError, KeyError, IndexError, UnicodeDecodeError, struct.error):
        pass  # a broken tail is judged by the unpickler itself
    return found


def _scan(f: Any, found: list[tuple[str, str]]) -> None:
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None
    for op, arg, _pos in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(str(arg))
            last = arg
            continue
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append((strings[-2], strings[-1]))
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int):
            memo[arg] = last
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int):
            got = memo.get(arg)
            if isinstance(got, str):
                strings.append(got)
                last = got
                continue
        last = None


def refuse_dangerous(f: Any, pickles: int = 1) -> None:
    """Refuse before building anything when a pickle names code anywhere in it."""
    for module, name in globals_named(f, pickles):
        resolve(module, name)


@dataclass
class Classes:
    """Classes outside the allowlist that a file built (with --allow-unknown-classes) or only named."""

    built: set[str] = field(default_factory=set)
    named: set[str] = field(default_factory=set)

    def add(self, u: RestrictedUnpickler) -> None:
        self.built |= {q for q in u.built if not data_class(q)}
        self.named |= {q for q in u.named if not data_class(q)}

    @property
    def referenced(self) -> list[str]:
        """Named, never built."""
        return sorted(self.named - self.built)

    def notes(self) -> list[tuple[str, str]]:
        """(finding code, message) for the audit report."""
        out = []
        if self.built:
            out.append(("LIP030", "objects of classes outside the allowlist were read as inert placeholders "
                        f"(--allow-unknown-classes): {_names(sorted(self.built))}; a full torch.load "
                        "would call them"))
        if self.referenced:
            out.append(("LIP031", f"the checkpoint names classes it does not build: {_names(self.referenced)}"))
        return out


def _names(names: list[str]) -> str:
    shown = ", ".join(visible(n, 100) for n in names[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def unpickle(f: Any, limits: Limits, persistent: Callable[[object], object] | None = None,
             classes: Classes | None = None) -> Any:
    """The object of the pickle at the file's position; classes collects what it built or named."""
    u = RestrictedUnpickler(f, limits, persistent)
    root = u.load()
    if classes is not None:
        classes.add(u)
    return root
