"""Hypothesis strategies for attnc IR: well-typed score/mask expressions and whole kernels.

Used by the round-trip tests and, later, by end-to-end compiler fuzzing against the float64
reference, so every generated value is kept numerically tame, assuming tensor inputs with
|x| <= 1, scores |%s| <= SCORE_BOUND and positions/dims below POS_BOUND:

* f32 subtrees carry a magnitude bound; anything above F32_LIMIT is scaled down by an exact
  power of two, so f32 and float64 evaluations differ by a few ulps of <= 16 (exp of a score
  error that small stays within the 1e-5 accuracy contract).
* f32 constants are multiples of 1/8 in [-4, 4] (exact in f32); i32 constants are small.
* exp and exp2 only see arguments bounded by 2 (else exp(neg(abs(x)))); log, log2, sqrt and
  rsqrt see abs(x) + 1; tan sees tanh(x) * 1.25; div divides by abs(y) + 1; so nothing
  overflows, divides by zero or is NaN. sin, cos and sigmoid are bounded by 1; floor and ceil
  can flip only within rounding of an integer, like comparisons.
* i32 values stay below INT_LIMIT (mul only by small constants; idiv/mod by constants in
  -16..16, zero and negative divisors included); i32(x) casts only f32(i) * 0.5, which is
  exact, so truncation agrees everywhere.
* reads of captured tables (`Scope.tables`) take any i32 index expressions (indices out of
  range are clamped, the IR's rule), also values read from integer tables (gathers); float
  tables hold |x| <= 1, integer tables values below TABLE_INT_BOUND.
* comparisons of f32 values can flip only when a value lies within rounding of the other
  side (measure zero for random inputs); masks of i32 positions are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

from attnc.frontend.parser import KEYWORDS
from attnc.ir.nodes import (
    LOWERING_NAMES,
    Call,
    Const,
    Dim,
    DimExtent,
    Dot,
    DType,
    Expr,
    Grid,
    GridAxis,
    Kernel,
    Let,
    Load,
    Loop,
    Op,
    Param,
    Return,
    Sink,
    Slice,
    Softmax,
    SplitExtent,
    TensorType,
    TileExtent,
    Update,
    Var,
)
from attnc.ir.verify import call_dtype

F32, F16, I32, BOOL = DType.F32, DType.F16, DType.I32, DType.BOOL
SCORE_BOUND = 8.0  # assumed |%s|: q.k * scale with |q|, |k| <= 1 and scale ~ 1/sqrt(D)
LOAD_BOUND = 1.0  # assumed |x| of f32 tensor loads
F32_LIMIT = 16.0
POS_BOUND = 4096  # assumed bound on positions and dims
INT_LIMIT = 2**20
TABLE_INT_BOUND = 256  # assumed bound on the values of integer tables (u8 included)


def call(op: Op, *args: Expr) -> Call:
    """A Call typed by the verifier's own rules."""
    return Call(op, args, call_dtype(op, [a.dtype for a in args]))


def f32(x: float) -> Const:
    return Const(float(x), F32)


def i32(x: int) -> Const:
    return Const(int(x), I32)


@dataclass(frozen=True)
class Table:
    """A tensor param expressions may read anywhere (a captured array): name, dtype, rank."""

    name: str
    dtype: DType
    rank: int


@dataclass(frozen=True)
class Scope:
    """The leaves an expression may use: the f32 score, i32 positions/dims, f32 loads, tables."""

    score: Expr
    ints: tuple[Expr, ...]
    floats: tuple[Expr, ...] = ()
    tables: tuple[Table, ...] = ()

    def of(self, kind: str) -> list[Table]:
        """The tables whose reads are `kind` values: "f32", "i32" or "bool"."""
        want = {"f32": (F32, F16), "i32": (I32, DType.U32, DType.U8), "bool": (BOOL,)}[kind]
        return [t for t in self.tables if t.dtype in want]


def _read(draw, scope: Scope, kind: str, depth: int) -> Expr:
    """A read of a random `kind` table at random i32 indices of depth < `depth` (reads of
    integer tables among them while depth allows: gathers)."""
    t = draw(st.sampled_from(scope.of(kind)))
    index = tuple(_int(draw, scope, depth - 1)[0] for _ in range(t.rank))
    return Load(t.name, index, {"f32": F32, "i32": I32, "bool": BOOL}[kind])


DEFAULT_SCOPE = Scope(
    score=Var("s", F32),
    ints=(Var("b", I32), Var("h", I32), Var("qi", I32), Var("kj", I32), Var("qpos", I32),
          Dim("S"), Dim("T")),
)


def _scale_down(e: Expr, bound: float, limit: float = F32_LIMIT) -> tuple[Expr, float]:
    """Multiply by an exact power of two so that |e| <= limit / 2."""
    if bound <= limit:
        return e, bound
    k = math.ceil(math.log2(bound / (limit / 2)))
    return call(Op.MUL, e, f32(2.0**-k)), bound * 2.0**-k


def _f32(draw, scope: Scope, depth: int) -> tuple[Expr, float]:
    """A random f32 expression and a bound on its magnitude."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["score", "score", "const", "int", "float", "table"]))
        if kind == "table" and scope.of("f32"):
            return _read(draw, scope, "f32", min(depth, 1)), LOAD_BOUND
        if kind in ("score", "table"):
            return scope.score, SCORE_BOUND
        if kind == "const" or (kind == "float" and not scope.floats):
            c = draw(st.integers(-32, 32)) / 8
            return f32(c), abs(c)
        if kind == "float":
            return draw(st.sampled_from(scope.floats)), LOAD_BOUND
        i, ib = _int(draw, scope, depth - 1)
        return _scale_down(call(Op.F32, i), float(ib), 16.0)
    op = draw(st.sampled_from(["add", "sub", "mul", "max", "min", "neg", "abs", "div", "exp",
                               "log", "tanh", "sqrt", "rsqrt", "where", "sin", "cos", "tan", "exp2",
                               "log2", "floor", "ceil", "sigmoid"]))
    a, ab = _f32(draw, scope, depth - 1)
    one = f32(1.0)
    if op in ("add", "sub", "mul", "max", "min", "div", "where"):
        b, bb = _f32(draw, scope, depth - 1)
        if op == "div":
            return call(Op.DIV, a, call(Op.ADD, call(Op.ABS, b), one)), ab
        if op == "where":
            return call(Op.WHERE, _bool(draw, scope, depth - 1)[0], a, b), max(ab, bb)
        bound = {"add": ab + bb, "sub": ab + bb, "mul": ab * bb}.get(op, max(ab, bb))
        return _scale_down(call(Op(op), a, b), bound)
    if op in ("neg", "abs"):
        return call(Op(op), a), ab
    if op in ("floor", "ceil"):
        return call(Op(op), a), ab + 1
    if op in ("exp", "exp2"):
        if ab <= 2:
            return call(Op(op), a), math.exp(ab)
        return call(Op(op), call(Op.NEG, call(Op.ABS, a))), 1.0
    if op in ("tanh", "sin", "cos", "sigmoid"):
        return call(Op(op), a), 1.0
    if op == "tan":  # |argument| <= 1.25: no pole
        return call(Op.TAN, call(Op.MUL, call(Op.TANH, a), f32(1.25))), math.tan(1.25)
    safe = call(Op.ADD, call(Op.ABS, a), one)
    bound = {"log": math.log(ab + 1), "log2": math.log2(ab + 1), "sqrt": math.sqrt(ab + 1), "rsqrt": 1.0}[op]
    return call(Op(op), safe), bound


def _int(draw, scope: Scope, depth: int) -> tuple[Expr, int]:
    """A random i32 expression and a bound on its magnitude."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if scope.of("i32") and depth >= 0 and draw(st.integers(0, 4)) == 0:
            return _read(draw, scope, "i32", depth), TABLE_INT_BOUND
        if scope.ints and draw(st.booleans()):
            return draw(st.sampled_from(scope.ints)), POS_BOUND
        c = draw(st.integers(-8, 8))
        return i32(c), abs(c)
    op = draw(st.sampled_from(["add", "sub", "mul", "max", "min", "neg", "abs", "idiv", "mod",
                               "where", "cast"]))
    a, ab = _int(draw, scope, depth - 1)
    if op in ("add", "sub", "max", "min", "where"):
        b, bb = _int(draw, scope, depth - 1)
        if op == "where":
            return call(Op.WHERE, _bool(draw, scope, depth - 1)[0], a, b), max(ab, bb)
        if op in ("add", "sub") and ab + bb > INT_LIMIT:
            return a, ab
        return call(Op(op), a, b), (ab + bb if op in ("add", "sub") else max(ab, bb))
    if op == "mul":
        c = draw(st.integers(-4, 4))
        return (call(Op.MUL, a, i32(c)), ab * abs(c)) if ab * 4 <= INT_LIMIT else (a, ab)
    if op in ("idiv", "mod"):  # floor semantics; zero and negative divisors too
        c = draw(st.integers(1, 16) | st.integers(-16, 0))
        return call(Op(op), a, i32(c)), (ab if op == "idiv" or c == 0 else abs(c))
    if op == "cast":  # i32(f32(a) * 0.5): exact in f32, so every evaluator truncates alike
        return call(Op.I32, call(Op.MUL, call(Op.F32, a), f32(0.5))), ab
    return call(Op(op), a), ab


def _bool(draw, scope: Scope, depth: int) -> tuple[Expr, int]:
    """A random bool expression (the bound is meaningless and kept for symmetry)."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if scope.of("bool") and draw(st.integers(0, 3)) == 0:
            return _read(draw, scope, "bool", min(depth, 1)), 0
        if draw(st.integers(0, 4)) == 0:
            return Const(draw(st.booleans()), BOOL), 0
        cmp = draw(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]))
        return call(cmp, _int(draw, scope, 0)[0], _int(draw, scope, 0)[0]), 0
    op = draw(st.sampled_from(["cmp_int", "cmp_int", "cmp_f32", "cmp_bool", "and", "or", "not", "where"]))
    if op == "cmp_bool":  # == and != between booleans
        return call(draw(st.sampled_from([Op.EQ, Op.NE])), _bool(draw, scope, depth - 1)[0],
                    _bool(draw, scope, depth - 1)[0]), 0
    if op.startswith("cmp"):
        cmp = draw(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]))
        gen = _int if op == "cmp_int" else _f32
        return call(cmp, gen(draw, scope, depth - 1)[0], gen(draw, scope, depth - 1)[0]), 0
    a = _bool(draw, scope, depth - 1)[0]
    if op == "not":
        return call(Op.NOT, a), 0
    b = _bool(draw, scope, depth - 1)[0]
    if op == "where":
        return call(Op.WHERE, _bool(draw, scope, depth - 1)[0], a, b), 0
    return call(Op(op), a, b), 0


@st.composite
def score_exprs(draw, scope: Scope = DEFAULT_SCOPE, max_depth: int = 4) -> Expr:
    """Well-typed, numerically tame f32 expressions over the score and positions."""
    return _f32(draw, scope, draw(st.integers(0, max_depth)))[0]


@st.composite
def mask_exprs(draw, scope: Scope = DEFAULT_SCOPE, max_depth: int = 3) -> Expr:
    """Well-typed bool expressions over positions (and sometimes the score)."""
    return _bool(draw, scope, draw(st.integers(0, max_depth)))[0]


@st.composite
def int_exprs(draw, scope: Scope = DEFAULT_SCOPE, max_depth: int = 3) -> Expr:
    """Well-typed i32 expressions with |value| < INT_LIMIT."""
    return _int(draw, scope, draw(st.integers(0, max_depth)))[0]


def identifiers() -> st.SearchStrategy[str]:
    """Valid .attn names that are not keywords (op and dtype names are allowed)."""
    return st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True).filter(
        lambda s: s not in KEYWORDS)


# roles that are params, whose names cannot be the lowering's buffers' (o, lse, part, blocks)
PARAM_ROLES = ("q", "k", "v", "scale", "lens", "slopes", "sinks", "nsplit", "tf", "ti", "tb")
ROLES = ("B", "Hq", "S", "D", "Hkv", "T", "Dv", "q", "k", "v", "scale", "lens", "slopes",
         "sinks", "nsplit", "BM", "BN", "b", "h", "qi", "ks", "kj", "hk", "len", "qpos", "acc",
         "s", "t", "keep", "NT", "tf", "ti", "tb")


@st.composite
def kernels(draw, split: bool | None = None, sink: bool | None = None,
            lse: bool | None = None, max_depth: int = 3, tables: bool | None = None) -> Kernel:
    """Verified flash-attention-shaped kernels with random names, options, score and mask.

    Roles (q, k, v, dims, ...) are as in examples/*.attn; the kernel may split the KV axis,
    read per-batch lengths (`lens: i32[B]`), per-head slopes (an f32 leaf of the score),
    read tables of every tensor dtype over a dim of their own (`tables`: as a mod's captured
    arrays are), add per-head sinks and return the lse. Tunables are random powers of two.
    """
    names = draw(st.lists(identifiers(), min_size=len(ROLES), max_size=len(ROLES), unique=True).filter(
        lambda ns: not any(ns[ROLES.index(r)] in LOWERING_NAMES for r in PARAM_ROLES)))
    n = dict(zip(ROLES, names, strict=True))
    split = draw(st.booleans()) if split is None else split
    sink = draw(st.booleans()) if sink is None else sink
    lse = draw(st.booleans()) if lse is None else lse
    use_lens, use_slopes, use_scale, use_mask, use_tables = (draw(st.booleans()) for _ in range(5))
    use_tables = use_tables if tables is None else tables
    dt = [draw(st.sampled_from([F32, F16])) for _ in range(3)]
    B, Hq, S, D, Hkv, T, Dv = (n[r] for r in ("B", "Hq", "S", "D", "Hkv", "T", "Dv"))
    params = [Param(n["q"], TensorType(dt[0], (B, Hq, S, D))),
              Param(n["k"], TensorType(dt[1], (B, Hkv, T, D))),
              Param(n["v"], TensorType(dt[2], (B, Hkv, T, Dv)))]
    params += [Param(n["scale"], TensorType(F32))] if use_scale else []
    params += [Param(n["lens"], TensorType(I32, (B,)))] if use_lens else []
    params += [Param(n["slopes"], TensorType(F32, (Hq,)))] if use_slopes else []
    params += [Param(n["sinks"], TensorType(F32, (Hq,)))] if sink else []
    params += [Param(n["nsplit"], TensorType(I32))] if split else []
    tables: tuple[Table, ...] = ()
    if use_tables:  # captured-style tables: a named dim of their own, every tensor dtype
        tables = (Table(n["tf"], draw(st.sampled_from([F32, F16])), 2),
                  Table(n["ti"], draw(st.sampled_from([I32, DType.U32, DType.U8])), 1),
                  Table(n["tb"], BOOL, 1))
        dims = {n["tf"]: (n["NT"], Hq), n["ti"]: (n["NT"],), n["tb"]: (n["NT"],)}
        params += [Param(t.name, TensorType(t.dtype, dims[t.name])) for t in tables]
    params = draw(st.permutations(params))
    tunables = ((n["BM"], 2 ** draw(st.integers(0, 6))), (n["BN"], 2 ** draw(st.integers(0, 7))))

    v = {r: Var(n[r], I32) for r in ("b", "h", "qi", "kj", "ks", "hk", "len", "qpos")}
    axes = [GridAxis(n["b"], DimExtent(B)), GridAxis(n["h"], DimExtent(Hq)),
            GridAxis(n["qi"], TileExtent(S, n["BM"]))]
    if split:
        axes.insert(draw(st.integers(0, 3)), GridAxis(n["ks"], SplitExtent(T, n["nsplit"])))
    length = Load(n["lens"], (v["b"],), I32) if use_lens else Dim(T)
    pre = [Grid(tuple(axes)),
           Let(n["hk"], call(Op.IDIV, v["h"], call(Op.IDIV, Dim(Hq), Dim(Hkv)))),
           Let(n["len"], length),
           Let(n["qpos"], call(Op.ADD, v["qi"], call(Op.SUB, v["len"], Dim(S))))]
    scale = Var(n["scale"], F32) if use_scale else call(Op.RSQRT, call(Op.F32, Dim(D)))
    dot = Dot(Slice(n["q"], (v["b"], v["h"], v["qi"], None)),
              Slice(n["k"], (v["b"], v["hk"], v["kj"], None)))
    row_ints = (v["b"], v["h"], v["qi"], v["qpos"], v["len"], Dim(S), Dim(T))
    floats = (Load(n["slopes"], (v["h"],), F32),) if use_slopes else ()
    scope = Scope(Var(n["s"], F32), row_ints + (v["kj"],), floats, tables)
    score = _f32(draw, scope, draw(st.integers(0, max_depth)))[0]
    body: list = [Let(n["s"], call(Op.MUL, dot, scale))]
    if draw(st.booleans()):
        body.append(Let(n["t"], score))
        score = Var(n["t"], F32)
    if use_mask:
        body.append(Let(n["keep"], _bool(draw, scope, draw(st.integers(0, max_depth)))[0]))
        score = call(Op.WHERE, Var(n["keep"], BOOL), score, f32(-math.inf))
    body.append(Update(n["acc"], score, Slice(n["v"], (v["b"], v["hk"], v["kj"], None))))
    post = []
    if sink:
        sink_scope = Scope(Load(n["sinks"], (v["h"],), F32), row_ints, floats, tables)
        post.append(Sink(n["acc"], _f32(draw, sink_scope, draw(st.integers(0, 2)))[0]))
    post.append(Return(n["acc"], lse, n["ks"] if split else None))
    stmts = (*pre, Softmax(n["acc"], n["qi"], Dv),
             Loop(n["kj"], T, n["BN"], n["ks"] if split else None, tuple(body)), *post)
    name = draw(identifiers())
    return Kernel(name, tuple(params), TensorType(dt[0], (B, Hq, S, Dv)), tunables, stmts)


# ----------------------------------------------------------------------------- sink values
# Attention sinks beyond ordinary logits, the rule of attnc.attention's docstring: +inf takes
# all the weight (o = 0, lse = +inf, fully masked rows too), -inf is no sink, NaN makes the
# head's rows NaN; finite but huge ones (1e30, the f32 extremes) beside them.
SPECIAL_SINKS = (math.inf, -math.inf, math.nan, 1e30, -1e30, 3.4e38, -3.4e38)


def sink_values(large: float = 3.0) -> st.SearchStrategy[float]:
    """One head's sink: a special value or an ordinary one in [-large, large] (f32-exact)."""
    return st.sampled_from(SPECIAL_SINKS) | st.floats(-large, large, width=32)


def draw_sinks(rng, n: int, special: float = 1 / 3):
    """n float32 sinks from a numpy Generator: uniform in [-2, 2], each replaced by one of
    SPECIAL_SINKS with probability `special` (for the seed-driven forced-plan checks)."""
    import numpy as np

    z = rng.uniform(-2, 2, n)
    pick = rng.random(n) < special
    z[pick] = rng.choice(np.array(SPECIAL_SINKS), int(pick.sum()))
    return z.astype(np.float32)
