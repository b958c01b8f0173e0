"""Parse `.attn` text into verified IR: Lark grammar -> Transformer (raw tree) -> name resolver.

The Transformer keeps expression names unresolved (`_Name`, `_Call`, `_Index`); the resolver
then walks the statements in order with a scope (dims, scalar params, grid and loop vars,
lets), builds typed IR nodes and types each call with `call_dtype`. Lark's exceptions never
escape: they become `ParseError`s with file:line:column, the source line and a caret.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from attnc.errors import AttncError, ParseError, Span, VerifyError
from attnc.ir.nodes import (
    ARITY,
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
    Stmt,
    TensorType,
    TileExtent,
    Update,
    Var,
)
from attnc.ir.printer import KEYWORDS
from attnc.ir.verify import TypeRuleError, call_dtype, load_dtype, verify

__all__ = ["KEYWORDS", "parse", "parse_file"]

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
# Deepest nesting accepted: of brackets in the text, and of an expression through the lets
# it uses. Deeper trees would exhaust Python's recursion in the reader or the lowering.
MAX_DEPTH = 200
BOM = "\ufeff"
# control characters shown as '?' in the source line of a diagnostic (a tab stays a tab)
_UNPRINTABLE = {c: "?" for c in [*range(0, 9), *range(10, 32), 127, *range(128, 160)]}
OPS = {o.value: o for o in Op}
TERMINAL_WORDS = {"NAME": "a name", "LETNAME": "a %name", "FLOAT": "a number",
                  "INT": "an integer", "$END": "end of input"}
EXPR_START = {"NAME", "LETNAME", "FLOAT", "INT", "INF", "MINUS_INF", "NAN", "TRUE", "FALSE"}


@cache
def _lark() -> Lark:
    """The LALR parser for attn.lark, built on first use."""
    return Lark.open("attn.lark", rel_to=__file__, parser="lalr", propagate_positions=True)


# ----------------------------------------------------------------------------- raw tree

@dataclass(frozen=True)
class _Name:
    name: str
    let: bool
    span: Span | None


@dataclass(frozen=True)
class _Call:
    op: str
    args: tuple
    span: Span | None
    op_span: Span | None


@dataclass(frozen=True)
class _Index:
    tensor: str
    index: tuple
    span: Span | None
    name_span: Span | None


COLON = object()


@v_args(inline=True, meta=True)
class _ToRaw(Transformer):
    """Parse tree -> IR statements whose expressions are still raw (unresolved) trees."""

    def __init__(self, filename: str, lines: list[str]) -> None:
        super().__init__()
        self.file, self.lines = filename, lines

    def _at(self, line: int, column: int, end_line: int | None, end_column: int | None) -> Span:
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Span(self.file, line, column, text, end_column if end_line == line else None)

    def span(self, meta) -> Span | None:
        if meta.empty:
            return None
        return self._at(meta.line, meta.column, meta.end_line, meta.end_column)

    def tspan(self, tok: Token) -> Span:
        return self._at(tok.line, tok.column, tok.end_line, tok.end_column)

    def start(self, meta, name, *rest):
        params = tuple(r for r in rest if isinstance(r, Param))
        out = next(r for r in rest if isinstance(r, TensorType))
        tunables = next(r for r in rest if isinstance(r, _Tunables))
        body = tuple(r for r in rest if isinstance(r, Stmt))
        return Kernel(str(name), params, out, tunables.items, body, self.span(meta))

    def param(self, meta, name, type_):
        return Param(str(name), type_, self.span(meta))

    def type(self, meta, dtype, *dims):
        if str(dtype) not in {d.value for d in DType}:
            raise ParseError(f"unknown dtype '{dtype}'; expected one of "
                             f"{', '.join(d.value for d in DType)}",
                             self.tspan(dtype))
        return TensorType(DType(str(dtype)), tuple(str(d) for d in dims if d is not None))

    def tunables(self, meta, *items):
        seen: dict[str, int] = {}
        for name, value, span in (i for i in items if i is not None):
            if name in seen:
                raise ParseError(f"tunable {name} is given twice ({name}={seen[name]} before)", span)
            seen[name] = value
        return _Tunables(tuple(seen.items()))

    def tunable(self, meta, name, value):
        """(name, value, the name's span): a tile size is a positive integer, checked here where
        the text says it (the verifier's check could point only at the kernel)."""
        v = self._int(value)
        if v < 1:
            raise ParseError(f"tunable {name}={v} must be a positive integer", self.tspan(value))
        return (str(name), v, self.tspan(name))

    def grid(self, meta, *axes):
        return Grid(axes, self.span(meta))

    def dim_axis(self, meta, var, dim):
        return GridAxis(str(var), DimExtent(str(dim)), self.span(meta))

    def tile_axis(self, meta, var, dim, size):
        return GridAxis(str(var), TileExtent(str(dim), str(size)), self.span(meta))

    def split_axis(self, meta, var, dim, count):
        return GridAxis(str(var), SplitExtent(str(dim), str(count)), self.span(meta))

    def let(self, meta, name, value):
        return Let(name[1:], value, self.span(meta))

    def softmax(self, meta, name, rows, width):
        return Softmax(name[1:], str(rows), str(width), self.span(meta))

    def loop(self, meta, var, dim, size, split, *body):
        split = None if split is None else str(split)
        return Loop(str(var), str(dim), str(size), split, body, self.span(meta))

    def update(self, meta, acc, score, value):
        return Update(acc[1:], score, value, self.span(meta))

    def sink(self, meta, acc, logit):
        return Sink(acc[1:], logit, self.span(meta))

    def ret_result(self, meta, acc, lse):
        return self._ret(meta, acc, None, lse)

    def ret_combine(self, meta, acc, split, lse):
        return self._ret(meta, acc, str(split), lse)

    def _ret(self, meta, acc, combine, lse):
        if lse is not None and lse != acc:
            raise ParseError(f"lse({lse}) must name the same state as {acc}", self.tspan(lse))
        return Return(acc[1:], lse is not None, combine, self.span(meta))

    def lse(self, meta, acc):
        return acc

    def name(self, meta, tok):
        return _Name(str(tok), False, self.tspan(tok))

    def let_ref(self, meta, tok):
        return _Name(tok[1:], True, self.tspan(tok))

    def call(self, meta, op, *args):
        return _Call(str(op), tuple(a for a in args if a is not None), self.span(meta),
                     self.tspan(op))

    def index(self, meta, tensor, *items):
        return _Index(str(tensor), items, self.span(meta), self.tspan(tensor))

    def colon(self, meta):
        return COLON

    def _int(self, tok: Token) -> int:
        value = int(tok)
        if not I32_MIN <= value <= I32_MAX:
            raise ParseError(f"integer {tok} does not fit in i32", self.tspan(tok))
        return value

    def float_lit(self, meta, tok):
        return Const(float(tok), DType.F32, self.span(meta))

    def int_lit(self, meta, tok):
        return Const(self._int(tok), DType.I32, self.span(meta))

    def inf(self, meta):
        return Const(float("inf"), DType.F32, self.span(meta))

    def neg_inf(self, meta):
        return Const(float("-inf"), DType.F32, self.span(meta))

    def nan(self, meta):
        return Const(float("nan"), DType.F32, self.span(meta))

    def true(self, meta):
        return Const(True, DType.BOOL, self.span(meta))

    def false(self, meta):
        return Const(False, DType.BOOL, self.span(meta))


@dataclass(frozen=True)
class _Tunables:
    items: tuple[tuple[str, int], ...]


# ----------------------------------------------------------------------------- resolver

class _Resolver:
    """Resolves raw names by scope, in statement order, and types calls into IR nodes."""

    def __init__(self, k: Kernel) -> None:
        self.scope: dict[str, tuple[str, DType | None]] = {}
        for p in k.params:
            for d in p.type.dims:
                self.scope.setdefault(d, ("dim", DType.I32))
        for p in k.params:
            self.scope.setdefault(p.name, ("tensor" if p.type.dims else "scalar", p.type.dtype))
        for name, _ in k.tunables:
            self.scope.setdefault(name, ("tunable", None))
        for d in k.dims:  # the output's and the KV loop's dims too
            self.scope.setdefault(d, ("dim", DType.I32))
        self.tensors = {p.name: p.type for p in k.params if p.type.dims}

    def stmts(self, body: tuple[Stmt, ...]) -> tuple[Stmt, ...]:
        return tuple(self.stmt(s) for s in body)

    def stmt(self, s: Stmt) -> Stmt:
        if isinstance(s, Grid):
            for ax in s.axes:
                if ax.var in self.scope:  # (the verifier's rule, said here before a later use misleads)
                    raise ParseError(f"'{ax.var}' is already defined (as a {self.scope[ax.var][0]}); names are "
                                     "unique in a kernel", ax.span or s.span)
                self.scope[ax.var] = ("grid", DType.I32)
            return s
        if isinstance(s, Let):
            value = self.expr(s.value)
            self.scope.setdefault(s.var, ("let", value.dtype))
            return replace(s, value=value)
        if isinstance(s, Softmax):
            self.scope.setdefault(s.var, ("softmax", None))
            return s
        if isinstance(s, Update):
            return replace(s, score=self.expr(s.score), value=self.slice(s.value))
        if isinstance(s, Sink):
            return replace(s, logit=self.expr(s.logit))
        if isinstance(s, Loop):
            outer = dict(self.scope)
            self.scope.setdefault(s.var, ("loop", DType.I32))
            body = self.stmts(s.body)
            self.scope = outer
            return replace(s, body=body)
        return s

    def known(self, let: bool) -> str:
        kinds = ("let",) if let else ("dim", "scalar", "grid", "loop")
        names = [("%" if let else "") + n for n, (k, _) in self.scope.items() if k in kinds]
        return ", ".join(names) or "none"

    def name(self, e: _Name) -> Expr:
        shown = ("%" if e.let else "") + e.name
        kind, dtype = self.scope.get(e.name, ("unknown", None))
        if kind == "unknown" or (e.let != (kind in ("let", "softmax"))):
            hint = _did_you_mean(shown, self.known(e.let).split(", "))  # a let's suggestion keeps its '%'
            if kind != "unknown":
                hint = f"did you mean '{'' if e.let else '%'}{e.name}'? "
            raise ParseError(f"unknown name '{shown}'; {hint}known here: {self.known(e.let)}",
                             e.span)
        if kind == "dim":
            return Dim(e.name, e.span)
        if kind in ("scalar", "grid", "loop", "let"):
            return Var(e.name, dtype, e.span)
        what = {"tensor": f"a tensor; index it, as in {e.name}[...]",
                "tunable": "a tunable (a compile-time size), not a value",
                "softmax": "an online_softmax state, not a value"}[kind]
        raise ParseError(f"'{shown}' is {what}", e.span)

    def expr(self, e) -> Expr:
        if isinstance(e, Const):
            return e
        if isinstance(e, _Name):
            return self.name(e)
        if isinstance(e, _Index):
            if any(i is COLON for i in e.index):
                raise ParseError("a slice (with ':') is only allowed in dot(...) or as the "
                                 "value of 'update'", e.span)
            t = self.tensor(e)
            return Load(e.tensor, tuple(self.expr(i) for i in e.index), load_dtype(t.dtype),
                        e.span)
        if isinstance(e, _Call):
            return self.call(e)
        raise ParseError("expected an expression", getattr(e, "span", None))

    def tensor(self, e: _Index) -> TensorType:
        if e.tensor not in self.tensors:
            kind = self.scope.get(e.tensor, ("unknown",))[0]
            if kind == "unknown":
                known = ", ".join(self.tensors) or "none"
                raise ParseError(f"unknown tensor '{e.tensor}'; known here: {known}",
                                 e.name_span)
            raise ParseError(f"'{e.tensor}' is a {kind}, not a tensor; only tensor params "
                             "can be indexed", e.name_span)
        return self.tensors[e.tensor]

    def slice(self, e) -> Slice:
        if not isinstance(e, _Index) or not any(i is COLON for i in e.index):
            raise ParseError("expected a slice such as v[b, h, kj, :]", getattr(e, "span", None))
        self.tensor(e)
        index = tuple(None if i is COLON else self.expr(i) for i in e.index)
        return Slice(e.tensor, index, e.span)

    def call(self, e: _Call) -> Expr:
        if e.op == "dot":
            if len(e.args) != 2:
                raise ParseError(f"'dot' takes 2 slices, got {len(e.args)}", e.span)
            return Dot(self.slice(e.args[0]), self.slice(e.args[1]), e.span)
        op = OPS.get(e.op)
        if op is None:
            known = ", ".join(sorted([*OPS, "dot"]))
            hint = _did_you_mean(e.op, [*OPS, "dot"])
            raise ParseError(f"unknown operator '{e.op}'; {hint}known: {known}", e.op_span)
        if len(e.args) != ARITY[op]:
            n = ARITY[op]
            raise ParseError(f"'{e.op}' takes {n} argument{'s' * (n != 1)}, got {len(e.args)}",
                             e.span)
        args = tuple(self.expr(a) for a in e.args)
        try:
            dtype = call_dtype(op, [a.dtype for a in args])
        except TypeRuleError as err:
            raise VerifyError(str(err), e.span) from None
        return Call(op, args, dtype, e.span)


# ----------------------------------------------------------------------------- errors

def _did_you_mean(name: str, candidates: list[str]) -> str:
    """`did you mean 'x'? ` for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _describe_terminal(name: str) -> str:
    """A terminal name as a reader would say it: `')'`, `'for'`, `a name`."""
    if name in TERMINAL_WORDS:
        return TERMINAL_WORDS[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if isinstance(pattern, PatternStr) else name.lower()


def _expected(names) -> str:
    """`X`, `X or Y`, or `one of X, Y, Z` for a set of terminal names."""
    names = set(names or ())
    words = []
    if len(names & EXPR_START) >= 4:  # an expression can start here
        names -= EXPR_START
        words.append("an expression")
    words += sorted({_describe_terminal(n) for n in names})
    if len(words) <= 2:
        return " or ".join(words)
    return "one of " + ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_error(e: UnexpectedInput, lines: list[str], filename: str) -> ParseError:
    """A Lark error as a ParseError at the offending position, saying what was expected."""
    line, column, width = e.line, e.column, 1
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            what = "end of input"
            if tok.end_line is not None and tok.end_column is not None:
                line, column = tok.end_line, tok.end_column
            elif lines:
                line, column = len(lines), len(lines[-1]) + 1
        else:
            kind = {"NAME": "name ", "INT": "number ", "FLOAT": "number "}.get(tok.type, "")
            what = f"{kind}'{tok}'"
            width = max(1, len(str(tok).split("\n")[0]))
        expected = e.expected
    elif isinstance(e, UnexpectedCharacters):
        what = f"character {e.char!r}"
        expected = e.allowed
    else:  # UnexpectedEOF and anything else Lark may add
        what, expected = "end of input", getattr(e, "expected", ())
    if line is None or line < 1:
        line, column = max(1, len(lines)), 1
    column = column if column and column > 0 else 1
    source = lines[line - 1] if line <= len(lines) else ""
    message = f"unexpected {what}"
    if expected:
        message += f"; expected {_expected(expected)}"
    return ParseError(message, Span(filename, line, column, source, column + width))


# ----------------------------------------------------------------------------- entry points

def parse(text: str, filename: str = "<string>") -> Kernel:
    """Parse `.attn` text into a verified Kernel; raises ParseError or VerifyError."""
    text = text.removeprefix(BOM)  # editors that write a byte-order mark: it is not part of the text
    # Lark counts lines by '\n' only, so the lines shown in diagnostics are split the same way
    lines = [line.removesuffix("\r").translate(_UNPRINTABLE) for line in text.split("\n")]
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, lines, filename) from None
    depth, line, column = _deepest_bracket(text)
    if depth > MAX_DEPTH:
        raise ParseError(f"brackets nested {depth} deep here; at most {MAX_DEPTH} levels are supported",
                         Span(filename, line, column))
    try:
        raw = _ToRaw(filename, lines).transform(tree)
        kernel = replace(raw, body=_Resolver(raw).stmts(raw.body))
    except VisitError as e:
        if isinstance(e.orig_exc, AttncError):
            raise e.orig_exc from None
        raise ParseError(f"internal error while reading the kernel: {e.orig_exc!r}") from None
    except RecursionError:
        raise ParseError("the kernel is nested too deeply to read", Span(filename, line, column)) from None
    _check_let_depth(kernel.body, {})
    try:
        verify(kernel)
    except RecursionError:
        raise VerifyError("the kernel is nested too deeply to verify", Span(filename, line, column)) from None
    return kernel


def parse_file(path: str | Path) -> Kernel:
    """Parse and verify the `.attn` file at `path` (UTF-8, a leading byte-order mark is skipped);
    spans name the file. OSError when it cannot be read; ParseError when it is not UTF-8 text."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line_start = before.rfind(b"\n") + 1
        column = len(before[line_start:].decode("utf-8", errors="replace")) + 1
        raise ParseError(f"not UTF-8 text: byte 0x{data[e.start]:02x} ({e.reason}); .attn files are UTF-8",
                         Span(str(path), before.count(b"\n") + 1, column)) from None
    return parse(text, filename=str(path))


def _deepest_bracket(text: str) -> tuple[int, int, int]:
    """(depth, line, column) where (, [ and { first nest deepest, comments skipped."""
    depth = best = 0
    line, column, at = 1, 0, (1, 1)
    comment = False
    for ch in text:
        column += 1
        if ch == "\n":
            line, column, comment = line + 1, 0, False
        elif comment:
            continue
        elif ch == "#":
            comment = True
        elif ch in "([{":
            depth += 1
            if depth > best:
                best, at = depth, (line, column)
        elif ch in ")]}":
            depth -= 1
    return best, *at


def _expr_measure(e: Expr, lets: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(depth, size) of an expression with its lets inlined, as the lowering walks and renders it:
    a use of a let is one level more than the let's value and as large. Bounded by MAX_DEPTH
    brackets, so the recursion is too; each let's measure is computed once."""
    if isinstance(e, Var):
        if e.name in lets:
            depth, size = lets[e.name]
            return depth + 1, size
        return 1, 1
    if isinstance(e, Call):
        kids = e.args
    elif isinstance(e, Load):
        kids = e.index
    elif isinstance(e, Dot):
        kids = tuple(i for sl in (e.a, e.b) for i in sl.index if i is not None)
    else:
        kids = ()
    measures = [_expr_measure(k, lets) for k in kids]
    return 1 + max((d for d, _ in measures), default=0), 1 + sum(n for _, n in measures)


def _check_let_depth(body: tuple[Stmt, ...], lets: dict[str, tuple[int, int]]) -> None:
    """VerifyError at the first let (or update, sink) nested deeper than MAX_DEPTH through the
    lets it uses. (Size needs no limit: the lowering writes a let used more than once as a WGSL
    `let`, so a let used twice at each of 30 levels is 30 lets, not 2**30 operations.)"""
    for st in body:
        if isinstance(st, Loop):
            _check_let_depth(st.body, lets)
            continue
        if isinstance(st, Let):
            exprs = (st.value,)
        elif isinstance(st, Update):
            exprs = (st.score, *(i for i in st.value.index if i is not None))
        elif isinstance(st, Sink):
            exprs = (st.logit,)
        else:
            continue
        measures = [_expr_measure(x, lets) for x in exprs]
        depth, size = max(d for d, _ in measures), sum(n for _, n in measures)
        what = {Let: f"%{getattr(st, 'var', '')}", Update: "the update", Sink: "the sink"}[type(st)]
        if depth > MAX_DEPTH:
            raise VerifyError(f"{what} is nested {depth} deep through the lets it uses; at most {MAX_DEPTH} "
                              "levels are supported", st.span)
        if isinstance(st, Let):
            lets[st.var] = (depth, size)
