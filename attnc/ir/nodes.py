"""The attnc IR: small, immutable, typed nodes for attention kernels.

Semantics (what every pass, the printer, the interpreter and the WGSL back end agree on)
----------------------------------------------------------------------------------------
* A **kernel** has typed parameters and one output. A tensor parameter has a dtype and
  symbolic dims (`q: f32[B,Hq,S,D]`); a scalar parameter (`scale: f32`) is a runtime value.
  Dims are runtime sizes (uniforms), so one compiled pipeline serves every shape.
  Tensors are logical: layout (BHSD, BSHD, broadcasting) is a runtime stride matter.
* **Tunables** (`BM=32`) are compile-time integers: tile sizes and the like.
* The **grid** names the parallel axes. `b: B` runs over a dim; `qi: tile(S, BM)` runs over
  the rows of S in tiles of BM (one workgroup per tile); `ks: split(T, NSPLIT)` splits the
  KV axis into NSPLIT contiguous chunks of whole KV tiles, each computing a partial state.
* Inside expressions a tile variable denotes the *element* index: `qi` is the query row
  (0 <= qi < S), a loop variable `kj` is the key index (0 <= kj < T). Expressions in the
  loop body are evaluated for every (row, key) pair, as in FlexAttention.
* `%x = expr` binds an SSA value; all names (dims, params, grid and loop vars, `%lets`)
  are unique in a kernel.
* `%acc = online_softmax rows(qi) width(Dv)` declares, per row, a running max m (-inf),
  a running sum l (0) and an accumulator o[Dv] (0).
* `for kj in tile(T, BN) [split(ks)] { ... }` visits the keys in tiles of BN.
* `update %acc, s, v[..., kj, :]` folds a tile of scores s into the state:
  m' = max(m, max_j s_j); p_j = exp(s_j - m'); l' = l*exp(m - m') + sum_j p_j;
  o' = o*exp(m - m') + sum_j p_j v_j. When m' = -inf (everything masked so far) p = 0 and
  the rescale factor is 1, so no NaN is made from masking. NaN scores propagate; a key
  with p = 0 adds nothing to o, even when its value row holds NaN or inf.
  A score of -inf is a masked key (`where(keep, s, -inf)` is how masks are written).
* `sink %acc, z` adds one logit z per row to the denominator only (no value), after the
  loop (and after the split combine). z = +inf takes all the weight (m = +inf, l = 1, o
  scaled by 0: o = 0 and lse = +inf, masked rows too, NaN states stay NaN); z = -inf
  changes nothing; a NaN z makes the row NaN.
* `return result(%acc)` gives o / l, and 0 where l = 0 (all keys masked);
  `lse(%acc)` gives m + log(l) (-inf where l = 0); `combine(%acc, ks)` first merges the
  split partial states by log-sum-exp: M = max m_s, L = sum l_s exp(m_s - M),
  O = sum o_s exp(m_s - M).
* dot(a[.., :], b[.., :]) is the f32 dot product over the one `:` axis of each slice.
* **Tensor dtypes**: f32, f16, i32, u32, u8 and bool. f16 is storage only (a load is an f32
  value); u32 and u8 loads are i32 values (a u32 element must be below 2**31); a bool tensor
  loads bools. Scalar params are f32 or i32.
* A tensor of a quantized dtype (`q8_0`, `q4_0`, `int8`: attnc/quant.py) holds float values
  in that format along its last dim; every load or slice of it reads the dequantized f32
  values, and its slices are along that last dim.
* **Reads never fail**: each index of a load or a slice row is clamped into [0, n - 1] of its
  dim (the nearest element), so a kernel reads in bounds for any index values. Kernels
  evaluate score and mask functions for rows and keys past the ends of their last tiles too
  and discard the value; the clamp keeps those reads, and any other, inside the tensor.
* **Integers** are i32 and wrap around on overflow (two's complement). `idiv` floors toward
  -inf and `mod` takes the sign of the divisor, as Python's `//` and `%` do (-7 // 2 = -4,
  -7 % 2 = 1, 7 % -2 = -1); a zero divisor gives `idiv(x, 0) = 0` and `mod(x, 0) = x`, which
  keeps x == idiv(x, y) * y + mod(x, y) for every x and y. `i32(x)` truncates toward zero,
  saturating at the i32 range (NaN gives 0).
* **Floats**: float math is f32 on devices and float64 in the reference interpreter.
  `floor`, `ceil`, `sin`, `cos`, `tan`, `exp2`, `log2`, `sigmoid` (1 / (1 + exp(-x))) are the
  usual functions on f32 values; `eq`/`ne` also compare two bools.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from attnc.errors import Span


class DType(enum.Enum):
    """Element types of IR values and tensors."""

    F32 = "f32"
    F16 = "f16"
    I32 = "i32"
    U32 = "u32"
    U8 = "u8"
    BOOL = "bool"
    # quantized storage of float tensors (attnc/quant.py): loads give f32
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    INT8 = "int8"

    @property
    def is_float(self) -> bool:
        """A float tensor's dtype: f32, f16 or a quantized format."""
        return self in (DType.F32, DType.F16) or self.is_quant

    @property
    def is_quant(self) -> bool:
        """A quantized storage format (q8_0, q4_0, int8), read through its dequantization."""
        return self in (DType.Q8_0, DType.Q4_0, DType.INT8)

    @property
    def is_int(self) -> bool:
        return self in (DType.I32, DType.U32, DType.U8)


class Op(enum.Enum):
    """The closed set of expression operators; families below say how they type."""

    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    IDIV = "idiv"
    MOD = "mod"
    MAX = "max"
    MIN = "min"
    NEG = "neg"
    ABS = "abs"
    EXP = "exp"
    LOG = "log"
    TANH = "tanh"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    SIN = "sin"
    COS = "cos"
    TAN = "tan"
    EXP2 = "exp2"
    LOG2 = "log2"
    FLOOR = "floor"
    CEIL = "ceil"
    SIGMOID = "sigmoid"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"
    F32 = "f32"
    I32 = "i32"


# the buffers the lowering adds to a kernel's programs: the output o, its lse, the split-KV
# partial states and the block map; a kernel's own params cannot take these names (their
# WGSL bindings, loaders and stride uniforms would be the lowering's)
LOWERING_NAMES = frozenset({"o", "lse", "part", "blocks"})

# numeric (int or float) binary ops: same dtype in, same out
ARITH_BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.MIN})
# integer-only binary ops
INT_BINARY = frozenset({Op.IDIV, Op.MOD})
# float-only binary ops
FLOAT_BINARY = frozenset({Op.DIV})
# numeric unary ops keeping the dtype
ARITH_UNARY = frozenset({Op.NEG, Op.ABS})
# float-only unary transcendental ops
FLOAT_UNARY = frozenset({Op.EXP, Op.LOG, Op.TANH, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS, Op.TAN,
                         Op.EXP2, Op.LOG2, Op.FLOOR, Op.CEIL, Op.SIGMOID})
# comparisons: numeric x numeric -> bool (eq and ne also bool x bool)
COMPARE = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
# logic: bool -> bool
LOGIC = frozenset({Op.AND, Op.OR, Op.NOT})
# comparisons that also take two bools
BOOL_COMPARE = frozenset({Op.EQ, Op.NE})
# conversions
CAST = frozenset({Op.F32, Op.I32})
ARITY = {
    **{o: 2 for o in ARITH_BINARY | INT_BINARY | FLOAT_BINARY | COMPARE | {Op.AND, Op.OR}},
    **{o: 1 for o in ARITH_UNARY | FLOAT_UNARY | CAST | {Op.NOT}},
    Op.WHERE: 3,
}


SPAN = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class TensorType:
    """Dtype plus symbolic dims; dims == () is a scalar."""

    dtype: DType
    dims: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True)
class Const:
    """A literal: float (including inf/-inf/nan), int or bool."""

    value: float | int | bool
    dtype: DType
    span: Span | None = SPAN

    def __eq__(self, other: object) -> bool:  # nan == nan for structural equality
        if not isinstance(other, Const):
            return NotImplemented
        if self.dtype != other.dtype:
            return False
        a, b = self.value, other.value
        return a == b or (a != a and b != b)

    def __hash__(self) -> int:
        return hash((self.dtype, "nan" if self.value != self.value else self.value))


@dataclass(frozen=True, slots=True)
class Dim:
    """The runtime size of a symbolic dim, as an i32."""

    name: str
    span: Span | None = SPAN

    @property
    def dtype(self) -> DType:
        return DType.I32


@dataclass(frozen=True, slots=True)
class Var:
    """A reference to a grid/loop variable (i32), a scalar param or a `%let` value."""

    name: str
    dtype: DType
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Call:
    """An operator applied to arguments."""

    op: Op
    args: tuple[Expr, ...]
    dtype: DType
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Load:
    """One element of a tensor parameter at a full index."""

    tensor: str
    index: tuple[Expr, ...]
    dtype: DType
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Slice:
    """A vector view of a tensor: every index given except one `:` (None)."""

    tensor: str
    index: tuple[Expr | None, ...]
    span: Span | None = SPAN

    @property
    def axis(self) -> int:
        return self.index.index(None)


@dataclass(frozen=True, slots=True)
class Dot:
    """f32 dot product of two slices over their `:` axes."""

    a: Slice
    b: Slice
    span: Span | None = SPAN

    @property
    def dtype(self) -> DType:
        return DType.F32


Expr = Const | Dim | Var | Call | Load | Dot

# ----------------------------------------------------------------------------- statements


@dataclass(frozen=True, slots=True)
class DimExtent:
    """A grid axis over every index of a dim."""

    dim: str


@dataclass(frozen=True, slots=True)
class TileExtent:
    """A grid axis over tiles of `size` (a tunable name) of a dim."""

    dim: str
    size: str


@dataclass(frozen=True, slots=True)
class SplitExtent:
    """A grid axis over `count` (a scalar i32 param) contiguous chunks of a dim."""

    dim: str
    count: str


Extent = DimExtent | TileExtent | SplitExtent


@dataclass(frozen=True, slots=True)
class GridAxis:
    """One parallel axis: a variable and the range it covers."""

    var: str
    extent: Extent
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Grid:
    """The parallel grid, outermost axis first."""

    axes: tuple[GridAxis, ...]
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Let:
    """`%var = value`."""

    var: str
    value: Expr
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Softmax:
    """`%var = online_softmax rows(rows) width(width)`: declares a running softmax state."""

    var: str
    rows: str
    width: str
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Update:
    """`update %acc, score, value`: fold a tile of scores and value rows into the state."""

    acc: str
    score: Expr
    value: Slice
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Sink:
    """`sink %acc, logit`: one extra per-row logit in the denominator."""

    acc: str
    logit: Expr
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Loop:
    """`for var in tile(dim, size) [split(split)] { body }`: sequential over KV tiles."""

    var: str
    dim: str
    size: str
    split: str | None
    body: tuple[Stmt, ...]
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Return:
    """`return result(%acc)[, lse(%acc)]`, optionally `combine`d over a split axis first."""

    acc: str
    lse: bool = False
    combine: str | None = None
    span: Span | None = SPAN


Stmt = Grid | Let | Softmax | Update | Sink | Loop | Return


@dataclass(frozen=True, slots=True)
class Param:
    """A kernel parameter: a tensor (dims != ()) or a runtime scalar."""

    name: str
    type: TensorType
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class Kernel:
    """A whole attention kernel: params, tunables, body and output type."""

    name: str
    params: tuple[Param, ...]
    output: TensorType
    tunables: tuple[tuple[str, int], ...]
    body: tuple[Stmt, ...]
    span: Span | None = SPAN

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def tunable_values(self) -> dict[str, int]:
        return dict(self.tunables)

    @property
    def dims(self) -> tuple[str, ...]:
        """Every dim name in order of first appearance in the params, the output and the KV
        loop (a loop over a dim no tensor has, such as the logical length of paged keys, runs
        over a runtime size the caller gives)."""
        seen: dict[str, None] = {}
        for p in self.params:
            for d in p.type.dims:
                seen.setdefault(d)
        for d in self.output.dims:
            seen.setdefault(d)
        for s in walk_stmts(self.body):
            if isinstance(s, Loop):
                seen.setdefault(s.dim)
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class Store:
    """`store dst[.., :], src[.., :]`: write the vector src at dst, in dst's storage format (a
    quantized dst gets the row quantized as attnc.quant.quantize does). A store whose dst index
    lies outside dst's dims writes nothing."""

    target: Slice
    value: Slice
    span: Span | None = SPAN


@dataclass(frozen=True, slots=True)
class StoreKernel:
    """A kernel that writes rows into a tensor in place (a KV cache append): a grid of plain dim
    axes, lets, then stores; one grid point per stored row. The stores' targets are its outputs."""

    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt | Store, ...]
    span: Span | None = SPAN
    tunables: tuple[tuple[str, int], ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def output(self) -> TensorType:
        """The type of the first store's target (what the verifier's header sees as the output)."""
        st = next(s for s in self.body if isinstance(s, Store))
        return self.param(st.target.tensor).type

    @property
    def targets(self) -> tuple[str, ...]:
        """The tensors the kernel writes, in order of first store."""
        return tuple(dict.fromkeys(s.target.tensor for s in self.body if isinstance(s, Store)))

    @property
    def dims(self) -> tuple[str, ...]:
        """Every dim name in order of first appearance in the params."""
        return tuple(dict.fromkeys(d for p in self.params for d in p.type.dims))


def walk_stmts(body: tuple[Stmt, ...]):
    """Yield every statement, depth first, loops before their bodies."""
    for s in body:
        yield s
        if isinstance(s, Loop):
            yield from walk_stmts(s.body)


def walk_expr(e: Expr):
    """Yield an expression and all its sub-expressions (slice indices included)."""
    yield e
    if isinstance(e, Call):
        for a in e.args:
            yield from walk_expr(a)
    elif isinstance(e, Load):
        for a in e.index:
            yield from walk_expr(a)
    elif isinstance(e, Dot):
        for sl in (e.a, e.b):
            for a in sl.index:
                if a is not None:
                    yield from walk_expr(a)


def rename(kernel: Kernel, mapping: dict[str, str]) -> Kernel:
    """The kernel with names renamed by `mapping`: params, dims, lets, grid and loop variables
    and softmax states, where they are defined and wherever they are used (not tunables)."""
    if not mapping:
        return kernel

    def n(x: str) -> str:
        return mapping.get(x, x)

    def ex(e):
        if isinstance(e, Dim):
            return Dim(n(e.name), e.span)
        if isinstance(e, Var):
            return Var(n(e.name), e.dtype, e.span)
        if isinstance(e, Call):
            return Call(e.op, tuple(ex(a) for a in e.args), e.dtype, e.span)
        if isinstance(e, Load):
            return Load(n(e.tensor), tuple(ex(i) for i in e.index), e.dtype, e.span)
        if isinstance(e, Dot):
            return Dot(sl(e.a), sl(e.b), e.span)
        return e

    def sl(s: Slice) -> Slice:
        return Slice(n(s.tensor), tuple(None if i is None else ex(i) for i in s.index), s.span)

    def ext(x):
        if isinstance(x, DimExtent):
            return DimExtent(n(x.dim))
        if isinstance(x, TileExtent):
            return TileExtent(n(x.dim), x.size)
        return SplitExtent(n(x.dim), n(x.count))

    def st(s):
        if isinstance(s, Grid):
            return Grid(tuple(GridAxis(n(a.var), ext(a.extent), a.span) for a in s.axes), s.span)
        if isinstance(s, Let):
            return Let(n(s.var), ex(s.value), s.span)
        if isinstance(s, Softmax):
            return Softmax(n(s.var), n(s.rows), n(s.width), s.span)
        if isinstance(s, Update):
            return Update(n(s.acc), ex(s.score), sl(s.value), s.span)
        if isinstance(s, Sink):
            return Sink(n(s.acc), ex(s.logit), s.span)
        if isinstance(s, Loop):
            split = None if s.split is None else n(s.split)
            return Loop(n(s.var), n(s.dim), s.size, split, tuple(st(t) for t in s.body), s.span)
        if isinstance(s, Return):
            return Return(n(s.acc), s.lse, None if s.combine is None else n(s.combine), s.span)
        return s

    params = tuple(Param(n(p.name), TensorType(p.type.dtype, tuple(n(d) for d in p.type.dims)), p.span)
                   for p in kernel.params)
    out = TensorType(kernel.output.dtype, tuple(n(d) for d in kernel.output.dims))
    return Kernel(kernel.name, params, out, kernel.tunables, tuple(st(s) for s in kernel.body), kernel.span)
