"""The reference: a numpy float64 interpreter of the IR, the oracle every variant is tested against.

Expressions are evaluated over a broadcast index space with one axis per non-split grid
axis plus one key axis; a grid variable is an `arange` along its own axis, the loop
variable an `arange` of the current KV tile along the key axis. A split axis is run as a
Python loop producing partial states that are merged with the log-sum-exp combine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from attnc.ir.nodes import (
    Call,
    Const,
    Dim,
    Dot,
    DType,
    Expr,
    Grid,
    Kernel,
    Let,
    Load,
    Loop,
    Op,
    Return,
    Sink,
    Slice,
    Softmax,
    SplitExtent,
    Store,
    StoreKernel,
    Update,
    Var,
)

_UNARY = {
    Op.NEG: np.negative, Op.ABS: np.abs, Op.EXP: np.exp, Op.LOG: np.log, Op.TANH: np.tanh,
    Op.SQRT: np.sqrt, Op.NOT: np.logical_not, Op.SIN: np.sin, Op.COS: np.cos, Op.TAN: np.tan,
    Op.EXP2: np.exp2, Op.LOG2: np.log2, Op.FLOOR: np.floor, Op.CEIL: np.ceil,
}
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def wrap_i32(x):
    """Two's-complement i32 wrap-around of int64 values (the IR's integer overflow)."""
    return (np.asarray(x, dtype=np.int64) - I32_MIN) % 2**32 + I32_MIN


def floor_div(a, b):
    """The IR's idiv: floor division (Python's //), 0 for a zero divisor."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    safe = np.where(b == 0, 1, b)
    return np.where(b == 0, 0, np.floor_divide(a, safe))


def floor_mod(a, b):
    """The IR's mod: the sign of the divisor (Python's %), a itself for a zero divisor."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    safe = np.where(b == 0, 1, b)
    return np.where(b == 0, a, np.mod(a, safe))


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def to_i32(x):
    """The IR's i32(f32): truncation toward zero, saturating at the i32 range, NaN -> 0."""
    x = np.trunc(np.asarray(x, dtype=np.float64))
    return np.where(np.isnan(x), 0, np.clip(np.nan_to_num(x), I32_MIN, I32_MAX)).astype(np.int64)
_BINARY = {
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide,
    Op.MAX: np.maximum, Op.MIN: np.minimum, Op.LT: np.less, Op.LE: np.less_equal,
    Op.GT: np.greater, Op.GE: np.greater_equal, Op.EQ: np.equal, Op.NE: np.not_equal,
    Op.AND: np.logical_and, Op.OR: np.logical_or,
}


@dataclass
class _State:
    """Running online-softmax state for every row: max m, sum l, accumulator o."""

    m: np.ndarray
    l: np.ndarray
    o: np.ndarray


def _safe_sub_max(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x - m, where a row max of -inf (all masked) counts as 0 so exp gives 0, not NaN."""
    return x - np.where(np.isneginf(m), 0.0, m)


def _masked_pv(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """sum_j p_j v_j over keys with p_j != 0: a masked key adds nothing, even a NaN/inf value."""
    if np.isfinite(v).all():
        return p[..., None, :] @ v
    terms = np.where((p != 0)[..., :, None], p[..., :, None] * v, 0.0)
    return terms.sum(axis=-2, keepdims=True)


def _dequantized(name: str, fmt: str, a: object) -> np.ndarray:
    """The float values of a quantized tensor argument (the oracle dequantizes the words itself)."""
    from attnc.quant import QuantTensor, dequantize

    if not isinstance(a, QuantTensor) or a.fmt != fmt:
        got = f"a {a.fmt} tensor" if isinstance(a, QuantTensor) else type(a).__name__
        raise ValueError(f"{name}: expected a {fmt} QuantTensor (attnc.quant.quantize), got {got}")
    return dequantize(a)


class _Interp:
    """Evaluates one kernel on concrete arrays; one instance per call."""

    def __init__(self, kernel: Kernel, args: Mapping[str, object], dims: Mapping[str, int] | None = None):
        self.k = kernel
        self.tunables = kernel.tunable_values
        self.arrays: dict[str, np.ndarray] = {}
        self.scalars: dict[str, float | int] = {}
        self.dims: dict[str, int] = dict(dims or {})
        tensors: dict[str, np.ndarray] = {}
        for p in kernel.params:
            if p.name not in args:
                raise ValueError(f"missing argument {p.name!r}")
            a = args[p.name]
            if p.type.dtype.is_quant:
                a = _dequantized(p.name, p.type.dtype.value, a)
            if p.type.dims:
                arr = np.asarray(a)
                if arr.ndim != len(p.type.dims):
                    raise ValueError(f"{p.name}: expected rank {len(p.type.dims)}, got {arr.ndim}")
                tensors[p.name] = arr
            else:
                self.scalars[p.name] = a  # type: ignore[assignment]
        # a dim's size is the one size other than 1 its tensors have (size-1 axes broadcast)
        for p in kernel.params:
            for d, n in zip(p.type.dims, tensors.get(p.name, np.empty(0)).shape, strict=False):
                have = self.dims.get(d)
                if have is None or have == 1:
                    self.dims[d] = n
                elif n not in (1, have):
                    raise ValueError(f"{p.name}: dim {d} is {n}, elsewhere {have}")
        for name, arr in tensors.items():
            p = kernel.param(name)
            arr = np.broadcast_to(arr, tuple(self.dims[d] for d in p.type.dims))
            if p.type.dtype.is_float:
                arr = arr.astype(np.float64)
            elif p.type.dtype is not DType.BOOL:
                arr = arr.astype(np.int64)
            self.arrays[name] = arr
        grid = next(s for s in kernel.body if isinstance(s, Grid))
        self.axes = [a for a in grid.axes if not isinstance(a.extent, SplitExtent)]
        self.split = next((a for a in grid.axes if isinstance(a.extent, SplitExtent)), None)
        self.nd = len(self.axes) + 1
        self.env: dict[str, np.ndarray | float | int] = {}
        for i, ax in enumerate(self.axes):
            shape = [1] * self.nd
            n = self.dims[ax.extent.dim]
            shape[i] = n
            self.env[ax.var] = np.arange(n, dtype=np.int64).reshape(shape)
        self.row_shape = tuple(self.dims[a.extent.dim] for a in self.axes) + (1,)

    # ------------------------------------------------------------------ expressions
    def expr(self, e: Expr):
        if isinstance(e, Const):
            return e.value
        if isinstance(e, Dim):
            return self.dims[e.name]
        if isinstance(e, Var):
            if e.name in self.env:
                return self.env[e.name]
            return self.scalars[e.name]
        if isinstance(e, Call):
            args = [self.expr(a) for a in e.args]
            with np.errstate(all="ignore"):
                out = self.call(e.op, args)
            return wrap_i32(out) if e.dtype is DType.I32 else out
        if isinstance(e, Load):
            return self.gather(e.tensor, [self.expr(i) for i in e.index], None)
        if isinstance(e, Dot):
            a = self.slice(e.a)
            b = self.slice(e.b)
            return (a[..., None, :] @ b[..., :, None])[..., 0, 0]
        raise TypeError(f"unknown expression {e!r}")

    def call(self, op: Op, args: list):
        if op in _UNARY:
            return _UNARY[op](args[0])
        if op is Op.RSQRT:
            return 1.0 / np.sqrt(args[0])
        if op is Op.SIGMOID:
            return sigmoid(args[0])
        if op in _BINARY:
            return _BINARY[op](args[0], args[1])
        if op is Op.IDIV:
            return floor_div(args[0], args[1])
        if op is Op.MOD:
            return floor_mod(args[0], args[1])
        if op is Op.WHERE:
            return np.where(args[0], args[1], args[2])
        if op is Op.F32:
            return np.asarray(args[0], dtype=np.float64)
        if op is Op.I32:
            return to_i32(args[0])
        raise TypeError(f"unknown op {op}")

    def gather(self, tensor: str, index: list, axis: int | None) -> np.ndarray:
        """Elements (or, with `axis`, whole vectors along that axis) at broadcast indices, each
        index clamped into its dim (the IR's reads never fail)."""
        arr = self.arrays[tensor]
        if axis is not None:
            arr = np.moveaxis(arr, axis, -1)
        idx = [np.asarray(i, dtype=np.int64) for i in index]
        shape = np.broadcast_shapes(*(i.shape for i in idx))
        idx = [np.clip(np.broadcast_to(i, shape), 0, n - 1) for i, n in zip(idx, arr.shape, strict=False)]
        return arr[tuple(idx)]

    def slice(self, s: Slice) -> np.ndarray:
        return self.gather(s.tensor, [self.expr(i) for i in s.index if i is not None], s.axis)

    # ------------------------------------------------------------------ statements
    def run(self):
        states: dict[str, _State] = {}
        ret: Return | None = None
        splits = 1
        if self.split is not None:
            splits = int(self.scalars[self.split.extent.count])
        partials: list[dict[str, _State]] = []
        for ks in range(splits):
            if self.split is not None:
                self.env[self.split.var] = ks
            states = {}
            for st in self.k.body:
                if isinstance(st, Let):
                    self.env[st.var] = self.expr(st.value)
                elif isinstance(st, Softmax):
                    w = self.dims[st.width]
                    states[st.var] = _State(
                        np.full(self.row_shape, -np.inf), np.zeros(self.row_shape),
                        np.zeros(self.row_shape + (w,)))
                elif isinstance(st, Loop):
                    self.loop(st, states, ks, splits)
            partials.append(states)
        for st in self.k.body:
            if isinstance(st, Return):
                ret = st
        assert ret is not None
        state = self.combine([p[ret.acc] for p in partials])
        for st in self.k.body:
            if isinstance(st, Sink):
                z = np.broadcast_to(self.expr(st.logit), self.row_shape).astype(np.float64)
                top = np.isposinf(z)  # the sink takes all the weight: o = 0, lse = +inf (NaN stays NaN)
                with np.errstate(all="ignore"):
                    m = np.maximum(state.m, z)
                    a = np.where(top, 0.0, np.exp(_safe_sub_max(state.m, m)))
                    sink = np.where(top, 1.0, np.exp(_safe_sub_max(z, m)))
                state = _State(m, state.l * a + sink, state.o * a[..., None])
        with np.errstate(all="ignore"):
            o = np.where((state.l > 0)[..., None], state.o / np.where(state.l > 0, state.l, 1.0)[..., None], 0.0)
            o = np.where(np.isnan(state.l)[..., None], np.nan, o)
            lse = np.where(state.l > 0, state.m + np.log(np.where(state.l > 0, state.l, 1.0)), -np.inf)
            lse = np.where(np.isnan(state.l), np.nan, lse)
        return o[..., 0, :], (lse[..., 0] if ret.lse else None)

    def combine(self, parts: list[_State]) -> _State:
        if len(parts) == 1:
            return parts[0]
        m = np.maximum.reduce([p.m for p in parts])
        l = np.zeros_like(m)
        o = np.zeros_like(parts[0].o)
        for p in parts:
            w = np.exp(_safe_sub_max(p.m, m))
            l = l + p.l * w
            o = o + p.o * w[..., None]
        return _State(m, l, o)

    def loop(self, lp: Loop, states: dict[str, _State], ks: int, splits: int) -> None:
        n = self.dims[lp.dim]
        bn = self.tunables[lp.size]
        tiles = -(-n // bn)
        lo, hi = 0, tiles
        if lp.split is not None:
            per = -(-tiles // splits)
            lo, hi = min(ks * per, tiles), min((ks + 1) * per, tiles)
        for t in range(lo, hi):
            shape = [1] * self.nd
            cols = np.arange(t * bn, min((t + 1) * bn, n), dtype=np.int64)
            shape[-1] = cols.size
            self.env[lp.var] = cols.reshape(shape)
            self.loop_var = lp.var
            for st in lp.body:
                if isinstance(st, Let):
                    self.env[st.var] = self.expr(st.value)
                elif isinstance(st, Update):
                    self.update(states[st.acc], st)

    def update(self, state: _State, st: Update) -> None:
        s = np.asarray(self.expr(st.score), dtype=np.float64)
        ncols = self.env[self.loop_var].shape[-1]
        s = np.broadcast_to(s, self.row_shape[:-1] + (ncols,))
        v = self.slice(st.value)
        while v.ndim < self.nd + 1:
            v = v[None]
        with np.errstate(all="ignore"):
            m_new = np.maximum(state.m, s.max(axis=-1, keepdims=True))
            p = np.exp(_safe_sub_max(s, m_new))
            a = np.exp(_safe_sub_max(state.m, m_new))
            state.l = state.l * a + p.sum(axis=-1, keepdims=True)
            state.o = state.o * a[..., None] + _masked_pv(p, v)
            state.m = m_new


def interpret(kernel: Kernel, args: Mapping[str, object], dims: Mapping[str, int] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Run `kernel` on numpy arrays/scalars by name; returns (o, lse or None) in float64.

    Dims are read off the arrays; `dims` gives those no input carries (e.g. an output-only dim).
    """
    missing = [d for d in kernel.dims if d not in (dims or {}) and
               not any(d in p.type.dims for p in kernel.params)]
    if missing:
        raise ValueError(f"no size for dims {missing}: pass them in dims=")
    return _Interp(kernel, args, dims).run()



def interpret_store(kernel: StoreKernel, args: Mapping[str, object]) -> dict[str, object]:
    """Run a store kernel on numpy arrays (a quantized tensor as a QuantTensor); return its targets
    after the stores, as new arrays / QuantTensors (the arguments are not changed). Rows are
    quantized with attnc.quant.quantize; a row whose target index is out of range is not written."""
    from attnc.quant import QuantTensor, quantize, words_per_row

    dims: dict[str, int] = {}
    env: dict[str, object] = {}
    arrays: dict[str, object] = {}
    for p in kernel.params:
        a = args[p.name]
        shape = a.shape if isinstance(a, QuantTensor) else np.shape(a)
        if len(shape) != len(p.type.dims):
            raise ValueError(f"{p.name}: expected rank {len(p.type.dims)}, got {len(shape)}")
        for d, n in zip(p.type.dims, shape, strict=True):
            if dims.setdefault(d, n) != n:
                raise ValueError(f"{p.name}: dim {d} is {n}, elsewhere {dims[d]}")
        if p.type.dtype.is_quant:
            if not isinstance(a, QuantTensor) or a.fmt != p.type.dtype.value:
                raise ValueError(f"{p.name}: expected a {p.type.dtype.value} QuantTensor")
            arrays[p.name] = QuantTensor(a.fmt, a.shape, a.words.copy())
        elif p.type.dims:
            arrays[p.name] = np.array(a)
        else:
            env[p.name] = a
    grid = kernel.body[0]
    assert isinstance(grid, Grid)
    nd = len(grid.axes)
    for i, ax in enumerate(grid.axes):
        shape = [1] * nd
        shape[i] = dims[ax.extent.dim]
        env[ax.var] = np.arange(shape[i], dtype=np.int64).reshape(shape)
    points = tuple(dims[ax.extent.dim] for ax in grid.axes)
    interp = _Interp.__new__(_Interp)
    interp.dims, interp.env, interp.scalars = dims, env, {}
    interp.arrays = {n: a for n, a in arrays.items() if isinstance(a, np.ndarray)}
    for st in kernel.body[1:]:
        if isinstance(st, Let):
            env[st.var] = interp.expr(st.value)
            continue
        assert isinstance(st, Store)
        value = interp.slice(st.value)  # [*points, width]
        value = np.broadcast_to(value, points + value.shape[-1:]).reshape(-1, value.shape[-1])
        tgt = kernel.param(st.target.tensor)
        index = [np.broadcast_to(np.asarray(interp.expr(i), dtype=np.int64), points).reshape(-1)
                 for i in st.target.index if i is not None]
        outer = [d for d, i in zip(tgt.type.dims, st.target.index, strict=True) if i is not None]
        ok = np.ones(value.shape[0], bool)
        for i, d in zip(index, outer, strict=True):
            ok &= (i >= 0) & (i < dims[d])
        a = arrays[st.target.tensor]
        if isinstance(a, QuantTensor):
            rows = np.ravel_multi_index([i[ok] for i in index], [dims[d] for d in outer])
            wpr = words_per_row(a.fmt, a.shape[-1])
            words = a.words.reshape(-1, wpr)
            words[rows] = quantize(value[ok].astype(np.float32), a.fmt).words.reshape(-1, wpr)
        else:
            full = [None if i is None else 0 for i in st.target.index]
            axis = full.index(None)
            moved = np.moveaxis(a, axis, -1)
            moved[tuple(i[ok] for i in index)] = value[ok].astype(moved.dtype)
    return {n: arrays[n] for n in kernel.targets}
