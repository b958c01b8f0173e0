"""The key-range analysis (IntervalEnv, key_range) against brute force, under the IR's i32
wrap-around: random integer expressions over the query row, a uniform scalar and constants near
+-2^31, random row ranges. The emitted WGSL (the checks' `let`s, the bounds, the k_lo/k_hi
clamps) is evaluated by a small Python model of WGSL's i32 arithmetic (wrapping, and an
overflow in a constant expression, a shader-creation error, is a failure); every row's true
value must lie within the bounds, and every key the mask keeps for some row within the range.
Tight bounds where nothing can wrap: the analysis still skips tiles."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attnc.ir import nodes as ir
from attnc.ir.interp import floor_div, floor_mod, wrap_i32
from attnc.lowering.wgsl import ExprEnv, IntervalEnv, key_range
from tests.strategies import call, i32

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
QI, KJ, N = ir.Var("qi", ir.DType.I32), ir.Var("kj", ir.DType.I32), ir.Var("n", ir.DType.I32)
S = ir.Dim("S")


# ----------------------------------------------------------------------------- WGSL model


class W(int):
    """A WGSL i32 value: + - * and negation wrap; `const` (built from literals only): a
    constant expression, whose overflow WGSL rejects at shader creation."""

    const: bool

    def __new__(cls, v: int, const: bool = False) -> W:
        v = int(v)
        x = super().__new__(cls, (v - I32_MIN) % 2**32 + I32_MIN)
        x.const = const
        if const:
            assert x == v, f"constant expression overflows: {v}"
        return x

    def _op(self, other: int, f) -> W:
        c = getattr(other, "const", not isinstance(other, W)) and self.const
        return W(f(int(self), int(other)), c)

    def __add__(self, o): return self._op(o, lambda a, b: a + b)  # noqa: E704
    def __radd__(self, o): return self._op(o, lambda a, b: b + a)  # noqa: E704
    def __sub__(self, o): return self._op(o, lambda a, b: a - b)  # noqa: E704
    def __rsub__(self, o): return self._op(o, lambda a, b: b - a)  # noqa: E704
    def __mul__(self, o): return self._op(o, lambda a, b: a * b)  # noqa: E704
    def __rmul__(self, o): return self._op(o, lambda a, b: b * a)  # noqa: E704
    def __neg__(self): return W(-int(self), self.const)  # noqa: E704
    def __abs__(self): return W(abs(int(self)), self.const)  # noqa: E704


def _wgsl_floor_div(a: int, b: int) -> W:
    return W(0 if b == 0 else int(a) // int(b))


def _wgsl_floor_mod(a: int, b: int) -> W:
    return W(int(a) if b == 0 else int(a) % int(b))


def _const(*xs: int) -> bool:
    return all(getattr(x, "const", not isinstance(x, W)) for x in xs)


# select's result counts as a runtime value (its condition is one wherever the analysis writes it)
WGSL_FNS = {"i32": lambda v: W(int(v), _const(v)), "min": lambda a, b: W(min(a, b), _const(a, b)),
            "max": lambda a, b: W(max(a, b), _const(a, b)),
            "select": lambda f, t, c: W(t if c else f), "floor_div": _wgsl_floor_div,
            "floor_mod": _wgsl_floor_mod, "abs": abs, "true": True, "false": False}


def wgsl_eval(text: str, ns: dict) -> object:
    """The value of a WGSL expression of the forms the analysis writes."""
    py = text.replace("&&", " and ").replace("||", " or ").replace("(!", "(not ")
    py = re.sub(r"\bP\.d_S\b", "d_S", py)
    return eval(py, {"__builtins__": {}, **WGSL_FNS}, ns)  # noqa: S307


def run_lines(env: IntervalEnv, ns: dict) -> None:
    """Evaluate the analysis' `let`s into ns."""
    for line in getattr(env, "lines", []):
        m = re.fullmatch(r"let (\w+) = (.*);", line)
        assert m, line
        ns[m[1]] = wgsl_eval(m[2], ns)


# ----------------------------------------------------------------------------- reference


def ref_eval(e: ir.Expr, rows: np.ndarray, n: int, d_s: int) -> np.ndarray:
    """e's i32 value for each query row (the IR's semantics, as the interpreter has them)."""
    if isinstance(e, ir.Const):
        return np.full(rows.shape, int(e.value), dtype=np.int64) if e.dtype is ir.DType.I32 else \
            np.full(rows.shape, bool(e.value))
    if isinstance(e, ir.Dim):
        return np.full(rows.shape, d_s, dtype=np.int64)
    if isinstance(e, ir.Var):
        return rows if e.name == "qi" else np.full(rows.shape, n, dtype=np.int64)
    assert isinstance(e, ir.Call)
    a = [ref_eval(x, rows, n, d_s) for x in e.args]
    f = {ir.Op.ADD: np.add, ir.Op.SUB: np.subtract, ir.Op.MUL: np.multiply, ir.Op.MIN: np.minimum,
         ir.Op.MAX: np.maximum, ir.Op.IDIV: floor_div, ir.Op.MOD: floor_mod, ir.Op.NEG: np.negative,
         ir.Op.ABS: np.abs, ir.Op.LT: np.less, ir.Op.LE: np.less_equal, ir.Op.GT: np.greater,
         ir.Op.GE: np.greater_equal, ir.Op.AND: np.logical_and, ir.Op.WHERE: np.where}[e.op]
    out = f(*a)
    return wrap_i32(out) if e.dtype is ir.DType.I32 else out


# ----------------------------------------------------------------------------- expressions

BIG = st.sampled_from([I32_MIN, I32_MIN + 1, I32_MIN + 7, -2**30, 2**30, I32_MAX - 7, I32_MAX - 1, I32_MAX,
                       100_000_000, -100_000_000, 46341, -46341])
CONSTS = st.integers(-40, 40) | BIG | st.integers(I32_MIN, I32_MAX)
CMP = [ir.Op.LT, ir.Op.LE, ir.Op.GT, ir.Op.GE]


@st.composite
def int_exprs(draw, depth: int = 4) -> ir.Expr:
    """i32 expressions over the row, a uniform scalar n, the dim S and constants: + - * (by a
    constant or not), negation, // and % (by constants, zero and negative ones too), min, max,
    abs, where over comparisons."""
    e = _int_expr(draw, depth)
    # no operation on constants alone: the kernel's own rendering of those is a constant
    # expression, which WGSL evaluates at shader creation, whatever the analysis does
    return e if any(isinstance(x, (ir.Var, ir.Dim)) for x in ir.walk_expr(e)) else i32(draw(CONSTS))


def _int_expr(draw, depth: int) -> ir.Expr:
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["row", "row", "n", "dim", "const"]))
        return {"row": QI, "n": N, "dim": S}.get(kind) or i32(draw(CONSTS))
    op = draw(st.sampled_from(["add", "sub", "mul", "mulc", "neg", "idiv", "mod", "min", "max", "abs", "where"]))
    a = draw(int_exprs(depth - 1))
    if op in ("neg", "abs"):
        return call(ir.Op(op), a)
    if op == "mulc":
        c = i32(draw(CONSTS))
        return call(ir.Op.MUL, *((a, c) if draw(st.booleans()) else (c, a)))
    if op in ("idiv", "mod"):
        return call(ir.Op(op), a, i32(draw(st.integers(-5, 40) | BIG)))
    b = draw(int_exprs(depth - 1))
    if op == "where":
        cond = call(draw(st.sampled_from(CMP)), draw(int_exprs(depth - 1)), draw(int_exprs(depth - 1)))
        return call(ir.Op.WHERE, cond, a, b)
    return call(ir.Op(op), a, b)


ROW_STARTS = st.integers(0, 100) | st.integers(0, I32_MAX - 64) | st.sampled_from([I32_MAX - 64, 2**30 - 3])
N_VALUES = st.integers(-50, 50) | BIG | st.integers(I32_MIN, I32_MAX)


def _env() -> IntervalEnv:
    return IntervalEnv("qi", "r_lo", "r_hi", ExprEnv({"n": "p_n"}, {}, load=None), {}, "kj")  # type: ignore[arg-type]


def _ns(r_lo: int, r_hi: int, n: int, d_s: int) -> dict:
    return {"r_lo": W(r_lo), "r_hi": W(r_hi), "p_n": W(n), "d_S": W(d_s)}


# ----------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(e=int_exprs(), r0=ROW_STARTS, span=st.integers(0, 64), n=N_VALUES, d_s=st.integers(1, 2**20))
@example(e=call(ir.Op.MUL, call(ir.Op.SUB, QI, i32(35)), i32(100_000_000)), r0=0, span=39, n=0, d_s=40)
@example(e=call(ir.Op.ADD, QI, i32(I32_MAX - 10)), r0=0, span=63, n=0, d_s=64)
@example(e=call(ir.Op.SUB, i32(10), QI), r0=0, span=5, n=0, d_s=8)
@example(e=call(ir.Op.NEG, call(ir.Op.SUB, QI, N)), r0=0, span=3, n=I32_MAX, d_s=8)
@example(e=call(ir.Op.IDIV, QI, i32(-1)), r0=0, span=7, n=0, d_s=8)  # decreasing with the row
@example(e=call(ir.Op.IDIV, call(ir.Op.ADD, QI, i32(200)), i32(-3)), r0=5, span=20, n=0, d_s=64)
def test_every_row_value_lies_within_the_bounds(e, r0, span, n, d_s) -> None:
    """bounds(e) over rows [r0, r0 + span] holds e's wrapped value at every one of them."""
    env = _env()
    b = env.bounds(e)
    if b is None:
        return
    ns = _ns(r0, r0 + span, n, d_s)
    run_lines(env, ns)
    lo, hi = (wgsl_eval(x, ns) for x in b)
    vals = ref_eval(e, np.arange(r0, r0 + span + 1, dtype=np.int64), n, d_s)
    assert lo <= vals.min() and vals.max() <= hi, (lo, hi, vals.min(), vals.max(), b)


@st.composite
def masks(draw) -> ir.Expr:
    """A conjunction of 1-3 comparisons of the key with an expression (either side)."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        x = draw(int_exprs(3))
        op = draw(st.sampled_from(CMP))
        parts.append(call(op, KJ, x) if draw(st.booleans()) else call(op, x, KJ))
    m = parts[0]
    for p in parts[1:]:
        m = call(ir.Op.AND, m, p)
    return m


def _mask_ref(m: ir.Expr, rows: np.ndarray, keys: np.ndarray, n: int, d_s: int) -> np.ndarray:
    """m kept for every (row, key) pair: [rows, keys]."""
    if m.op is ir.Op.AND:
        return _mask_ref(m.args[0], rows, keys, n, d_s) & _mask_ref(m.args[1], rows, keys, n, d_s)
    a, b = m.args
    val = ref_eval(b if a == KJ else a, rows, n, d_s)[:, None]
    k = keys[None, :]
    return {ir.Op.LT: np.less, ir.Op.LE: np.less_equal, ir.Op.GT: np.greater,
            ir.Op.GE: np.greater_equal}[m.op](*((k, val) if a == KJ else (val, k)))


@settings(max_examples=400, deadline=None)
@given(m=masks(), r0=ROW_STARTS, span=st.integers(0, 64), n=N_VALUES, n_keys=st.integers(1, 80),
       d_s=st.integers(1, 2**20))
@example(m=call(ir.Op.LE, KJ, i32(I32_MAX)), r0=0, span=3, n=0, n_keys=16, d_s=4)
@example(m=call(ir.Op.GE, i32(I32_MAX), KJ), r0=0, span=3, n=0, n_keys=16, d_s=4)
@example(m=call(ir.Op.LE, KJ, N), r0=0, span=3, n=I32_MAX, n_keys=16, d_s=4)
@example(m=call(ir.Op.GT, KJ, N), r0=0, span=3, n=I32_MAX, n_keys=16, d_s=4)
@example(m=call(ir.Op.LE, KJ, call(ir.Op.ADD, i32(40), call(ir.Op.IDIV, QI, i32(-1)))), r0=0, span=31, n=0,
         n_keys=64, d_s=64)
def test_every_kept_key_lies_in_the_key_range(m, r0, span, n, n_keys, d_s) -> None:
    """The key range key_bounds writes (k_lo = max(k_lo, lo), k_hi = min(k_hi, hi) from 0 and
    n_keys) holds every key the mask keeps for some row of [r0, r0 + span]."""
    env = _env()
    los, his = key_range(m, env, lambda x: x)
    ns = _ns(r0, r0 + span, n, d_s)
    run_lines(env, ns)
    k_lo, k_hi = W(0), W(n_keys)
    for lo in los:
        k_lo = max(k_lo, wgsl_eval(lo, ns))
    for hi in his:
        k_hi = min(k_hi, wgsl_eval(hi, ns))
    keep = _mask_ref(m, np.arange(r0, r0 + span + 1, dtype=np.int64), np.arange(n_keys), n, d_s)
    kept = np.nonzero(keep.any(axis=0))[0]
    assert kept.size == 0 or (k_lo <= kept.min() and kept.max() < k_hi), (k_lo, k_hi, kept, los, his)


def test_bounds_are_exact_where_nothing_wraps() -> None:
    """Monotone expressions of the row whose values stay in range get their exact range (tile
    skipping for causal, windows and offsets is kept): qi + c, qi - c, c - qi, qi * c, c * qi,
    -qi, qi // c, min/max, over rows [5, 9] and a uniform n = 7."""
    c = i32(3)
    rows = np.arange(5, 10, dtype=np.int64)
    exprs = [call(ir.Op.ADD, QI, c), call(ir.Op.SUB, QI, N), call(ir.Op.SUB, c, QI), call(ir.Op.MUL, QI, c),
             call(ir.Op.MUL, i32(-4), QI), call(ir.Op.NEG, QI), call(ir.Op.IDIV, QI, c),
             call(ir.Op.MIN, QI, i32(7)), call(ir.Op.MAX, call(ir.Op.SUB, QI, N), i32(0)),
             call(ir.Op.ADD, QI, call(ir.Op.SUB, S, N))]
    cases = [(e, [ref_eval(e, rows, 7, 12).min(), ref_eval(e, rows, 7, 12).max()]) for e in exprs]
    # (qi + (S - n)) - 2 qi: each operand's range, not the whole i32 range (interval
    # arithmetic's over-estimate: [5 + 5 - 18, 9 + 5 - 10])
    cases.append((call(ir.Op.SUB, call(ir.Op.ADD, QI, call(ir.Op.SUB, S, N)), call(ir.Op.MUL, QI, i32(2))), [-8, 4]))
    for e, want in cases:
        env = _env()
        b = env.bounds(e)
        assert b is not None, e
        ns = _ns(5, 9, 7, 12)
        run_lines(env, ns)
        assert [wgsl_eval(x, ns) for x in b] == want, e


def test_a_key_bound_at_the_i32_limits_keeps_every_key_and_clamps_without_wrapping() -> None:
    """kj <= max, max >= kj: no upper bound below n_keys; kj > max: every key dropped (k_lo at
    i32 max, not wrapped to i32 min)."""
    ns = _ns(0, 3, I32_MAX, 4)
    for m, want in [(call(ir.Op.LE, KJ, i32(I32_MAX)), (0, 16)), (call(ir.Op.GE, N, KJ), (0, 16)),
                    (call(ir.Op.GT, KJ, N), (I32_MAX, 16)), (call(ir.Op.LT, KJ, i32(I32_MIN)), (0, I32_MIN))]:
        env = _env()
        los, his = key_range(m, env, lambda x: x)
        run_lines(env, ns)
        k_lo = max([W(0)] + [wgsl_eval(x, ns) for x in los])
        k_hi = min([W(16)] + [wgsl_eval(x, ns) for x in his])
        assert (k_lo, k_hi) == want, m
