"""The split-KV combine pass: log-sum-exp merge of the partial states, sink, normalise."""

from __future__ import annotations

from attnc.errors import LoweringError
from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec
from attnc.lowering.plan import Family
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader
from attnc.lowering.wgsl import NEG_INF, Writer

COLS = 32  # output columns per workgroup: one per lane of a split group
CU = 8  # splits per split group per loop iteration (independent loads in flight)
MAX_GROUPS = 8


def combine_groups(nsplit: int) -> int:
    """Split groups for a combine of nsplit splits: enough that each merges at most CU of them."""
    return min(MAX_GROUPS, 1 << max(0, (-(-nsplit // CU) - 1).bit_length()))


def _tree(names: list[str], comb: str) -> str:
    """A balanced reduction expression over names."""
    while len(names) > 1:
        names = [comb.format(a, b) for a, b in zip(names[0::2], names[1::2], strict=True)] + \
            (names[-1:] if len(names) % 2 else [])
    return names[0]


def emit_combine(sh: Shader) -> Program:
    """The split-KV combine: log-sum-exp merge of the partial states, sink, normalise, store.

    One workgroup per (row, chunk of COLS output columns; 2 x COLS for a float16 o, two
    adjacent columns per lane), COLS x CSG invocations: split group g merges every CSG-th
    split for its column(s), then the CSG groups' sums meet in workgroup memory. Spreading the
    splits over invocations keeps every load of a row in flight at once; one invocation per
    output element walking all splits measured 29 us for 64 splits of dec_h128 on an H200,
    most of it load latency.
    """
    s = sh.spec
    SG = sh.plan.combine_groups or MAX_GROUPS
    if SG not in (1, 2, 4, 8):
        raise LoweringError(f"CSG={SG} split groups must be 1, 2, 4 or 8")
    WG = COLS * SG
    # columns per lane: a float16 o is stored in pairs of halves, so each lane merges two
    # adjacent columns (c even, c + 1) and writes their word; an f32 o one column
    CPL = 2 if sh.half_out else 1
    w = Writer()
    sh.header(w, sh.plan.family is Family.SUBGROUPS, with_f16=False)
    inputs = [p.name for p in s.tensors if p.name in _combine_reads(s)] + ["part"]
    outputs = ["o", "lse"] if s.lse else ["o"]
    binds = sh.bindings(w, outputs, inputs)
    w.line(f"var<workgroup> c_m: array<f32, {WG}>;")
    w.line(f"var<workgroup> c_l: array<f32, {WG}>;")
    w.line(f"var<workgroup> c_o: array<f32, {WG}>;")
    if CPL == 2:
        w.line(f"var<workgroup> c_o1: array<f32, {WG}>;")
    sh.privates(w)
    sh.functions(w, main=False)
    ns = f"u32(P.p_{s.split_count})"
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: "
                 "vec3<u32>, @builtin(local_invocation_index) lid: u32)"):
        w.line("let wg = wid.x + wid.y * P.grid_stride_x;")
        with w.block("if (wg >= P.grid_total)"):  # uniform per workgroup
            w.line("return;")
        w.line(f"let n_width = P.d_{s.width};")
        if CPL == 1:
            w.line(f"let n_chunks = (n_width + {COLS - 1}u) / {COLS}u;")
            w.line(f"let col = (wg % n_chunks) * {COLS}u + lid % {COLS}u;")
            w.line("let cin = min(col, n_width - 1u);  // lanes past the width load a valid column, never store")
        else:
            w.line(f"let n_chunks = (n_width + {COLS * CPL - 1}u) / {COLS * CPL}u;")
            w.line(f"let col = (wg % n_chunks) * {COLS * CPL}u + (lid % {COLS}u) * 2u;")
            w.line("let cin = min(col, n_width - 1u);  // lanes past the width load a valid column, never store")
            w.line("let cin1 = min(col + 1u, n_width - 1u);")
        w.line(f"let sg = lid / {COLS}u;")
        w.line("var rem = wg / n_chunks;")
        for a in reversed(s.axes):
            if a is s.row:
                w.line(f"let qi = i32(rem % P.d_{a.dim});")
            else:
                w.line(f"g_{a.var} = i32(rem % P.d_{a.dim});")
            w.line(f"rem = rem / P.d_{a.dim};")
        sh.uniform_lets(w, skip_split=True)
        w.line(f"let base = row_linear(qi) * {ns};")
        w.line(f"let nsp = {ns};")
        step = f"{SG * CU}u"
        w.line(f"var mx = {NEG_INF};")
        with w.block(f"for (var j = sg; j < nsp; j = j + {step})"):
            for u in range(CU):  # a clamped index repeats the last split: harmless for a max
                w.line(f"mx = max(mx, t_part[(base + min(j + {u * SG}u, nsp - 1u)) * (n_width + 2u)]);")
        w.line("c_m[lid] = mx;")
        w.line("workgroupBarrier();")
        w.line(f"mx = {_tree([f'c_m[{COLS * g}u]' for g in range(SG)], 'max({0}, {1})')};")
        w.line("var l = 0.0;")
        w.line("var o = 0.0;")
        if CPL == 2:
            w.line("var o1 = 0.0;")
        with w.block(f"for (var j = sg; j < nsp; j = j + {step})"):
            for u in range(CU):
                w.line(f"let sp{u} = j + {u * SG}u;")
                w.line(f"let pr{u} = (base + min(sp{u}, nsp - 1u)) * (n_width + 2u);")
                w.line(f"let wt{u} = select(0.0, select(exp_sub(t_part[pr{u}], mx), 0.0, is_neg_inf(mx)), "
                       f"sp{u} < nsp);")
                w.line(f"l = l + select(0.0, t_part[pr{u} + 1u] * wt{u}, sp{u} < nsp);")
                w.line(f"o = o + select(0.0, t_part[pr{u} + 2u + cin] * wt{u}, sp{u} < nsp);")
                if CPL == 2:
                    w.line(f"o1 = o1 + select(0.0, t_part[pr{u} + 2u + cin1] * wt{u}, sp{u} < nsp);")
        w.line("c_l[lid] = l;")
        w.line("c_o[lid] = o;")
        if CPL == 2:
            w.line("c_o1[lid] = o1;")
        w.line("workgroupBarrier();")
        with w.block("if (sg == 0u && col < n_width)"):
            w.line(f"l = {_tree([f'c_l[lid + {COLS * g}u]' for g in range(SG)], '({0} + {1})')};")
            w.line(f"o = {_tree([f'c_o[lid + {COLS * g}u]' for g in range(SG)], '({0} + {1})')};")
            if CPL == 2:
                w.line(f"o1 = {_tree([f'c_o1[lid + {COLS * g}u]' for g in range(SG)], '({0} + {1})')};")
            if s.sink is not None:
                w.line("let z = sink_fn(qi);")
                w.line("let mf = max(mx, z);")
                w.line("let a = sink_scale(mx, mf, z);")
                w.line("l = select(l * a + sink_term(z, mf), z, is_nan(z));")
                w.line("o = o * a;")
                if CPL == 2:
                    w.line("o1 = o1 * a;")
                w.line("mx = mf;")
            if CPL == 2:  # the half past an odd Dv is the row's padding: 0
                sh.store_o2(w, "o_base(qi)", "col", "select(o / l, 0.0, l == 0.0)",
                            "select(select(o1 / l, 0.0, l == 0.0), 0.0, col + 1u >= n_width)")
            else:
                w.line(f"t_o[o_base(qi) + col * P.s_o_{len(s.axes)}] = select(o / l, 0.0, l == 0.0);")
            if s.lse:
                with w.block("if (col == 0u)"):
                    w.line(f"t_lse[lse_base(qi)] = select(mx + log(l), {NEG_INF}, l == 0.0);")
    grid = tuple(a.dim for a in s.axes) + (f"ceil_div({s.width},{COLS * CPL})",)
    return Program("combine", w.text(), "main", WG, binds, sh.uniforms, grid, frozenset(), 4 * (2 + CPL) * WG,
                   in_bounds=True)


def _combine_reads(s: FlashSpec) -> set[str]:
    """Tensors the combine pass reads: those in the sink logit and the uniform lets."""
    exprs = [s.lets[n] for n in s.uniform_lets]
    if s.sink is not None:
        exprs.append(s.sink)
    return {x.tensor for e in exprs for x in ir.walk_expr(e) if isinstance(x, ir.Load)}
