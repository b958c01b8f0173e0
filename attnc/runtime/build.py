"""The shipped flash kernel traced for a call's options, and lowered for a plan (both cached).

What the traced IR depends on is `Options` (which options are present, not their values:
those are uniforms); a kernel and a plan give the programs, whatever the device. A
score_mod or mask_mod is traced once per distinct function (`function_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from attnc.ir import nodes as ir
from attnc.lowering import Plan, Storage, lower
from attnc.lowering.program import Program
from attnc.lowering.retype import retype, with_kv_formats


@dataclass(frozen=True)
class Options:
    """The kernel-shaping options of one attention call (what the traced IR depends on)."""

    causal: bool = False
    window: tuple[int | None, int | None] | None = None  # which sides are bounded (0); values are uniforms
    softcap: bool = False
    alibi: bool = False
    bias: bool = False
    sinks: bool = False
    kv_lens: bool = False
    offsets: bool = False
    lse: bool = False
    split: bool = False
    pack_gqa: bool = False
    f16: bool = False
    k_format: str | None = None  # a quantized K (attnc/quant.py: q8_0, q4_0, int8), else q's dtype
    v_format: str | None = None  # the same for V
    score_mod: Callable[..., Any] | None = None
    mask_mod: Callable[..., Any] | None = None


def options_key(opts: Options) -> str:
    """The kernel-shaping options as a stable string (the tuning cache keys on it)."""
    d = {k: v for k, v in opts.__dict__.items() if k not in ("split", "score_mod", "mask_mod")
         and not (k in ("k_format", "v_format") and v is None)}
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


class _Identity:
    """A key part that compares an object by identity and keeps it alive (so its id is not
    reused while the key is in a cache)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _value_key(x: Any, depth: int) -> Hashable:
    """A value a traced function reads, as a cache key: numbers, strings and tuples of them by
    value, modules by name, functions by their own key, anything else by identity."""
    if isinstance(x, _PLAIN):
        return (type(x).__name__, x)
    if isinstance(x, tuple):
        return ("tuple",) + tuple(_value_key(v, depth) for v in x)
    if hasattr(x, "dtype") and hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy scalars
        return ("scalar", str(x.dtype), x.item())
    if isinstance(x, types.ModuleType):
        return ("module", x.__name__)
    if callable(x) and not isinstance(x, type) and depth < 8:
        return function_key(x, depth + 1)
    return _Identity(x)


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the functions nested in it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def function_key(fn: Any, depth: int = 0) -> Hashable:
    """What tracing a score_mod or mask_mod depends on, as a cache key: its code object, the
    values of its closure cells, defaults and the globals its code names (numbers, strings and
    tuples by value, functions by their own key, other objects by identity). Two calls with
    the same function, or with a new closure over equal values, share one traced kernel; a
    captured object mutated in place is not noticed."""
    if isinstance(fn, functools.partial):
        return ("partial", function_key(fn.func, depth + 1), _value_key(tuple(fn.args), depth),
                _value_key(tuple(sorted(fn.keywords.items())), depth))
    if isinstance(fn, types.MethodType):
        return ("method", function_key(fn.__func__, depth + 1), _value_key(fn.__self__, depth))
    code = getattr(fn, "__code__", None)
    if not isinstance(fn, types.FunctionType) or code is None:
        return ("object", _Identity(fn))
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_value_key(cell.cell_contents, depth))
        except ValueError:  # an empty cell (a name assigned after the function was made)
            cells.append(("empty",))
    scope = fn.__globals__
    used = tuple(sorted((n, _value_key(scope[n], depth)) for n in _global_names(code) if n in scope
                        and scope[n] is not fn))
    kwdefaults = tuple(sorted((fn.__kwdefaults__ or {}).items()))
    return ("function", code, tuple(cells), _value_key(fn.__defaults__, depth), _value_key(kwdefaults, depth), used)


class _Cache:
    """Traced kernels and lowered programs, keyed by everything that changes them."""

    def __init__(self) -> None:
        self.kernels: dict[Any, ir.Kernel] = {}
        self.programs: dict[Any, tuple[Program, ...]] = {}


_CACHE = _Cache()


def build_kernel(opts: Options, tunables: dict[str, int]) -> ir.Kernel:
    """Trace the shipped flash kernel for these options (cached; score_mod and mask_mod by
    `function_key`) and set the storage dtype."""
    from attnc.kernels.flash import flash_attention

    mods = tuple(None if f is None else function_key(f) for f in (opts.score_mod, opts.mask_mod))
    key = (dataclasses.replace(opts, score_mod=None, mask_mod=None), mods, tuple(sorted(tunables.items())))
    kern = _CACHE.kernels.get(key)
    if kern is None:
        kern = flash_attention.trace(
            causal=opts.causal, window=opts.window, softcap=opts.softcap, alibi=opts.alibi,
            bias=opts.bias, sinks=opts.sinks, kv_lens=opts.kv_lens, lse=opts.lse,
            split=opts.split, score_mod=opts.score_mod, mask_mod=opts.mask_mod, pack_gqa=opts.pack_gqa,
            offsets=opts.offsets, **tunables)
        kern = retype(kern, Storage.F16 if opts.f16 else Storage.F32)
        kern = with_kv_formats(kern, opts.k_format, opts.v_format)
        _CACHE.kernels[key] = kern
    return kern


def programs_for(kern: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower (cached by kernel and plan)."""
    key = (kern, plan)
    progs = _CACHE.programs.get(key)
    if progs is None:
        progs = lower(kern, plan)
        _CACHE.programs[key] = progs
    return progs
