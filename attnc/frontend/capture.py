"""What a score_mod or mask_mod reads besides its arguments becomes an input of the kernel.

FlexAttention's programming model: a mod may close over tensors (numpy arrays, and any other
type registered with `register_tensor_type`) and over numbers. While the kernel is traced,
each of them is replaced by a proxy: a tensor becomes a tensor param of the kernel (a storage
binding) that the mod indexes with traced integers, a Python or numpy number a scalar param
(a uniform). The traced kernel therefore depends on the captured tensors' dtypes and shapes,
never on their values, and a new value is a new binding or uniform, not a new kernel. A number
the mod uses in Python control flow (`if`, `range`, `math.*`, a numpy function) cannot be a
uniform: the kernel is traced again with that number as a constant, and from then on its value
is part of the cache key.

Where captured values are found: the function's closure cells, its default arguments, the
module globals its code names, `functools.partial` arguments, tuples, lists and dicts of up to
MAX_ITEMS items holding any of these, and, recursively, the same places of the functions
reachable from there (a helper defined in the mod's module, a mod wrapped by another). Objects
reached any other way (an attribute of an object) are not captured; indexing a numpy array with
a traced value is then a TraceError that says so.

`scan(roots)` walks the reachable values once: it gives the cache key (function code, every
reached value that is not captured, and the dtype, shape and aliasing of captured tensors) and
the captured objects by path. `Session.rewrite` makes the function with proxies that tracing
calls; the paths name the same slots in both, so a kernel traced once serves later calls whose
captured objects are looked up by path.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnc.ir import nodes as ir

MAX_ITEMS = 64  # containers larger than this are constants of the mod, not searched
MAX_DEPTH = 12  # functions reached through functions
_I32 = (-(2**31), 2**31 - 1)

Path = tuple[Hashable, ...]

# numpy dtype kind/itemsize -> the IR dtype a captured tensor of it is read as
_INT_TO_I32 = {"int8", "int16", "int32", "int64", "uint16", "uint64"}


def ir_dtype(dtype: Any) -> ir.DType | None:
    """The IR tensor dtype a captured array of numpy `dtype` is bound as (None: unsupported).

    float64 is bound as f32 and the wider or signed integer types as i32 (values are checked
    to fit when bound); u32, u8 and bool keep their width (docs/API.md, docs/MANIFEST.md)."""
    dt = np.dtype(dtype)
    if dt == np.float16:
        return ir.DType.F16
    if dt in (np.float32, np.float64):
        return ir.DType.F32
    if dt == np.bool_:
        return ir.DType.BOOL
    if dt == np.uint8:
        return ir.DType.U8
    if dt == np.uint32:
        return ir.DType.U32
    if dt.name in _INT_TO_I32:
        return ir.DType.I32
    return None


@dataclass(frozen=True)
class TensorInfo:
    """What tracing needs to know of a captured tensor: its numpy dtype and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]
    unreadable: str | None = None  # a tensor numpy cannot read (a bfloat16 one): its dtype, said when it is read


def _numpy_info(obj: Any) -> TensorInfo | None:
    if isinstance(obj, np.ndarray):
        return TensorInfo(obj.dtype, tuple(int(n) for n in obj.shape))
    return None


_TENSOR_TYPES: list[Callable[[Any], TensorInfo | None]] = [_numpy_info]


def register_tensor_type(describe: Callable[[Any], TensorInfo | None]) -> None:
    """Let mods capture another tensor type: `describe(obj)` gives its dtype and shape, or None
    for objects it does not handle. The runtime's binding code must accept the same objects
    (attnc/runtime/params.py)."""
    if describe not in _TENSOR_TYPES:
        _TENSOR_TYPES.append(describe)


def tensor_info(obj: Any) -> TensorInfo | None:
    """The dtype and shape of a capturable tensor, None for anything else."""
    for describe in _TENSOR_TYPES:
        info = describe(obj)
        if info is not None:
            return info
    return None


def scalar_dtype(obj: Any) -> ir.DType | None:
    """The uniform dtype of a capturable number (a 0-d array counts), None for anything else."""
    if isinstance(obj, bool | np.bool_):
        return None
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        obj = obj[()]
    if isinstance(obj, int | np.integer) and not isinstance(obj, bool | np.bool_):
        return ir.DType.I32 if _I32[0] <= int(obj) <= _I32[1] else None
    if isinstance(obj, float | np.floating):
        return ir.DType.F32
    return None


@dataclass(frozen=True)
class Slot:
    """A captured object: where it was found, what it is, and a name for its param."""

    path: Path
    obj: Any
    kind: str  # "tensor" | "scalar"
    dtype: ir.DType
    shape: tuple[int, ...]
    hint: str


# paths (by root function code) whose numbers a trace found used in Python control flow
_STATIC: dict[tuple[str, Any], set[Path]] = {}


def static_paths(roots: dict[str, Callable[..., Any]]) -> set[Path]:
    """The slots of these mods learned to be constants (used in Python control flow)."""
    out: set[Path] = set()
    for name, fn in roots.items():
        out |= _STATIC.get((name, getattr(fn, "__code__", None)), set())
    return out


def learn_static(roots: dict[str, Callable[..., Any]], paths: set[Path]) -> None:
    """Remember that these slots are constants, for later scans of the same mods."""
    for name, fn in roots.items():
        mine = {p for p in paths if p[:1] == (name,)}
        if mine:
            _STATIC.setdefault((name, getattr(fn, "__code__", None)), set()).update(mine)


class _Walk:
    """One traversal: the key parts, the slots, and (when `make`) the rewritten objects."""

    def __init__(self, static: set[Path], make: Callable[[Slot, Path], Any] | None):
        self.static = static
        self.make = make
        self.key: list[Hashable] = []
        self.slots: dict[Path, Slot] = {}
        self.first: dict[int, Path] = {}  # id(object) -> the first path it was found at
        self.cacheable = True
        self.active: set[int] = set()

    def visit(self, obj: Any, path: Path, hint: str, depth: int) -> Any:
        """The object to put in place of `obj` (itself when nothing in it is captured)."""
        if obj is None or isinstance(obj, bool | str | bytes | np.bool_ | type | types.ModuleType):
            self.key.append((path, _const_key(obj)))
            return obj
        if isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            self.key.append((path, "builtin", obj))
            return obj
        info = tensor_info(obj)
        if info is not None and len(info.shape) > 0:
            return self.capture(obj, path, hint, "tensor", info)
        if scalar_dtype(obj) is not None or (isinstance(obj, np.ndarray) and obj.ndim == 0):
            if path in self.static or scalar_dtype(obj) is None:
                self.key.append((path, "const", _const_key(obj)))
                return obj
            return self.capture(obj, path, hint, "scalar", None)
        if isinstance(obj, types.FunctionType):
            return self.function(obj, path, depth)
        if isinstance(obj, functools.partial):
            return self.partial(obj, path, hint, depth)
        if isinstance(obj, tuple | list) and len(obj) <= MAX_ITEMS:
            self.key.append((path, type(obj).__name__, len(obj)))
            items = [self.visit(x, path + (i,), f"{hint}_{i}", depth) for i, x in enumerate(obj)]
            if all(a is b for a, b in zip(items, obj, strict=True)):
                return obj
            if hasattr(obj, "_fields"):  # a namedtuple
                return type(obj)(*items)
            return type(obj)(items)
        if isinstance(obj, dict) and len(obj) <= MAX_ITEMS and all(isinstance(k, str) for k in obj):
            self.key.append((path, "dict", tuple(obj)))
            new = {k: self.visit(v, path + (k,), k, depth) for k, v in obj.items()}
            return obj if all(new[k] is obj[k] for k in obj) else new
        self.key.append((path, "object", _const_key(obj)))
        if _const_key(obj) is _UNHASHABLE:
            self.cacheable = False
        return obj

    def capture(self, obj: Any, path: Path, hint: str, kind: str, info: TensorInfo | None) -> Any:
        if kind == "tensor":
            assert info is not None
            dtype = None if info.unreadable else ir_dtype(info.dtype)
            if dtype is None:
                self.key.append((path, "bad tensor", info.unreadable or str(info.dtype)))
                return _Unsupported(hint, info.unreadable or str(info.dtype)) if self.make else obj
            shape = info.shape
        else:
            dtype, shape = scalar_dtype(obj), ()
            assert dtype is not None
        alias = self.first.setdefault(id(obj), path)
        self.key.append((path, kind, dtype, shape, alias))
        slot = Slot(path, obj, kind, dtype, shape, hint)
        self.slots[path] = slot
        return self.make(slot, alias) if self.make else obj

    def function(self, fn: types.FunctionType, path: Path, depth: int) -> Any:
        code = fn.__code__
        if id(fn) in self.active or depth > MAX_DEPTH:
            self.key.append((path, "function", code))
            return fn
        self.active.add(id(fn))
        try:
            self.key.append((path, "function", code))
            changed = False
            cells = []
            for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell (a name assigned after the function)
                    self.key.append((path + ("cell", name), "empty"))
                    cells.append(cell)
                    continue
                new = self.visit(value, path + ("cell", name), name, depth + 1)
                changed |= new is not value
                cells.append(cell if new is value else types.CellType(new))
            names = code.co_varnames[:code.co_argcount + code.co_posonlyargcount]
            defaults = list(fn.__defaults__ or ())
            for i, d in enumerate(defaults):
                hint = names[len(names) - len(defaults) + i] if len(names) >= len(defaults) else f"arg{i}"
                new = self.visit(d, path + ("default", i), hint, depth + 1)
                changed |= new is not d
                defaults[i] = new
            kwdefaults = dict(fn.__kwdefaults__ or {})
            for k, d in kwdefaults.items():
                new = self.visit(d, path + ("kwdefault", k), k, depth + 1)
                changed |= new is not d
                kwdefaults[k] = new
            new_globals: dict[str, Any] | None = None
            if not _is_library(fn):
                for name in sorted(_global_names(code)):
                    if name not in fn.__globals__:
                        continue
                    value = fn.__globals__[name]
                    if isinstance(value, types.FunctionType) and value.__globals__ is not fn.__globals__:
                        self.key.append((path + ("global", name), "function", value.__code__, id(value)))
                        continue  # a function of another module: a library call, not searched
                    new = self.visit(value, path + ("global", name), name, depth + 1)
                    if new is not value:
                        if new_globals is None:
                            new_globals = dict(fn.__globals__)
                        new_globals[name] = new
            if not changed and new_globals is None:
                return fn
            out = types.FunctionType(code, new_globals if new_globals is not None else fn.__globals__,
                                     fn.__name__, tuple(defaults) or None, tuple(cells) or None)
            out.__kwdefaults__ = kwdefaults or None
            out.__qualname__, out.__module__, out.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
            out.__dict__.update(fn.__dict__)
            return out
        finally:
            self.active.discard(id(fn))

    def partial(self, p: functools.partial, path: Path, hint: str, depth: int) -> Any:
        self.key.append((path, "partial", len(p.args), tuple(p.keywords)))
        func = self.visit(p.func, path + ("func",), hint, depth + 1)
        args = [self.visit(a, path + ("arg", i), f"{hint}_{i}", depth + 1) for i, a in enumerate(p.args)]
        kw = {k: self.visit(v, path + ("kw", k), k, depth + 1) for k, v in p.keywords.items()}
        if func is p.func and all(a is b for a, b in zip(args, p.args, strict=True)) and \
                all(kw[k] is p.keywords[k] for k in kw):
            return p
        return functools.partial(func, *args, **kw)


_UNHASHABLE = object()


def _const_key(obj: Any) -> Hashable:
    """A value that stands for `obj` in a cache key: itself (with its type) when hashable."""
    if isinstance(obj, np.ndarray):  # a 0-d array used as a constant
        return ("ndarray", str(obj.dtype), obj.tobytes())
    try:
        hash(obj)
    except TypeError:
        return _UNHASHABLE
    return (type(obj), obj)


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code (and the code nested in it: lambdas, comprehensions) may read as globals."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _global_names(c)
    return out


def _is_library(fn: types.FunctionType) -> bool:
    """attnc's own functions and the standard library's: their globals are not captured."""
    mod = (fn.__module__ or "").split(".")[0]
    return mod == "attnc" or mod in sys.stdlib_module_names


@dataclass
class Scan:
    """The result of walking some mods: a cache key (None: not cacheable) and the slots."""

    key: Hashable | None
    slots: dict[Path, Slot]


def scan(roots: dict[str, Callable[..., Any]]) -> Scan:
    """Walk every value these mods (by option name) can read; see the module docstring."""
    walk = _Walk(static_paths(roots), None)
    for name, fn in roots.items():
        walk.visit(fn, (name,), name, 0)
    return Scan(tuple(walk.key) if walk.cacheable else None, walk.slots)


class _Unsupported:
    """A captured array of a dtype attnc cannot bind: indexing it is a clear TraceError."""

    def __init__(self, hint: str, dtype: str):
        self.hint, self.dtype = hint, dtype

    def __getitem__(self, idx: Any) -> Any:
        from attnc.frontend.semantic import fail

        raise fail(f"captured array {self.hint!r} has dtype {self.dtype}: a kernel cannot read it",
                   ("captured tensors are float16/32/64, bool, uint8, uint32 or integers that fit "
                    "in int32",))


@dataclass
class Session:
    """The captures of one trace: slots seen so far, their proxies, the static slots."""

    static: set[Path] = field(default_factory=set)
    prefixes: dict[int, str] = field(default_factory=dict)  # id(mod) -> its option name
    proxies: dict[Path, Any] = field(default_factory=dict)
    slots: dict[Path, Slot] = field(default_factory=dict)
    make_proxy: Callable[[Slot], Any] | None = None
    calls: int = 0

    def rewrite(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with every captured value replaced by its proxy (one per distinct object)."""
        prefix = self.prefixes.get(id(fn))
        if prefix is None:  # a function the kernel made itself: its own paths, never cached
            self.calls += 1
            prefix = f"mod{self.calls}"
        assert self.make_proxy is not None

        def make(slot: Slot, alias: Path) -> Any:
            if alias not in self.proxies:  # the first time this object is met
                self.slots[alias] = slot
                self.proxies[alias] = self.make_proxy(slot)  # type: ignore[misc]
            return self.proxies[alias]

        walk = _Walk(self.static, make)
        # objects already captured by an earlier mod of this trace keep their proxy
        walk.first.update({id(s.obj): p for p, s in self.slots.items()})
        return walk.visit(fn, (prefix,), prefix, 0)


class NeedsStatic(Exception):  # noqa: N818 - a signal to the tracer, not an error users see
    """A captured number was used in Python control flow: trace again with it as a constant."""

    def __init__(self, paths: set[Path]):
        super().__init__(f"captured numbers used as constants: {sorted(map(str, paths))}")
        self.paths = paths
