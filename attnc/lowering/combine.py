"""The split-KV combine pass: log-sum-exp merge of the partial states, sink, normalise."""

from __future__ import annotations

from attnc.ir import nodes as ir
from attnc.lowering.analyze import FlashSpec
from attnc.lowering.plan import Family
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader
from attnc.lowering.wgsl import NEG_INF, Writer

COMBINE_WG = 64
CU = 8  # splits merged per loop iteration


def _tree(names: list[str], comb: str) -> str:
    """A balanced reduction expression over names."""
    while len(names) > 1:
        names = [comb.format(a, b) for a, b in zip(names[0::2], names[1::2], strict=True)] + \
            (names[-1:] if len(names) % 2 else [])
    return names[0]


def emit_combine(sh: Shader) -> Program:
    """The split-KV combine: log-sum-exp merge of the partial states, sink, normalise, store."""
    s = sh.spec
    w = Writer()
    sh.header(w, sh.plan.family is Family.SUBGROUPS, with_f16=False)
    inputs = [p.name for p in s.tensors if p.name in _combine_reads(s)] + ["part"]
    outputs = ["o", "lse"] if s.lse else ["o"]
    binds = sh.bindings(w, outputs, inputs)
    sh.privates(w)
    sh.functions(w, main=False)
    ns = f"u32(P.p_{s.split_count})"
    with w.block(f"@compute @workgroup_size({COMBINE_WG}) fn main(@builtin(workgroup_id) wid: "
                 "vec3<u32>, @builtin(local_invocation_index) lid: u32)"):
        w.line("let wg = wid.x + wid.y * P.grid_stride_x;")
        w.line(f"let idx = wg * {COMBINE_WG}u + lid;")
        w.line(f"let n_width = P.d_{s.width};")
        total = " * ".join([f"P.d_{a.dim}" for a in s.axes] + ["n_width"])
        with w.block(f"if (wg >= P.grid_total || idx >= {total})"):
            w.line("return;")
        w.line("let col = idx % n_width;")
        w.line("var rem = idx / n_width;")
        for a in reversed(s.axes):
            if a is s.row:
                w.line(f"let qi = i32(rem % P.d_{a.dim});")
            else:
                w.line(f"g_{a.var} = i32(rem % P.d_{a.dim});")
            w.line(f"rem = rem / P.d_{a.dim};")
        sh.uniform_lets(w, skip_split=True)
        w.line(f"let base = row_linear(qi) * {ns};")
        # CU splits per iteration, independent loads in flight (a long split loop is latency
        # bound: with 4 per iteration the combine of 64 splits measured 17 us on an H200)
        w.line(f"let nsp = {ns};")
        for u in range(CU):
            w.line(f"var mx{u} = {NEG_INF};")
        with w.block(f"for (var j = 0u; j < nsp; j = j + {CU}u)"):
            for u in range(CU):  # a clamped index repeats the last split: harmless for a max
                w.line(f"mx{u} = max(mx{u}, t_part[(base + min(j + {u}u, nsp - 1u)) * (n_width + 2u)]);")
        w.line(f"var mx = {_tree([f'mx{u}' for u in range(CU)], 'max({0}, {1})')};")
        for u in range(CU):
            w.line(f"var l{u} = 0.0;")
            w.line(f"var o{u} = 0.0;")
        with w.block(f"for (var j = 0u; j < nsp; j = j + {CU}u)"):
            for u in range(CU):
                w.line(f"let pr{u} = (base + min(j + {u}u, nsp - 1u)) * (n_width + 2u);")
                w.line(f"let wt{u} = select(0.0, select(exp_sub(t_part[pr{u}], mx), 0.0, is_neg_inf(mx)), "
                       f"j + {u}u < nsp);")
                w.line(f"l{u} = l{u} + select(0.0, t_part[pr{u} + 1u] * wt{u}, j + {u}u < nsp);")
                w.line(f"o{u} = o{u} + select(0.0, t_part[pr{u} + 2u + col] * wt{u}, j + {u}u < nsp);")
        w.line(f"var l = {_tree([f'l{u}' for u in range(CU)], '({0} + {1})')};")
        w.line(f"var o = {_tree([f'o{u}' for u in range(CU)], '({0} + {1})')};")
        if s.sink is not None:
            w.line("let z = sink_fn(qi);")
            w.line("let mf = max(mx, z);")
            w.line("let a = exp_sub(mx, mf);")
            w.line("l = select(l * a + exp_sub(z, mf), z, is_nan(z));")
            w.line("o = o * a;")
            w.line("mx = mf;")
        w.line(f"t_o[o_base(qi) + col * P.s_o_{len(s.axes)}] = select(o / l, 0.0, l == 0.0);")
        if s.lse:
            with w.block("if (col == 0u)"):
                w.line(f"t_lse[lse_base(qi)] = select(mx + log(l), {NEG_INF}, l == 0.0);")
    total_f = "*".join([a.dim for a in s.axes] + [s.width])
    return Program("combine", w.text(), "main", COMBINE_WG, binds, sh.uniforms,
                   (f"ceil_div({total_f},{COMBINE_WG})",), frozenset(), 0)


def _combine_reads(s: FlashSpec) -> set[str]:
    """Tensors the combine pass reads: those in the sink logit and the uniform lets."""
    exprs = [s.lets[n] for n in s.uniform_lets]
    if s.sink is not None:
        exprs.append(s.sink)
    return {x.tensor for e in exprs for x in ir.walk_expr(e) if isinstance(x, ir.Load)}
