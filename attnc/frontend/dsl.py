"""The Python-embedded DSL: thin user-facing builtins that forward to the semantic layer.

A kernel is a Python function decorated with `@kernel`; `KernelDef.trace(**options)` calls
it with symbolic values and records IR. Masks and score modifiers are plain functions of
traced values (FlexAttention style): operators on traced values build IR expressions, and the
arrays and numbers they close over become kernel params (frontend/capture.py).
"""

from __future__ import annotations

import ast
import contextvars
import functools
import inspect
import linecache
import math
import operator
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnc.errors import TraceError
from attnc.frontend import capture
from attnc.frontend import semantic as sem
from attnc.frontend.capture import NeedsStatic
from attnc.frontend.semantic import fail
from attnc.ir import nodes as ir
from attnc.ir.printer import KEYWORDS
from attnc.ir.verify import load_dtype, verify

_BUILDER: contextvars.ContextVar[sem.Builder | None] = contextvars.ContextVar("attnc_builder",
                                                                              default=None)


# what dim(name) gives inside the score_mod or mask_mod being traced (see apply_mod)
_MOD_DIMS: contextvars.ContextVar[dict[str, Callable[[], Value]] | None] = contextvars.ContextVar(
    "attnc_mod_dims", default=None)
# whether a user's score_mod or mask_mod is being traced (its attnc.input / attnc.scalar declare
# inputs of its own, which must not take the kernel's names)
_IN_MOD: contextvars.ContextVar[bool] = contextvars.ContextVar("attnc_in_mod", default=False)


def _builder() -> sem.Builder:
    b = _BUILDER.get()
    if b is None:
        raise fail("DSL operations are only valid while a kernel is traced",
                   ("call KernelDef.trace(...) or attnc.attention(..., score_mod=f)",))
    return b


# ----------------------------------------------------------------------------- types


class DTypeSpec:
    """`f32`, `f16`, `i32`, `u32`, `u8`, `bool_`: a scalar annotation (f32, i32), or
    `f32["B", "S"]` for a tensor type."""

    def __init__(self, dtype: ir.DType):
        self.dtype = dtype

    def __getitem__(self, dims: str | tuple[str, ...]) -> ir.TensorType:
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        for d in dims:
            if not isinstance(d, str) or not d.isidentifier():
                raise fail(f"tensor dims are names (strings), got {d!r}")
        return ir.TensorType(self.dtype, dims)

    def __call__(self, x: Any) -> Value:
        """Convert a value: f32(i) turns an index into a float, i32(x) truncates."""
        if self.dtype.is_quant:
            raise fail(f"{self.dtype.value} is a storage type for tensors, not a conversion",
                       ("use f32(x) or i32(x)",))
        if self.dtype not in (ir.DType.F32, ir.DType.F16, ir.DType.I32):
            raise fail(f"{self.dtype.value} is a tensor storage type; values convert with f32(...) or i32(...)")
        op = ir.Op.F32 if self.dtype is not ir.DType.I32 else ir.Op.I32
        return Value(sem.call(op, _expr(x)))

    def __repr__(self) -> str:
        return self.dtype.value


f32 = DTypeSpec(ir.DType.F32)
f16 = DTypeSpec(ir.DType.F16)
i32 = DTypeSpec(ir.DType.I32)
u32 = DTypeSpec(ir.DType.U32)
u8 = DTypeSpec(ir.DType.U8)
bool_ = DTypeSpec(ir.DType.BOOL)
# quantized storage of K/V tensors (attnc/quant.py): k: q8_0["B", "Hkv", "T", "D"]
q8_0 = DTypeSpec(ir.DType.Q8_0)
q4_0 = DTypeSpec(ir.DType.Q4_0)
int8 = DTypeSpec(ir.DType.INT8)
inf = float("inf")


@dataclass(frozen=True)
class Tunable:
    """A compile-time integer (a tile size); its name is the keyword argument's name."""

    default: int
    name: str = ""

    def __index__(self) -> int:
        return self.default


def tunable(default: int) -> Tunable:
    """Declare a tunable keyword argument of a kernel with its default value."""
    return Tunable(default)


# ----------------------------------------------------------------------------- values


# numpy's ufuncs that a numpy scalar operand (np.float32(0.5) * s) calls on a traced value,
# as the Python operators the traced value implements
_NUMPY_OPERATORS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "subtract": operator.sub, "multiply": operator.mul, "true_divide": operator.truediv,
    "floor_divide": operator.floordiv, "remainder": operator.mod, "less": operator.lt, "less_equal": operator.le,
    "greater": operator.gt, "greater_equal": operator.ge, "equal": operator.eq, "not_equal": operator.ne,
    "bitwise_and": operator.and_, "bitwise_or": operator.or_, "negative": operator.neg,
}


def _expr(x: Any) -> ir.Expr:
    if isinstance(x, Value):
        return x.expr
    if isinstance(x, _SubTensor):
        raise fail(f"{x.tensor._describe()}, indexed with {len(x.prefix)}",
                   ("index it down to one element, e.g. t[b, q_idx] or t[b][q_idx]",))
    if isinstance(x, CapturedTensor):
        raise fail(f"captured tensor {x.slot.hint!r} is not a scalar value; index it first")
    if isinstance(x, (TensorInput, Acc)):
        raise fail(f"{x!r} is not a scalar value; index it first")
    return sem.const(x)


class Value:
    """A traced scalar expression (per row, or per (row, key) pair inside the KV loop)."""

    __slots__ = ("expr",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, expr: ir.Expr):
        self.expr = expr

    def _bin(self, op: ir.Op, other: Any, swap: bool = False) -> Value:
        a, b = self.expr, _expr(other)
        return Value(sem.call(op, *((b, a) if swap else (a, b))))

    def __add__(self, o): return self._bin(ir.Op.ADD, o)
    def __radd__(self, o): return self._bin(ir.Op.ADD, o, True)
    def __sub__(self, o): return self._bin(ir.Op.SUB, o)
    def __rsub__(self, o): return self._bin(ir.Op.SUB, o, True)
    def __mul__(self, o): return self._bin(ir.Op.MUL, o)
    def __rmul__(self, o): return self._bin(ir.Op.MUL, o, True)
    def __truediv__(self, o): return self._bin(ir.Op.DIV, o)
    def __rtruediv__(self, o): return self._bin(ir.Op.DIV, o, True)
    def __floordiv__(self, o): return self._bin(ir.Op.IDIV, o)
    def __rfloordiv__(self, o): return self._bin(ir.Op.IDIV, o, True)
    def __mod__(self, o): return self._bin(ir.Op.MOD, o)
    def __rmod__(self, o): return self._bin(ir.Op.MOD, o, True)
    def __lt__(self, o): return self._bin(ir.Op.LT, o)
    def __le__(self, o): return self._bin(ir.Op.LE, o)
    def __gt__(self, o): return self._bin(ir.Op.GT, o)
    def __ge__(self, o): return self._bin(ir.Op.GE, o)
    def __eq__(self, o): return self._bin(ir.Op.EQ, o)  # type: ignore[override]
    def __ne__(self, o): return self._bin(ir.Op.NE, o)  # type: ignore[override]
    def _mask_op(self, op: ir.Op, symbol: str, o: Any = None, swap: bool = False) -> Value:
        """`a & b`, `a | b`, `~a` of masks (bools); on numbers the error says what the
        operator is, not the IR op it traces to."""
        operands = (self.expr,) if o is None else (self.expr, _expr(o))
        if any(e.dtype is not ir.DType.BOOL for e in operands):
            raise fail(f"'{symbol}' takes bools (masks) in kernels: the DSL has no bitwise integer operators",
                       ("for integers use % and // (x % 4 for the low two bits), for masks compare first "
                        "(kv_idx <= q_idx)",))
        return Value(sem.call(op, self.expr)) if o is None else self._bin(op, o, swap)

    def __and__(self, o): return self._mask_op(ir.Op.AND, "&", o)
    def __rand__(self, o): return self._mask_op(ir.Op.AND, "&", o, True)
    def __or__(self, o): return self._mask_op(ir.Op.OR, "|", o)
    def __ror__(self, o): return self._mask_op(ir.Op.OR, "|", o, True)
    def __invert__(self): return self._mask_op(ir.Op.NOT, "~")
    def __neg__(self): return Value(sem.call(ir.Op.NEG, self.expr))
    def __abs__(self): return Value(sem.call(ir.Op.ABS, self.expr))

    def _divmod(self, *_: Any) -> Value:
        raise fail("divmod() of a traced value is not in the DSL",
                   ("write the two parts: x // y and x % y (they floor, as Python's divmod)",))

    __divmod__ = __rdivmod__ = _divmod

    def _xor(self, o: Any) -> Value:
        """`a ^ b` of two masks: they differ (a != b); the DSL has no bitwise integer ops."""
        if self.expr.dtype is ir.DType.BOOL and _expr(o).dtype is ir.DType.BOOL:
            return self._bin(ir.Op.NE, o)
        raise fail("'^' takes two bools (masks) in kernels: the DSL has no bitwise integer operators",
                   ("for masks, a ^ b is a != b",))

    def __xor__(self, o): return self._xor(o)
    def __rxor__(self, o): return self._xor(o)

    def _shift(self, *_: Any) -> Value:
        raise fail("'<<' and '>>' are not in the DSL (it has no bitwise integer operators)",
                   ("use x * 2**n or x // 2**n (floor division, as Python's >> on ints)",))

    __lshift__ = __rlshift__ = __rshift__ = __rrshift__ = _shift

    def __round__(self, ndigits: Any = None) -> Value:
        raise fail("round() of a traced value is not in the DSL", ("use math.floor(x + 0.5) or attnc.floor",))

    def __pow__(self, o):
        if isinstance(o, int | np.integer) and not isinstance(o, bool) and -8 <= int(o) <= 8:
            n = int(o)  # x ** 0 is 1 of x's type (an i32 for an integer x, as Python's int)
            out: Value = Value(sem.const(1 if self.expr.dtype is ir.DType.I32 else 1.0)) if n == 0 else self
            for _ in range(abs(n) - 1):
                out = out * self
            return 1.0 / out if n < 0 else out
        notes = ("use exp(log(x) * y), sqrt(x) or x * x",)
        if isinstance(o, Value):  # a captured number as the exponent: traced again as a constant
            raise o._not_python("'**' takes a constant integer exponent from -8 to 8 in kernels", notes)
        raise fail("'**' takes a constant integer exponent from -8 to 8 in kernels", notes)

    def __rpow__(self, base):
        """A positive number to a traced float power (ALiBi's 2 ** (-8 * (h + 1) / H)):
        exp2(x * log2(base)), an f32. A traced integer power only of a power of 2 (2 ** kv_idx,
        0.5 ** kv_idx), where exp2 is exact: 3 ** kv_idx would not be Python's integer."""
        if isinstance(base, int | float | np.integer | np.floating) and not isinstance(base, bool | np.bool_) \
                and math.isfinite(base) and base > 0:
            log_base = math.log2(float(base))
            if self.expr.dtype is ir.DType.I32 and not log_base.is_integer():
                raise self._not_python(
                    f"{base!r} ** a traced integer: '**' takes a constant integer exponent from -8 to 8; a traced "
                    "exponent is computed in f32 as exp2(x * log2(base)), exact only for a base that is a power of 2",
                    (f"for exact integer powers, capture a table of them (pows = {base!r} ** np.arange(n), "
                     "then pows[kv_idx])",
                     f"for a float power, say so: {float(base)!r} ** attnc.f32(x) (f32, rounded)"))
            return exp2(self * log_base)
        raise fail(f"{base!r} ** a traced value: the base of a traced power must be a positive number",
                   ("use where() to choose the sign, or exp(log(b) * x)",))

    def __floor__(self) -> Value:  # math.floor(x): an integer, as in Python
        return Value(sem.call(ir.Op.I32, sem.call(ir.Op.FLOOR, self.expr)))

    def __ceil__(self) -> Value:  # math.ceil(x)
        return Value(sem.call(ir.Op.I32, sem.call(ir.Op.CEIL, self.expr)))

    def __trunc__(self) -> Value:  # math.trunc(x)
        return Value(sem.call(ir.Op.I32, self.expr))

    # the tensor-method spellings of the DSL's functions (x.abs(), x.exp(), ...)
    def abs(self) -> Value: return abs(self)
    def exp(self) -> Value: return exp(self)
    def exp2(self) -> Value: return exp2(self)
    def log(self) -> Value: return log(self)
    def log2(self) -> Value: return log2(self)
    def sin(self) -> Value: return sin(self)
    def cos(self) -> Value: return cos(self)
    def tan(self) -> Value: return tan(self)
    def tanh(self) -> Value: return tanh(self)
    def sqrt(self) -> Value: return sqrt(self)
    def rsqrt(self) -> Value: return rsqrt(self)
    def sigmoid(self) -> Value: return sigmoid(self)
    def floor(self) -> Value: return floor(self)
    def ceil(self) -> Value: return ceil(self)

    def _not_python(self, what: str, notes: tuple[str, ...]) -> TraceError:
        """The error for using a traced value as a Python value; for a captured number, the
        signal to trace again with it as a constant."""
        paths = _captured_numbers(self.expr)
        if paths:
            return NeedsStatic(paths)  # type: ignore[return-value]
        return fail(what, notes)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        name = getattr(ufunc, "__name__", "a numpy function")
        op = _NUMPY_OPERATORS.get(name)
        if op is not None and method == "__call__" and not kwargs and all(
                isinstance(x, Value) or (isinstance(x, np.generic) and x.dtype.kind in "biuf") for x in inputs):
            # a numpy scalar beside a traced value (np.float32(0.5) * s): the Python operator
            return op(*(x.item() if isinstance(x, np.generic) else x for x in inputs))
        raise self._not_python(f"numpy's {name} cannot take a traced value",
                               (f"use the DSL's version, e.g. attnc.{name}" if name in _DSL_FUNCS else
                                "use attnc.exp, log, sin, cos, tanh, sqrt, maximum, minimum, where",))

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._not_python(
            "a numpy array (or a value numpy converts) met a traced value: only captured arrays "
            "can be indexed with traced values",
            ("attnc captures the arrays a score_mod or mask_mod closes over, takes as default "
             "arguments or reads as module globals; bind one reached another way (an attribute, "
             "a large container) to a variable the function closes over, or declare it with "
             "attnc.input(...) and pass it with inputs=",))

    def __bool__(self) -> bool:
        chained = _chained_comparison()
        if chained is not None:
            raise self._not_python(
                "a chained comparison of traced values: Python evaluates `a < x < b` as `(a < x) and (x < b)`, "
                "and `and` cannot take a traced value", (f"write {chained}",))
        raise self._not_python("a traced value cannot drive Python control flow (if/and/or/not/while)",
                               ("use where(cond, a, b) for a choice, & | ~ for logic, attnc.maximum / "
                                "attnc.minimum for Python's max / min",))

    def __index__(self) -> int:
        raise self._not_python("a traced value cannot be used as a Python int", ())

    def __int__(self) -> int:
        raise self._not_python("a traced value cannot be used as a Python int",
                               ("use attnc.i32(x) (truncates) or math.floor(x)",))

    def __float__(self) -> float:
        raise self._not_python("a traced value cannot be used as a Python float",
                               ("math.* functions need Python floats: use attnc.sin, cos, exp, "
                                "log, sqrt, tanh ... on traced values",))

    def __repr__(self) -> str:
        return f"Value({self.expr.dtype.value})"


_COMPARE_SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


def _chained_comparison() -> str | None:
    """When the user's expression being evaluated (the innermost frame outside attnc's
    frontend) is a chained comparison `a < x < b`, the `&` of its links to write instead
    ("(a < x) & (x < b)"); else None. Read from the source at the frame's instruction."""
    frame = inspect.currentframe()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(sem._FRONTEND_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    pos = inspect.getframeinfo(frame, context=0).positions
    if pos is None or None in (pos.lineno, pos.end_lineno, pos.col_offset, pos.end_col_offset):
        return None
    lines = [x.encode() for x in linecache.getlines(frame.f_code.co_filename)[pos.lineno - 1:pos.end_lineno]]
    if len(lines) != pos.end_lineno - pos.lineno + 1:
        return None
    lines[-1] = lines[-1][:pos.end_col_offset]  # offsets count UTF-8 bytes
    lines[0] = lines[0][pos.col_offset:]
    try:
        node = ast.parse("(" + b"".join(lines).decode() + ")", mode="eval").body
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(node, ast.Compare) or len(node.ops) < 2 or \
            any(type(op) not in _COMPARE_SYMBOLS for op in node.ops):
        return None
    parts = [node.left, *node.comparators]
    return " & ".join(f"({ast.unparse(a)} {_COMPARE_SYMBOLS[type(op)]} {ast.unparse(b)})"
                      for a, op, b in zip(parts, node.ops, parts[1:], strict=False))


def _captured_numbers(e: ir.Expr) -> set:
    """The capture paths of the captured numbers an expression depends on (lets followed)."""
    b = _BUILDER.get()
    if b is None or not b.capture_scalars:
        return set()
    out, stack, seen = set(), [e], set()
    while stack:
        for x in ir.walk_expr(stack.pop()):
            if isinstance(x, ir.Var) and x.name not in seen:
                seen.add(x.name)
                if x.name in b.capture_scalars:
                    out.add(b.capture_scalars[x.name])
                elif x.name in b.let_values:
                    stack.append(b.let_values[x.name])
    return out


_DSL_FUNCS = {"exp", "log", "tanh", "sqrt", "maximum", "minimum", "where", "abs", "sin", "cos",
              "tan", "exp2", "log2", "floor", "ceil"}


def _arity_checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its arguments checked against its signature first: a TraceError at the user's
    line naming the function and what is missing or extra (Python's TypeError named attnc's
    internals: `_unary.<locals>.f() takes 1 positional argument`)."""
    sig = inspect.signature(fn)
    shown = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in sig.parameters.values())

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise fail(f"attnc.{fn.__name__}({shown}): {exc}") from None
        return fn(*args, **kwargs)
    return checked


def _unary(op: ir.Op) -> Callable[[Any], Value]:
    def f(x: Any) -> Value:
        return Value(sem.call(op, _expr(x)))
    f.__name__ = op.value
    f.__qualname__ = op.value
    f.__doc__ = f"Elementwise {op.value} of a traced value."
    return _arity_checked(f)


exp = _unary(ir.Op.EXP)
log = _unary(ir.Op.LOG)
tanh = _unary(ir.Op.TANH)
sqrt = _unary(ir.Op.SQRT)
rsqrt = _unary(ir.Op.RSQRT)
sin = _unary(ir.Op.SIN)
cos = _unary(ir.Op.COS)
tan = _unary(ir.Op.TAN)
exp2 = _unary(ir.Op.EXP2)
log2 = _unary(ir.Op.LOG2)
floor = _unary(ir.Op.FLOOR)
ceil = _unary(ir.Op.CEIL)
sigmoid = _unary(ir.Op.SIGMOID)
sigmoid.__doc__ = "Elementwise 1 / (1 + exp(-x)) of a traced value (no overflow for large |x|)."
floor.__doc__ = "Elementwise floor of a traced value, as an f32 (math.floor(x) gives an i32)."
ceil.__doc__ = "Elementwise ceiling of a traced value, as an f32 (math.ceil(x) gives an i32)."


@_arity_checked
def maximum(a: Any, b: Any) -> Value:
    """Elementwise max (NaN propagates)."""
    return Value(sem.call(ir.Op.MAX, _expr(a), _expr(b)))


@_arity_checked
def minimum(a: Any, b: Any) -> Value:
    """Elementwise min (NaN propagates)."""
    return Value(sem.call(ir.Op.MIN, _expr(a), _expr(b)))


@_arity_checked
def where(cond: Any, a: Any, b: Any) -> Value:
    """a where cond holds, else b."""
    return Value(sem.call(ir.Op.WHERE, _expr(cond), _expr(a), _expr(b)))


def and_masks(*mask_mods: Callable[..., Any]) -> Callable[..., Any]:
    """A mask_mod keeping the keys every one of `mask_mods` keeps (FlexAttention's and_masks)."""
    def and_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        out: Any = True
        for m in mask_mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out
    return and_mask


def or_masks(*mask_mods: Callable[..., Any]) -> Callable[..., Any]:
    """A mask_mod keeping the keys any one of `mask_mods` keeps (FlexAttention's or_masks)."""
    def or_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        out: Any = False
        for m in mask_mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out
    return or_mask


@_arity_checked
def dim(name: str) -> Value:
    """The runtime size of a symbolic dim, as an i32 value (inside a score_mod or mask_mod,
    the value apply_mod was given for it, if any)."""
    whole = (_MOD_DIMS.get() or {}).get(name)
    if whole is not None:
        return whole()
    return Value(ir.Dim(name, sem.user_span()))


@_arity_checked
def let(name: str, x: Any) -> Value:
    """Bind a value to a name (`%name` in the text form), so it is computed once."""
    b = _builder()
    e = _expr(x)
    var = b.fresh(name)
    b.emit(ir.Let(var, e, sem.user_span()))
    b.let_values[var] = e
    return Value(ir.Var(var, e.dtype, sem.user_span()))


def _def_span(fn: Any) -> Any:
    """The span of a user function's `def` line (where mistakes in what it returns are reported)."""
    from attnc.errors import Span

    try:
        lines, line = inspect.getsourcelines(fn)
        return Span(inspect.getsourcefile(fn) or "<unknown>", line, 1, lines[0])
    except (OSError, TypeError):
        return None


def apply_mod(fn: Any, args: tuple[Any, ...], kind: str,
              dims: dict[str, Callable[[], Value]] | None = None) -> Value:
    """Call a score_mod ("score", must return a number) or mask_mod ("mask", must return a bool);
    the tensors and numbers it closes over become kernel inputs (frontend/capture.py).

    `dims` gives what `dim(name)` means inside the mod where that is not the kernel's dim
    (a kernel computing one piece of a larger problem: the sizes of the whole problem)."""
    if not callable(fn):
        raise TraceError(f"{kind}_mod must be a function, got a {type(fn).__name__}")
    _check_mod_arity(fn, len(args), kind)
    b = _builder()
    if b.captures is not None:  # what it closes over becomes kernel inputs
        fn = b.captures.rewrite(fn)
    token, in_mod = _MOD_DIMS.set(dims), _IN_MOD.set(True)
    try:
        out = fn(*args)
    finally:
        _MOD_DIMS.reset(token)
        _IN_MOD.reset(in_mod)
    want = "a bool (a comparison, & | ~, where)" if kind == "mask" else "a number (the modified score)"
    if isinstance(out, np.generic) and out.dtype.kind in "biuf":  # np.True_, np.float32(0.5): constants
        out = out.item()
    if out is None or (not isinstance(out, (Value, bool, int, float))):
        what = f"the captured tensor {out.slot.hint!r} of shape {out.slot.shape} (index it: {out.slot.hint}[h])" \
            if isinstance(out, CapturedTensor) else repr(out)
        raise TraceError(f"{kind}_mod {getattr(fn, '__name__', '')!r} returned {what}; it must return {want}",
                         _def_span(fn))
    e = _expr(out)
    if (kind == "mask") != (e.dtype is ir.DType.BOOL):
        raise TraceError(f"{kind}_mod {getattr(fn, '__name__', '')!r} returned a {e.dtype.value}; "
                         f"it must return {want}", _def_span(fn))
    return Value(e)


def _check_mod_arity(fn: Any, n: int, kind: str) -> None:
    """A TraceError at the mod's definition when it cannot take the n positional arguments its
    kind is called with (a Python TypeError from inside the trace said only how many it got)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        params = "(score, b, h, q_idx, kv_idx)" if kind == "score" else "(b, h, q_idx, kv_idx)"
        try:
            have = f"{getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}"
        except (TypeError, ValueError):
            have = repr(fn)
        raise TraceError(f"a {kind}_mod is called with {n} arguments {params}; {have} cannot take them",
                         _def_span(fn)) from None
    except ValueError:  # no signature to read (a builtin): let the call say what it says
        return


# ----------------------------------------------------------------------------- tensors


class _NotAValue:
    """Arithmetic or a comparison on a whole tensor or a partly indexed one (`table * 2`):
    Python's TypeError named attnc's classes and no line (and `table == 2` was a constant
    False); a TraceError at the user's line, saying to index it down to one element."""

    def _whole(self) -> TraceError:
        raise NotImplementedError

    def _not_a_value(self, *_: Any) -> Any:
        raise self._whole()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _not_a_value
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __divmod__ = _not_a_value
    __rdivmod__ = __lt__ = __le__ = __gt__ = __ge__ = __neg__ = __pos__ = __abs__ = __invert__ = _not_a_value
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __matmul__ = __rmatmul__ = _not_a_value
    __eq__ = __ne__ = _not_a_value  # type: ignore[assignment] (Python's identity test: a constant False)
    __hash__ = object.__hash__


class TensorInput(_NotAValue):
    """A tensor (or, with no dims, a runtime scalar) input of a kernel.

    Kernel parameters are made from the function's annotations; `input(name, type)`
    makes extra ones (bias, slopes, kv_lens...) that become parameters when used.
    Indexing with one index per dim reads an element (each index clamped into its dim, the
    IR's rule; a negative Python int counts from the end); fewer indices select a sub-tensor
    to index further (`bias[b][h, q_idx]`); one ':' makes a slice for dot() and update().
    """

    def __init__(self, name: str, ty: ir.TensorType):
        if not name.isidentifier():
            raise fail(f"input name {name!r} is not an identifier")
        self.name, self.type = name, ty

    def _register(self, span: Any = None) -> None:
        """Make it a param of the kernel being traced (at `span`: a kernel's own params at its
        def line, where the verifier points at them; else the user's line declaring it)."""
        b = _builder()
        if type(self) is TensorInput:  # declared by name (a captured tensor's name is its own)
            b.declare_input(self.name, _IN_MOD.get())
        b.add_param(self.name, self.type, span)

    def __getitem__(self, idx: Any) -> Value | Slice | _SubTensor:
        return self._index(idx if isinstance(idx, tuple) else (idx,))

    def _describe(self) -> str:
        """How errors name it: `bias has 4 dims ['B', 'Hq', 'S', 'T']`."""
        return f"{self.name} has {len(self.type.dims)} dims {list(self.type.dims)}"

    def _index(self, idx: tuple[Any, ...]) -> Value | Slice | _SubTensor:
        rank = len(self.type.dims)
        colons = [i for i, x in enumerate(idx) if isinstance(x, slice)]
        if len(idx) > rank or (colons and len(idx) != rank):
            raise fail(f"{self._describe()}, indexed with {len(idx)}")
        if any(x != slice(None) for x in idx if isinstance(x, slice)):
            raise fail("only a plain ':' slice is supported (the reduction axis)")
        if any(x is Ellipsis or x is None for x in idx):
            raise fail(f"{self.name}[...]: indices are integers (traced or Python), or one ':'")
        if len(idx) < rank:
            return _SubTensor(self, idx)
        self._register()
        exprs = tuple(None if isinstance(x, slice) else self._one(x, d)
                      for x, d in zip(idx, self.type.dims, strict=True))
        if not colons:
            return Value(ir.Load(self.name, exprs, load_dtype(self.type.dtype), sem.user_span()))  # type: ignore[arg-type]
        if len(colons) > 1:
            raise fail(f"{self.name}[...] has {len(colons)} ':' slices; a slice takes exactly one")
        if not self.type.dtype.is_float:
            raise fail(f"{self.name} is {self.type.dtype.value}; slices read float tensors")
        return Slice(ir.Slice(self.name, exprs, sem.user_span()), self.type.dims[colons[0]])

    def _whole(self) -> TraceError:
        return _whole_tensor(self, 0)


    @staticmethod
    def _one(x: Any, dim_name: str) -> ir.Expr:
        """One index: a negative Python int counts from the end of its dim, as in Python."""
        if isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_) and int(x) < 0:
            return sem.call(ir.Op.ADD, ir.Dim(dim_name, sem.user_span()), sem.const(int(x)))
        return _index(x)

    @property
    def shape(self) -> tuple[Any, ...]:
        """The sizes of its dims, as traced i32 values (captured tensors: Python ints)."""
        return tuple(dim(d) for d in self.type.dims)

    @property
    def ndim(self) -> int:
        return len(self.type.dims)

    def __len__(self) -> int:
        raise fail(f"len({self.name}): the size of a kernel input is a runtime value",
                   (f"use attnc.dim({self.type.dims[0]!r})" if self.type.dims else "it is a scalar",))

    def __iter__(self) -> Iterator[Any]:
        raise fail(f"iterating over {self.name}: the size of a kernel input is a runtime value",
                   ("index it with traced integers",))

    def value(self) -> Value:
        """A scalar input's value."""
        if self.type.dims:
            raise fail(f"{self.name} is a tensor; index it")
        self._register()
        return Value(ir.Var(self.name, self.type.dtype, sem.user_span()))

    def __repr__(self) -> str:
        return f"{self.name}: {self.type.dtype.value}{list(self.type.dims)}"


def _whole_tensor(t: TensorInput, indexed: int) -> TraceError:
    """The error for arithmetic or a comparison on a tensor (or a sub-tensor: `indexed` of its
    axes indexed) where one element is meant."""
    rank = len(t.type.dims)
    name = t.slot.hint if isinstance(t, CapturedTensor) else t.name
    what = f"captured tensor {name!r} of shape {t.slot.shape}" if isinstance(t, CapturedTensor) else \
        f"input {name!r} of dims {list(t.type.dims)}"
    if indexed:
        what = f"{name}[...] with {indexed} of the {rank} axes of {what} indexed"
    index = ", ".join(("b", "h", "q_idx", "kv_idx")[-rank:] if 1 <= rank <= 4 else ["i"] * max(1, rank))
    return fail(f"{what}: arithmetic and comparisons take one element, not a whole tensor",
                (f"index it down to one element first, with one integer per axis: {name}[{index}]",
                 "a computation over the whole array is done outside the function, and its result captured"))


class _SubTensor(_NotAValue):
    """`t[i]` of a tensor with more dims: the leading indices, waiting for the rest."""

    def __init__(self, tensor: TensorInput, prefix: tuple[Any, ...]):
        self.tensor, self.prefix = tensor, prefix

    def _whole(self) -> TraceError:
        return _whole_tensor(self.tensor, len(self.prefix))


    def __getitem__(self, idx: Any) -> Value | Slice | _SubTensor:
        return self.tensor._index(self.prefix + (idx if isinstance(idx, tuple) else (idx,)))

    @property
    def shape(self) -> tuple[Any, ...]:
        return self.tensor.shape[len(self.prefix):]

    def __iter__(self) -> Iterator[Any]:
        """Its elements along the next axis, where that size is known (a captured tensor)."""
        if not isinstance(self.tensor, CapturedTensor):
            raise fail(f"iterating over a sub-tensor of {self.tensor.name}: its size is a runtime value",
                       ("index it with traced integers",))
        return (self[i] for i in range(self.tensor.slot.shape[len(self.prefix)]))

    def __getattr__(self, name: str) -> Any:
        raise fail(f"a sub-tensor of {self.tensor.name} has no '{name}': index it down to elements",
                   ("reductions over captured tensors (sum, max, ...) are not traced; compute them "
                    "outside the function and capture the result",))

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise fail(f"a sub-tensor of {self.tensor.name} is not an array: index it down to elements")


class CapturedTensor(TensorInput):
    """A tensor a mod closes over (frontend/capture.py): a kernel param with a dim per axis,
    named after the variable when the trace ends; `.shape` gives the captured array's sizes."""

    def __init__(self, name: str, ty: ir.TensorType, slot: capture.Slot):
        super().__init__(name, ty)
        self.slot = slot

    def _describe(self) -> str:
        return f"captured tensor {self.slot.hint!r} of shape {self.slot.shape} has {len(self.slot.shape)} dims"

    def _index(self, idx: tuple[Any, ...]) -> Value | Slice | _SubTensor:
        if any(isinstance(x, slice) for x in idx):
            raise fail(f"captured tensor {self.slot.hint!r} is indexed with one integer per axis",
                       ("a ':' slice (a whole axis) is for q/k/v in dot() and update(); a mod reads "
                        "single elements",))
        return super()._index(idx)

    def _register(self) -> None:
        b = _builder()
        if self.name not in b.params:
            b.captured[self.name] = self.slot
        super()._register()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.slot.shape

    @property
    def dtype(self) -> Any:
        return capture.tensor_info(self.slot.obj).dtype  # type: ignore[union-attr]

    def __len__(self) -> int:
        if not self.slot.shape:
            raise fail(f"len() of the 0-d captured array {self.slot.hint!r}")
        return self.slot.shape[0]

    def __iter__(self) -> Iterator[Any]:
        """Its rows (its elements, if 1-D), as numpy iterates the captured array: the sizes are
        known while tracing, so `for row in table` unrolls (it had no __iter__: Python's fallback
        indexed it without end, as a clamped index never runs past it)."""
        return (self[i] for i in range(len(self)))

    def __getattr__(self, name: str) -> Any:
        raise fail(f"captured tensor {self.slot.hint!r} has no '{name}' in a kernel",
                   ("a captured tensor is indexed with traced integers, and has .shape, .ndim and "
                    ".dtype; compute anything else outside the function and capture the result",))

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise fail(f"captured tensor {self.slot.hint!r} is not an array while the kernel is traced",
                   ("index it with traced integers; numpy functions cannot run on it inside a mod",))


class CapturedScalar(Value):
    """A number a mod closes over: a scalar param (a uniform) once an operation reads it."""

    __slots__ = ("_slot", "_name")

    def __init__(self, name: str, slot: capture.Slot):  # noqa: D107 - no Value.__init__: lazy expr
        self._name, self._slot = name, slot

    @property  # type: ignore[override]
    def expr(self) -> ir.Expr:
        b = _builder()
        if self._name not in b.params:
            b.add_param(self._name, ir.TensorType(self._slot.dtype, ()))
            b.captured[self._name] = self._slot
            b.capture_scalars[self._name] = self._slot.path
        return ir.Var(self._name, self._slot.dtype, sem.user_span())


def _proxy(b: sem.Builder, slot: capture.Slot) -> Any:
    """The stand-in for a captured object while a kernel is traced (names are provisional)."""
    def fresh(base: str) -> str:  # a name no other is using; taken for real when registered
        name = b.fresh(base)
        b.names.discard(name)
        return name

    name = fresh(f"captured{len(b.captures.proxies)}")
    if slot.kind == "scalar":
        return CapturedScalar(name, slot)
    dims = tuple(fresh(f"{name}_d{i}") for i in range(len(slot.shape)))
    return CapturedTensor(name, ir.TensorType(slot.dtype, dims), slot)


def _index(x: Any) -> ir.Expr:
    e = _expr(x)
    if e.dtype is not ir.DType.I32:
        raise fail(f"tensor indices must be i32, got {e.dtype.value}", ("use i32(x)",))
    return e


def input(name: str, ty: ir.TensorType | DTypeSpec) -> TensorInput:  # noqa: A001
    """Declare an extra input tensor (or scalar, with a bare dtype) used by masks or mods."""
    if isinstance(ty, DTypeSpec):
        ty = ir.TensorType(ty.dtype, ())
    return TensorInput(name, ty)


def scalar(name: str, dtype: DTypeSpec = f32) -> Value:
    """A runtime scalar input (a uniform), e.g. scalar("softcap")."""
    return TensorInput(name, ir.TensorType(dtype.dtype, ())).value()


@dataclass(frozen=True)
class Slice:
    """q[b, h, qi, :] — a vector over one dim, consumed by dot() and acc.update()."""

    node: ir.Slice
    dim: str


@_arity_checked
def dot(a: Slice, b: Slice) -> Value:
    """f32 dot product of two slices over their ':' axes (the head dim)."""
    if not isinstance(a, Slice) or not isinstance(b, Slice):
        raise fail("dot() takes two slices such as q[b, h, qi, :] and k[b, hk, kj, :]")
    if a.dim != b.dim:
        raise fail(f"dot() over different dims: {a.dim} and {b.dim}")
    return Value(ir.Dot(a.node, b.node, sem.user_span()))


# ----------------------------------------------------------------------------- grid & loops


@dataclass(frozen=True)
class _Tiles:
    dim: str
    size: Tunable
    split: Value | None = None
    var: str = "kj"

    def __iter__(self) -> Iterator[Value]:
        b = _builder()
        if not self.size.name:
            raise fail("tile sizes must be tunables of the kernel (BN=tunable(64))")
        b.tunables.setdefault(self.size.name, self.size.default)
        var = b.fresh(self.var)
        span = sem.user_span()
        b.scopes.append([])
        yield Value(ir.Var(var, ir.DType.I32, span))
        body = b.scopes.pop()
        split = None
        if self.split is not None:
            if not isinstance(self.split.expr, ir.Var):
                raise fail("split= takes the split grid variable")
            split = self.split.expr.name
        b.emit(ir.Loop(var, self.dim, self.size.name, split, tuple(body), span))


def tiles(dim_name: str, size: Tunable, *, split: Value | None = None, var: str = "kj") -> _Tiles:
    """Tiles of `size` over a dim: a grid axis (one workgroup per tile) or a KV loop."""
    if not isinstance(size, Tunable):
        raise fail("tile sizes must be tunables of the kernel (BM=tunable(64))")
    return _Tiles(dim_name, size, split, var)


@dataclass(frozen=True)
class _Split:
    dim: str
    count: str


def splits(dim_name: str, count: str) -> _Split:
    """A grid axis splitting a dim into `count` (an i32 runtime scalar) chunks."""
    return _Split(dim_name, count)


def grid(**axes: str | _Tiles | _Split) -> tuple[Value, ...]:
    """Declare the parallel grid, outermost first: grid(b="B", h="Hq", qi=tiles("S", BM))."""
    b = _builder()
    out, nodes = [], []
    for name, ext in axes.items():
        span = sem.user_span()
        if isinstance(ext, str):
            extent: ir.Extent = ir.DimExtent(ext)
        elif isinstance(ext, _Tiles):
            b.tunables.setdefault(ext.size.name, ext.size.default)
            extent = ir.TileExtent(ext.dim, ext.size.name)
        elif isinstance(ext, _Split):
            b.add_param(ext.count, ir.TensorType(ir.DType.I32, ()))
            extent = ir.SplitExtent(ext.dim, ext.count)
        else:
            raise fail(f"grid axis {name}: expected a dim name, tiles(...) or splits(...)")
        var = b.fresh(name)
        nodes.append(ir.GridAxis(var, extent, span))
        out.append(Value(ir.Var(var, ir.DType.I32, span)))
    b.emit(ir.Grid(tuple(nodes), sem.user_span()))
    return tuple(out)


class Acc:
    """An online-softmax accumulator: running max, sum and weighted sum of value rows."""

    def __init__(self, var: str):
        self.var = var

    def update(self, score: Any, value: Slice) -> None:
        """Fold a tile of scores (-inf = masked) and the matching value rows into the state."""
        s = sem.to_f32(_expr(score))
        if not isinstance(value, Slice):
            raise fail("update() takes the value slice v[b, hk, kj, :] as its second argument")
        _builder().emit(ir.Update(self.var, s, value.node, sem.user_span()))

    def sink(self, logit: Any) -> None:
        """Add one extra logit per row to the softmax denominator (attention sinks)."""
        _builder().emit(ir.Sink(self.var, sem.to_f32(_expr(logit)), sem.user_span()))

    def result(self, *, lse: bool = False) -> ir.Return:
        """The normalised output (and optionally the log-sum-exp)."""
        return ir.Return(self.var, lse, None, sem.user_span())

    def combine(self, split: Value, *, lse: bool = False) -> ir.Return:
        """Merge split-KV partial states by log-sum-exp, then normalise."""
        if not isinstance(split.expr, ir.Var):
            raise fail("combine() takes the split grid variable")
        return ir.Return(self.var, lse, split.expr.name, sem.user_span())


def online_softmax(rows: Value, width: str) -> Acc:
    """Declare an online-softmax state per row of `rows` with an accumulator of `width`."""
    b = _builder()
    if not isinstance(rows, Value) or not isinstance(rows.expr, ir.Var):
        got = "" if isinstance(rows, Value) else f", got a {type(rows).__name__}"
        raise fail(f"online_softmax(rows=...) takes the query tile grid variable (qi of grid(..., qi=tiles(...))){got}")
    var = b.fresh("acc")
    b.emit(ir.Softmax(var, rows.expr.name, width, sem.user_span()))
    return Acc(var)


# ----------------------------------------------------------------------------- kernels


def _retyped(name: str, ann: ir.TensorType, dtype: str | None) -> ir.TensorType:
    """A tensor parameter's type with the dtype a `<name>_dtype=` trace option gives (f32, f16
    or a quantized storage format: k_dtype="q8_0"), else as annotated."""
    if dtype is None:
        return ann
    if not ann.dims:
        raise fail(f"{name}_dtype: {name!r} is a scalar, its dtype is fixed")
    allowed = ("f32", "f16", "q8_0", "q4_0", "int8") if ann.dtype.is_float else (ann.dtype.value,)
    if dtype not in allowed:
        raise fail(f"{name}_dtype={dtype!r}: {name!r} can be stored as {', '.join(allowed)}")
    return ir.TensorType(ir.DType(dtype), ann.dims)


class KernelDef:
    """A decorated kernel function; `trace(**options)` turns it into verified IR. Besides the
    function's keyword options, `<param>_dtype="..."` sets the storage of a tensor parameter
    (k_dtype="q8_0": K stored as q8_0)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.name = fn.__name__
        self.signature = inspect.signature(fn, eval_str=True)
        self.__doc__ = fn.__doc__

    @property
    def tunable_names(self) -> frozenset[str]:
        """The keyword options declared with attnc.tunable (compile-time integers)."""
        return frozenset(p.name for p in self.signature.parameters.values()
                         if p.kind is p.KEYWORD_ONLY and isinstance(p.default, Tunable))

    @property
    def option_names(self) -> frozenset[str]:
        """What trace() takes by keyword: the keyword-only options and tunables, and a
        `<param>_dtype` storage for each tensor parameter."""
        params = self.signature.parameters.values()
        return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY) | frozenset(
            f"{p.name}_dtype" for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    def trace(self, **options: Any) -> ir.Kernel:
        """Run the function on symbolic inputs with these options/tunables; return the IR."""
        return self.trace_with_captures(**options)[0]

    def trace_with_captures(self, **options: Any) -> tuple[ir.Kernel, dict[str, capture.Slot]]:
        """The IR, and the objects its mods captured by kernel param name (frontend/capture.py).

        A captured number that the mods use in Python control flow makes the trace start again
        with that number as a constant (remembered for later traces of the same mods)."""
        mods = {k: v for k, v in options.items() if callable(v) and not isinstance(v, Tunable)}
        static = capture.static_paths(mods)
        for _ in range(64):
            try:
                return self._trace_once(dict(options), mods, static)
            except NeedsStatic as e:
                if e.paths <= static:  # pragma: no cover - each retry adds a constant
                    raise
                static = static | e.paths
                capture.learn_static(mods, e.paths)
        raise fail(f"kernel {self.name}: too many captured numbers used as Python values")

    def _trace_once(self, options: dict[str, Any], mods: dict[str, Any], static: set
                    ) -> tuple[ir.Kernel, dict[str, capture.Slot]]:
        b = sem.Builder(self.name)
        b.captures = capture.Session(static=set(static), prefixes={id(f): n for n, f in mods.items()},
                                     make_proxy=lambda slot: _proxy(b, slot))
        token = _BUILDER.set(b)
        try:
            args, kwargs = [], {}
            for p in self.signature.parameters.values():
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    ann = p.annotation
                    if isinstance(ann, DTypeSpec):
                        ann = ir.TensorType(ann.dtype, ())
                    if not isinstance(ann, ir.TensorType):
                        raise TraceError(f"parameter {p.name!r} of kernel {self.name} needs a type annotation like "
                                         "f32['B', 'H', 'S', 'D'] or f32", _def_span(self.fn) or sem.user_span())
                    ann = _retyped(p.name, ann, options.pop(f"{p.name}_dtype", None))
                    t = TensorInput(p.name, ann)
                    t._register(_def_span(self.fn))
                    args.append(t if ann.dims else t.value())
                elif p.kind is p.KEYWORD_ONLY:
                    val = options.pop(p.name, p.default)
                    if isinstance(p.default, Tunable):
                        val = Tunable(int(val), p.name)
                    kwargs[p.name] = val
            if options:
                raise fail(f"unknown options for kernel {self.name}: {sorted(options)}")
            ret = self.fn(*args, **kwargs)
            if not isinstance(ret, ir.Return):
                raise TraceError(f"kernel {self.name} returned {type(ret).__name__ if ret is not None else 'None'}; "
                                 "a kernel must return acc.result() or acc.combine(...)",
                                 _def_span(self.fn) or sem.user_span())
            b.emit(ret)
            body = tuple(b.scopes[0])
            kern = ir.Kernel(self.name, tuple(b.params.values()), _output_type(b, body),
                             tuple(b.tunables.items()), body, sem.user_span())
        finally:
            _BUILDER.reset(token)
        kern, captured = _name_captures(kern, b.captured)
        verify(kern)
        return kern, captured

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<attnc kernel {self.name}>"


def _output_type(b: sem.Builder, body: tuple[ir.Stmt, ...]) -> ir.TensorType:
    grid = next((s for s in body if isinstance(s, ir.Grid)), None)
    acc = next((s for s in body if isinstance(s, ir.Softmax)), None)
    if grid is None or acc is None:
        raise fail("a kernel needs grid(...) and online_softmax(...)")
    dims = tuple(a.extent.dim for a in grid.axes if not isinstance(a.extent, ir.SplitExtent))
    first = next((p for p in b.params.values() if p.type.dims), None)
    dtype = first.type.dtype if first else ir.DType.F32
    if first is not None and dtype.is_quant:
        raise fail(f"the output takes the dtype of the first tensor parameter {first.name!r}, which is "
                   f"{dtype.value}: {first.name}_dtype must be f32 or f16")
    return ir.TensorType(dtype, dims + (acc.width,))


def _name_captures(kern: ir.Kernel, captured: dict[str, capture.Slot]
                   ) -> tuple[ir.Kernel, dict[str, capture.Slot]]:
    """Give captured params (and their dims) the names of the variables they came from, `rel`
    and its dims `rel_0`, ...: those are what a caller of `attnc compile`'s output binds. A name
    the kernel's params, dims, grid or loop use gets a number (`rel1`); a `%let` of the kernel
    with that name is renamed instead (lets are the kernel's own)."""
    if not captured:
        return kern, {}
    fixed = set(KEYWORDS) | set(ir.LOWERING_NAMES) | {p.name for p in kern.params if p.name not in captured}
    fixed |= {d for p in kern.params if p.name not in captured for d in p.type.dims}
    fixed |= {n for n, _ in kern.tunables} | set(kern.output.dims) | set(kern.dims)
    lets: set[str] = set()
    for st in ir.walk_stmts(kern.body):
        if isinstance(st, ir.Let):
            lets.add(st.var)
        elif isinstance(st, ir.Softmax | ir.Loop):
            fixed.add(st.var)
        elif isinstance(st, ir.Grid):
            fixed.update(a.var for a in st.axes)
    fixed -= set(captured)
    fixed -= {d for p in kern.params if p.name in captured for d in p.type.dims}
    mapping: dict[str, str] = {}
    out: dict[str, capture.Slot] = {}
    for p in kern.params:
        if p.name not in captured:
            continue
        slot = captured[p.name]
        base = slot.hint if slot.hint.isidentifier() else "captured"
        name, i = base, 1
        while name in fixed or any(f"{name}_{j}" in fixed for j in range(len(p.type.dims))):
            name, i = f"{base}{i}", i + 1
        mapping[p.name] = name
        fixed.add(name)
        for j, d in enumerate(p.type.dims):
            mapping[d] = f"{name}_{j}"
            fixed.add(mapping[d])
        out[name] = slot
    taken = fixed | lets | set(mapping.values())
    for let in sorted(lets & set(mapping.values())):  # a kernel let the user's name displaces
        new, i = f"{let}1", 2
        while new in taken:
            new, i = f"{let}{i}", i + 1
        mapping[let] = new
        taken.add(new)
    return ir.rename(kern, mapping), out


def kernel(fn: Callable[..., Any]) -> KernelDef:
    """Decorator: make a DSL kernel from a Python function."""
    return KernelDef(fn)


def store(target: Slice, value: Slice) -> None:
    """In a store kernel: write the row `value` (x[b, h, n, :]) at `target` (cache[b, h, t, :]),
    quantized to the target's format when it has one; a target index outside its dims writes nothing."""
    if not isinstance(target, Slice) or not isinstance(value, Slice):
        raise fail("store() takes two slices such as cache[b, h, t, :] and x[b, h, n, :]")
    _builder().emit(ir.Store(target.node, value.node, sem.user_span()))


class StoreKernelDef(KernelDef):
    """A decorated store kernel; `trace(**options)` gives a verified ir.StoreKernel.

    Keyword options `<param>_dtype` (e.g. cache_dtype="q8_0") retype a tensor parameter, so one
    function serves every storage format."""

    def trace(self, **options: Any) -> ir.StoreKernel:  # type: ignore[override]
        """Run the function on symbolic inputs; return the verified store kernel."""
        from attnc.ir.verify import verify_store

        b = sem.Builder(self.name)
        token = _BUILDER.set(b)
        try:
            args, kwargs = [], {}
            for p in self.signature.parameters.values():
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    ann = p.annotation
                    if isinstance(ann, DTypeSpec):
                        ann = ir.TensorType(ann.dtype, ())
                    if not isinstance(ann, ir.TensorType):
                        raise TraceError(f"parameter {p.name!r} of store kernel {self.name} needs a type annotation "
                                         "like f32['B', 'H', 'N', 'D']", _def_span(self.fn) or sem.user_span())
                    ann = _retyped(p.name, ann, options.pop(f"{p.name}_dtype", None))
                    t = TensorInput(p.name, ann)
                    t._register(_def_span(self.fn))
                    args.append(t if ann.dims else t.value())
                elif p.kind is p.KEYWORD_ONLY:
                    kwargs[p.name] = options.pop(p.name, p.default)
            if options:
                raise fail(f"unknown options for store kernel {self.name}: {sorted(options)}")
            if self.fn(*args, **kwargs) is not None:
                raise fail("a store kernel returns nothing: it writes with store(...)")
            kern = ir.StoreKernel(self.name, tuple(b.params.values()), tuple(b.scopes[0]), sem.user_span())
        finally:
            _BUILDER.reset(token)
        verify_store(kern)
        return kern


def store_kernel(fn: Callable[..., Any]) -> StoreKernelDef:
    """Decorator: make a DSL store kernel (grid, lets, store(...)) from a Python function."""
    return StoreKernelDef(fn)
