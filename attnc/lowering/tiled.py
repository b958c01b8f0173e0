"""The tiled main pass: a workgroup per (grid point, query tile[, KV split][, value-column
chunk]); q/k tiles staged in workgroup memory, register-blocked dot products, online softmax
with cross-invocation row reductions (workgroup memory, or subgroup shuffles), P.V."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from attnc.ir import nodes as ir
from attnc.lowering.plan import Family, Layout
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, features
from attnc.lowering.wgsl import NAN, NEG_INF, Writer


def _sm(arr: str, idx: str) -> str:
    """One f32 element of a workgroup array of vec4 (stored as vec4 for 16-byte reads)."""
    return f"{arr}[({idx}) >> 2u][({idx}) & 3u]"


@dataclass(frozen=True)
class _Copy:
    """A rows x cols block of a tensor slice to stage in workgroup array `arr` at `offset`.

    Row `r` is index `first + r` (valid below `limit`), column `c` is `col0 + c` (valid
    below `col_limit`); `base(idx)` is the row's element offset. Transposed (column-major:
    element (r, c) at c*rows + r) for q and k, so an invocation reads its TM rows or TN keys
    for one head-dim index as one vec4; row-major for v. With `flag`, a non-finite value
    sets `v_bad` (the P.V loop then takes its careful path).
    """

    sl: ir.Slice
    idx: str
    first: str
    limit: str
    base: str
    rows: int
    cols: int
    col0: str
    col_limit: str
    offset: int = 0
    transpose: bool = True
    flag: bool = False
    arr: str = "stage"

    def at(self, first: str, col0: str) -> _Copy:
        """The same block for other rows and columns (the next chunk or tile)."""
        return replace(self, first=first, col0=col0)


def _vec(sh: Shader, cp: _Copy) -> int:
    """Elements per load of the block: 4 when its tensor is read as vec4."""
    return 4 if cp.sl.tensor in sh.vec4 else 1


def _reg_type(sh: Shader, cp: _Copy) -> str:
    """The WGSL type of one load of the block."""
    return f"vec4<{sh.smem_t}>" if _vec(sh, cp) == 4 else sh.smem_t


def _count(sh: Shader, cp: _Copy) -> tuple[int, int]:
    """(elements or vec4s of the block, copies per invocation)."""
    n = cp.rows * cp.cols // _vec(sh, cp)
    return n, -(-n // sh.lay.WG)


def _element(w: Writer, sh: Shader, cp: _Copy, e: str | None, n: int, body: Callable[[], None]) -> None:
    """`let e` (unless e is None: a loop variable), its row r and column c, then `body`
    (skipped past the block's end)."""
    vec = _vec(sh, cp)
    if e is not None:
        w.line(f"let e = {e};")
    with w.block("" if e is None or n % sh.lay.WG == 0 else f"if (e < {n}u)"):
        w.line(f"let r = e / {cp.cols // vec}u;")
        w.line(f"let c = (e % {cp.cols // vec}u) * {vec}u;")
        body()


def _fetch(w: Writer, sh: Shader, cp: _Copy, reg: str) -> None:
    """reg = the element at (r, c) from storage, zero outside the slice."""
    w.line(f"{reg} = {_reg_type(sh, cp)}();")
    w.line(f"let {cp.idx} = {cp.first} + i32(r);")
    w.line(f"let col = {cp.col0} + c;")
    with w.block(f"if ({cp.idx} < {cp.limit} && col < {cp.col_limit})"):
        if _vec(sh, cp) == 4:  # the head-dim axis has unit stride and every other stride is a multiple of 4
            w.line(f"{reg} = {sh.read4_tile(cp.sl.tensor, f'({cp.base}({cp.idx}) + col) >> 2u')};")
        else:
            ref = f"{cp.base}({cp.idx}) + col * P.s_{cp.sl.tensor}_{cp.sl.axis}"
            w.line(f"{reg} = {sh.smem_t}({sh.read(cp.sl.tensor, ref)});")


def _put(w: Writer, sh: Shader, cp: _Copy, reg: str) -> None:
    """Store reg as element (r, c) of the block (and flag a non-finite value)."""
    st = sh.smem_t
    if _vec(sh, cp) == 1:
        if cp.flag:
            with w.block(f"if ((bitcast<u32>(f32({reg})) & 0x7f800000u) == 0x7f800000u)"):
                w.line("atomicOr(&v_bad, 1u);")
        dst = f"{cp.offset}u + c * {cp.rows}u + r" if cp.transpose else f"{cp.offset}u + r * {cp.cols}u + c"
        w.line(f"{_sm(cp.arr, dst)} = {reg};")
        return
    if cp.flag:
        bits = f"bitcast<vec4<u32>>(vec4<f32>({reg}))" if st == "f16" else f"bitcast<vec4<u32>>({reg})"
        with w.block(f"if (any(({bits} & vec4<u32>(0x7f800000u)) == vec4<u32>(0x7f800000u)))"):
            w.line("atomicOr(&v_bad, 1u);")
    if cp.transpose:
        for i, comp in enumerate("xyzw"):
            w.line(f"{_sm(cp.arr, f'{cp.offset}u + (c + {i}u) * {cp.rows}u + r')} = {reg}.{comp};")
    else:
        w.line(f"{cp.arr}[({cp.offset}u + r * {cp.cols}u + c) >> 2u] = {reg};")


def _stage(w: Writer, sh: Shader, cp: _Copy) -> None:
    """Cooperatively copy a block into workgroup memory (a loop of UN-unrolled copies)."""
    n, per = _count(sh, cp)

    def body() -> None:
        w.line(f"var x: {_reg_type(sh, cp)};")
        _fetch(w, sh, cp, "x")
        _put(w, sh, cp, "x")

    if sh.plan.UN == 1:  # a loop from lid: LLVM (lavapipe) does not unroll it, which compiles 2x faster
        with w.block(f"for (var e = lid; e < {n}u; e = e + {sh.lay.WG}u)"):
            _element(w, sh, cp, None, n, body)
    else:
        w.counted("ei", per, sh.plan.UN, lambda: _element(w, sh, cp, f"lid + ei * {sh.lay.WG}u", n, body))


def _prefetch_regs(w: Writer, sh: Shader, cp: _Copy, name: str) -> None:
    """Declare the registers a prefetched block passes through (one per copy)."""
    for i in range(_count(sh, cp)[1]):
        w.line(f"var {name}{i}: {_reg_type(sh, cp)};")


def _prefetch(w: Writer, sh: Shader, cp: _Copy, name: str, put: bool) -> None:
    """Load a block into its registers (put=False), or store them into workgroup memory."""
    n, per = _count(sh, cp)
    for i in range(per):
        with w.block(""):
            _element(w, sh, cp, f"lid + {i * sh.lay.WG}u", n,
                     lambda i=i: (_put if put else _fetch)(w, sh, cp, f"{name}{i}"))


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


def _pv_loop(w: Writer, lay: Layout, vs: int, careful: bool, half: bool, unroll: int) -> None:
    """o += p . v over the BN keys of a tile, for one staged chunk of value columns
    (with `half`, p and v are f16 and each product is rounded to f16, then summed in f32)."""
    w.counted("j", lay.BN, unroll, lambda: _pv_key(w, lay, vs, careful, half))


def _pv_key(w: Writer, lay: Layout, vs: int, careful: bool, half: bool) -> None:
    """The P.V updates of key j."""
    YPS = lay.DVS // lay.CT
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


def _dot_step(w: Writer, sh: Shader) -> None:
    """The TM x TN score updates of head-dim index dd of the staged chunk."""
    lay = sh.lay
    if sh.plan.QRES:
        _loads(w, "a", "q_sh", f"(d0 + dd) * {lay.BM}u + rg * {lay.TM}u", lay.TM)
    else:
        _loads(w, "a", "stage", f"dd * {lay.BM}u + rg * {lay.TM}u", lay.TM)
    kofs = 0 if sh.plan.QRES else lay.BM * lay.DK
    _loads(w, "b", "stage", f"{kofs}u + dd * {lay.BN}u + ct * {lay.TN}u", lay.TN)
    for i in range(lay.TM):
        for x in range(lay.TN):
            if sh.half:  # an f16 product, summed in f32
                w.line(f"s{i}_{x} = s{i}_{x} + f32(a{i} * b{x});")
            else:
                w.line(f"s{i}_{x} = fma(a{i}, b{x}, s{i}_{x});")


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
        qblk = _Copy(s.dot.a, "qi", "q0", "n_rows", "q_base", BM, DK, "d0", "n_dot")
        kblk = _Copy(s.dot.b, "kj", "k0", "n_keys", "k_base", BN, DK, "d0", "n_dot", kofs)
        vblk = _Copy(s.value, "kj", "k0", "n_keys", "v_base", BN, DVS, f"dvc * {DVC}u", "n_width",
                     transpose=False, flag=True)
        qk = [(kblk, "pk")] if qres else [(qblk, "pq"), (kblk, "pk")]
        pf = bool(plan.PF)  # the next block's global loads are issued before this block's math

        def prefetch_qk(first: str, col0: str) -> None:
            for cp, name in qk:
                _prefetch(w, sh, cp.at(cp.first if cp is qblk else first, col0), name, put=False)

        if qres:  # transposed [d][row], zero past the head dim and the last row
            _stage(w, sh, replace(qblk, cols=plan.DQ, col0="0u", arr="q_sh"))
        if pf:
            for cp, name in [*qk, (vblk, "pv")]:
                _prefetch_regs(w, sh, cp, name)
            prefetch_qk(f"t_lo * {BN}", "0u")
        with w.block("for (var t = t_lo; t < t_hi; t = t + 1)"):
            w.line(f"let k0 = t * {BN};")
            with w.block("if (lid == 0u)"):
                w.line("atomicStore(&v_bad, 0u);")
            for i in range(TM):
                for x in range(TN):
                    w.line(f"var s{i}_{x} = 0.0;")
            with w.block(f"for (var d0 = 0u; d0 < n_dot; d0 = d0 + {DK}u)"):
                for cp, name in qk:
                    if pf:
                        _prefetch(w, sh, cp, name, put=True)
                    else:
                        _stage(w, sh, cp)
                w.line("workgroupBarrier();")
                if pf:  # the next head-dim chunk, or after the last one the first value chunk
                    with w.block(f"if (d0 + {DK}u < n_dot)"):
                        prefetch_qk("k0", f"(d0 + {DK}u)")
                    with w.block("else"):
                        _prefetch(w, sh, vblk, "pv", put=False)
                w.counted("dd", DK, plan.UN, lambda: _dot_step(w, sh))
                w.line("workgroupBarrier();")
            _softmax(w, sh)
            for vs in range(0, DVC, DVS):
                if vs:  # (the first chunk's stage was last read before the dot loop's barrier)
                    w.line("workgroupBarrier();")
                cp = vblk.at("k0", f"dvc * {DVC}u + {vs}u")
                if pf:
                    _prefetch(w, sh, cp, "pv", put=True)
                else:
                    _stage(w, sh, cp)
                w.line("workgroupBarrier();")
                if pf and vs + DVS < DVC:
                    _prefetch(w, sh, vblk.at("k0", f"dvc * {DVC}u + {vs + DVS}u"), "pv", put=False)
                elif pf:  # the next tile's first chunk
                    with w.block("if (t + 1 < t_hi)"):
                        prefetch_qk(f"(k0 + {BN})", "0u")
                # masked keys (p = 0) add nothing, even an inf/NaN value: a tile holding such
                # values takes the careful loop, every other tile the branch-free one
                half = bool(sh.half)
                with w.block("if (atomicLoad(&v_bad) == 0u)"):
                    _pv_loop(w, lay, vs, careful=False, half=half, unroll=plan.UN)
                with w.block("else"):
                    _pv_loop(w, lay, vs, careful=True, half=half, unroll=plan.UN)
            w.line("workgroupBarrier();")
        _emit_epilogue(w, sh)
    return Program("main", w.text(), "main", WG, binds, sh.uniforms, sh.grid_factors(),
                   features(plan), smem)


def _softmax(w: Writer, sh: Shader) -> None:
    """Scores (score_mod, masks), the online-softmax update of m, l and o, and p into p_sh."""
    lay, st = sh.lay, sh.smem_t
    TM, TN, TD, BM = lay.TM, lay.TN, lay.TD, lay.BM
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
