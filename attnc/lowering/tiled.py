"""The tiled main pass: a workgroup per (grid point, query tile[, KV split][, value-column
chunk]); q/k tiles staged in workgroup memory, register-blocked dot products, online softmax
with cross-invocation row reductions (workgroup memory, or subgroup shuffles), P.V."""

from __future__ import annotations

from attnc.ir import nodes as ir
from attnc.lowering.plan import Family, Layout
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, features
from attnc.lowering.wgsl import NAN, NEG_INF, Writer


def _sm(arr: str, idx: str) -> str:
    """One f32 element of a workgroup array of vec4 (stored as vec4 for 16-byte reads)."""
    return f"{arr}[({idx}) >> 2u][({idx}) & 3u]"


def _stage(w: Writer, sh: Shader, sl: ir.Slice, idx: str, first: str, limit: str, base: str,
           rows: int, cols: int, col0: str, col_limit: str, offset: int, transpose: bool,
           flag: bool = False, arr: str = "stage") -> None:
    """Cooperatively copy a rows x cols block of a tensor slice into `stage` (zeros outside).

    Transposed (column-major: element (r, c) at c*rows + r) for q and k, so an invocation
    reads its TM rows or TN keys for one head-dim index as one vec4; row-major for v.
    With `flag`, a non-finite value sets `v_bad` (the P.V loop then takes its careful path).
    """
    lay = sh.lay
    vec = 4 if sl.tensor in sh.vec4 else 1
    n = rows * cols // vec
    with w.block(f"for (var e = lid; e < {n}u; e = e + {lay.WG}u)"):
        w.line(f"let r = e / {cols // vec}u;")
        w.line(f"let c = (e % {cols // vec}u) * {vec}u;")
        w.line(f"let {idx} = {first} + i32(r);")
        w.line(f"let col = {col0} + c;")
        st = sh.smem_t
        if vec == 1:
            w.line(f"var x = {st}(0.0);")
            with w.block(f"if ({idx} < {limit} && col < {col_limit})"):
                w.line(f"x = {st}({sh.read(sl.tensor, f'{base}({idx}) + col * P.s_{sl.tensor}_{sl.axis}')});")
            if flag:
                with w.block("if ((bitcast<u32>(f32(x)) & 0x7f800000u) == 0x7f800000u)"):
                    w.line("atomicOr(&v_bad, 1u);")
            dst = f"{offset}u + c * {rows}u + r" if transpose else f"{offset}u + r * {cols}u + c"
            w.line(f"{_sm(arr, dst)} = x;")
        else:  # the head-dim axis has unit stride and every other stride is a multiple of 4
            w.line(f"var x = vec4<{st}>();")
            with w.block(f"if ({idx} < {limit} && col < {col_limit})"):
                w.line(f"x = {sh.read4_tile(sl.tensor, f'({base}({idx}) + col) >> 2u')};")
            if flag:
                bits = "bitcast<vec4<u32>>(vec4<f32>(x))" if st == "f16" else "bitcast<vec4<u32>>(x)"
                with w.block(f"if (any(({bits} & vec4<u32>(0x7f800000u)) == vec4<u32>(0x7f800000u)))"):
                    w.line("atomicOr(&v_bad, 1u);")
            if transpose:
                for i, comp in enumerate("xyzw"):
                    w.line(f"{_sm(arr, f'{offset}u + (c + {i}u) * {rows}u + r')} = x.{comp};")
            else:
                w.line(f"{arr}[({offset}u + r * {cols}u + c) >> 2u] = x;")


def _loads(w: Writer, name: str, arr: str, base: str, n: int) -> None:
    """`let {name}{k}` for n consecutive f32 at `base` (a multiple of 4 when n >= 4)."""
    if n % 4 == 0:
        for k4 in range(n // 4):
            w.line(f"let {name}v{k4} = {arr}[({base} + {4 * k4}u) >> 2u];")
            for k, comp in enumerate("xyzw"):
                w.line(f"let {name}{4 * k4 + k} = {name}v{k4}.{comp};")
    else:
        for k in range(n):
            w.line(f"let {name}{k} = {_sm(arr, f'{base} + {k}u')};")


def _pv_loop(w: Writer, lay: Layout, vs: int, careful: bool, half: bool = False) -> None:
    """o += p . v over the BN keys of a tile, for one staged chunk of value columns
    (with `half`, p and v are f16 and each product is rounded to f16, then summed in f32)."""
    YPS = lay.DVS // lay.CT
    with w.block(f"for (var j = 0u; j < {lay.BN}u; j = j + 1u)"):
        _loads(w, "v", "stage", f"j * {lay.DVS}u + ct * {YPS}u", YPS)
        _loads(w, "p", "p_sh", f"j * {lay.BM}u + rg * {lay.TM}u", lay.TM)
        for i in range(lay.TM):
            acc = [f"o{i}_{(vs // lay.DVS) * YPS + y}" for y in range(YPS)]
            updates = [f"{a} = {a} + f32(p{i} * v{y});" if half else f"{a} = fma(p{i}, v{y}, {a});"
                       for y, a in enumerate(acc)]
            if careful:
                with w.block(f"if (p{i} != 0.0)"):
                    for u in updates:
                        w.line(u)
            else:
                for u in updates:
                    w.line(u)


def _reduce(w: Writer, lay: Layout, names: list[str], op: str) -> None:
    """Reduce per-row values across the CT invocations of a row group (max or add)."""
    comb = "max({0}, {1})" if op == "max" else "({0} + {1})"
    off = 1
    while off < lay.G:
        for n in names:
            w.line(f"{n} = {comb.format(n, f'subgroupShuffleXor({n}, {off}u)')};")
        off *= 2
    if lay.CT > lay.G:
        groups = lay.CT // lay.G
        with w.block(f"if (ct % {lay.G}u == 0u)"):
            for i, n in enumerate(names):
                w.line(f"red[(rg * {lay.TM}u + {i}u) * {groups}u + ct / {lay.G}u] = {n};")
        w.line("workgroupBarrier();")
        for i, n in enumerate(names):
            base = f"(rg * {lay.TM}u + {i}u) * {groups}u"
            w.line(f"{n} = red[{base}];")
            for g in range(1, groups):
                w.line(f"{n} = {comb.format(n, f'red[{base} + {g}u]')};")
        w.line("workgroupBarrier();")


def emit_main(sh: Shader) -> Program:
    """The main pass: one workgroup per (grid point, query tile[, split][, Dv chunk])."""
    s, lay, plan = sh.spec, sh.lay, sh.plan
    BM, BN, WG, CT, TM, TN, TD, DK, DVC, DVS = (lay.BM, lay.BN, lay.WG, lay.CT, lay.TM, lay.TN,
                                                lay.TD, lay.DK, lay.DVC, lay.DVS)
    w = Writer()
    sh.header(w, plan.family is Family.SUBGROUPS)
    inputs = [p.name for p in s.tensors]
    outputs = ["part"] if s.split_var else (["o", "lse"] if s.lse else ["o"])
    binds = sh.bindings(w, outputs, inputs)
    qres = plan.QRES  # the query tile stays in workgroup memory for the whole KV loop
    stage = max((0 if qres else BM * DK) + BN * DK, BN * DVS)
    kofs = 0 if qres else BM * DK
    groups = CT // lay.G
    st = sh.smem_t
    w.line(f"var<workgroup> stage: array<vec4<{st}>, {stage // 4}>;")
    if qres:
        w.line(f"var<workgroup> q_sh: array<vec4<{st}>, {BM * plan.DQ // 4}>;")
    w.line(f"var<workgroup> p_sh: array<vec4<{st}>, {BM * BN // 4}>;")
    if CT > lay.G:
        w.line(f"var<workgroup> red: array<f32, {BM * groups}>;")
    w.line("var<workgroup> wg_lo: i32;")
    w.line("var<workgroup> wg_hi: i32;")
    w.line("var<workgroup> v_bad: atomic<u32>;  // a staged value is inf/NaN in this tile")
    sh.privates(w)
    sh.functions(w)
    esz = 2 if st == "f16" else 4
    smem = esz * (stage + BM * BN + (BM * plan.DQ if qres else 0)) + 4 * ((BM * groups if CT > lay.G else 0) + 3)
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32)"):
        sh.prologue(w)
        w.line(f"let rg = lid / {CT}u;")
        w.line(f"let ct = lid % {CT}u;")
        w.line(f"let q0 = i32(qtile) * {BM};")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_dot = P.d_{s.head_dim};")
        w.line(f"let n_width = P.d_{s.width};")
        sh.tile_bounds(w, BM, BN)
        w.line("let t_lo = workgroupUniformLoad(&wg_lo);")
        w.line("let t_hi = workgroupUniformLoad(&wg_hi);")
        for i in range(TM):
            w.line(f"var m{i} = {NEG_INF};")
            w.line(f"var l{i} = 0.0;")
            w.line(f"var nan{i} = false;")
            for y in range(TD):
                w.line(f"var o{i}_{y} = 0.0;")
        if qres:  # transposed [d][row], zero past the head dim and the last row
            _stage(w, sh, s.dot.a, "qi", "q0", "n_rows", "q_base", BM, plan.DQ, "0u", "n_dot", 0, True,
                   arr="q_sh")
        with w.block("for (var t = t_lo; t < t_hi; t = t + 1)"):
            w.line(f"let k0 = t * {BN};")
            with w.block("if (lid == 0u)"):
                w.line("atomicStore(&v_bad, 0u);")
            for i in range(TM):
                for x in range(TN):
                    w.line(f"var s{i}_{x} = 0.0;")
            with w.block(f"for (var d0 = 0u; d0 < n_dot; d0 = d0 + {DK}u)"):
                if not qres:
                    _stage(w, sh, s.dot.a, "qi", "q0", "n_rows", "q_base", BM, DK, "d0", "n_dot", 0, True)
                _stage(w, sh, s.dot.b, "kj", "k0", "n_keys", "k_base", BN, DK, "d0", "n_dot", kofs, True)
                w.line("workgroupBarrier();")
                with w.block(f"for (var dd = 0u; dd < {DK}u; dd = dd + 1u)"):
                    if qres:
                        _loads(w, "a", "q_sh", f"(d0 + dd) * {BM}u + rg * {TM}u", TM)
                    else:
                        _loads(w, "a", "stage", f"dd * {BM}u + rg * {TM}u", TM)
                    _loads(w, "b", "stage", f"{kofs}u + dd * {BN}u + ct * {TN}u", TN)
                    for i in range(TM):
                        for x in range(TN):
                            if sh.half:  # an f16 product, summed in f32
                                w.line(f"s{i}_{x} = s{i}_{x} + f32(a{i} * b{x});")
                            else:
                                w.line(f"s{i}_{x} = fma(a{i}, b{x}, s{i}_{x});")
                w.line("workgroupBarrier();")
            # scores, masks and the row max
            for i in range(TM):
                w.line(f"var tmax{i} = {NEG_INF};")
                with w.block(""):
                    w.line(f"let qi = q0 + i32(rg * {TM}u + {i}u);")
                    for x in range(TN):
                        w.line(f"let kj{x} = k0 + i32(ct * {TN}u + {x}u);")
                        w.line(f"s{i}_{x} = select({NEG_INF}, score_fn(s{i}_{x}, qi, kj{x}), "
                               f"kj{x} < n_keys);")
                        w.line(f"nan{i} = nan{i} || is_nan(s{i}_{x});")
                        w.line(f"tmax{i} = max(tmax{i}, s{i}_{x});")
            _reduce(w, lay, [f"tmax{i}" for i in range(TM)], "max")
            for i in range(TM):
                w.line(f"let mn{i} = max(m{i}, tmax{i});")
                w.line(f"let al{i} = select(exp_sub(m{i}, mn{i}), 1.0, is_neg_inf(mn{i}));")
                w.line(f"var ts{i} = 0.0;")
                for x in range(TN):
                    w.line(f"s{i}_{x} = exp_sub(s{i}_{x}, mn{i});")
                    w.line(f"ts{i} = ts{i} + s{i}_{x};")
                    w.line(f"{_sm('p_sh', f'(ct * {TN}u + {x}u) * {BM}u + rg * {TM}u + {i}u')} = {st}(s{i}_{x});")
                w.line(f"m{i} = mn{i};")
            _reduce(w, lay, [f"ts{i}" for i in range(TM)], "add")
            for i in range(TM):
                w.line(f"l{i} = l{i} * al{i} + ts{i};")
                for y in range(TD):
                    w.line(f"o{i}_{y} = o{i}_{y} * al{i};")
            for vs in range(0, DVC, DVS):
                w.line("workgroupBarrier();")
                _stage(w, sh, s.value, "kj", "k0", "n_keys", "v_base", BN, DVS, f"dvc * {DVC}u + {vs}u",
                       "n_width", 0, False, flag=True)
                w.line("workgroupBarrier();")
                # masked keys (p = 0) add nothing, even an inf/NaN value: a tile holding such
                # values takes the careful loop, every other tile the branch-free one
                half = bool(sh.half)
                with w.block("if (atomicLoad(&v_bad) == 0u)"):
                    _pv_loop(w, lay, vs, careful=False, half=half)
                with w.block("else"):
                    _pv_loop(w, lay, vs, careful=True, half=half)
            w.line("workgroupBarrier();")
        _emit_epilogue(w, sh)
    return Program("main", w.text(), "main", WG, binds, sh.uniforms, sh.grid_factors(),
                   features(plan), smem)


def _emit_epilogue(w: Writer, sh: Shader) -> None:
    """Sink, normalisation and the stores (final output, or the split's partial state)."""
    s, lay = sh.spec, sh.lay
    YPS = lay.DVS // lay.CT
    for i in range(lay.TM):
        with w.block(""):
            w.line(f"let qi = q0 + i32(rg * {lay.TM}u + {i}u);")
            if s.sink is not None and not s.split_var:
                w.line("let z = sink_fn(qi);")
                w.line(f"let mf = max(m{i}, z);")
                w.line(f"let a = exp_sub(m{i}, mf);")
                w.line(f"l{i} = l{i} * a + exp_sub(z, mf);")
                w.line(f"nan{i} = nan{i} || is_nan(z);")
                for y in range(lay.TD):
                    w.line(f"o{i}_{y} = o{i}_{y} * a;")
                w.line(f"m{i} = mf;")
            with w.block("if (qi < n_rows)"):
                if s.split_var:
                    w.line(f"let pr = (row_linear(qi) * u32(P.p_{s.split_count}) + "
                           f"u32(g_{s.split_var})) * (n_width + 2u);")
                    with w.block("if (ct == 0u && dvc == 0u)"):
                        w.line(f"t_part[pr] = m{i};")
                        w.line(f"t_part[pr + 1u] = select(l{i}, {NAN}, nan{i});")
                else:
                    w.line(f"let inv = select(1.0 / l{i}, 0.0, l{i} == 0.0);")
                    if s.lse:
                        with w.block("if (ct == 0u && dvc == 0u)"):
                            w.line(f"let lse = select(m{i} + log(l{i}), {NEG_INF}, l{i} == 0.0);")
                            w.line(f"t_lse[lse_base(qi)] = select(lse, {NAN}, nan{i});")
                for y in range(lay.TD):
                    col = f"dvc * {lay.DVC}u + {(y // YPS) * lay.DVS}u + ct * {YPS}u + {y % YPS}u"
                    with w.block(f"if ({col} < n_width)"):
                        if s.split_var:
                            w.line(f"t_part[pr + 2u + {col}] = o{i}_{y};")
                        else:
                            w.line(f"t_o[o_base(qi) + ({col}) * P.s_o_{len(s.axes)}] = "
                                   f"select(o{i}_{y} * inv, {NAN}, nan{i});")
