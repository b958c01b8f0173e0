"""The IR verifier: well-formedness, then types/dims/structure; returns an `Analysis`.

Phase 1 checks names (valid, unique across the kernel, defined before use, loop-body
names not used after the loop) and where statements may stand. Phase 2 checks dtypes,
ranks, slice axes and the grid/loop/softmax consistency rules. Every failure is a
`VerifyError` naming the node and carrying its span.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from attnc.errors import Span, VerifyError
from attnc.ir.nodes import (
    ARITH_BINARY,
    ARITH_UNARY,
    ARITY,
    BOOL_COMPARE,
    CAST,
    COMPARE,
    FLOAT_BINARY,
    FLOAT_UNARY,
    INT_BINARY,
    LOWERING_NAMES,
    Call,
    Const,
    Dim,
    DimExtent,
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
    Stmt,
    Store,
    StoreKernel,
    TileExtent,
    Update,
    Var,
    walk_expr,
)
from attnc.ir.printer import KEYWORDS, describe

NUMERIC = (DType.I32, DType.F32)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
LET_IDENT = re.compile(r"[A-Za-z0-9_]+\Z")  # `%0` is a fine SSA name
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
F32_MAX = 3.4028234663852886e38  # the largest finite f32
# constants below this round to F32_MAX (it is half an f32 ulp above it), from it on to inf,
# which WGSL's compilers refuse for a literal
F32_MAX_ROUNDING = F32_MAX + 2.0**103


class TypeRuleError(Exception):
    """An operator applied to operands of the wrong dtypes or count (no span; callers add it)."""


TENSOR_DTYPES = (DType.F32, DType.F16, DType.I32, DType.U32, DType.U8, DType.BOOL, DType.Q8_0, DType.Q4_0, DType.INT8)


def load_dtype(storage: DType) -> DType:
    """The dtype of a value loaded from a tensor: f16 is storage only, so float loads are f32;
    u32 and u8 loads are i32 values."""
    if storage.is_float:
        return DType.F32
    return DType.I32 if storage.is_int else storage


def call_dtype(op: Op, arg_dtypes: tuple[DType, ...] | list[DType]) -> DType:
    """The result dtype of `op` applied to operands of `arg_dtypes`, or TypeRuleError."""
    ts = tuple(arg_dtypes)
    n = ARITY[op]
    if len(ts) != n:
        raise TypeRuleError(f"'{op.value}' takes {n} argument{'s' * (n != 1)}, got {len(ts)}")
    got = ", ".join(t.value for t in ts)
    if op in ARITH_BINARY:
        if ts[0] == ts[1] and ts[0] in NUMERIC:
            return ts[0]
        raise TypeRuleError(f"'{op.value}' needs two operands of the same dtype, i32 or f32; "
                            f"got {got}")
    if op in INT_BINARY:
        if ts == (DType.I32, DType.I32):
            return DType.I32
        raise TypeRuleError(f"'{op.value}' needs i32 operands; got {got}")
    if op in FLOAT_BINARY:
        if ts == (DType.F32, DType.F32):
            return DType.F32
        raise TypeRuleError(f"'{op.value}' needs f32 operands (use idiv for i32); got {got}")
    if op in ARITH_UNARY:
        if ts[0] in NUMERIC:
            return ts[0]
        raise TypeRuleError(f"'{op.value}' needs an i32 or f32 operand; got {got}")
    if op in FLOAT_UNARY:
        if ts[0] == DType.F32:
            return DType.F32
        raise TypeRuleError(f"'{op.value}' needs an f32 operand (cast with f32(...)); got {got}")
    if op in COMPARE:
        if ts[0] == ts[1] and (ts[0] in NUMERIC or (op in BOOL_COMPARE and ts[0] == DType.BOOL)):
            return DType.BOOL
        which = "i32, f32 (or bool for eq/ne)" if op in BOOL_COMPARE else "i32 or f32"
        raise TypeRuleError(f"'{op.value}' compares two operands of the same dtype, {which}; "
                            f"got {got}")
    if op in (Op.AND, Op.OR, Op.NOT):
        if all(t == DType.BOOL for t in ts):
            return DType.BOOL
        raise TypeRuleError(f"'{op.value}' needs bool operands; got {got}")
    if op == Op.WHERE:
        if ts[0] == DType.BOOL and ts[1] == ts[2]:
            return ts[1]
        raise TypeRuleError(f"'where' needs (bool, X, X); got {got}")
    if op in CAST:
        if ts[0] in NUMERIC:
            return DType(op.value)
        raise TypeRuleError(f"'{op.value}' converts an i32 or f32 operand; got {got}")
    raise TypeRuleError(f"unknown operator {op!r}")  # pragma: no cover - the enum is closed


@dataclass(frozen=True)
class Analysis:
    """What lowering needs to know about a verified kernel, computed once here."""

    softmax: str  # the online_softmax state's name
    rows: str  # the grid var of the query-tile axis
    rows_dim: str
    rows_size: str  # the tunable giving the query tile size
    width: str  # the value width dim (Dv)
    loop_var: str
    loop_dim: str
    loop_size: str  # the tunable giving the KV tile size
    split: str | None  # the split grid var, if the KV axis is split
    split_count: str | None  # the i32 scalar param holding the number of splits
    uses_sink: bool
    returns_lse: bool
    tensors_read: frozenset[str]
    scalars_used: frozenset[str]  # scalar params read by expressions or as the split count
    needs: frozenset[str] = frozenset()  # device capabilities the kernel requires


@dataclass
class _Binding:
    kind: str  # dim | tensor | scalar | grid | loop | let | softmax | tunable
    dtype: DType | None = None


class _Verifier:
    """Walks a kernel once per phase with an explicit scope; raises on the first problem."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.names: dict[str, _Binding] = {}  # every name defined so far (global uniqueness)
        self.visible: set[str] = set()

    def fail(self, node: object, message: str, span: Span | None = None) -> VerifyError:
        """A VerifyError naming `node` (printed briefly) with the node's span."""
        lets = {n for n, b in self.names.items() if b.kind in ("let", "softmax")}
        where = describe(node, lets)
        text = f"{where}: {message}" if where else message
        return VerifyError(text, span if span is not None else getattr(node, "span", None))

    # ------------------------------------------------------------------ phase 1
    def define(self, name: str, binding: _Binding, node: object, let: bool = False) -> None:
        pattern = LET_IDENT if let else IDENT
        if not isinstance(name, str) or not pattern.match(name) or name in KEYWORDS:
            raise self.fail(node, f"'{name}' is not a valid name")
        if name in self.names:
            raise self.fail(node, f"'{name}' is already defined (as a {self.names[name].kind}); "
                              "names are unique in a kernel")
        self.names[name] = binding
        self.visible.add(name)

    def lookup(self, name: str, kinds: tuple[str, ...], node: object, what: str) -> _Binding:
        b = self.names.get(name)
        if b is None or name not in self.visible:
            known = ", ".join(n for n in self.names if n in self.visible
                              and self.names[n].kind in kinds) or "none"
            raise self.fail(node, f"unknown {what} '{name}'; known here: {known}")
        if b.kind not in kinds:
            raise self.fail(node, f"'{name}' is a {b.kind}, not a {what}")
        return b

    def header(self) -> None:
        k = self.k
        if not isinstance(k.name, str) or not IDENT.match(k.name) or k.name in KEYWORDS:
            raise self.fail(k, f"'{k.name}' is not a valid kernel name", k.span)
        for p in k.params:
            for d in p.type.dims:
                if self.names.get(d, _Binding("")).kind != "dim":
                    self.define(d, _Binding("dim", DType.I32), p)
        for p in k.params:
            if p.name in LOWERING_NAMES:
                raise self.fail(p, f"param '{p.name}': the names {', '.join(sorted(LOWERING_NAMES))} are attnc's "
                                   "(the output, its lse, split-KV partial states, the block map); rename it")
            kind = "tensor" if p.type.dims else "scalar"
            self.define(p.name, _Binding(kind, p.type.dtype), p)
        for name, _value in k.tunables:
            self.define(name, _Binding("tunable"), k)
        for d in k.output.dims:  # a dim only the output has is a runtime size the caller gives
            if self.names.get(d, _Binding("")).kind != "dim":
                self.define(d, _Binding("dim", DType.I32), k)
        for s in k.body:  # so is the dim of a KV loop no tensor has (paged keys' logical length)
            if isinstance(s, Loop) and isinstance(s.dim, str) and s.dim not in self.names:
                self.define(s.dim, _Binding("dim", DType.I32), s)

    def expr_names(self, e: Expr, stmt: Stmt) -> None:
        for x in walk_expr(e):
            if isinstance(x, Var):
                self.lookup(x.name, ("scalar", "grid", "loop", "let"), x, "value")
            elif isinstance(x, Dim):
                self.lookup(x.name, ("dim",), x, "dim")
            elif isinstance(x, Load):
                self.lookup(x.tensor, ("tensor",), x, "tensor")
            elif isinstance(x, Dot):
                for sl in (x.a, x.b):
                    self.slice_names(sl)
            elif not isinstance(x, Const | Call):
                raise self.fail(stmt, f"unexpected expression node {type(x).__name__}")

    def slice_names(self, sl: Slice) -> None:
        if not isinstance(sl, Slice):
            raise self.fail(sl, "expected a slice such as v[b, h, kj, :]")
        self.lookup(sl.tensor, ("tensor",), sl, "tensor")

    def phase1(self) -> None:
        self.header()
        body = self.k.body
        if not body or not isinstance(body[0], Grid):
            raise self.fail(body[0] if body else self.k, "a kernel body starts with its grid",
                        body[0].span if body else self.k.span)
        state = {"loop": 0, "softmax": 0, "sink": 0}
        for i, s in enumerate(body):
            if isinstance(s, Grid):
                if i:
                    raise self.fail(s, "only one grid, as the first statement")
                for ax in s.axes:
                    self.extent_names(ax)
                    self.define(ax.var, _Binding("grid", DType.I32), ax)
            elif isinstance(s, Let):
                self.expr_names(s.value, s)
                self.define(s.var, _Binding("let", getattr(s.value, "dtype", None)), s, let=True)
            elif isinstance(s, Softmax):
                if state["loop"] or state["softmax"]:
                    raise self.fail(s, "one online_softmax, declared before the loop")
                state["softmax"] += 1
                self.lookup(s.rows, ("grid",), s, "grid var")
                self.lookup(s.width, ("dim",), s, "dim")
                self.define(s.var, _Binding("softmax"), s, let=True)
            elif isinstance(s, Loop):
                if state["loop"]:
                    raise self.fail(s, "only one loop per kernel")
                state["loop"] += 1
                self.loop_names(s)
            elif isinstance(s, Update):
                raise self.fail(s, "'update' is only allowed inside a for loop")
            elif isinstance(s, Sink):
                if not state["loop"] or state["sink"]:
                    raise self.fail(s, "one 'sink', after the loop")
                state["sink"] += 1
                self.lookup(s.acc, ("softmax",), s, "online_softmax")
                self.expr_names(s.logit, s)
            elif isinstance(s, Return):
                if i != len(body) - 1:
                    raise self.fail(s, "'return' must be the last statement")
                if not state["loop"]:
                    raise self.fail(s, "'return' must come after the loop")
                self.lookup(s.acc, ("softmax",), s, "online_softmax")
                if s.combine is not None:
                    self.lookup(s.combine, ("grid",), s, "grid var")
            else:
                raise self.fail(s, f"unexpected statement {type(s).__name__}")
        if not isinstance(body[-1], Return):
            raise self.fail(body[-1], "the last statement must be 'return'")
        if not state["softmax"]:
            raise self.fail(self.k, "the kernel declares no online_softmax", self.k.span)

    def extent_names(self, ax) -> None:
        ext = ax.extent
        if not isinstance(ext, DimExtent | TileExtent | SplitExtent):
            raise self.fail(ax, f"unexpected grid extent {type(ext).__name__}")
        self.lookup(ext.dim, ("dim",), ax, "dim")
        if isinstance(ext, TileExtent):
            self.lookup(ext.size, ("tunable",), ax, "tunable")
        if isinstance(ext, SplitExtent):
            self.lookup(ext.count, ("scalar",), ax, "scalar param")

    def loop_names(self, s: Loop) -> None:
        self.lookup(s.dim, ("dim",), s, "dim")
        self.lookup(s.size, ("tunable",), s, "tunable")
        if s.split is not None:
            self.lookup(s.split, ("grid",), s, "grid var")
        outer = set(self.visible)
        self.define(s.var, _Binding("loop", DType.I32), s)
        updates = 0
        for t in s.body:
            if isinstance(t, Let):
                self.expr_names(t.value, t)
                self.define(t.var, _Binding("let", getattr(t.value, "dtype", None)), t, let=True)
            elif isinstance(t, Update):
                if updates:
                    raise self.fail(t, "one 'update' per loop")
                updates += 1
                self.lookup(t.acc, ("softmax",), t, "online_softmax")
                self.expr_names(t.score, t)
                self.slice_names(t.value)
                for ix in t.value.index:
                    if ix is not None:
                        self.expr_names(ix, t)
            else:
                raise self.fail(t, "a loop body holds only lets and one 'update'")
        if not updates:
            raise self.fail(s, "the loop has no 'update'")
        self.visible = outer  # loop-body names go out of scope (but stay taken)

    # ------------------------------------------------------------------ phase 2
    def check_expr(self, e: Expr) -> DType:
        """Type-check an expression bottom-up against the (already resolved) bindings."""
        if isinstance(e, Const):
            v, t = e.value, e.dtype
            ok = (t == DType.BOOL and isinstance(v, bool)) or (
                t == DType.I32 and isinstance(v, int) and not isinstance(v, bool)
                and I32_MIN <= v <= I32_MAX) or (
                t == DType.F32 and isinstance(v, float | int) and not isinstance(v, bool))
            if not ok:
                raise self.fail(e, f"{v!r} is not a valid {t.value} constant")
            if t == DType.F32 and math.isfinite(v) and abs(v) >= F32_MAX_ROUNDING:
                raise self.fail(e, f"{v!r} is outside f32's range (largest {F32_MAX:.7g}); write inf for an infinity")
            return t
        if isinstance(e, Dim):
            return DType.I32
        if isinstance(e, Var):
            b = self.names[e.name]
            want = DType.I32 if b.kind in ("grid", "loop") else b.dtype
            if want == DType.F16:
                raise self.fail(e, "scalar params are f32 or i32")
            if e.dtype != want:
                raise self.fail(e, f"'{e.name}' has dtype {want and want.value}, "
                               f"not {e.dtype.value}")
            return e.dtype
        if isinstance(e, Call):
            args = tuple(self.check_expr(a) for a in e.args)
            try:
                t = call_dtype(e.op, args)
            except TypeRuleError as err:
                raise self.fail(e, str(err)) from None
            if e.dtype != t:
                raise self.fail(e, f"'{e.op.value}' gives {t.value}, not {e.dtype.value}")
            return t
        if isinstance(e, Load):
            p = self.k.param(e.tensor)
            if len(e.index) != len(p.type.dims):
                raise self.fail(e, f"'{e.tensor}' has rank {len(p.type.dims)} "
                               f"but {len(e.index)} indices are given")
            self.check_indices(e, e.index)
            want = load_dtype(p.type.dtype)
            if e.dtype != want:
                raise self.fail(e, f"a load of '{e.tensor}' is {want.value}, not {e.dtype.value}")
            return want
        if isinstance(e, Dot):
            da, db = self.check_slice(e.a), self.check_slice(e.b)
            if da != db:
                raise self.fail(e, f"dot over different dims '{da}' and '{db}'")
            return DType.F32
        raise self.fail(e, f"unexpected expression node {type(e).__name__}")

    def check_indices(self, node: object, index: tuple) -> None:
        for ix in index:
            if ix is not None and self.check_expr(ix) != DType.I32:
                raise self.fail(ix, "tensor indices are i32")

    def check_slice(self, sl: Slice) -> str:
        """Check a slice and return the dim of its `:` axis."""
        p = self.k.param(sl.tensor)
        if len(sl.index) != len(p.type.dims):
            raise self.fail(sl, f"'{sl.tensor}' has rank {len(p.type.dims)} "
                            f"but {len(sl.index)} indices are given")
        if sum(ix is None for ix in sl.index) != 1:
            raise self.fail(sl, "a slice has exactly one ':'")
        if not p.type.dtype.is_float:
            raise self.fail(sl, f"'{sl.tensor}' is {p.type.dtype.value}; slices read float tensors")
        if p.type.dtype.is_quant and sl.axis != len(p.type.dims) - 1:
            raise self.fail(sl, f"'{sl.tensor}' is stored as {p.type.dtype.value} along its last dim "
                                f"'{p.type.dims[-1]}'; its slices are along that dim")
        self.check_indices(sl, sl.index)
        return p.type.dims[sl.axis]

    def phase2(self) -> Analysis:
        k = self.k
        for p in k.params:
            allowed = TENSOR_DTYPES if p.type.dims else NUMERIC
            if p.type.dtype not in allowed:
                what = "tensor" if p.type.dims else "scalar"
                raise self.fail(p, f"a {what} param cannot be {p.type.dtype.value}")
        for name, value in k.tunables:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise self.fail(k, f"tunable {name}={value!r} must be a positive integer", k.span)
        if k.output.dtype not in (DType.F32, DType.F16):
            raise self.fail(k, f"the output is f32 or f16, not {k.output.dtype.value}", k.span)
        grid = k.body[0]
        tiles = [a for a in grid.axes if isinstance(a.extent, TileExtent)]
        splits = [a for a in grid.axes if isinstance(a.extent, SplitExtent)]
        if len(tiles) != 1:
            raise self.fail(grid, f"the grid needs exactly one tile(...) axis, has {len(tiles)}")
        if len(splits) > 1:
            raise self.fail(splits[1], "at most one split(...) axis")
        split = splits[0] if splits else None
        if split is not None and self.names[split.extent.count].dtype != DType.I32:
            raise self.fail(split, f"the split count '{split.extent.count}' must be an i32 param")
        sm = next(s for s in k.body if isinstance(s, Softmax))
        loop = next(s for s in k.body if isinstance(s, Loop))
        if sm.rows != tiles[0].var:
            raise self.fail(sm, f"rows({sm.rows}) must be the grid's tile axis '{tiles[0].var}'")
        if split is not None and split.extent.dim != loop.dim:
            raise self.fail(split, f"split({split.extent.dim}, ...) must split the loop's dim "
                               f"'{loop.dim}'")
        if loop.split != (split.var if split else None):
            want = f"split({split.var})" if split else "no split(...)"
            raise self.fail(loop, f"the loop must have {want} to match the grid")
        uses_sink = returns_lse = False
        for s in k.body:
            if isinstance(s, Let):
                self.check_expr(s.value)
            elif isinstance(s, Loop):
                for t in s.body:
                    if isinstance(t, Let):
                        self.check_expr(t.value)
                    else:
                        self.check_update(t, sm)
            elif isinstance(s, Sink):
                uses_sink = True
                if self.check_expr(s.logit) != DType.F32:
                    raise self.fail(s, "the sink logit must be f32")
            elif isinstance(s, Return):
                returns_lse = s.lse
                if s.combine != (split.var if split else None):
                    want = f"combine(%{sm.var}, {split.var})" if split else f"result(%{sm.var})"
                    raise self.fail(s, f"the grid {'splits' if split else 'does not split'} the "
                                   f"loop, so return {want}")
        want = tuple(a.extent.dim for a in grid.axes if a is not split) + (sm.width,)
        if tuple(k.output.dims) != want:
            raise self.fail(k, f"output dims [{','.join(k.output.dims)}] must be "
                           f"[{','.join(want)}] (the grid axes, then the softmax width)", k.span)
        return self.analysis(sm, tiles[0], loop, split, uses_sink, returns_lse)

    def check_update(self, u: Update, sm: Softmax) -> None:
        if self.check_expr(u.score) != DType.F32:
            raise self.fail(u, "the update score must be f32")
        d = self.check_slice(u.value)
        if d != sm.width:
            raise self.fail(u.value, f"the value slice runs over '{d}' but the softmax width is "
                                 f"'{sm.width}'")

    def analysis(self, sm, tile, loop, split, uses_sink, returns_lse) -> Analysis:
        tensors, scalars = set(), set()
        exprs: list[Expr] = []
        for s in self.k.body:
            if isinstance(s, Let):
                exprs.append(s.value)
            elif isinstance(s, Sink):
                exprs.append(s.logit)
            elif isinstance(s, Loop):
                for t in s.body:
                    if isinstance(t, Let):
                        exprs.append(t.value)
                    else:
                        exprs.append(t.score)
                        tensors.add(t.value.tensor)
                        exprs.extend(ix for ix in t.value.index if ix is not None)
        for e in exprs:
            for x in walk_expr(e):
                if isinstance(x, Load):
                    tensors.add(x.tensor)
                elif isinstance(x, Dot):
                    tensors.update((x.a.tensor, x.b.tensor))
                elif isinstance(x, Var) and self.names[x.name].kind == "scalar":
                    scalars.add(x.name)
        if split is not None:
            scalars.add(split.extent.count)
        return Analysis(
            softmax=sm.var, rows=sm.rows, rows_dim=tile.extent.dim, rows_size=tile.extent.size,
            width=sm.width, loop_var=loop.var, loop_dim=loop.dim, loop_size=loop.size,
            split=split.var if split else None, split_count=split.extent.count if split else None,
            uses_sink=uses_sink, returns_lse=returns_lse,
            tensors_read=frozenset(tensors), scalars_used=frozenset(scalars))


def verify(kernel: Kernel) -> Analysis:
    """Check `kernel` (well-formedness, then types and dims) and return its `Analysis`."""
    v = _Verifier(kernel)
    v.phase1()
    return v.phase2()


def verify_store(k: StoreKernel) -> None:
    """Check a store kernel: names, a grid of plain dim axes first, then lets and stores whose
    target and value are slices over the same dim of float tensors (a quantized target along its
    last dim), the target not read by the kernel. Raises VerifyError."""
    v = _Verifier(k)  # type: ignore[arg-type]
    if not k.body or not isinstance(k.body[0], Grid):
        raise v.fail(k.body[0] if k.body else k, "a store kernel body starts with its grid",
                     k.body[0].span if k.body else k.span)
    if not any(isinstance(s, Store) for s in k.body):
        raise v.fail(k, "a store kernel stores at least one row (store(dst[..., :], src[..., :]))", k.span)
    v.header()
    read: set[str] = set()
    for i, s in enumerate(k.body):
        if isinstance(s, Grid):
            if i:
                raise v.fail(s, "only one grid, as the first statement")
            for ax in s.axes:
                if not isinstance(ax.extent, DimExtent):
                    raise v.fail(ax, "a store kernel's grid axes cover whole dims (one point per stored row)")
                v.extent_names(ax)
                v.define(ax.var, _Binding("grid", DType.I32), ax)
        elif isinstance(s, Let):
            v.expr_names(s.value, s)
            v.define(s.var, _Binding("let", getattr(s.value, "dtype", None)), s, let=True)
            v.check_expr(s.value)
            read.update(x.tensor for x in walk_expr(s.value) if isinstance(x, Load))
        elif isinstance(s, Store):
            for sl in (s.target, s.value):
                v.slice_names(sl)
                for ix in sl.index:
                    if ix is not None:
                        v.expr_names(ix, s)
                        read.update(x.tensor for x in walk_expr(ix) if isinstance(x, Load))
            dt, dv = v.check_slice(s.target), v.check_slice(s.value)
            if dt != dv:
                raise v.fail(s, f"the store writes a row of '{dv}' into a row of '{dt}'")
            read.add(s.value.tensor)
        else:
            raise v.fail(s, f"a store kernel holds a grid, lets and stores, not {type(s).__name__}")
    both = sorted(read & set(k.targets))
    if both:
        raise v.fail(k, f"'{both[0]}' is both stored to and read; a store kernel reads other tensors", k.span)
