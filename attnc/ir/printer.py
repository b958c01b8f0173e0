"""The canonical `.attn` text form of the IR: deterministic, and parsed back to an equal IR.

`KEYWORDS` are the words the text form reserves; the verifier rejects them as names so that
every verified kernel prints to text that parses.
"""

from __future__ import annotations

import math

from attnc.ir.nodes import (
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

KEYWORDS = frozenset({
    "kernel", "tunables", "grid", "tile", "split", "for", "in", "online_softmax", "rows",
    "width", "update", "sink", "return", "result", "lse", "combine", "true", "false", "inf",
    "nan",
})
INDENT = "  "


def print_float(x: float) -> str:
    """A float literal that re-parses to the identical float and never reads as an int."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)  # repr is shortest-round-trip and always has '.' or 'e'


def print_type(t: TensorType) -> str:
    """`f32[B,H,S,D]`, or `f32` for a scalar."""
    return t.dtype.value + (f"[{','.join(t.dims)}]" if t.dims else "")


def print_expr(e: Expr | Slice, lets: frozenset[str] | set[str] = frozenset()) -> str:
    """One expression; names in `lets` print as `%name`, other names bare."""
    if isinstance(e, Const):
        if e.dtype == DType.BOOL:
            return "true" if e.value else "false"
        if e.dtype == DType.F32:
            return print_float(e.value)
        return str(e.value)
    if isinstance(e, Dim):
        return e.name
    if isinstance(e, Var):
        return f"%{e.name}" if e.name in lets else e.name
    if isinstance(e, Call):
        return f"{e.op.value}({', '.join(print_expr(a, lets) for a in e.args)})"
    if isinstance(e, Load | Slice):
        idx = ", ".join(":" if i is None else print_expr(i, lets) for i in e.index)
        return f"{e.tensor}[{idx}]"
    if isinstance(e, Dot):
        return f"dot({print_expr(e.a, lets)}, {print_expr(e.b, lets)})"
    raise TypeError(f"not an expression: {e!r}")


def print_extent(ax: GridAxis) -> str:
    """`b: B`, `qi: tile(S, BM)` or `ks: split(T, NSPLIT)`."""
    x = ax.extent
    if isinstance(x, DimExtent):
        return f"{ax.var}: {x.dim}"
    if isinstance(x, TileExtent):
        return f"{ax.var}: tile({x.dim}, {x.size})"
    if isinstance(x, SplitExtent):
        return f"{ax.var}: split({x.dim}, {x.count})"
    raise TypeError(f"not a grid extent: {x!r}")


def print_stmt(s: Stmt, lets: set[str], depth: int = 1) -> list[str]:
    """The lines of one statement at `depth`; records the `%names` it defines in `lets`."""
    pad = INDENT * depth
    if isinstance(s, Grid):
        return [pad + "grid " + ", ".join(print_extent(a) for a in s.axes)]
    if isinstance(s, Let):
        line = f"{pad}%{s.var} = {print_expr(s.value, lets)}"
        lets.add(s.var)
        return [line]
    if isinstance(s, Softmax):
        lets.add(s.var)
        return [f"{pad}%{s.var} = online_softmax rows({s.rows}) width({s.width})"]
    if isinstance(s, Update):
        return [f"{pad}update %{s.acc}, {print_expr(s.score, lets)}, "
                f"{print_expr(s.value, lets)}"]
    if isinstance(s, Sink):
        return [f"{pad}sink %{s.acc}, {print_expr(s.logit, lets)}"]
    if isinstance(s, Loop):
        split = f" split({s.split})" if s.split is not None else ""
        lines = [f"{pad}for {s.var} in tile({s.dim}, {s.size}){split} {{"]
        for t in s.body:
            lines += print_stmt(t, lets, depth + 1)
        return lines + [pad + "}"]
    if isinstance(s, Return):
        first = f"combine(%{s.acc}, {s.combine})" if s.combine else f"result(%{s.acc})"
        return [f"{pad}return {first}" + (f", lse(%{s.acc})" if s.lse else "")]
    raise TypeError(f"not a statement: {s!r}")


def print_param(p: Param) -> str:
    """`q: f32[B,Hq,S,D]` or `scale: f32`."""
    return f"{p.name}: {print_type(p.type)}"


def print_kernel(k: Kernel) -> str:
    """The canonical text of a kernel, in the style of examples/*.attn, ending in a newline."""
    params = ", ".join(print_param(p) for p in k.params)
    tunables = ", ".join(f"{n}={v}" for n, v in k.tunables)
    lines = [f"kernel {k.name}({params}) -> {print_type(k.output)}",
             f"    tunables({tunables}) {{"]
    lets: set[str] = set()
    for s in k.body:
        lines += print_stmt(s, lets)
    return "\n".join(lines + ["}"]) + "\n"


def describe(node: object, lets: frozenset[str] | set[str] = frozenset(), limit: int = 60) -> str:
    """A short quoted one-line rendering of a node for error messages ('' if it has none)."""
    try:
        if isinstance(node, Kernel):
            text = f"kernel {node.name}"
        elif isinstance(node, Param):
            text = print_param(node)
        elif isinstance(node, GridAxis):
            text = print_extent(node)
        elif isinstance(node, Loop):
            text = print_stmt(node, set())[0].rstrip(" {")
        elif isinstance(node, Grid | Let | Softmax | Update | Sink | Return):
            text = print_stmt(node, set(lets))[0]
        else:
            text = print_expr(node, lets)  # type: ignore[arg-type]
    except (TypeError, AttributeError, ValueError):
        return ""
    text = text.strip()
    return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"
