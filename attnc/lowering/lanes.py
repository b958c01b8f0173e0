"""The lanes strategy: query rows in registers, keys shared across a subgroup's lanes.

Each invocation owns TM query rows. A subgroup of SG lanes walks the keys SG at a time: every
lane reads a different key's k and v rows from storage into registers, then `subgroupShuffle`
hands key c's rows to every lane, one key after the other (online softmax per key). Each
value read from memory feeds SG x TM products. This suits CPU adapters: llvmpipe runs a
subgroup as one SIMD vector and turns a load whose address is not a compile-time constant
into one scalar load per lane, so a key read at the same address by every lane (the rows
strategy) costs as much as SG different keys. SG is a compile-time constant (the plan's SGB)
so that the driver unrolls the key loop and each shuffle's lane becomes a constant (an
element extract in llvmpipe): 1.4x faster there than a loop over the run-time size.
Measured in docs/BENCHMARKS.md.

A shader run where the subgroup size is not SG writes NaN: the check is in the shader, so
users of `attnc compile` output see it too.
"""

from __future__ import annotations

import contextlib

from attnc.lowering.blocks import FULL_BIT, record_base
from attnc.lowering.plan import Dialect
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, features
from attnc.lowering.wgsl import NAN, NEG_INF, Writer


def emit_lanes(sh: Shader) -> Program:
    """TM rows per invocation; each step reads one key per lane and shuffles them to all."""
    s, plan = sh.spec, sh.plan
    BM, BN, SG, R = s.BM, s.BN, plan.subgroup_width, plan.rows_per_invocation
    D4, C4 = plan.query_dim // 4, plan.value_columns // 4
    NW = BM // R  # invocations per workgroup
    w = Writer()
    if plan.dialect is Dialect.TINT:  # the key loop's bounds come from subgroup reductions
        w.line("diagnostic(off, subgroup_uniformity);")
    sh.header(w, True)
    binds = sh.main_bindings(w)
    sh.privates(w)
    sh.functions(w)
    qt, kt, vt = s.dot.a.tensor, s.dot.b.tensor, s.value.tensor
    rows = range(R)
    with w.block(f"@compute @workgroup_size({NW}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32, "
                 "@builtin(subgroup_size) sg_size: u32)"):
        sh.prologue(w)
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let nd = min(P.d_{s.head_dim}, {4 * D4}u) >> 2u;")
        w.line(f"let c0 = dvc * {4 * C4}u;")
        w.line(f"let n_cols = min(P.d_{s.width} - c0, {4 * C4}u);")
        w.line("let nc = (n_cols + 3u) >> 2u;")
        w.line(f"let bad = sg_size != {SG}u;  // the key steps below assume {SG} lanes")
        w.line("var lo = n_keys;")
        w.line("var hi = 0;")
        for r in rows:
            w.line(f"let qi{r} = i32(qtile) * {BM} + {r * NW} + i32(lid);")
            w.line(f"let ok{r} = qi{r} < n_rows;")
            w.line(f"let qc{r} = min(qi{r}, n_rows - 1);")
            w.line(f"var klo{r} = 0;")
            w.line(f"var khi{r} = 0;")
            with w.block(f"if (ok{r})"):
                sh.row_key_bounds(w, f"qi{r}", BN)
                w.line(f"klo{r} = max(k_lo, 0);")
                w.line(f"khi{r} = min(k_hi, n_keys);")
            w.line(f"lo = min(lo, klo{r});")
            w.line(f"hi = max(hi, khi{r});")
            w.line(f"let qb{r} = q_base(qc{r}) >> 2u;")
            for d in range(D4):
                w.line(f"let q{r}_{d} = select(vec4<f32>(0.0), {sh.read4(qt, f'qb{r} + min({d}u, nd - 1u)')}, "
                       f"{d}u < nd);")
            for c in range(C4):
                w.line(f"var acc{r}_{c} = vec4<f32>(0.0);")
            w.line(f"var m{r} = {NEG_INF};")
            w.line(f"var l{r} = 0.0;")
            w.line(f"var nan{r} = false;")
        # every lane runs the same key steps: the subgroup's union of the rows' ranges
        w.line("lo = subgroupMin(lo);")
        w.line("hi = subgroupMax(hi);")
        listed = sh.block_mask is not None
        tiles = contextlib.ExitStack()  # the loop over listed tiles around the key loop
        if listed:  # only the KV tiles the block map lists as live (lowering/blocks.py)
            w.line(f"let n_kt = (P.d_{s.kv_dim} + {BN - 1}u) / {BN}u;")
            record_base(w, s, sh.block_mask, "qtile", "n_kt")
            w.line("let n_live = t_blocks[blk_rec];")
            tiles.enter_context(w.block("for (var li = 0u; li < n_live; li = li + 1u)"))
            w.line("let listed = t_blocks[blk_rec + 1u + min(li, n_kt - 1u)];")
            w.line(f"let tk0 = i32(listed & {FULL_BIT - 1:#x}u) * {BN};")
            w.line(f"let tile_full = listed >= {FULL_BIT:#x}u;")
            keys = f"for (var j0 = max(lo, tk0); j0 < min(hi, tk0 + {BN}); j0 = j0 + {SG})"
        else:
            keys = f"for (var j0 = lo; j0 < hi; j0 = j0 + {SG})"
        with w.block(keys):
            w.line("let kb = k_base(clamp(j0 + i32(lane), 0, n_keys - 1)) >> 2u;")
            if kt in sh.quant:  # the row's first word once per key
                w.line(f"let kw = {sh.quant_row_words(kt, 'kb')};")
            if sh.block_quantized(kt):
                sh.read_blocks(w, kt, "k", "kw", D4, "0u", f"(P.d_{s.head_dim} >> 5u) - 1u")
                for d in range(D4):  # vec4s past the head dim (the padded query dim) are 0
                    w.line(f"let k_{d} = select(vec4<f32>(0.0), kr_{d}, {d}u < nd);")
            else:
                for d in range(D4):
                    c = f"min({d}u, nd - 1u)"
                    k4 = f"ldr4_{kt}(kw, {c})" if kt in sh.quant else sh.read4(kt, f"kb + {c}")
                    w.line(f"let k_{d} = select(vec4<f32>(0.0), {k4}, {d}u < nd);")
            if vt in sh.quant:  # likewise for V: the row's first word, then vec4 c0 / 4 + x of it
                w.line(f"let vw = {sh.quant_row_words(vt, 'v_base(clamp(j0 + i32(lane), 0, n_keys - 1)) >> 2u')};")
                if sh.block_quantized(vt) and C4 % 8 == 0:  # c0 starts a block
                    # columns past Dv read a valid block (clamped) and are never stored
                    sh.read_blocks(w, vt, "v", "vw", C4, "(c0 >> 5u)", f"(P.d_{s.width} >> 5u) - 1u")
                    for x in range(C4):
                        w.line(f"let v_{x} = vr_{x};")
                else:
                    for x in range(C4):
                        w.line(f"let v_{x} = ldr4_{vt}(vw, (c0 >> 2u) + min({x}u, nc - 1u));")
            else:
                w.line("let vb = (v_base(clamp(j0 + i32(lane), 0, n_keys - 1)) + c0) >> 2u;")
                for x in range(C4):
                    w.line(f"let v_{x} = {sh.read4(vt, f'vb + min({x}u, nc - 1u)')};")
            with w.block(f"for (var c = 0u; c < {SG}u; c = c + 1u)"):
                w.line("let j = j0 + i32(c);")
                w.line("let jc = min(j, n_keys - 1);")
                for r in rows:
                    w.line(f"var t{r} = vec4<f32>(0.0);")
                for d in range(D4):
                    w.line(f"let kk{d} = subgroupShuffle(k_{d}, c);")
                    for r in rows:
                        w.line(f"t{r} = fma(q{r}_{d}, kk{d}, t{r});")
                for r in rows:
                    if listed:  # a full tile drops the mask
                        w.line(f"var sc{r}: f32;")
                        with w.block("if (tile_full)"):
                            w.line(f"sc{r} = score_free_fn(dot(t{r}, vec4<f32>(1.0)), qc{r}, jc);")
                        with w.block("else"):
                            w.line(f"sc{r} = score_fn(dot(t{r}, vec4<f32>(1.0)), qc{r}, jc);")
                    else:
                        w.line(f"let sc{r} = score_fn(dot(t{r}, vec4<f32>(1.0)), qc{r}, jc);")
                    w.line(f"let s{r} = select({NEG_INF}, sc{r}, j >= klo{r} && j < khi{r});")
                    w.line(f"nan{r} = nan{r} || is_nan(s{r});")
                    w.line(f"let mn{r} = max(m{r}, s{r});")
                    w.line(f"let al{r} = select(exp_sub(m{r}, mn{r}), 1.0, is_neg_inf(mn{r}));")
                    w.line(f"let p{r} = exp_sub(s{r}, mn{r});")
                    w.line(f"l{r} = l{r} * al{r} + p{r};")
                    w.line(f"m{r} = mn{r};")
                for x in range(C4):
                    w.line(f"let vv{x} = subgroupShuffle(v_{x}, c);")
                    for r in rows:  # masked keys add nothing, even a NaN value
                        w.line(f"let a{r}_{x} = acc{r}_{x} * al{r};")
                        w.line(f"acc{r}_{x} = select(a{r}_{x}, fma(vec4<f32>(p{r}), vv{x}, a{r}_{x}), p{r} != 0.0);")
        tiles.close()
        for r in rows:
            with w.block(f"if (ok{r})"):
                _epilogue(sh, w, r, C4)
    return Program("main", w.text(), "main", NW, binds, sh.uniforms, sh.grid_factors(), features(plan), 0,
                   in_bounds=True)


def _epilogue(sh: Shader, w: Writer, r: int, C4: int) -> None:
    """Row r's sink, then its output (or its split partial state), NaN when `bad`."""
    s = sh.spec
    qi = f"qi{r}"
    if s.sink is not None and not s.split_var:
        def scale(a: str) -> None:
            for c in range(C4):
                w.line(f"acc{r}_{c} = acc{r}_{c} * {a};")

        sh.merge_sink(w, qi, f"m{r}", f"l{r}", f"nan{r}", scale)
    w.line(f"nan{r} = nan{r} || bad;")
    if s.split_var:
        w.line(f"let pr = {sh.part_row(qi, f'P.d_{s.width}')};")
        with w.block("if (dvc == 0u)"):
            w.line(f"t_part[pr] = select(m{r}, {NAN}, bad);")
            w.line(f"t_part[pr + 1u] = select(l{r}, {NAN}, nan{r});")
        for c in range(C4):
            for e in range(4):
                with w.block(f"if ({4 * c + e}u < n_cols)"):
                    w.line(f"t_part[pr + 2u + c0 + {4 * c + e}u] = acc{r}_{c}[{e}];")
        return
    w.line(f"let inv = select(1.0 / l{r}, 0.0, l{r} == 0.0);")
    if s.lse:
        with w.block("if (dvc == 0u)"):
            w.line(f"let lse = select(m{r} + log(l{r}), {NEG_INF}, l{r} == 0.0);")
            w.line(f"t_lse[lse_base({qi})] = select(lse, {NAN}, nan{r});")
    w.line(f"let ob = o_base({qi});")
    if sh.half_out:  # float16: columns 4c + e, 4c + e + 1 (e = 0, 2) as one word of halves
        for c in range(C4):
            for e in (0, 2):
                with w.block(f"if ({4 * c + e}u < n_cols)"):
                    lo = f"select(acc{r}_{c}[{e}] * inv, {NAN}, nan{r})"
                    hi = f"select(select(acc{r}_{c}[{e + 1}] * inv, {NAN}, nan{r}), 0.0, {4 * c + e + 1}u >= n_cols)"
                    sh.store_o2(w, "ob", f"c0 + {4 * c + e}u", lo, hi)
        return
    for c in range(C4):
        for e in range(4):
            with w.block(f"if ({4 * c + e}u < n_cols)"):
                w.line(f"t_o[ob + (c0 + {4 * c + e}u) * P.s_o_{len(s.axes)}] = "
                       f"select(acc{r}_{c}[{e}] * inv, {NAN}, nan{r});")

