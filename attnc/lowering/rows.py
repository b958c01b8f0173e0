"""The row-per-invocation strategy: each invocation owns one query row and walks its keys.

No workgroup memory and no barriers: every invocation keeps its query row and output
accumulator in registers, and invocations of a SIMD group read the same key at the same
time (uniform addresses). That suits CPU adapters (lavapipe vectorises across
invocations, and lane-varying loads become slow gathers) and short rows; the tiled
strategy (flash.py) suits GPUs. Which is faster on a device is decided by measurement.
"""

from __future__ import annotations

from attnc.errors import LoweringError
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, features
from attnc.lowering.wgsl import NAN, NEG_INF, Writer


def emit_rows(sh: Shader) -> Program:
    """One invocation per query row; KC keys per online-softmax step."""
    s, plan = sh.spec, sh.plan
    BM, BN, KC, DQ, DVC = s.BM, s.BN, plan.keys_per_step, plan.query_dim, plan.value_columns
    if sh.half_out and DVC % 2:
        raise LoweringError(f"DVC={DVC} must be even for a float16 output (its columns are stored in pairs)")
    w = Writer()
    sh.header(w, False)
    binds = sh.main_bindings(w)
    sh.privates(w)
    sh.functions(w)
    qt, kt, vt = s.dot.a.tensor, s.dot.b.tensor, s.value.tensor
    with w.block(f"@compute @workgroup_size({BM}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32)"):
        sh.prologue(w)
        w.line(f"let qi = i32(qtile) * {BM} + i32(lid);")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        with w.block("if (qi >= n_rows)"):
            w.line("return;")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_dot = min(P.d_{s.head_dim}, {DQ}u);")
        w.line(f"let c0 = dvc * {DVC}u;")
        w.line(f"let n_cols = min(P.d_{s.width} - c0, {DVC}u);")
        # this row's key range: mask-implied bounds, then the split's share of KV tiles
        sh.row_key_bounds(w, "qi", BN)
        vec = 4 if qt in sh.vec4 else 1
        vt_ = "vec4<f32>" if vec == 4 else "f32"
        nd, nc = ("(n_dot >> 2u)", "(n_cols >> 2u)") if vec == 4 else ("n_dot", "n_cols")
        w.line(f"var qr: array<{vt_}, {DQ // vec}>;")
        w.line("let qb = q_base(qi);")
        with w.block(f"for (var d = 0u; d < {nd}; d = d + 1u)"):
            if vec == 4:  # unit stride on the head dim, other strides multiples of 4
                w.line(f"qr[d] = {sh.read4(qt, '(qb >> 2u) + d')};")
            else:
                w.line(f"qr[d] = {sh.read(qt, f'qb + d * P.s_{qt}_{s.dot.a.axis}')};")
        w.line(f"var acc: array<{vt_}, {DVC // vec}>;")
        w.line(f"var m = {NEG_INF};")
        w.line("var l = 0.0;")
        w.line("var nan = false;")
        with w.block(f"for (var j0 = max(k_lo, 0); j0 < k_hi; j0 = j0 + {KC})"):
            w.line(f"var cmax = {NEG_INF};")
            for c in range(KC):
                w.line(f"var s{c} = {NEG_INF};")
                with w.block(f"if (j0 + {c} < k_hi)"):
                    w.line(f"let kb = k_base(j0 + {c});")
                    w.line("var dot_ = 0.0;")
                    with w.block(f"for (var d = 0u; d < {nd}; d = d + 1u)"):
                        if vec == 4:
                            w.line(f"dot_ = dot_ + dot(qr[d], {sh.read4(kt, '(kb >> 2u) + d')});")
                        else:
                            w.line(f"dot_ = fma(qr[d], {sh.read(kt, f'kb + d * P.s_{kt}_{s.dot.b.axis}')}, dot_);")
                    w.line(f"s{c} = score_fn(dot_, qi, j0 + {c});")
                w.line(f"nan = nan || is_nan(s{c});")
                w.line(f"cmax = max(cmax, s{c});")
            w.line("let mn = max(m, cmax);")
            w.line("let al = select(exp_sub(m, mn), 1.0, is_neg_inf(mn));")
            w.line("l = l * al;")
            with w.block(f"for (var d = 0u; d < {nc}; d = d + 1u)"):
                w.line("acc[d] = acc[d] * al;")
            for c in range(KC):
                w.line(f"let p{c} = exp_sub(s{c}, mn);")
                w.line(f"l = l + p{c};")
                with w.block(f"if (p{c} != 0.0)"):  # masked keys add nothing, even a NaN value
                    w.line(f"let vb = v_base(j0 + {c});")
                    with w.block(f"for (var d = 0u; d < {nc}; d = d + 1u)"):
                        if vec == 4:
                            v = sh.read4(vt, "((vb + c0) >> 2u) + d")
                            w.line(f"acc[d] = fma(vec4<f32>(p{c}), {v}, acc[d]);")
                        else:
                            v = sh.read(vt, f"vb + (c0 + d) * P.s_{vt}_{s.value.axis}")
                            w.line(f"acc[d] = fma(p{c}, {v}, acc[d]);")
            w.line("m = mn;")
        acc = "acc[d >> 2u][d & 3u]" if vec == 4 else "acc[d]"
        if s.sink is not None and not s.split_var:
            def scale(a: str) -> None:
                with w.block(f"for (var d = 0u; d < {nc}; d = d + 1u)"):
                    w.line(f"acc[d] = acc[d] * {a};")

            sh.merge_sink(w, "qi", "m", "l", "nan", scale)
        if s.split_var:
            w.line(f"let pr = {sh.part_row('qi', f'P.d_{s.width}')};")
            with w.block("if (dvc == 0u)"):
                w.line("t_part[pr] = m;")
                w.line(f"t_part[pr + 1u] = select(l, {NAN}, nan);")
            with w.block("for (var d = 0u; d < n_cols; d = d + 1u)"):
                w.line(f"t_part[pr + 2u + c0 + d] = {acc};")
        else:
            w.line("let inv = select(1.0 / l, 0.0, l == 0.0);")
            if s.lse:
                with w.block("if (dvc == 0u)"):
                    w.line(f"let lse = select(m + log(l), {NEG_INF}, l == 0.0);")
                    w.line(f"t_lse[lse_base(qi)] = select(lse, {NAN}, nan);")
            w.line("let ob = o_base(qi);")
            if sh.half_out:  # float16: columns in pairs (DVC is even, so c0 + d is), one word each
                acc1 = "acc[(d + 1u) >> 2u][(d + 1u) & 3u]" if vec == 4 else "acc[d + 1u]"
                with w.block("for (var d = 0u; d < n_cols; d = d + 2u)"):
                    sh.store_o2(w, "ob", "c0 + d", f"select({acc} * inv, {NAN}, nan)",
                                f"select(select({acc1} * inv, {NAN}, nan), 0.0, d + 1u >= n_cols)")
            else:
                with w.block("for (var d = 0u; d < n_cols; d = d + 1u)"):
                    w.line(f"t_o[ob + (c0 + d) * P.s_o_{len(s.axes)}] = select({acc} * inv, {NAN}, nan);")
    return Program("main", w.text(), "main", BM, binds, sh.uniforms, sh.grid_factors(), features(plan), 0,
                   in_bounds=True)
