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


@dataclass
class IntervalEnv:
    """Interval arithmetic over i32 expressions: the query row ranges over [lo, hi]."""

    row: str
    row_lo: str
    row_hi: str
    uniform: ExprEnv
    lets: dict[str, ir.Expr]
    kv: str

    def bounds(self, e: ir.Expr) -> tuple[str, str] | None:
        """WGSL (lower, upper) bounds of `e`, or None when the analysis cannot tell."""
        if isinstance(e, ir.Var) and e.name == self.row:
            return self.row_lo, self.row_hi
        if isinstance(e, ir.Var) and e.name == self.kv:
            return None
        if isinstance(e, ir.Var) and e.name in self.lets and e.name not in self.uniform.vars:
            return self.bounds(self.lets[e.name])
        if isinstance(e, (ir.Const, ir.Dim, ir.Var)):
            if e.dtype is not ir.DType.I32:
                return None
            x = self.uniform.render(e)
            return x, x
        if isinstance(e, ir.Load):
            if any(self._varying(i) for i in e.index):
                return None
            x = self.uniform.render(e)
            return x, x
        if not isinstance(e, ir.Call) or e.dtype is not ir.DType.I32:
            return None
        bs = [self.bounds(a) for a in e.args]
        if any(b is None for b in bs):
            return None
        (alo, ahi), *rest = bs  # type: ignore[misc]
        if e.op is ir.Op.NEG:
            return f"(-{ahi})", f"(-{alo})"
        blo, bhi = rest[0] if rest else ("", "")  # type: ignore[misc]
        if e.op is ir.Op.ADD:
            return f"({alo} + {blo})", f"({ahi} + {bhi})"
        if e.op is ir.Op.SUB:
            return f"({alo} - {bhi})", f"({ahi} - {blo})"
        if e.op in (ir.Op.MIN, ir.Op.MAX):
            f = e.op.value
            return f"{f}({alo}, {blo})", f"{f}({ahi}, {bhi})"
        if e.op is ir.Op.MUL and isinstance(e.args[1], ir.Const):
            c = int(e.args[1].value)
            return (f"({alo} * {c})", f"({ahi} * {c})") if c >= 0 else \
                (f"({ahi} * {c})", f"({alo} * {c})")
        if e.op is ir.Op.IDIV and isinstance(e.args[1], ir.Const) and int(e.args[1].value) > 0:
            c = int(e.args[1].value)
            return f"floor_div({alo}, {c})", f"floor_div({ahi}, {c})"
        return None

    def _varying(self, e: ir.Expr) -> bool:
        """Whether `e` (lets followed, each once) reads the query row or the key index."""
        seen: set[str] = set()
        todo = [e]
        while todo:
            for x in ir.walk_expr(todo.pop()):
                if isinstance(x, ir.Var) and x.name in (self.row, self.kv):
                    return True
                if isinstance(x, ir.Var) and x.name in self.lets and x.name not in self.uniform.vars \
                        and x.name not in seen:
                    seen.add(x.name)
                    todo.append(self.lets[x.name])
        return False


def key_range(mask: ir.Expr, env: IntervalEnv, resolve: Callable[[ir.Expr], ir.Expr]
              ) -> tuple[list[str], list[str]]:
    """Lower bounds (inclusive) and upper bounds (exclusive) on the key index implied by a
    conjunction of comparisons `kj <op> f(row)`: keys outside are masked for every row."""
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
        bb = env.bounds(b)
        if bb is None:
            continue
        lo, hi = bb
        if op is ir.Op.LT:
            his.append(hi)
        elif op is ir.Op.LE:
            his.append(f"({hi} + 1)")
        elif op is ir.Op.GE:
            los.append(lo)
        else:
            los.append(f"({lo} + 1)")
    return los, his
