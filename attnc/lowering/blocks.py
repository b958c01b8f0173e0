"""Block sparsity from data: for a mask that reads tensors (document ids, a boolean block
table, prefix lengths), two small programs before the main pass (tiled, stream, lanes) classify every
(query tile, KV tile) as empty, partial or full and list each query tile's live KV tiles, so
the main pass visits only those and drops the mask on full ones (FlexAttention's BlockMask,
computed on the device from the same mask expression).

The scratch buffer `blocks` (u32) holds one record of 1 + n_kt words per query tile of each
point of the grid axes the mask depends on (n_kt = the KV tiles of the problem):

* after `classify`: word 1 + t holds the class of KV tile t (EMPTY, PARTIAL or FULL);
* after `compact` (in place): word 0 holds the number n of live tiles, words 1..n their
  indices in increasing order, FULL_BIT set on a full one.

Masks the interval analysis already turns into key bounds (causal, windows, `kj < kv_lens[b]`)
need no map: only a conjunct that reads a tensor and is not a comparison of the key index
against a function of the row asks for one.
"""

from __future__ import annotations

from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec
from attnc.lowering.plan import Family
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, mask_of
from attnc.lowering.wgsl import Writer

EMPTY, PARTIAL, FULL = 0, 1, 2
FULL_BIT = 0x80000000  # on a listed tile index: the mask keeps every element of the tile
CLASSIFY_WG = 64
COMPACT_WG = 64
_KEY_COMPARISONS = (ir.Op.LT, ir.Op.LE, ir.Op.GT, ir.Op.GE)


def _reads(spec: FlashSpec, e: ir.Expr) -> set[str]:
    """The tensors `e` loads from, lets followed (each once)."""
    out: set[str] = set()
    seen: set[str] = set()
    todo = [e]
    while todo:
        for x in ir.walk_expr(todo.pop()):
            if isinstance(x, ir.Load):
                out.add(x.tensor)
            elif isinstance(x, ir.Var) and x.name in spec.lets and x.name not in seen:
                seen.add(x.name)
                todo.append(spec.lets[x.name])
    return out


def _has_dot(spec: FlashSpec, e: ir.Expr) -> bool:
    """Whether `e` (lets followed) reads the score's dot product."""
    return spec.contains([e], ir.Dot)


def _conjuncts(spec: FlashSpec, mask: ir.Expr) -> list[ir.Expr]:
    out, todo = [], [mask]
    while todo:
        c = spec.resolve(todo.pop())
        if isinstance(c, ir.Call) and c.op is ir.Op.AND:
            todo.extend(c.args)
        else:
            out.append(c)
    return out


def _key_bound(spec: FlashSpec, c: ir.Expr) -> bool:
    """Whether conjunct c is `kj <op> f` or `f <op> kj` with f free of kj: interval analysis
    turns it into key bounds (where f is analysable), so a map would add nothing."""
    if not (isinstance(c, ir.Call) and c.op in _KEY_COMPARISONS):
        return False
    a, b = (spec.resolve(x) for x in c.args)
    kv = frozenset({spec.loop_var})
    for key, other in ((a, b), (b, a)):
        if isinstance(key, ir.Var) and key.name == spec.loop_var and not spec.depends(other, kv):
            return True
    return False


def block_mask(spec: FlashSpec) -> ir.Expr | None:
    """The mask to build a block map from, or None where a map would not pay (no mask, a mask
    that reads the score, or one whose every tensor-reading part is a key bound)."""
    mask = mask_of(spec)
    if mask is None or _has_dot(spec, mask):
        return None
    if any(_reads(spec, c) and not _key_bound(spec, c) for c in _conjuncts(spec, mask)):
        return mask
    return None


def map_axes(spec: FlashSpec, mask: ir.Expr) -> list:
    """The grid axes (not the row axis) the mask depends on: the map has a record per point of
    them and query tile; the others share it (a document mask over B, not over heads)."""
    return [a for a in spec.axes if a is not spec.row and spec.depends(mask, frozenset({a.var}))]


def scratch_factors(spec: FlashSpec, mask: ir.Expr) -> tuple[str, ...]:
    """The word count of `blocks` as grid factors: records of 1 + n_kt words."""
    return (*(a.dim for a in map_axes(spec, mask)), f"ceil_div({spec.row.dim},{spec.BM})",
            f"ceil_div({spec.kv_dim}+{spec.BN},{spec.BN})")


def record_base(w: Writer, spec: FlashSpec, mask: ir.Expr, qtile: str, n_kt: str) -> None:
    """`let blk_rec`: the first word of the record of query tile `qtile` at the current grid point
    (the g_ privates of the map's axes set)."""
    lin = "0u"
    for a in map_axes(spec, mask):
        lin = f"({lin}) * P.d_{a.dim} + u32(g_{a.var})"
    n_qt = f"((P.d_{spec.row.dim} + {spec.BM - 1}u) / {spec.BM}u)"
    w.line(f"let blk_rec = (({lin}) * {n_qt} + {qtile}) * ({n_kt} + 1u);")


def _header(sh: Shader, mask: ir.Expr, w: Writer) -> tuple[list[str], object]:
    """Header, bindings (the tensors the mask and the uniform lets read, then `blocks`) and the
    mask function `keep_fn(qi, kj)`."""
    s = sh.spec
    # a variant's programs share its enable directives (the manifest lists them per variant)
    sh.header(w, sh.plan.family is Family.SUBGROUPS)
    reads = _reads(s, mask)
    for n in s.uniform_lets:
        reads |= _reads(s, s.lets[n])
    inputs = [p.name for p in s.tensors if p.name in reads]
    binds = sh.bindings(w, ["blocks"], inputs)
    sh.privates(w)
    env = sh.env("qi", "kj")
    with w.block("fn keep_fn(qi: i32, kj: i32) -> bool"):
        w.line(f"return {env.hoist(w, mask).render(mask)};")
    return inputs, binds


def _grid_point(sh: Shader, mask: ir.Expr, w: Writer) -> None:
    """Decompose `rem` into the map's axes (the others stay 0) and set the uniform lets."""
    for a in reversed(map_axes(sh.spec, mask)):
        w.line(f"g_{a.var} = i32(rem % P.d_{a.dim});")
        w.line(f"rem = rem / P.d_{a.dim};")
    sh.uniform_lets(w, skip_split=True)


def emit_classify(sh: Shader, mask: ir.Expr) -> Program:
    """One workgroup per (map point, query tile, KV tile): evaluate the mask on the tile's
    valid elements and write the tile's class (tiles outside the key bounds the interval
    analysis gives for the query tile are EMPTY without evaluating it)."""
    s = sh.spec
    BM, BN = s.BM, s.BN
    w = Writer()
    _inputs, binds = _header(sh, mask, w)
    w.line("var<workgroup> seen: atomic<u32>;  // bit 0: a kept element, bit 1: a dropped one")
    with w.block(f"@compute @workgroup_size({CLASSIFY_WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32)"):
        w.line("let wg = wid.x + wid.y * P.grid_stride_x;")
        with w.block("if (wg >= P.grid_total)"):
            w.line("return;")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_kt = (P.d_{s.kv_dim} + {BN - 1}u) / {BN}u;")
        w.line(f"let n_qt = (P.d_{s.row.dim} + {BM - 1}u) / {BM}u;")
        w.line("var rem = wg;")
        w.line("let kt = rem % n_kt;")
        w.line("rem = rem / n_kt;")
        w.line("let qtile = rem % n_qt;")
        w.line("rem = rem / n_qt;")
        _grid_point(sh, mask, w)
        record_base(w, s, mask, "qtile", "n_kt")
        w.line(f"let q0 = i32(qtile) * {BM};")
        w.line(f"let k0 = i32(kt) * {BN};")
        w.line("let r_lo = q0;")
        w.line(f"let r_hi = min(q0 + {BM}, n_rows) - 1;")
        sh.key_bounds(w, "r_lo", "r_hi")
        with w.block("if (lid == 0u)"):
            w.line("atomicStore(&seen, 0u);")
        w.line("workgroupBarrier();")
        w.line("var mine = 0u;")
        with w.block(f"if (k0 < k_hi && k0 + {BN} > k_lo)"):
            with w.block(f"for (var e = lid; e < {BM * BN}u; e = e + {CLASSIFY_WG}u)"):
                w.line(f"let qi = q0 + i32(e / {BN}u);")
                w.line(f"let kj = k0 + i32(e % {BN}u);")
                with w.block("if (qi < n_rows && kj < n_keys)"):
                    w.line("mine = mine | select(2u, 1u, keep_fn(qi, kj));")
        w.line("atomicOr(&seen, mine);")
        w.line("workgroupBarrier();")
        with w.block("if (lid == 0u)"):
            w.line("let f = atomicLoad(&seen);")
            w.line(f"t_blocks[blk_rec + 1u + kt] = select(select({PARTIAL}u, {FULL}u, f == 1u), {EMPTY}u, "
                   "(f & 1u) == 0u);")
    grid = (*(a.dim for a in map_axes(s, mask)), f"ceil_div({s.row.dim},{BM})", f"ceil_div({s.kv_dim},{BN})")
    return Program("classify", w.text(), "main", CLASSIFY_WG, binds, sh.uniforms, grid,
                   frozenset({"f16"}) if sh.half else frozenset(), 4, in_bounds=True,
                   scratch=(("blocks", scratch_factors(s, mask)),))


def emit_compact(sh: Shader, mask: ir.Expr) -> Program:
    """One workgroup per (map point, query tile): list the live KV tiles of the record in
    order, in place (a workgroup prefix sum over each run of COMPACT_WG classes; an entry
    moves only to a lower word, after every class of its run was read)."""
    s = sh.spec
    BM, BN, WG = s.BM, s.BN, COMPACT_WG
    w = Writer()
    sh.header(w, sh.plan.family is Family.SUBGROUPS, with_f16=False)
    binds = sh.bindings(w, ["blocks"], [])
    sh.privates(w)
    w.line(f"var<workgroup> scan: array<u32, {WG}>;")
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32)"):
        w.line("let wg = wid.x + wid.y * P.grid_stride_x;")
        with w.block("if (wg >= P.grid_total)"):
            w.line("return;")
        w.line(f"let n_kt = (P.d_{s.kv_dim} + {BN - 1}u) / {BN}u;")
        w.line(f"let n_qt = (P.d_{s.row.dim} + {BM - 1}u) / {BM}u;")
        w.line("var rem = wg;")
        w.line("let qtile = rem % n_qt;")
        w.line("rem = rem / n_qt;")
        for a in reversed(map_axes(s, mask)):
            w.line(f"g_{a.var} = i32(rem % P.d_{a.dim});")
            w.line(f"rem = rem / P.d_{a.dim};")
        record_base(w, s, mask, "qtile", "n_kt")
        w.line("var n_live = 0u;")
        with w.block(f"for (var c0 = 0u; c0 < n_kt; c0 = c0 + {WG}u)"):
            w.line("let t = c0 + lid;")
            w.line(f"var cls = {EMPTY}u;")
            with w.block("if (t < n_kt)"):
                w.line("cls = t_blocks[blk_rec + 1u + t];")
            w.line(f"let live = select(0u, 1u, cls != {EMPTY}u);")
            w.line("scan[lid] = live;")
            w.line("workgroupBarrier();")
            with w.block(f"for (var d = 1u; d < {WG}u; d = d * 2u)"):
                w.line("let x = scan[lid] + select(0u, scan[lid - min(d, lid)], lid >= d);")
                w.line("workgroupBarrier();")
                w.line("scan[lid] = x;")
                w.line("workgroupBarrier();")
            w.line(f"let run_live = scan[{WG - 1}u];")
            with w.block("if (live == 1u)"):
                w.line(f"t_blocks[blk_rec + 1u + n_live + scan[lid] - 1u] = t | select(0u, {FULL_BIT:#x}u, "
                       f"cls == {FULL}u);")
            w.line("n_live = n_live + run_live;")
            w.line("workgroupBarrier();")
        with w.block("if (lid == 0u)"):
            w.line("t_blocks[blk_rec] = n_live;")
    grid = (*(a.dim for a in map_axes(s, mask)), f"ceil_div({s.row.dim},{BM})")
    return Program("compact", w.text(), "main", WG, binds, sh.uniforms, grid, frozenset(), 4 * WG,
                   in_bounds=True)
