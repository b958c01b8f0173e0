"""The tiled main pass: a workgroup per (grid point, query tile[, KV split][, value-column
chunk]); q/k tiles staged in workgroup memory, register-blocked dot products, online softmax
with cross-invocation row reductions (workgroup memory, or subgroup shuffles), P.V."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from attnc.ir import nodes as ir
from attnc.lowering.blocks import FULL_BIT, record_base
from attnc.lowering.plan import Family, Layout, fast_reduce, owned_run
from attnc.lowering.program import Program
from attnc.lowering.shader import Shader, features, unpack_f16x4
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
    stride: int = 0  # words per line of a transposed block (0: rows)

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


def _packed_regs(sh: Shader, cp: _Copy) -> bool:
    """Whether the block's prefetch registers hold its packed f16 words (vec2<u32>), unpacked
    only when stored to workgroup memory: unpacking at the load would wait for it there, where
    the prefetch is meant to leave it in flight behind the tile's math."""
    return cp.sl.tensor in sh.packed and _vec(sh, cp) == 4


def _fetch(w: Writer, sh: Shader, cp: _Copy, reg: str, packed: bool = False) -> None:
    """reg = the element at (r, c) from storage, zero outside the slice (with `packed`, the
    raw words of four f16 elements)."""
    w.line(f"{reg} = {'vec2<u32>' if packed else _reg_type(sh, cp)}();")
    w.line(f"let {cp.idx} = {cp.first} + i32(r);")
    w.line(f"let col = {cp.col0} + c;")
    with w.block(f"if ({cp.idx} < {cp.limit} && col < {cp.col_limit})"):
        if packed:
            w.line(f"{reg} = t_{cp.sl.tensor}[({cp.base}({cp.idx}) + col) >> 2u];")
        elif _vec(sh, cp) == 4:  # the head-dim axis has unit stride and every other stride is a multiple of 4
            w.line(f"{reg} = {sh.read4_tile(cp.sl.tensor, f'({cp.base}({cp.idx}) + col) >> 2u')};")
        else:
            ref = f"{cp.base}({cp.idx}) + col * P.s_{cp.sl.tensor}_{cp.sl.axis}"
            w.line(f"{reg} = {sh.smem_t}({sh.read(cp.sl.tensor, ref)});")


def _put(w: Writer, sh: Shader, cp: _Copy, reg: str) -> None:
    """Store reg as element (r, c) of the block (and flag a non-finite value)."""
    st = sh.smem_t
    line = cp.stride or cp.rows
    if _vec(sh, cp) == 1:
        if cp.flag:
            with w.block(f"if ((bitcast<u32>(f32({reg})) & 0x7f800000u) == 0x7f800000u)"):
                w.line("atomicOr(&v_bad, 1u);")
        dst = f"{cp.offset}u + c * {line}u + r" if cp.transpose else f"{cp.offset}u + r * {cp.cols}u + c"
        w.line(f"{_sm(cp.arr, dst)} = {reg};")
        return
    if cp.flag:
        bits = f"bitcast<vec4<u32>>(vec4<f32>({reg}))" if st == "f16" else f"bitcast<vec4<u32>>({reg})"
        with w.block(f"if (any(({bits} & vec4<u32>(0x7f800000u)) == vec4<u32>(0x7f800000u)))"):
            w.line("atomicOr(&v_bad, 1u);")
    if cp.transpose:
        for i, comp in enumerate("xyzw"):
            w.line(f"{_sm(cp.arr, f'{cp.offset}u + (c + {i}u) * {line}u + r')} = {reg}.{comp};")
    else:
        w.line(f"{cp.arr}[({cp.offset}u + r * {cp.cols}u + c) >> 2u] = {reg};")


def _stage(w: Writer, sh: Shader, cp: _Copy) -> None:
    """Cooperatively copy a block into workgroup memory (a loop of UN-unrolled copies)."""
    n, per = _count(sh, cp)

    def body() -> None:
        w.line(f"var x: {_reg_type(sh, cp)};")
        _fetch(w, sh, cp, "x")
        _put(w, sh, cp, "x")

    if sh.plan.unroll == 1:  # a loop from lid: LLVM (lavapipe) does not unroll it, which compiles 2x faster
        with w.block(f"for (var e = lid; e < {n}u; e = e + {sh.lay.WG}u)"):
            _element(w, sh, cp, None, n, body)
    else:
        w.counted("ei", per, sh.plan.unroll, lambda: _element(w, sh, cp, f"lid + ei * {sh.lay.WG}u", n, body))


def _prefetch_regs(w: Writer, sh: Shader, cp: _Copy, name: str) -> None:
    """Declare the registers a prefetched block passes through (one per copy)."""
    reg = "vec2<u32>" if _packed_regs(sh, cp) else _reg_type(sh, cp)
    for i in range(_count(sh, cp)[1]):
        w.line(f"var {name}{i}: {reg};")


def _prefetch(w: Writer, sh: Shader, cp: _Copy, name: str, put: bool) -> None:
    """Load a block into its registers (put=False), or store them into workgroup memory."""
    n, per = _count(sh, cp)
    packed = _packed_regs(sh, cp)

    def one(reg: str) -> None:
        if not put:
            _fetch(w, sh, cp, reg, packed)
        elif packed:
            w.line(f"let x = {unpack_f16x4(reg)};")
            _put(w, sh, cp, "x")
        else:
            _put(w, sh, cp, reg)

    for i in range(per):
        with w.block(""):
            _element(w, sh, cp, f"lid + {i * sh.lay.WG}u", n, lambda i=i: one(f"{name}{i}"))


def _loads(w: Writer, name: str, arr: str, base: str, n: int, first: int = 0) -> None:
    """`let {name}{first + k}` for n consecutive f32 at `base` (a multiple of 4 when n >= 4)."""
    if n % 4 == 0:
        for k4 in range(n // 4):
            vec = f"{name}v{first // 4 + k4}"
            w.line(f"let {vec} = {arr}[({base} + {4 * k4}u) >> 2u];")
            for k, comp in enumerate("xyzw"):
                w.line(f"let {name}{first + 4 * k4 + k} = {vec}.{comp};")
    else:
        for k in range(n):
            w.line(f"let {name}{first + k} = {_sm(arr, f'{base} + {k}u')};")


def owned(CT: int, n: int, x: int) -> tuple[int, int]:
    """(a, b): of the n elements of a tile line (keys or value columns) that each of CT
    invocations owns, invocation ct's x-th is element a * ct + b.

    Elements are dealt in runs of `owned_run(n)`: invocation ct owns run ct of every group of CT
    runs, so the CT invocations of a row group read (or write) one contiguous span per run,
    which keeps vec4 accesses free of bank conflicts (contiguous runs of 8 per invocation
    put 2 invocations on every bank)."""
    r = owned_run(n)
    return r, (x // r) * CT * r + x % r


def _owned(lay: Layout, n: int, x: int) -> str:
    """WGSL for `owned`'s index in the invocation's row group."""
    a, b = owned(lay.CT, n, x)
    return f"ct * {a}u + {b}u"


def _loads_owned(w: Writer, lay: Layout, name: str, base: str, n: int) -> None:
    """`let {name}{x}` for an invocation's n owned elements of the tile line at `base`."""
    r = owned_run(n)
    for g in range(n // r):
        _loads(w, name, "stage", f"{base} + {g * lay.CT * r}u + ct * {r}u", r, g * r)


def _pv_loop(w: Writer, lay: Layout, vs: int, ks: int, careful: bool, half: bool, unroll: int) -> None:
    """o += p . v over the VK keys from ks of a tile, for one staged block of value columns
    (with `half`, p and v come from f16 tiles and are multiplied in f32: see `_dot_step`)."""
    w.counted("j", lay.VK, unroll, lambda: _pv_key(w, lay, vs, ks, careful, half))


def _pv_key(w: Writer, lay: Layout, vs: int, ks: int, careful: bool, half: bool) -> None:
    """The P.V updates of key ks + j."""
    YPS = lay.DVS // lay.CT
    _loads_owned(w, lay, "v", f"{lay.value_offset}u + j * {lay.DVS}u", YPS)
    pk = ks % lay.PK  # the p tile holds the chunk of PK keys this block is in
    _loads(w, "p", _p_array(lay), f"({pk}u + j) * {lay.QS}u + rg * {lay.TM}u", lay.TM)
    for i in range(lay.TM):
        acc = [f"o{i}_{(vs // lay.DVS) * YPS + y}" for y in range(YPS)]
        updates = [f"{a} = fma(p{i}, f32(v{y}), {a});" if half else f"{a} = fma(p{i}, v{y}, {a});"
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
    if sh.plan.resident_query:
        _loads(w, "a", "q_sh", f"(d0 + dd) * {lay.QS}u + rg * {lay.TM}u", lay.TM)
    else:
        _loads(w, "a", "stage", f"dd * {lay.QS}u + rg * {lay.TM}u", lay.TM)
    kofs = 0 if sh.plan.resident_query else lay.QS * lay.DK
    _loads_owned(w, lay, "b", f"{kofs}u + dd * {lay.KS}u", lay.TN)
    for i in range(lay.TM):
        for x in range(lay.TN):
            if sh.half:
                # f16 tiles, f32 products: the product of two halves is exact in f32, where an f16
                # product (one instruction more than this fma) rounds |q_i k_i| to 11 bits and
                # overflows past 65504: scores of 6e3 would be 4 apart
                w.line(f"s{i}_{x} = fma(f32(a{i}), f32(b{x}), s{i}_{x});")
            else:
                w.line(f"s{i}_{x} = fma(a{i}, b{x}, s{i}_{x});")


def _reduce(w: Writer, lay: Layout, names: list[str], op: str, fast: bool) -> None:
    """Reduce per-row values across the CT invocations of a row group (max or add): xor
    butterflies within G lanes, then workgroup memory, or (fast, when the subgroups the shader
    runs with are at least CT lanes) butterflies alone, with no barriers."""
    comb = "max({0}, {1})" if op == "max" else "({0} + {1})"

    def butterflies(lo: int, hi: int) -> None:
        off = lo
        while off < hi:
            for n in names:
                w.line(f"{n} = {comb.format(n, f'subgroupShuffleXor({n}, {off}u)')};")
            off *= 2

    butterflies(1, lay.G)
    if lay.CT > lay.G and fast:
        with w.block("if (sg_wide)"):
            butterflies(lay.G, lay.CT)
        with w.block("else"):
            _reduce_shared(w, lay, names, comb)
    elif lay.CT > lay.G:
        _reduce_shared(w, lay, names, comb)


def _reduce_shared(w: Writer, lay: Layout, names: list[str], comb: str) -> None:
    """The row groups' G-lane partials combined through workgroup memory (two barriers)."""
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
    binds = sh.main_bindings(w)
    qres = plan.resident_query  # the query tile stays in workgroup memory for the whole KV loop
    # one array for both phases: q/k chunks while dot products run, then the p tile and the
    # value chunks (p is written after the dot loop's last barrier, q/k after the tile's)
    stage = lay.stage_words
    kofs = 0 if qres else lay.QS * DK
    groups = CT // lay.G
    st = sh.smem_t
    w.line(f"var<workgroup> stage: array<vec4<{st}>, {stage // 4}>;")
    if lay.HALF:  # p unrounded: the products and the row sums must use the same probabilities
        w.line(f"var<workgroup> p_tile: array<vec4<f32>, {-(-lay.p_words // 4)}>;")
    if qres:
        w.line(f"var<workgroup> q_sh: array<vec4<{st}>, {lay.QS * plan.query_dim // 4}>;")
    if CT > lay.G:
        w.line(f"var<workgroup> red: array<f32, {BM * groups}>;")
    if lay.XW and sh.half_out and not s.split_var:
        w.line(f"var<workgroup> o_x: array<f32, {lay.XW}>;  // odd invocations' outputs for their even neighbours")
    w.line("var<workgroup> wg_lo: i32;")
    w.line("var<workgroup> wg_hi: i32;")
    w.line("var<workgroup> v_bad: atomic<u32>;  // a staged value is inf/NaN in this tile")
    sh.privates(w)
    sh.functions(w)
    esz = 2 if st == "f16" else 4
    xw = lay.XW if sh.half_out and not s.split_var else 0
    smem = esz * (stage + (lay.QS * plan.query_dim if qres else 0)) + 4 * ((BM * groups if CT > lay.G else 0) + 3 + xw)
    smem += 4 * lay.p_words if lay.HALF else 0
    fast = fast_reduce(plan, lay)
    sg_arg = ", @builtin(subgroup_size) sg_size: u32" if fast else ""
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 f"@builtin(local_invocation_index) lid: u32{sg_arg})"):
        sh.prologue(w)
        if fast:  # a row group's lanes all in one subgroup (uniform: the branch may hold barriers)
            w.line(f"let sg_wide = sg_size >= {CT}u;")
        w.line(f"let rg = lid / {CT}u;")
        w.line(f"let ct = lid % {CT}u;")
        w.line(f"let q0 = i32(qtile) * {BM};")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_dot = P.d_{s.head_dim};")
        w.line(f"let n_width = P.d_{s.width};")
        listed = sh.block_mask is not None  # the loop runs over the list of live KV tiles
        if listed:
            w.line(f"let n_kt = (P.d_{s.kv_dim} + {BN - 1}u) / {BN}u;")
            record_base(w, s, sh.block_mask, "qtile", "n_kt")
        sh.tile_bounds(w, BM, BN)
        w.line("let t_lo = workgroupUniformLoad(&wg_lo);")
        w.line("let t_hi = workgroupUniformLoad(&wg_hi);")
        for i in range(TM):
            w.line(f"var m{i} = {NEG_INF};")
            w.line(f"var l{i} = 0.0;")
            w.line(f"var nan{i} = false;")
            for y in range(TD):
                w.line(f"var o{i}_{y} = 0.0;")
        qblk = _Copy(s.dot.a, "qi", "q0", "n_rows", "q_base", BM, DK, "d0", "n_dot", stride=lay.QS)
        kblk = _Copy(s.dot.b, "kj", "k0", "n_keys", "k_base", BN, DK, "d0", "n_dot", kofs, stride=lay.KS)
        vblk = _Copy(s.value, "kj", "k0", "n_keys", "v_base", lay.VK, DVS, f"dvc * {DVC}u", "n_width",
                     lay.value_offset, transpose=False, flag=True)
        qk = [(kblk, "pk")] if qres else [(qblk, "pq"), (kblk, "pk")]
        pf = bool(plan.prefetch)  # the next block's global loads are issued before this block's math

        def prefetch_qk(first: str, col0: str) -> None:
            for cp, name in qk:
                _prefetch(w, sh, cp.at(cp.first if cp is qblk else first, col0), name, put=False)

        def first_key(t: str) -> str:
            """The first key of the t-th tile the loop visits (a listed index past the list
            reads its last word: only a prefetch that is never used does)."""
            if not listed:
                return f"({t}) * {BN}"
            return f"i32(t_blocks[blk_rec + 1u + min(u32({t}), n_kt - 1u)] & {FULL_BIT - 1:#x}u) * {BN}"

        if qres:  # transposed [d][row], zero past the head dim and the last row
            _stage(w, sh, replace(qblk, cols=plan.query_dim, col0="0u", arr="q_sh"))
        if pf:
            for cp, name in [*qk, (vblk, "pv")]:
                _prefetch_regs(w, sh, cp, name)
            prefetch_qk(first_key("t_lo"), "0u")
        with w.block("for (var t = t_lo; t < t_hi; t = t + 1)"):
            if listed:
                w.line("let listed = t_blocks[blk_rec + 1u + u32(t)];")
                w.line(f"let k0 = i32(listed & {FULL_BIT - 1:#x}u) * {BN};")
                w.line(f"let tile_full = listed >= {FULL_BIT:#x}u;")
            else:
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
                w.counted("dd", DK, plan.unroll, lambda: _dot_step(w, sh))
                w.line("workgroupBarrier();")
            _softmax(w, sh, _p_keys(lay, 0))
            # value blocks of VK keys x DVS columns: p chunks of PK keys outer (each written
            # once, before its first block), then column chunks, then the chunk's keys
            blocks = [(vs, ks) for kc in range(0, BN, lay.PK) for vs in range(0, DVC, DVS)
                      for ks in range(kc, kc + lay.PK, lay.VK)]
            for b, (vs, ks) in enumerate(blocks):
                if b:  # (the first block's stage was last read before the dot loop's barrier)
                    w.line("workgroupBarrier();")
                    if ks % lay.PK == 0 and vs == 0:
                        _store_p(w, sh, _p_keys(lay, ks), ks)
                cp = vblk.at(f"(k0 + {ks})", f"dvc * {DVC}u + {vs}u")
                if pf:
                    _prefetch(w, sh, cp, "pv", put=True)
                else:
                    _stage(w, sh, cp)
                w.line("workgroupBarrier();")
                if pf and b + 1 < len(blocks):
                    nvs, nks = blocks[b + 1]
                    _prefetch(w, sh, vblk.at(f"(k0 + {nks})", f"dvc * {DVC}u + {nvs}u"), "pv", put=False)
                elif pf:  # the next tile's first chunk
                    with w.block("if (t + 1 < t_hi)"):
                        prefetch_qk(first_key("t + 1"), "0u")
                # masked keys (p = 0) add nothing, even an inf/NaN value: a tile holding such
                # values takes the careful loop, every other tile the branch-free one
                half = bool(sh.half)
                with w.block("if (atomicLoad(&v_bad) == 0u)"):
                    _pv_loop(w, lay, vs, ks, careful=False, half=half, unroll=plan.unroll)
                with w.block("else"):
                    _pv_loop(w, lay, vs, ks, careful=True, half=half, unroll=plan.unroll)
            w.line("workgroupBarrier();")
        _emit_epilogue(w, sh)
    return Program("main", w.text(), "main", WG, binds, sh.uniforms, sh.grid_factors(),
                   features(plan), smem, in_bounds=True)


def _p_keys(lay: Layout, kc: int) -> list[int]:
    """The x (owned-key indices) of the p chunk of keys kc..kc+PK-1: PK covers whole groups of
    runs, so they are the same x in every invocation."""
    return [x for x in range(lay.TN) if kc <= owned(lay.CT, lay.TN, x)[1] < kc + lay.PK]


def _p_array(lay: Layout) -> str:
    """The workgroup array of the p tile: the staging array, or its own f32 one beside f16
    tiles (an f16 p would round each probability to 11 bits in the products but not in the row
    sums, so o would not be a weighted mean of v)."""
    return "p_tile" if lay.HALF else "stage"


def _store_p(w: Writer, sh: Shader, xs: list[int], ks: int) -> None:
    """p of the invocation's owned keys xs into [key - ks][row] lines of QS words: a vec4 of 4
    rows per store where TM allows."""
    lay, TM = sh.lay, sh.lay.TM
    st, arr = ("f32", "p_tile") if lay.HALF else (sh.smem_t, "stage")
    for x in xs:
        key = _owned(lay, lay.TN, x) + (f" - {ks}u" if ks else "")
        line = f"({key}) * {lay.QS}u + rg * {TM}u"
        if TM % 4 == 0:
            for i4 in range(0, TM, 4):
                vals = ", ".join(f"{st}(s{i4 + k}_{x})" for k in range(4))
                w.line(f"{arr}[({line} + {i4}u) >> 2u] = vec4<{st}>({vals});")
        else:
            for i in range(TM):
                w.line(f"{_sm(arr, f'{line} + {i}u')} = {st}(s{i}_{x});")


def _scores(w: Writer, i: int, TN: int, fn: str) -> None:
    """Row i's scores of its owned keys through `fn`; keys past the end masked."""
    for x in range(TN):
        w.line(f"s{i}_{x} = select({NEG_INF}, {fn}(s{i}_{x}, qi, kj{x}), kj{x} < n_keys);")


def _softmax(w: Writer, sh: Shader, xs: list[int]) -> None:
    """Scores (score_mod, masks), the online-softmax update of m, l and o, and the p of owned
    keys xs into the staging array."""
    lay = sh.lay
    TM, TN, TD = lay.TM, lay.TN, lay.TD
    # scores, masks and the row max
    for i in range(TM):
        w.line(f"var tmax{i} = {NEG_INF};")
        with w.block(""):
            w.line(f"let qi = q0 + i32(rg * {TM}u + {i}u);")
            for x in range(TN):
                w.line(f"let kj{x} = k0 + i32({_owned(lay, TN, x)});")
            if sh.block_mask is None:
                _scores(w, i, TN, "score_fn")
            else:  # a full tile (the block map) drops the mask
                with w.block("if (tile_full)"):
                    _scores(w, i, TN, "score_free_fn")
                with w.block("else"):
                    _scores(w, i, TN, "score_fn")
            for x in range(TN):
                w.line(f"nan{i} = nan{i} || is_nan(s{i}_{x});")
                w.line(f"tmax{i} = max(tmax{i}, s{i}_{x});")
    fast = fast_reduce(sh.plan, lay)
    _reduce(w, lay, [f"tmax{i}" for i in range(TM)], "max", fast)
    for i in range(TM):
        w.line(f"let mn{i} = max(m{i}, tmax{i});")
        w.line(f"let al{i} = select(exp_sub(m{i}, mn{i}), 1.0, is_neg_inf(mn{i}));")
        w.line(f"var ts{i} = 0.0;")
        for x in range(TN):
            w.line(f"s{i}_{x} = exp_sub(s{i}_{x}, mn{i});")
            w.line(f"ts{i} = ts{i} + s{i}_{x};")
        w.line(f"m{i} = mn{i};")
    _store_p(w, sh, xs, 0)
    _reduce(w, lay, [f"ts{i}" for i in range(TM)], "add", fast)
    for i in range(TM):
        w.line(f"l{i} = l{i} * al{i} + ts{i};")
        for y in range(TD):
            w.line(f"o{i}_{y} = o{i}_{y} * al{i};")


def _emit_epilogue(w: Writer, sh: Shader) -> None:
    """Sink, normalisation and the stores (final output, or the split's partial state)."""
    s, lay = sh.spec, sh.lay
    if sh.half_out and not s.split_var and lay.XW:
        _epilogue_exchanged(w, sh)
        return
    for i in range(lay.TM):
        with w.block(""):
            w.line(f"let qi = q0 + i32(rg * {lay.TM}u + {i}u);")
            if s.sink is not None and not s.split_var:
                def scale(a: str, i: int = i) -> None:
                    for y in range(lay.TD):
                        w.line(f"o{i}_{y} = o{i}_{y} * {a};")

                sh.merge_sink(w, "qi", f"m{i}", f"l{i}", f"nan{i}", scale)
            with w.block("if (qi < n_rows)"):
                if s.split_var:
                    w.line(f"let pr = {sh.part_row('qi', 'n_width')};")
                    with w.block("if (ct == 0u && dvc == 0u)"):
                        w.line(f"t_part[pr] = m{i};")
                        w.line(f"t_part[pr + 1u] = select(l{i}, {NAN}, nan{i});")
                else:
                    w.line(f"let inv = select(1.0 / l{i}, 0.0, l{i} == 0.0);")
                    if s.lse:
                        with w.block("if (ct == 0u && dvc == 0u)"):
                            w.line(f"let lse = select(m{i} + log(l{i}), {NEG_INF}, l{i} == 0.0);")
                            w.line(f"t_lse[lse_base(qi)] = select(lse, {NAN}, nan{i});")
                if sh.half_out and not s.split_var:
                    _store_half(w, sh, i)
                else:
                    _store_columns(w, sh, i)


def _store_columns(w: Writer, sh: Shader, i: int) -> None:
    """Row i's owned columns, one f32 each: the split's partial accumulators, or the normalised
    output."""
    s, lay = sh.spec, sh.lay
    YPS = lay.DVS // lay.CT
    for y in range(lay.TD):
        col = f"dvc * {lay.DVC}u + {(y // YPS) * lay.DVS}u + {_owned(lay, YPS, y % YPS)}"
        with w.block(f"if ({col} < n_width)"):
            if s.split_var:
                w.line(f"t_part[pr + 2u + {col}] = o{i}_{y};")
            else:
                w.line(f"t_o[o_base(qi) + ({col}) * P.s_o_{len(s.axes)}] = "
                       f"select(o{i}_{y} * inv, {NAN}, nan{i});")


def _store_half(w: Writer, sh: Shader, i: int) -> None:
    """Row i's normalised outputs as float16, when the invocation owns an even number of columns
    per staged chunk (DVS / CT): they are dealt in runs of 2 or 4, so its columns come in pairs
    (c, c + 1), c even, one u32 word each; the half past an odd Dv is the row's padding, 0."""
    lay = sh.lay
    YPS = lay.DVS // lay.CT
    for y in range(0, lay.TD, 2):
        (a, b), (a1, b1) = owned(lay.CT, YPS, y % YPS), owned(lay.CT, YPS, y % YPS + 1)
        assert YPS % 2 == 0 and (a, b + 1) == (a1, b1), "a packed pair of columns spans two invocations"
        col = f"dvc * {lay.DVC}u + {(y // YPS) * lay.DVS}u + {_owned(lay, YPS, y % YPS)}"
        with w.block(f"if ({col} < n_width)"):
            w.line(f"let c = {col};")
            lo = f"select(o{i}_{y} * inv, {NAN}, nan{i})"
            hi = f"select(select(o{i}_{y + 1} * inv, {NAN}, nan{i}), 0.0, c + 1u >= n_width)"
            sh.store_o2(w, "o_base(qi)", "c", lo, hi)


def _epilogue_exchanged(w: Writer, sh: Shader) -> None:
    """A float16 output when each invocation owns an odd number of columns per staged chunk
    (DVS / CT odd, e.g. one column of 32 among 32 invocations of a decode tile): columns are
    dealt one at a time (run 1), so column c + 1 of an even invocation's column c belongs to its
    neighbour ct ^ 1 (same rows: lid ^ 1). Each round (one owned column) the odd invocations
    leave their normalised outputs in workgroup memory (o_x, CT x BM / 2 words), the even ones
    take them and store both as one word. Barriers are fine here: after the KV loop, in
    uniform control flow; rows past n_rows compute but never store."""
    s, lay = sh.spec, sh.lay
    TM, YPS, half = lay.TM, lay.DVS // lay.CT, lay.WG // 2
    assert YPS % 2 == 1 and lay.CT % 2 == 0 and owned(lay.CT, YPS, 0)[0] == 1
    for i in range(TM):
        if s.sink is not None:
            with w.block(""):
                w.line(f"let qi = q0 + i32(rg * {TM}u + {i}u);")

                def scale(a: str, i: int = i) -> None:
                    for y in range(lay.TD):
                        w.line(f"o{i}_{y} = o{i}_{y} * {a};")

                sh.merge_sink(w, "qi", f"m{i}", f"l{i}", f"nan{i}", scale)
        w.line(f"let inv{i} = select(1.0 / l{i}, 0.0, l{i} == 0.0);")
    w.line("let odd = (ct & 1u) == 1u;")
    for y in range(lay.TD):
        if y:
            w.line("workgroupBarrier();")
        with w.block("if (odd)"):
            for i in range(TM):
                w.line(f"o_x[{i * half}u + (lid >> 1u)] = select(o{i}_{y} * inv{i}, {NAN}, nan{i});")
        w.line("workgroupBarrier();")
        for i in range(TM):
            w.line(f"let h{i}_{y} = o_x[{i * half}u + (lid >> 1u)];")
    for i in range(TM):
        with w.block(""):
            w.line(f"let qi = q0 + i32(rg * {TM}u + {i}u);")
            with w.block("if (qi < n_rows)"):
                if s.lse:
                    with w.block("if (ct == 0u && dvc == 0u)"):
                        w.line(f"let lse = select(m{i} + log(l{i}), {NEG_INF}, l{i} == 0.0);")
                        w.line(f"t_lse[lse_base(qi)] = select(lse, {NAN}, nan{i});")
                with w.block("if (!odd)"):
                    for y in range(lay.TD):
                        col = f"dvc * {lay.DVC}u + {(y // YPS) * lay.DVS}u + {_owned(lay, YPS, y % YPS)}"
                        with w.block(f"if ({col} < n_width)"):
                            w.line(f"let c = {col};")
                            sh.store_o2(w, "o_base(qi)", "c", f"select(o{i}_{y} * inv{i}, {NAN}, nan{i})",
                                        f"select(h{i}_{y}, 0.0, c + 1u >= n_width)")
