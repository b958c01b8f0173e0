"""WGSL emission helpers: an indenting writer, the op table and IR-expression rendering."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from attnc.errors import LoweringError
from attnc.ir import nodes as ir

# Tint rejects constant expressions that evaluate to inf/nan, so these read private vars.
NEG_INF = "bitcast<f32>(BITS_NEG_INF)"
POS_INF = "bitcast<f32>(BITS_POS_INF)"
NAN = "bitcast<f32>(BITS_NAN)"

# op -> format over rendered arguments; helpers named here live in wgsl_lib/helpers.wgsl
CODE_FOR_OP: dict[ir.Op, str] = {
    ir.Op.ADD: "({0} + {1})", ir.Op.SUB: "({0} - {1})", ir.Op.MUL: "({0} * {1})",
    ir.Op.DIV: "({0} / {1})", ir.Op.IDIV: "floor_div({0}, {1})", ir.Op.MOD: "floor_mod({0}, {1})",
    ir.Op.MAX: "max({0}, {1})", ir.Op.MIN: "min({0}, {1})", ir.Op.NEG: "(-{0})",
    ir.Op.ABS: "abs({0})", ir.Op.EXP: "exp({0})", ir.Op.LOG: "log({0})",
    ir.Op.TANH: "safe_tanh({0})", ir.Op.SQRT: "sqrt({0})", ir.Op.RSQRT: "inverseSqrt({0})",
    ir.Op.SIN: "sin_({0})", ir.Op.COS: "cos_({0})", ir.Op.TAN: "tan_({0})", ir.Op.EXP2: "exp2({0})",
    ir.Op.LOG2: "log2({0})", ir.Op.FLOOR: "floor({0})", ir.Op.CEIL: "ceil({0})",
    ir.Op.SIGMOID: "sigmoid_({0})",
    ir.Op.LT: "({0} < {1})", ir.Op.LE: "({0} <= {1})", ir.Op.GT: "({0} > {1})",
    ir.Op.GE: "({0} >= {1})", ir.Op.EQ: "({0} == {1})", ir.Op.NE: "({0} != {1})",
    ir.Op.AND: "({0} && {1})", ir.Op.OR: "({0} || {1})", ir.Op.NOT: "(!{0})",
    ir.Op.WHERE: "select({2}, {1}, {0})", ir.Op.F32: "f32({0})", ir.Op.I32: "i32({0})",
}
# ops whose first operand is a float: NaN-propagating min and max, and the saturating i32(x)
# (helpers.wgsl), where WGSL's builtins differ from the IR's semantics (ir/interp.py)
FLOAT_CODE_FOR_OP: dict[ir.Op, str] = {
    ir.Op.MAX: "max_nan({0}, {1})", ir.Op.MIN: "min_nan({0}, {1})", ir.Op.I32: "f32_to_i32({0})",
}


class Writer:
    """Accumulates WGSL lines with explicit indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append(("  " * self.depth + text) if text else "")

    @contextlib.contextmanager
    def block(self, head: str) -> Iterator[None]:
        """`head {` ... `}` with the body indented."""
        self.line(head + " {")
        self.depth += 1
        yield
        self.depth -= 1
        self.line("}")

    def counted(self, var: str, n: int, unroll: int, body: Callable[[], None]) -> None:
        """`for (var = 0u; var < n; var++) { body }` with `unroll` copies of the body per
        iteration (the largest divisor of n up to `unroll`; all n copies: no loop at all).

        Each copy is its own block opening with `let var = ...`, so the body reads `var`
        unchanged. Unrolling here, not in the driver, matters because Naga's SPIR-V output
        gives every loop a hidden iteration counter, which keeps drivers from unrolling it.
        """
        u = max(d for d in range(1, max(1, min(unroll, n)) + 1) if n % d == 0)
        if u == 1:
            with self.block(f"for (var {var} = 0u; {var} < {n}u; {var} = {var} + 1u)"):
                body()
            return
        outer = f"{var}_0"
        if u < n:
            self.line(f"for (var {outer} = 0u; {outer} < {n}u; {outer} = {outer} + {u}u) {{")
            self.depth += 1
        for k in range(u):
            with self.block(""):
                self.line(f"let {var} = {outer} + {k}u;" if u < n else f"let {var} = {k}u;")
                body()
        if u < n:
            self.depth -= 1
            self.line("}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def const(c: ir.Const) -> str:
    """A WGSL literal for an IR constant (inf and nan through bitcasts)."""
    if c.dtype is ir.DType.BOOL:
        return "true" if c.value else "false"
    if c.dtype is ir.DType.I32:
        v = int(c.value)
        if v == -2**31:  # its magnitude is no i32: written as the sum of two that are
            return "(-i32(2147483647) - i32(1))"
        return f"i32({v})" if v >= 0 else f"(-i32({-v}))"
    v = float(c.value)
    if math.isnan(v):
        return NAN
    if math.isinf(v):
        return POS_INF if v > 0 else NEG_INF
    return f"f32({v!r})"


@dataclass
class ExprEnv:
    """How to render leaves: variables by name, dims, scalar params, loads and the dot."""

    vars: dict[str, str]
    lets: dict[str, ir.Expr]
    load: Callable[[ir.Load, ExprEnv], str]
    dot: str | None = None
    memo: dict[str, str] = field(default_factory=dict)

    def hoist(self, w: Writer, *roots: ir.Expr) -> ExprEnv:
        """An env in which each let that `roots` read more than once (directly or through
        other lets) is a WGSL `let` written to `w` first, once: a value the kernel shares
        stays shared in the shader instead of being inlined at every use."""
        uses: Counter[str] = Counter()
        order: list[str] = []  # lets before the lets that read them

        def visit(e: ir.Expr) -> None:
            for x in ir.walk_expr(e):
                if isinstance(x, ir.Var) and x.name in self.lets and x.name not in self.vars:
                    uses[x.name] += 1
                    if uses[x.name] == 1:
                        visit(self.lets[x.name])
                        order.append(x.name)

        for r in roots:
            visit(r)
        env = dataclasses.replace(self, vars=dict(self.vars), memo={})
        for name in order:
            if uses[name] > 1:
                local = "let_" + re.sub(r"\W", "_", name)
                w.line(f"let {local} = {env.render(self.lets[name])};")
                env.vars[name] = local
        return env

    def render(self, e: ir.Expr) -> str:
        """Render an expression; let references not bound in `vars` are inlined."""
        if isinstance(e, ir.Const):
            return const(e)
        if isinstance(e, ir.Dim):
            return f"i32(P.d_{e.name})"
        if isinstance(e, ir.Var):
            if e.name in self.vars:
                return self.vars[e.name]
            if e.name in self.lets:
                return self.render(self.lets[e.name])
            raise LoweringError(f"no value for {e.name!r} in this part of the kernel", e.span)
        if isinstance(e, ir.Call):
            table = FLOAT_CODE_FOR_OP if e.op in FLOAT_CODE_FOR_OP and e.args[0].dtype.is_float else CODE_FOR_OP
            return table[e.op].format(*(self.render(a) for a in e.args))
        if isinstance(e, ir.Load):
            return self.load(e, self)
        if isinstance(e, ir.Dot):
            if self.dot is None:
                raise LoweringError("dot() is only supported in the update score", e.span)
            return self.dot
        raise LoweringError(f"cannot lower {type(e).__name__}", getattr(e, "span", None))


# ----------------------------------------------------------------------------- bounds

I32_MIN, I32_MAX = -2**31, 2**31 - 1


def i32_lit(v: int) -> str:
    """A WGSL i32 literal (for -2**31 too)."""
    return const(ir.Const(v, ir.DType.I32))


def sat_inc(x: str) -> str:
    """WGSL for x + 1 that stays at i32 max instead of wrapping: sound for the key bounds (keys
    lie below n_keys <= i32 max, so `kj <= max` keeps and `kj > max` drops every key either way)."""
    return f"(min({x}, {i32_lit(I32_MAX - 1)}) + 1)"


@dataclass
class IntervalEnv:
    """Interval arithmetic over i32 expressions: the query row ranges over [lo, hi].

    Sound under the IR's i32 wrap-around: an expression that does not read the row is
    rendered as it is (lo = hi = its value, wrapped as it wraps); an operation on row-varying
    operands whose result could leave the i32 range for some operand values (+, -, *, negation)
    has its bounds checked in WGSL against that, and is the whole i32 range where it could
    (`lines`: the `let`s of those checks, written before the bounds are used)."""

    row: str
    row_lo: str
    row_hi: str
    uniform: ExprEnv
    lets: dict[str, ir.Expr]
    kv: str
    lines: list[str] = field(default_factory=list)
    # bounds found so far, with the number of `lines` they read (a subexpression that several
    # comparisons share is checked once)
    memo: dict[ir.Expr, tuple[tuple[str, str] | None, int]] = field(default_factory=dict)

    def bounds(self, e: ir.Expr) -> tuple[str, str] | None:
        """WGSL (lower, upper) bounds of `e`, or None when the analysis cannot tell."""
        if e not in self.memo:
            b = self._bounds(e)
            self.memo[e] = b, len(self.lines)
        return self.memo[e][0]

    def rollback(self, n: int) -> None:
        """Forget the `lines` from the n-th on (and the bounds that read them)."""
        del self.lines[n:]
        self.memo = {e: v for e, v in self.memo.items() if v[1] <= n}

    def _bounds(self, e: ir.Expr) -> tuple[str, str] | None:
        if e.dtype is not ir.DType.I32:
            return None
        if isinstance(e, ir.Var) and e.name == self.row:
            return self.row_lo, self.row_hi
        if not self._varying(e):  # its value, wrapped as the kernel wraps it
            x = self.uniform.render(e)
            return x, x
        if isinstance(e, ir.Var) and e.name in self.lets and e.name not in self.uniform.vars:
            return self.bounds(self.lets[e.name])
        if not isinstance(e, ir.Call):  # the key index; a load at a varying index
            return None
        if e.op is ir.Op.MUL:  # by a constant (either side)
            x, c = e.args
            if isinstance(x, ir.Const):
                x, c = c, x
            if not isinstance(c, ir.Const):
                return None
            return self._scaled(x, int(c.value))
        bs = [self.bounds(a) for a in e.args]
        if any(b is None for b in bs):
            return None
        (alo, ahi), *rest = bs  # type: ignore[misc]
        if e.op is ir.Op.NEG:
            return self._checked(f"{alo} != {i32_lit(I32_MIN)}", f"(-{ahi})", f"(-{alo})")
        blo, bhi = rest[0] if rest else ("", "")  # type: ignore[misc]
        lo, hi = i32_lit(I32_MIN), i32_lit(I32_MAX)
        if e.op is ir.Op.ADD:  # alo + blo >= min and ahi + bhi <= max, without wrapping
            return self._checked(f"{alo} >= {lo} - min({blo}, 0) && {ahi} <= {hi} - max({bhi}, 0)",
                                 f"({alo} + {blo})", f"({ahi} + {bhi})")
        if e.op is ir.Op.SUB:  # alo - bhi >= min and ahi - blo <= max
            return self._checked(f"{alo} >= {lo} + max({bhi}, 0) && {ahi} <= {hi} + min({blo}, 0)",
                                 f"({alo} - {bhi})", f"({ahi} - {blo})")
        if e.op in (ir.Op.MIN, ir.Op.MAX):
            f = e.op.value
            return f"{f}({alo}, {blo})", f"{f}({ahi}, {bhi})"
        if e.op is ir.Op.IDIV and isinstance(e.args[1], ir.Const) and int(e.args[1].value) > 0:
            c = int(e.args[1].value)  # monotone, and never wraps for c > 0
            return f"floor_div({alo}, {c})", f"floor_div({ahi}, {c})"
        return None

    def _scaled(self, x: ir.Expr, c: int) -> tuple[str, str] | None:
        """Bounds of x * c for a constant c: x's bounds scaled, checked to lie where x * c
        stays in the i32 range (x in [ceil(min / c), floor(max / c)] for c > 0)."""
        b = self.bounds(x)
        if b is None:
            return None
        if c == 0:
            return i32_lit(0), i32_lit(0)
        alo, ahi = b
        # x * c stays in the i32 range for x in [x_lo, x_hi]: [ceil(min / c), floor(max / c)]
        # for c > 0; [ceil(max / c), floor(min / c)] for c < 0 (the division flips the order)
        x_lo, x_hi = (-(-I32_MIN // c), I32_MAX // c) if c > 0 else (-(I32_MAX // -c), I32_MIN // c)
        ok = [f"{alo} >= {i32_lit(x_lo)}"] if x_lo > I32_MIN else []
        ok += [f"{ahi} <= {i32_lit(x_hi)}"] if x_hi < I32_MAX else []
        lo, hi = (f"({alo} * {i32_lit(c)})", f"({ahi} * {i32_lit(c)})") if c > 0 else \
            (f"({ahi} * {i32_lit(c)})", f"({alo} * {i32_lit(c)})")
        return self._checked(" && ".join(ok), lo, hi) if ok else (lo, hi)

    def _checked(self, ok: str, lo: str, hi: str) -> tuple[str, str]:
        """(lo, hi) where the WGSL condition `ok` holds (no operand values make the operation
        wrap), else the whole i32 range; `ok` becomes a `let` of `lines`."""
        name = f"kb_ok{len(self.lines)}"
        self.lines.append(f"let {name} = {ok};")
        return f"select({i32_lit(I32_MIN)}, {lo}, {name})", f"select({i32_lit(I32_MAX)}, {hi}, {name})"

    def _varying(self, e: ir.Expr) -> bool:
        """Whether `e` (lets followed, each once) reads the query row or the key index (or a
        dot product: none has a value outside the loop)."""
        seen: set[str] = set()
        todo = [e]
        while todo:
            for x in ir.walk_expr(todo.pop()):
                if isinstance(x, ir.Var) and x.name in (self.row, self.kv) or isinstance(x, ir.Dot):
                    return True
                if isinstance(x, ir.Var) and x.name in self.lets and x.name not in self.uniform.vars \
                        and x.name not in seen:
                    seen.add(x.name)
                    todo.append(self.lets[x.name])
        return False


def key_range(mask: ir.Expr, env: IntervalEnv, resolve: Callable[[ir.Expr], ir.Expr]
              ) -> tuple[list[str], list[str]]:
    """Lower bounds (inclusive) and upper bounds (exclusive) on the key index implied by a
    conjunction of comparisons `kj <op> f(row)`: keys outside are masked for every row. They
    read the `let`s the analysis adds to `env.lines` (write those first); none wraps around."""
    los: list[str] = []
    his: list[str] = []
    stack = [mask]
    while stack:
        c = resolve(stack.pop())
        if isinstance(c, ir.Call) and c.op is ir.Op.AND:
            stack.extend(c.args)
            continue
        if not isinstance(c, ir.Call) or c.op not in (ir.Op.LT, ir.Op.LE, ir.Op.GT, ir.Op.GE):
            continue
        a, b = (resolve(x) for x in c.args)
        op = c.op
        if isinstance(b, ir.Var) and b.name == env.kv:
            a, b = b, a
            op = {ir.Op.LT: ir.Op.GT, ir.Op.LE: ir.Op.GE, ir.Op.GT: ir.Op.LT,
                  ir.Op.GE: ir.Op.LE}[op]
        if not (isinstance(a, ir.Var) and a.name == env.kv):
            continue
        n = len(env.lines)
        bb = env.bounds(b)
        if bb is None:
            env.rollback(n)
            continue
        lo, hi = bb
        if op is ir.Op.LT:
            his.append(hi)
        elif op is ir.Op.LE:
            his.append(sat_inc(hi))
        elif op is ir.Op.GE:
            los.append(lo)
        else:
            los.append(sat_inc(lo))
    return los, his
