"""Recognise the tiled-attention structure of a verified kernel: the facts WGSL emission needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attnc.errors import LoweringError
from attnc.ir import nodes as ir


@dataclass(frozen=True)
class Axis:
    """A non-split grid axis: its variable, dim and tile size (None for a plain dim)."""

    var: str
    dim: str
    tile: int | None


@dataclass(frozen=True)
class FlashSpec:
    """A kernel seen as tiled attention: grid, rows, KV loop, score, value, sink, output."""

    kernel: ir.Kernel
    axes: tuple[Axis, ...]
    row: Axis
    split_var: str | None
    split_count: str | None
    loop_var: str
    kv_dim: str
    BN: int
    width: str
    head_dim: str
    lets: dict[str, ir.Expr]
    uniform_lets: tuple[str, ...]
    score: ir.Expr
    dot: ir.Dot
    value: ir.Slice
    sink: ir.Expr | None
    lse: bool

    @property
    def BM(self) -> int:
        assert self.row.tile is not None
        return self.row.tile

    def reaches(self, exprs: list[ir.Expr], found: Callable[[ir.Expr], bool]) -> bool:
        """Whether a sub-expression of any of `exprs`, lets followed (each once), is `found`."""
        seen: set[str] = set()
        todo = list(exprs)
        while todo:
            for x in ir.walk_expr(todo.pop()):
                if found(x):
                    return True
                if isinstance(x, ir.Var) and x.name in self.lets and x.name not in seen:
                    seen.add(x.name)
                    todo.append(self.lets[x.name])
        return False

    def depends(self, e: ir.Expr, names: frozenset[str]) -> bool:
        """Whether `e` (lets followed, each once) reads any of `names`."""
        return self.reaches([e], lambda x: isinstance(x, ir.Var) and x.name in names)

    def contains(self, exprs: list[ir.Expr], node: type) -> bool:
        """Whether any of `exprs` (lets followed, each once) has a sub-expression of type `node`."""
        return self.reaches(exprs, lambda x: isinstance(x, node))

    def gathers(self, sl: ir.Slice) -> bool:
        """Whether a slice's index reads a tensor (lets followed): a gather such as a page
        table's entry, a load per key that the strategies compute once and share."""
        return self.contains([i for i in sl.index if i is not None], ir.Load)

    def resolve(self, e: ir.Expr) -> ir.Expr:
        """Follow a chain of let references to the defining expression."""
        while isinstance(e, ir.Var) and e.name in self.lets:
            e = self.lets[e.name]
        return e

    @property
    def tensors(self) -> tuple[ir.Param, ...]:
        return tuple(p for p in self.kernel.params if p.type.dims)

    def reads(self, exprs: list[ir.Expr]) -> set[str]:
        """The tensors that any of `exprs` (lets followed, each once) loads or slices."""
        found: set[str] = set()

        def note(x: ir.Expr) -> bool:
            if isinstance(x, ir.Dot):
                found.update((x.a.tensor, x.b.tensor))
            elif isinstance(x, (ir.Load, ir.Slice)):
                found.add(x.tensor)
            return False  # walk every sub-expression

        self.reaches(exprs, note)
        return found

    @property
    def main_tensors(self) -> tuple[ir.Param, ...]:
        """The tensors a main pass binds: all of them, less those only the sink reads when the
        KV axis is split (the combine pass applies the sink). A binding its shader never reads
        would be missing from a pipeline's automatic layout, which other runtimes build."""
        if self.sink is None or not self.split_var:
            return self.tensors
        value_index = [i for i in self.value.index if i is not None]  # walk_expr stops at a slice
        rest = [self.score, self.dot, self.value, *value_index, *self.lets.values()]
        sink_only = self.reads([self.sink]) - self.reads(rest)
        return tuple(p for p in self.tensors if p.name not in sink_only)

    @property
    def scalars(self) -> tuple[ir.Param, ...]:
        return tuple(p for p in self.kernel.params if not p.type.dims)


def _err(msg: str, node: object) -> LoweringError:
    return LoweringError(msg, getattr(node, "span", None))


def check_tile_sizes(k: ir.Kernel) -> None:
    """Tile sizes are powers of two (every layout divides them over workgroups and subgroups);
    the IR and its reference take any size, so this is the lowering's rule, said at the tile."""
    tun = k.tunable_values
    grid = next(s for s in k.body if isinstance(s, ir.Grid))
    tiles = [(a.extent.size, "query-row", a) for a in grid.axes if isinstance(a.extent, ir.TileExtent)]
    tiles += [(s.size, "key", s) for s in ir.walk_stmts(k.body) if isinstance(s, ir.Loop)]
    for name, what, node in tiles:
        value = tun[name]
        if value & (value - 1):
            raise _err(f"tunable {name}={value} sizes the {what} tiles, which are powers of two when lowered", node)


def analyze(k: ir.Kernel) -> FlashSpec:
    """Extract a FlashSpec, or raise LoweringError naming what does not fit the template."""
    check_tile_sizes(k)
    tun = k.tunable_values
    grid = next(s for s in k.body if isinstance(s, ir.Grid))
    axes, split_var, split_count = [], None, None
    for a in grid.axes:
        if isinstance(a.extent, ir.SplitExtent):
            split_var, split_count = a.var, a.extent.count
        elif isinstance(a.extent, ir.TileExtent):
            axes.append(Axis(a.var, a.extent.dim, tun[a.extent.size]))
        else:
            axes.append(Axis(a.var, a.extent.dim, None))
    row = next(a for a in axes if a.tile is not None)
    lets: dict[str, ir.Expr] = {}
    top_lets: list[str] = []
    loop = None
    sink = None
    ret = None
    for st in k.body:
        if isinstance(st, ir.Let):
            lets[st.var] = st.value
            top_lets.append(st.var)
        elif isinstance(st, ir.Loop):
            loop = st
        elif isinstance(st, ir.Sink):
            if sink is not None:
                raise _err("only one sink per kernel is supported", st)
            sink = st.logit
        elif isinstance(st, ir.Return):
            ret = st
    assert loop is not None and ret is not None
    updates = [s for s in loop.body if isinstance(s, ir.Update)]
    if len(updates) != 1:
        raise _err("the KV loop must hold exactly one update", loop)
    for st in loop.body:
        if isinstance(st, ir.Let):
            lets[st.var] = st.value
        elif isinstance(st, ir.Loop):
            raise _err("nested KV loops are not supported", st)
    upd = updates[0]
    acc = next(s for s in k.body if isinstance(s, ir.Softmax))
    loop_lets = tuple(st.value for st in loop.body if isinstance(st, ir.Let))
    spec = FlashSpec(k, tuple(axes), row, split_var, split_count, loop.var, loop.dim,
                     tun[loop.size], acc.width, "", lets, (), upd.score,
                     _the_dot(upd.score, lets, loop_lets), upd.value, sink, ret.lse)
    varying = frozenset({row.var, loop.var})
    uniform = tuple(n for n in top_lets if not spec.depends(lets[n], varying))
    dot = spec.dot
    head = k.param(dot.a.tensor).type.dims[dot.a.axis]
    spec = FlashSpec(**{**spec.__dict__, "uniform_lets": uniform, "head_dim": head})
    _check_slices(spec)
    return spec


def _the_dot(score: ir.Expr, lets: dict[str, ir.Expr], loop_lets: tuple[ir.Expr, ...] = ()) -> ir.Dot:
    """The q.k dot of the score; a score that ignores it (a constant score_mod) still has one
    in the loop body, which then only shapes the tiles."""
    seen: dict[int, ir.Dot] = {}
    visited: set[str] = set()

    def visit(e: ir.Expr) -> None:
        for x in ir.walk_expr(e):
            if isinstance(x, ir.Dot):
                seen[hash(x)] = x
            elif isinstance(x, ir.Var) and x.name in lets and x.name not in visited:
                visited.add(x.name)
                visit(lets[x.name])

    visit(score)
    if not seen:
        for e in loop_lets:
            visit(e)
    if len(seen) != 1:
        raise _err("the update score must use exactly one dot(q-row slice, k-row slice)", score)
    return next(iter(seen.values()))


def _check_slices(spec: FlashSpec) -> None:
    row, kv = frozenset({spec.row.var}), frozenset({spec.loop_var})
    for sl, bad, what in ((spec.dot.a, kv, "query"), (spec.dot.b, row, "key"),
                          (spec.value, row, "value")):
        for i in sl.index:
            if i is not None and spec.depends(i, bad):
                raise _err(f"the {what} slice {sl.tensor}[...] must not depend on "
                           f"{'the key index' if bad == kv else 'the query row'}", sl)
    if not any(i is not None and spec.depends(i, row) for i in spec.dot.a.index):
        raise _err("the first dot operand must be indexed by the query row variable", spec.dot.a)
    if spec.sink is not None and spec.depends(spec.sink, kv):
        raise _err("the sink logit must not depend on the key index", spec.sink)
