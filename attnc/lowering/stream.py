"""The stream strategy, for short row tiles (decoding, cross-attention with few queries).

Decoding is bound by reading K and V once. Staging them through workgroup memory (the tiled
strategy) costs barriers per head-dim chunk and keeps few loads in flight; here both are read
straight from storage as vec4:

- dot phase: KL neighbouring invocations share a key (each reads every KL-th vec4 of its
  row, so a group's loads are contiguous) and dot it with every query row of the tile, held
  in workgroup memory; the partial dots go to workgroup memory.
- P.V phase: invocation (kg, cg) owns output columns 4cg..4cg+3 and every KG-th key of the
  tile. It keeps its own online-softmax state (max, sum, accumulator) per row over its keys,
  so no cross-invocation max or sum is needed per tile: two barriers per tile in all.
- at the end the KG states of each row are merged in workgroup memory (one log-sum-exp merge,
  as in the split-KV combine) and stored, normalised or as the split's partial state.

With many rows per tile (packed GQA heads), the CG invocations sharing a key would each
recompute its scores and exponentials; SMX=1 adds a softmax phase between the two (one
invocation per key group and row keeps that row's max and sum and writes the probabilities
and the rescale factor to workgroup memory), and the P.V phase only multiplies and adds.

SMX=2 (one lane per key) computes each probability once in the dot phase instead: the lane
that scores a key also takes its exponential, against a maximum per row that the whole
workgroup shares. A tile only updates that maximum (a reduction, the accumulators rescaled,
the tile's exponentials taken again) when one of its scores passes it by more than
LAZY_MARGIN, which on most data happens on a split's first tile alone; the other tiles keep
the two barriers and the P.V phase only multiplies and adds.

SMX=3 (subgroups family) drops the phases. A key belongs to KL neighbouring lanes of one
subgroup: each dots every KL-th vec4 of its K row, a shuffle butterfly gives all KL the score,
and each multiplies it into DVC/KL of the key's value columns (every KL-th vec4). So each
group of KL lanes streams its own keys (every NG-th of a tile) with its own online softmax,
in registers: no workgroup memory, no barrier and no repeated exponential in the KV loop, and
the groups' states are merged once at the end. A shader run where a key's KL lanes are not
neighbours in one subgroup (checked by shuffling the invocation index) writes NaN.

SMX 0-2 use no subgroup operations: the same code serves both families.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from attnc.errors import LoweringError
from attnc.ir import nodes as ir
from attnc.lowering.blocks import FULL_BIT, record_base
from attnc.lowering.plan import StreamLayout, stream_layout
from attnc.lowering.program import Program
from attnc.lowering.shader import Fetched, Shader, features
from attnc.lowering.wgsl import NAN, NEG_INF, Writer

# How far a score may pass the workgroup's shared maximum before SMX=2 raises it: the
# probabilities stay below e^20 (4.9e8), so a split's sum and accumulators stay below
# 4.9e8 x its keys x max|v|, far from f32's 3.4e38 for any cache that fits a device.
LAZY_MARGIN = 20.0
# invocations per row in the middle step of SMX=2's maximum reduction (fewer when the
# workgroup has fewer than this many per row)
LAZY_REDUCE_LANES = 16


def emit_stream(sh: Shader) -> Program:
    """The main pass of the stream strategy: one workgroup per (grid point, row tile[, split][, Dv chunk])."""
    s, plan = sh.spec, sh.plan
    lay = stream_layout(plan, s.BM, s.BN)
    BM, BN, WG, CG, KG, D4 = lay.BM, lay.BN, lay.WG, lay.CG, lay.KG, lay.D4
    w = Writer()
    if lay.SMX == 3:
        return _emit_lane_groups(sh, lay, w)
    sh.header(w, lay.LS)
    binds = sh.main_bindings(w)
    w.line(f"var<workgroup> q_sh: array<vec4<f32>, {BM * D4}>;")
    merge = ", then the merge's" if lay.merge_in_sp else ""
    held = "scores [key][row]" if lay.LS else "partial dots [key][lane][row]"
    w.line(f"var<workgroup> sp: array<f32, {lay.sp_words}>;  // {held}{merge}")
    w.line(f"var<workgroup> m_red: array<f32, {KG * BM}>;")
    w.line(f"var<workgroup> l_red: array<f32, {KG * BM}>;")
    w.line(f"var<workgroup> m_fin: array<f32, {BM}>;")
    w.line(f"var<workgroup> l_fin: array<f32, {BM}>;")
    if not lay.merge_in_sp:
        w.line(f"var<workgroup> o_red: array<vec4<f32>, {KG * lay.RC * CG}>;")
    if lay.SMX:
        w.line(f"var<workgroup> p_sh: array<f32, {BN * BM}>;  // probabilities [key][row]")
    if lay.SMX == 1:
        w.line(f"var<workgroup> al_sh: array<f32, {KG * BM}>;  // rescale factor [key group][row]")
    if lay.SMX == 2:
        w.line("var<workgroup> wg_raise: atomic<u32>;  // a score of this tile passed the shared maximum")
    if lay.LS:
        w.line("var<workgroup> wg_bad: atomic<u32>;  // a key's lanes were not neighbours in one subgroup")
    # V's row read through a table (paged) or quantized (its first word computed): shared per key
    v_rows_shared = s.gathers(s.value) or s.value.tensor in sh.quant
    if v_rows_shared:
        w.line(f"var<workgroup> vb_sh: array<u32, {BN}>;  // each key's V row base, found once per tile")
    # K's row found through a table, read by several lanes per key: found once per key, for
    # the next tile during this one (the first before the loop)
    k_rows_shared = s.gathers(s.dot.b) and lay.KL > 1
    if k_rows_shared:
        w.line(f"var<workgroup> kb_sh: array<u32, {BN}>;  // each key's K row (vec4 index), for the dot phase")
    w.line("var<workgroup> wg_lo: i32;")
    w.line("var<workgroup> wg_hi: i32;")
    sh.privates(w)
    sh.functions(w)
    subgroup_size = ", @builtin(subgroup_size) sg_size: u32" if lay.LS else ""
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 f"@builtin(local_invocation_index) lid: u32{subgroup_size})"):
        sh.prologue(w)
        w.line(f"let kg = lid / {CG}u;")
        w.line(f"let cg = lid % {CG}u;")
        w.line(f"let q0 = i32(qtile) * {BM};")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_dot4 = P.d_{s.head_dim} >> 2u;")
        w.line(f"let n_width = P.d_{s.width};")
        w.line(f"let col = dvc * {plan.value_columns}u + cg * 4u;")
        w.line("let col_in = min(col, n_width - 4u);  // lanes past Dv read a valid column, never stored")
        listed = sh.block_mask is not None  # the loop runs over the list of live KV tiles
        if listed:
            w.line(f"let n_kt = (P.d_{s.kv_dim} + {BN - 1}u) / {BN}u;")
            record_base(w, s, sh.block_mask, "qtile", "n_kt")
        sh.tile_bounds(w, BM, BN)
        flags = (["wg_raise"] if lay.SMX == 2 else []) + (["wg_bad"] if lay.LS else [])
        if flags:  # not left to zero-initialisation, which a driver may skip
            with w.block("if (lid == 0u)"):
                for flag in flags:
                    w.line(f"atomicStore(&{flag}, 0u);")
        _stage_queries(w, sh, lay)
        w.line("let t_lo = workgroupUniformLoad(&wg_lo);")
        w.line("let t_hi = workgroupUniformLoad(&wg_hi);")
        if lay.LS:
            _check_lane_neighbours(w, lay.KL)
        if k_rows_shared:
            with w.block("if (t_lo < t_hi)"):
                _share_k_rows(w, sh, lay, listed, "t_lo")
            w.line("workgroupBarrier();")
        states = range(_pairs(lay)) if lay.SMX == 1 else range(BM)  # online-softmax states held
        for r in states:
            if lay.SMX == 1:
                w.line(f"let pi{r} = lid + {WG * r}u;  // softmax-phase pair: key group pi / BM, row pi % BM")
            w.line(f"var m{r} = {NEG_INF};")
            w.line(f"var l{r} = 0.0;")
            if lay.SMX != 2:  # SMX=2: a NaN score is a NaN probability, summed into l
                w.line(f"var nan{r} = false;")
        for r in range(BM):
            w.line(f"var o{r} = vec4<f32>();")
        with w.block("for (var t = t_lo; t < t_hi; t = t + 1)"):
            if listed:  # a full tile drops the mask (score_tile_fn)
                w.line("let listed = t_blocks[blk_rec + 1u + u32(t)];")
                w.line(f"let k0 = {_first_key('listed', BN)};")
                w.line(f"let tile_full = listed >= {FULL_BIT:#x}u;")
            else:
                w.line(f"let k0 = t * {BN};")
            if lay.SMX == 2:
                _lazy_dot_phase(w, sh, lay, v_rows_shared)
                _lazy_raise(w, lay)
                _pv_shared(w, sh, lay, v_rows_shared)
            elif lay.SMX == 1:
                _dot_phase(w, sh, lay, v_rows_shared, k_rows_shared)
                w.line("workgroupBarrier();")
                _softmax_phase(w, sh, lay)
                w.line("workgroupBarrier();")
                _pv_shared(w, sh, lay, v_rows_shared)
            else:
                _dot_phase(w, sh, lay, v_rows_shared, k_rows_shared)
                w.line("workgroupBarrier();")
                _pv_phase(w, sh, lay, v_rows_shared)
            if k_rows_shared:  # kb_sh was last read before the barrier after the dot phase
                with w.block("if (t + 1 < t_hi)"):
                    _share_k_rows(w, sh, lay, listed, "t + 1")
            w.line("workgroupBarrier();")
        _merge(w, sh, lay)
    smem = 4 * (lay.smem_words + (BN if v_rows_shared else 0) + (BN if k_rows_shared else 0))
    return Program("main", w.text(), "main", WG, binds, sh.uniforms, sh.grid_factors(),
                   features(plan) - (set() if lay.LS else {"subgroups"}), smem, in_bounds=True)


def _stage_queries(w: Writer, sh: Shader, lay: StreamLayout) -> None:
    """The BM query rows into workgroup memory, zero past the head dim and the last row."""
    qt = sh.spec.dot.a.tensor
    with w.block(f"for (var e = lid; e < {lay.BM * lay.D4}u; e = e + {lay.WG}u)"):
        w.line(f"let qi = q0 + i32(e / {lay.D4}u);")
        w.line(f"let c = e % {lay.D4}u;")
        w.line("var x = vec4<f32>();")
        with w.block("if (qi < n_rows && c < n_dot4)"):
            w.line(f"x = {sh.read4(qt, '(q_base(qi) >> 2u) + c')};")
        w.line("q_sh[e] = x;")
    w.line("workgroupBarrier();")


def _dot_phase(w: Writer, sh: Shader, lay: StreamLayout, v_rows_shared: bool, k_rows_shared: bool = False) -> None:
    """Partial q.k dots: KL lanes per key, each over every KL-th vec4 of the head dim. With
    `v_rows_shared`, the first lane of each key also finds its V row base for the P.V phase;
    with `k_rows_shared`, the K row comes from kb_sh (found once per key). LS: _summed_dots."""
    if lay.LS:
        _summed_dots(w, sh, lay, v_rows_shared, k_rows_shared)
        return
    with w.block(f"for (var e = lid; e < {lay.BN * lay.KL}u; e = e + {lay.WG}u)"):
        w.line(f"let jl = e / {lay.KL}u;")
        w.line(f"let part = e % {lay.KL}u;")
        _key_row(w, sh, v_rows_shared, "part == 0u", "kb_sh[jl]" if k_rows_shared else None)
        for r, terms in enumerate(_key_dots(w, sh, lay)):
            w.line(f"sp[e * {lay.BM}u + {r}u] = {terms};")


# LS: key parts per invocation and tile written out one after another (their loads all issued
# before the first shuffle, which compilers do not move loads across); more go in a loop
LANE_SUM_UNROLLED_PARTS = 8


def _summed_dots(w: Writer, sh: Shader, lay: StreamLayout, v_rows_shared: bool, k_rows_shared: bool) -> None:
    """LS: each of the invocation's key parts (BN x KL / WG of them: the same count in every
    invocation, as shuffles need) dots its vec4s, then the KL lanes of each key sum the partial
    dots by a shuffle butterfly and the key's first lane stores its score per row."""
    KL, BM, WG = lay.KL, lay.BM, lay.WG
    parts = lay.BN * KL // WG
    w.line("// a key's KL neighbouring lanes sum its partial dots by shuffles: one score per key and row")
    w.line(f"let part = lid % {KL}u;  // (WG is a multiple of KL: the same lane of its key in every part)")
    unrolled = parts <= LANE_SUM_UNROLLED_PARTS
    # the key part index e of each part written out (all of them, or one per loop iteration)
    indices = [f"lid + {i * WG}u" for i in range(parts)] if unrolled else ["e0 + lid"]
    loop = contextlib.nullcontext() if unrolled else \
        w.block(f"for (var e0 = 0u; e0 < {lay.BN * KL}u; e0 = e0 + {WG}u)")
    with loop:
        for i in range(len(indices)):
            for r in range(BM):
                w.line(f"var s{i}_{r} = 0.0;")
        for i, e in enumerate(indices):
            with w.block(""):
                w.line(f"let e = {e};")
                w.line(f"let jl = e / {KL}u;")
                _key_row(w, sh, v_rows_shared, "part == 0u", "kb_sh[jl]" if k_rows_shared else None)
                for r, terms in enumerate(_key_dots(w, sh, lay)):
                    w.line(f"s{i}_{r} = {terms};")
        k = 1
        while k < KL:  # every lane of the key ends with the same sum (a + b == b + a); a round of
            for i in range(len(indices)):  # shuffles over every part before the next (independent)
                for r in range(BM):
                    w.line(f"s{i}_{r} = s{i}_{r} + subgroupShuffleXor(s{i}_{r}, {k}u);")
            k *= 2
        with w.block("if (part == 0u)"):
            for i, e in enumerate(indices):
                for r in range(BM):
                    w.line(f"sp[(({e}) / {KL}u) * {BM}u + {r}u] = s{i}_{r};")


def _key_score(lay: StreamLayout, jl: str, r: int | str) -> str:
    """The dot of key `jl` of the tile with row `r` from workgroup memory: its score (LS), or
    the sum of its KL lanes' partial dots."""
    rr = f"{r}u" if isinstance(r, int) else r
    if lay.LS:
        return f"sp[{jl} * {lay.BM}u + {rr}]"
    return " + ".join(f"sp[({jl} * {lay.KL}u + {p}u) * {lay.BM}u + {rr}]" for p in range(lay.KL))


def _key_row(w: Writer, sh: Shader, v_rows_shared: bool, first_lane: str | None, shared: str | None = None) -> None:
    """`kb`, the vec4 index of key `jl`'s K row (`shared`: where it was found already), and
    (`v_rows_shared`, by the key's `first_lane`: None for every lane) its V row's base in `vb_sh`."""
    if shared is None:
        w.line(f"let kb = {_k_row('k0 + i32(jl)')};  // past the end: masked below")
    else:
        w.line(f"let kb = {shared};")
    if v_rows_shared:
        row = f"vb_sh[jl] = {_v_row_base(sh, 'min(k0 + i32(jl), n_keys - 1)')};"
        if first_lane is None:
            w.line(row)
        else:
            with w.block(f"if ({first_lane})"):
                w.line(row)


def _first_key(entry: str, BN: int) -> str:
    """The first key of the tile a block map's list `entry` names (its full bit dropped)."""
    return f"i32({entry} & {FULL_BIT - 1:#x}u) * {BN}"


def _k_row(key: str) -> str:
    """The vec4 index of K row `key`, clamped to the last key (keys past the end are masked)."""
    return f"k_base(min({key}, n_keys - 1)) >> 2u"


def _rescale(m: str, mn: str) -> str:
    """The factor that takes a state kept against maximum `m` to maximum `mn` (1 while `mn`
    is still -inf: nothing kept yet)."""
    return f"select(exp_sub({m}, {mn}), 1.0, is_neg_inf({mn}))"


def _share_k_rows(w: Writer, sh: Shader, lay: StreamLayout, listed: bool, tile: str) -> None:
    """kb_sh: the K row (vec4 index) of each key of tile `tile`, one invocation per key."""
    with w.block(""):
        w.line(f"let tn = {tile};")
        if listed:
            w.line(f"let kn = {_first_key('t_blocks[blk_rec + 1u + u32(tn)]', lay.BN)};")
        else:
            w.line(f"let kn = tn * {lay.BN};")
        with w.block(f"for (var e = lid; e < {lay.BN}u; e = e + {lay.WG}u)"):
            w.line(f"kb_sh[e] = {_k_row('kn + i32(e)')};")


def _q_shared(lay: StreamLayout) -> Callable[[int, int], str]:
    """Row r's query vec4 that the lane's i-th K vec4 (vec4 c{i} of the row) meets: from q_sh."""
    return lambda r, i: f"q_sh[{r * lay.D4}u + c{i}]"


def _key_dots(w: Writer, sh: Shader, lay: StreamLayout) -> list[str]:
    """Load this lane's vec4s of K row `kb` (every KL-th from `part`, all issued before any is
    used) and return, per query row of the tile, its dot with them (a partial dot for KL > 1)."""
    return _dot_terms(_load_key(w, sh, lay), lay, _q_shared(lay))


def _dot_terms(groups: list[list[int]] | None, lay: StreamLayout, q: Callable[[int, int], str],
               k: Callable[[int], str] = lambda i: f"k{i}", d: Callable[[int], str] = lambda g: f"d{g}") -> list[str]:
    """Per query row, the dot of its vec4s `q(r, i)` with the lane's D4/KL K vec4s `k(i)`: for
    a quantized K each group's sum times its scale `d(g)` (`groups`, from _load_key)."""
    if groups is None:
        return [" + ".join(f"dot({q(r, i)}, {k(i)})" for i in range(lay.D4 // lay.KL)) for r in range(lay.BM)]
    return [" + ".join(f"{d(g)} * (" + " + ".join(f"dot({q(r, i)}, {k(i)})" for i in members) + ")"
                       for g, members in enumerate(groups))
            for r in range(lay.BM)]


def _load_key(w: Writer, sh: Shader, lay: StreamLayout) -> list[list[int]] | None:
    """Emit this lane's loads of K row `kb` as `k{i}` (vec4 c{i} = part + KL i of the row, zero
    past the head dim), all issued before any is used, and for a quantized K each group's scale
    `d{g}` (read once per group). Returns the groups of i that share a scale; None for an
    unquantized K. (Lane groups read a quantized K past the head dim unmasked: _step_loads.)"""
    kt = sh.spec.dot.b.tensor
    n = lay.D4 // lay.KL
    groups = _key_groups(sh, lay, False)
    if groups is None:
        for i in range(n):
            w.line(f"let c{i} = part + {lay.KL * i}u;")
            w.line(f"let k{i} = select(vec4<f32>(), {sh.read4(kt, f'kb + min(c{i}, n_dot4 - 1u)')}, "
                   f"c{i} < n_dot4);")
        return None
    # quantized K: each scale read once and applied once to its group's partial dot
    w.line(f"let kw = {sh.quant_row_words(kt, 'kb')};")
    words = sh.quant_block_words(kt)
    for g, members in enumerate(groups):
        if words is None:  # int8: one scale for the row
            w.line(f"let kw{g} = kw;")
        else:  # the group's block (clamped: past the head dim the values are discarded)
            w.line(f"let kw{g} = kw + min({g}u, (n_dot4 >> 3u) - 1u) * {words}u;")
        w.line(f"let d{g} = qs_{kt}(kw{g});")
        for i in members:
            c = f"min(c{i}, n_dot4 - 1u)" + (" & 7u" if words is not None else "")
            w.line(f"let c{i} = part + {lay.KL * i}u;")
            w.line(f"let k{i} = select(vec4<f32>(), qr4_{kt}(kw{g}, {c}), c{i} < n_dot4);")
    return groups


def block_runs(sh: Shader, tensor: str) -> bool:
    """SMX=3: whether the lanes of a key own runs of a row's vec4s rather than every KL-th:
    for q8_0 and q4_0, so that a lane's vec4s share their blocks' scales and words."""
    return sh.block_quantized(tensor)


def _key_groups(sh: Shader, lay: StreamLayout, runs: bool) -> list[list[int]] | None:
    """The lane's K vec4s i grouped by the scale they share: _scale_groups, or with `runs` (a
    q8_0 or q4_0 K whose lanes own runs of n = D4/KL vec4s, n dividing 8 or a multiple of 8)
    one group per block of the run. None for K without scales."""
    kt = sh.spec.dot.b.tensor
    if not runs:
        return _scale_groups(sh, kt, lay)
    n = lay.D4 // lay.KL
    if 8 % n and n % 8:
        raise LoweringError(f"SMX=3 over a {sh.quant[kt].value} K: each lane's run of DQ/(4 KL) = {n} vec4s must "
                            "divide a block of 8 or be whole blocks")
    return [list(range(g, min(g + 8, n))) for g in range(0, n, 8)]


def _lazy_dot_phase(w: Writer, sh: Shader, lay: StreamLayout, v_rows_shared: bool) -> None:
    """SMX=2: invocation i scores keys i, i + WG, ... of the tile whole (kept as s{n}_{r} for a
    raise), writes each probability against the shared maximum m{r}, and flags the tile when
    a score passes that maximum by more than LAZY_MARGIN."""
    BM, WG = lay.BM, lay.WG
    for n in range(lay.BN // WG):
        for r in range(BM):
            w.line(f"var s{n}_{r} = {NEG_INF};")
        with w.block(""):
            w.line(f"let jl = lid + {WG * n}u;")
            w.line("let part = 0u;")
            w.line("let kj = k0 + i32(jl);  // before the K vec4s k0, k1, ... shadow the tile's k0")
            _key_row(w, sh, v_rows_shared, None)
            terms = _key_dots(w, sh, lay)
            for r in range(BM):
                with w.block(""):
                    w.line(f"let qi = q0 + {r};")
                    w.line(f"s{n}_{r} = select({NEG_INF}, {_score(sh, terms[r], 'kj')}, kj < n_keys);")
                    w.line(f"p_sh[jl * {BM}u + {r}u] = {_prob(f's{n}_{r}', f'm{r}')};")
                    with w.block(f"if (s{n}_{r} > m{r} + {LAZY_MARGIN})"):
                        w.line("atomicOr(&wg_raise, 1u);")


def _prob(s: str, m: str) -> str:
    """The probability of score `s` against maximum `m`: NaN for a NaN score (so that the
    row's sum, and with it the row, is NaN), 0 for a masked one."""
    return f"select(exp_sub({s}, {m}), {NAN}, is_nan({s}))"


def _lazy_raise(w: Writer, lay: StreamLayout) -> None:
    """SMX=2: after the dot phase (a barrier), if a score passed the shared maximum: the tile's
    maximum per row (each invocation's own keys, then LAZY_REDUCE_LANES invocations per row,
    then one), the new maximum in m_fin, every accumulator rescaled to it and the tile's
    probabilities written again."""
    BM, WG = lay.BM, lay.WG
    lanes = max(1, min(LAZY_REDUCE_LANES, WG // BM))
    keys = range(lay.BN // WG)
    w.line("let raise = workgroupUniformLoad(&wg_raise);")
    with w.block("if (raise != 0u)"):
        for r in range(BM):
            own = f"s0_{r}"
            for n in keys[1:]:
                own = f"max({own}, s{n}_{r})"
            w.line(f"sp[{r * WG}u + lid] = {own};")
        w.line("workgroupBarrier();")
        with w.block(f"for (var x = lid; x < {BM * lanes}u; x = x + {WG}u)"):
            w.line(f"let r = x / {lanes}u;")
            w.line(f"var mx = {NEG_INF};")
            with w.block(f"for (var i = x % {lanes}u; i < {WG}u; i = i + {lanes}u)"):
                w.line(f"mx = max(mx, sp[r * {WG}u + i]);")
            w.line("p_sh[x] = mx;  // rewritten below")
        w.line("workgroupBarrier();")
        for r in range(BM):
            with w.block(f"if (lid == {r}u)"):
                w.line(f"var mx = m{r};")
                with w.block(f"for (var i = 0u; i < {lanes}u; i = i + 1u)"):
                    w.line(f"mx = max(mx, p_sh[{r * lanes}u + i]);")
                w.line(f"m_fin[{r}] = mx;")
        w.line("workgroupBarrier();")
        with w.block("if (lid == 0u)"):
            w.line("atomicStore(&wg_raise, 0u);")
        for r in range(BM):
            w.line(f"let mn{r} = m_fin[{r}];")
            w.line(f"let al{r} = {_rescale(f'm{r}', f'mn{r}')};")
            w.line(f"o{r} = o{r} * al{r};")
            w.line(f"l{r} = l{r} * al{r};")
            w.line(f"m{r} = mn{r};")
        for n in keys:
            for r in range(BM):
                w.line(f"p_sh[(lid + {WG * n}u) * {BM}u + {r}u] = {_prob(f's{n}_{r}', f'm{r}')};")
        w.line("workgroupBarrier();")


def _scale_groups(sh: Shader, kt: str, lay: StreamLayout) -> list[list[int]] | None:
    """For a quantized K, the lane's vec4 loads (i: vec4 part + KL * i of the row) grouped by
    the scale they share: one group per block of 8 vec4s (q8_0, q4_0; KL must divide 8 so
    that a block's vec4s are the same i for every part), or one for the row (int8). None
    for other K (and for KL that does not divide 8)."""
    if kt not in sh.quant:
        return None
    n = lay.D4 // lay.KL
    if sh.quant_block_words(kt) is None:
        return [list(range(n))]
    if 8 % lay.KL:
        return None
    per = 8 // lay.KL
    return [list(range(g, min(g + per, n))) for g in range(0, n, per)]


def _v_row_base(sh: Shader, key: str) -> str:
    """What the P.V phase needs of a key's V row, found once per tile: the first word of the
    row for a quantized V, else the element offset (v_base)."""
    vt = sh.spec.value.tensor
    if vt in sh.quant:
        return sh.quant_row_words(vt, f"v_base({key}) >> 2u")
    return f"v_base({key})"


def _v_read(sh: Shader, u: int, key: str, v_rows_shared: bool) -> str:
    """The P.V phase's vec4 of V for its u-th key (`key`: its absolute index) at col_in."""
    vt = sh.spec.value.tensor
    if vt in sh.quant:
        return f"ldr4_{vt}(vb_sh[jl{u}], col_in >> 2u)"
    row = f"vb_sh[jl{u}]" if v_rows_shared else f"v_base(min({key}, n_keys - 1))"
    return sh.read4(vt, f"({row} + col_in) >> 2u")


def _pv_phase(w: Writer, sh: Shader, lay: StreamLayout, v_rows_shared: bool) -> None:
    """Scores, the invocation's own online softmax and o += p.v over its keys of the tile."""
    KC, BM = lay.KC, lay.BM
    with w.block(f"for (var i0 = 0u; i0 < {lay.NK}u; i0 = i0 + {KC}u)"):
        for u in range(KC):
            w.line(f"let jl{u} = kg + {lay.KG}u * (i0 + {u}u);")
            w.line(f"let kj{u} = k0 + i32(jl{u});")
            w.line(f"let v{u} = {_v_read(sh, u, f'kj{u}', v_rows_shared)};")
        for r in range(BM):
            dots = [_key_score(lay, f"jl{u}", r) for u in range(KC)]
            _online_step(w, sh, r, "s", dots, [(f"o{r}", lambda u: f"v{u}")])


def _score(sh: Shader, dots: str, kj: str) -> str:
    """The score of key `kj` for row `qi`: without the mask on a tile the block map lists as full."""
    if sh.block_mask is None:
        return f"score_fn({dots}, qi, {kj})"
    return f"score_tile_fn({dots}, qi, {kj}, tile_full)"


def _pairs(lay: StreamLayout) -> int:
    """(key group, row) pairs each invocation owns in the softmax phase."""
    return -(-lay.KG * lay.BM // lay.WG)


def _softmax_phase(w: Writer, sh: Shader, lay: StreamLayout) -> None:
    """SMX: pair (key group g, row r) scores g's keys of the tile for row r, updates r's max and
    sum over them, and leaves p and the rescale factor in workgroup memory."""
    BM, KG = lay.BM, lay.KG
    for i in range(_pairs(lay)):
        with w.block(f"if (pi{i} < {KG * BM}u)"):
            w.line(f"let g = pi{i} / {BM}u;")
            w.line(f"let r = pi{i} % {BM}u;")
            w.line("let qi = q0 + i32(r);")
            w.line(f"var mx = {NEG_INF};")
            with w.block(f"for (var n = 0u; n < {lay.NK}u; n = n + 1u)"):
                w.line(f"let jl = g + {KG}u * n;")
                w.line("let kj = k0 + i32(jl);")
                w.line(f"let x = select({NEG_INF}, {_score(sh, _key_score(lay, 'jl', 'r'), 'kj')}, kj < n_keys);")
                w.line(f"nan{i} = nan{i} || is_nan(x);")
                w.line("mx = max(mx, x);")
                w.line(f"p_sh[jl * {BM}u + r] = x;")
            w.line(f"let mn = max(m{i}, mx);")
            w.line(f"let al = {_rescale(f'm{i}', 'mn')};")
            w.line("var ps = 0.0;")
            with w.block(f"for (var n = 0u; n < {lay.NK}u; n = n + 1u)"):
                w.line(f"let a = (g + {KG}u * n) * {BM}u + r;")
                w.line("let p = exp_sub(p_sh[a], mn);")
                w.line("p_sh[a] = p;")
                w.line("ps = ps + p;")
            w.line(f"l{i} = l{i} * al + ps;")
            w.line(f"m{i} = mn;")
            w.line(f"al_sh[pi{i}] = al;")


def _pv_shared(w: Writer, sh: Shader, lay: StreamLayout, v_rows_shared: bool) -> None:
    """o += p.v over the invocation's keys, p from workgroup memory: after SMX=1's rescale by
    al (from workgroup memory), or summing l (SMX=2, whose raise rescaled o and l)."""
    KC, BM = lay.KC, lay.BM
    if lay.SMX == 1:
        for r in range(BM):
            w.line(f"o{r} = o{r} * al_sh[kg * {BM}u + {r}u];")
    with w.block(f"for (var i0 = 0u; i0 < {lay.NK}u; i0 = i0 + {KC}u)"):
        for u in range(KC):
            w.line(f"let jl{u} = kg + {lay.KG}u * (i0 + {u}u);")
            w.line(f"let v{u} = {_v_read(sh, u, f'k0 + i32(jl{u})', v_rows_shared)};")
        for u in range(KC):
            for r in range(BM):
                # a key with p = 0 adds nothing, even an inf/NaN value
                w.line(f"let p{u}_{r} = p_sh[jl{u} * {BM}u + {r}u];")
                if lay.SMX == 2:
                    w.line(f"l{r} = l{r} + p{u}_{r};")
                w.line(f"o{r} = o{r} + select(vec4<f32>(p{u}_{r}) * v{u}, vec4<f32>(), p{u}_{r} == 0.0);")


def _merge(w: Writer, sh: Shader, lay: StreamLayout) -> None:
    """Merge the KG key groups' states per row (log-sum-exp), apply the sink, store."""
    BM, KG, CG, RC = lay.BM, lay.KG, lay.CG, lay.RC
    if lay.SMX == 1:  # the softmax-phase owners hold the states
        for i in range(_pairs(lay)):
            with w.block(f"if (pi{i} < {KG * BM}u)"):
                w.line(f"m_red[pi{i}] = m{i};")
                w.line(f"l_red[pi{i}] = select(l{i}, {NAN}, nan{i});")
    else:
        with w.block("if (cg == 0u)"):
            for r in range(BM):
                w.line(f"m_red[kg * {BM}u + {r}u] = m{r};")
                lr = f"l{r}" if lay.SMX == 2 else f"select(l{r}, {NAN}, nan{r})"
                w.line(f"l_red[kg * {BM}u + {r}u] = {lr};")
    if lay.LS:
        with w.block("if (!lanes_ok)"):
            w.line("atomicOr(&wg_bad, 1u);")
    w.line("workgroupBarrier();")
    _merge_rows(w, sh, lay, KG, "atomicLoad(&wg_bad) != 0u" if lay.LS else "false")
    w.line("workgroupBarrier();")
    for r in range(BM):  # this invocation's share, rescaled to the row's final max
        own = f"m_red[kg * {BM}u + {r}u]" if lay.SMX == 1 else f"m{r}"
        w.line(f"o{r} = o{r} * exp_sub({own}, m_fin[{r}]);")
    # each round: RC rows' outputs of every key group, [key group][row][column group] vec4s in
    # o_red, or (merge_in_sp) in sp, free after the loop's last barrier, as component-major
    # planes of words, so that the invocations of a row store and load consecutive words
    plane = KG * RC * CG
    for r0 in range(0, BM, RC):
        for rr in range(min(RC, BM - r0)):
            at = f"(kg * {RC}u + {rr}u) * {CG}u + cg"
            if lay.merge_in_sp:
                for i, comp in enumerate("xyzw"):
                    w.line(f"sp[{i * plane}u + {at}] = o{r0 + rr}.{comp};")
            else:
                w.line(f"o_red[{at}] = o{r0 + rr};")
        w.line("workgroupBarrier();")
        with w.block(f"if (lid < {min(RC, BM - r0) * CG}u)"):
            w.line(f"let rr = lid / {CG}u;")
            w.line(f"let cc = lid % {CG}u;")
            w.line("var acc = vec4<f32>();")
            with w.block(f"for (var g = 0u; g < {KG}u; g = g + 1u)"):
                b = f"(g * {RC}u + rr) * {CG}u + cc"
                if lay.merge_in_sp:
                    w.line(f"let b = {b};")
                    w.line(f"acc = acc + vec4<f32>(sp[b], sp[b + {plane}u], sp[b + {2 * plane}u], "
                           f"sp[b + {3 * plane}u]);")
                else:
                    w.line(f"acc = acc + o_red[{b}];")
            w.line(f"let row = {r0}u + rr;")
            _store_merged(w, sh, f"dvc * {sh.plan.value_columns}u + cc * 4u")
        w.line("workgroupBarrier();")


def _merge_rows(w: Writer, sh: Shader, lay: StreamLayout, groups: int, bad: str = "false") -> None:
    """m_fin and l_fin per row from the `groups` states in m_red and l_red ([group][row]): the
    row's maximum, the sum rescaled to it, the sink (unsplit); l NaN where a group's is or `bad`."""
    s, BM = sh.spec, lay.BM
    with w.block(f"for (var r = lid; r < {BM}u; r = r + {lay.WG}u)"):  # an invocation per row
        w.line(f"var mm = {NEG_INF};")
        with w.block(f"for (var g = 0u; g < {groups}u; g = g + 1u)"):
            w.line(f"mm = max(mm, m_red[g * {BM}u + r]);")
        w.line("var ll = 0.0;")
        w.line(f"var bad = {bad};")
        with w.block(f"for (var g = 0u; g < {groups}u; g = g + 1u)"):
            w.line(f"let lg = l_red[g * {BM}u + r];")
            w.line("bad = bad || is_nan(lg);")
            w.line(f"ll = ll + lg * exp_sub(m_red[g * {BM}u + r], mm);")
        if s.sink is not None and not s.split_var:
            w.line("let z = sink_fn(q0 + i32(r));")
            w.line("let mf = max(mm, z);")
            w.line("ll = ll * sink_scale(mm, mf, z) + sink_term(z, mf);")
            w.line("bad = bad || is_nan(z);")
            w.line("mm = mf;")
        w.line("m_fin[r] = mm;")
        w.line(f"l_fin[r] = select(ll, {NAN}, bad);")


def _emit_lane_groups(sh: Shader, lay: StreamLayout, w: Writer) -> Program:
    """SMX=3: groups of KL lanes, each streaming every NG-th key of a tile with its own online
    softmax and its DVC/KL value columns in registers; merged once at the end."""
    s, plan = sh.spec, sh.plan
    BM, WG, KL, NG, NV, KC = lay.BM, lay.WG, lay.KL, lay.NG, lay.NV, lay.KC
    sh.header(w, True)
    binds = sh.main_bindings(w)
    w.line(f"var<workgroup> q_sh: array<vec4<f32>, {BM * lay.D4}>;")
    w.line(f"var<workgroup> m_red: array<f32, {NG * BM}>;  // each lane group's max and sum [group][row]")
    w.line(f"var<workgroup> l_red: array<f32, {NG * BM}>;")
    w.line(f"var<workgroup> m_fin: array<f32, {BM}>;")
    w.line(f"var<workgroup> l_fin: array<f32, {BM}>;")
    w.line(f"var<workgroup> o_red: array<vec4<f32>, {lay.RV * WG}>;  // a merge round [vec4][group][lane]")
    w.line("var<workgroup> wg_bad: atomic<u32>;  // a key's lanes were not neighbours in one subgroup")
    w.line("var<workgroup> wg_lo: i32;")
    w.line("var<workgroup> wg_hi: i32;")
    sh.privates(w)
    sh.functions(w)
    with w.block(f"@compute @workgroup_size({WG}) fn main(@builtin(workgroup_id) wid: vec3<u32>, "
                 "@builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) sg_size: u32)"):
        sh.prologue(w)
        w.line(f"let grp = lid / {KL}u;")
        w.line(f"let part = lid % {KL}u;")
        w.line(f"let q0 = i32(qtile) * {BM};")
        w.line(f"let n_rows = i32(P.d_{s.row.dim});")
        w.line(f"let n_keys = i32(P.d_{s.kv_dim});")
        w.line(f"let n_dot4 = P.d_{s.head_dim} >> 2u;")
        w.line(f"let n_width = P.d_{s.width};")
        v_runs = block_runs(sh, s.value.tensor)
        for j in range(NV):  # lanes past Dv read a valid column, never stored
            w.line(f"let cin{j} = min(dvc * {plan.value_columns}u + ({_own_vec4(lay, v_runs, 'part', j)}) * 4u, "
                   "n_width - 4u);")
        listed = sh.block_mask is not None
        if listed:
            w.line(f"let n_kt = (P.d_{s.kv_dim} + {lay.BN - 1}u) / {lay.BN}u;")
            record_base(w, s, sh.block_mask, "qtile", "n_kt")
        sh.tile_bounds(w, BM, lay.BN)
        with w.block("if (lid == 0u)"):  # not left to zero-initialisation, which a driver may skip
            w.line("atomicStore(&wg_bad, 0u);")
        _stage_queries(w, sh, lay)
        w.line("let t_lo = workgroupUniformLoad(&wg_lo);")
        w.line("let t_hi = workgroupUniformLoad(&wg_hi);")
        _check_lane_neighbours(w, KL)
        k_runs = block_runs(sh, s.dot.b.tensor)
        for r in range(BM):
            for i in range(lay.D4 // KL):
                c = f"part * {lay.D4 // KL}u + {i}u" if k_runs else f"part + {KL * i}u"
                w.line(f"let qv{r}_{i} = q_sh[{r * lay.D4}u + {c}];")
            if plan.int_dot:
                k_groups = _key_groups(sh, lay, k_runs)
                if k_groups is None:
                    raise LoweringError("IDP=1 takes K's dots from its stored int8 codes: K must be q8_0, q4_0 or "
                                        f"int8 (got {sh.spec.kernel.param(s.dot.b.tensor).type.dtype.value})")
                _int_queries(w, sh, lay, k_groups, r)
            w.line(f"var m{r} = {NEG_INF};")
            w.line(f"var l{r} = 0.0;")
            w.line(f"var nan{r} = false;")
            for j in range(NV):
                w.line(f"var o{r}_{j} = vec4<f32>();")
        # one loop over the group's steps of KC keys (NK / KC per tile): with PF=1 the loads of
        # the next step are issued before the math on this one, so their latency overlaps it
        parts = _group_registers(w, sh, lay, k_runs)
        w.line(f"let n_steps = (t_hi - t_lo) * {lay.NK // KC};")
        if plan.prefetch:
            with w.block("if (n_steps > 0)"):
                _group_fetch(w, sh, lay, k_runs, "0")
        with w.block("for (var n = 0; n < n_steps; n = n + 1)"):
            if not plan.prefetch:
                _group_fetch(w, sh, lay, k_runs, "n")
            _group_take(w, sh, lay, k_runs)
            if plan.prefetch:
                with w.block("if (n + 1 < n_steps)"):
                    _group_fetch(w, sh, lay, k_runs, "n + 1")
            _group_unpack(w, sh, lay, k_runs)
            _group_math(w, sh, lay, parts)
        _merge_lane_groups(w, sh, lay, v_runs)
    return Program("main", w.text(), "main", WG, binds, sh.uniforms, sh.grid_factors(), features(plan),
                   4 * lay.smem_words, in_bounds=True)


def _check_lane_neighbours(w: Writer, KL: int) -> None:
    """`lanes_ok`: whether this invocation's key group of KL lanes lies in one subgroup in
    invocation order (its xor partners are the invocations lid ^ 1, lid ^ 2, ...), which the
    shuffle butterflies assume; the merge turns a group that is not into NaN."""
    w.line(f"var lanes_ok = sg_size >= {KL}u;")
    k = 1
    while k < KL:  # each shuffle on its own line: not under a short-circuit's control flow
        w.line(f"let lane_x{k} = subgroupShuffleXor(lid, {k}u);")
        w.line(f"lanes_ok = lanes_ok && lane_x{k} == (lid ^ {k}u);")
        k *= 2


def _merge_lane_groups(w: Writer, sh: Shader, lay: StreamLayout, v_runs: bool) -> None:
    """SMX=3's end: the NG groups' states per row (log-sum-exp; NaN where a group's lanes were
    not neighbours), each lane's output vec4s rescaled to the row's maximum and summed over the
    groups in rounds of RV vec4s per lane through o_red, then stored."""
    BM, WG, KL, NG, NV = lay.BM, lay.WG, lay.KL, lay.NG, lay.NV
    with w.block("if (!lanes_ok)"):
        w.line("atomicOr(&wg_bad, 1u);")
    with w.block("if (part == 0u)"):
        for r in range(BM):
            w.line(f"m_red[grp * {BM}u + {r}u] = m{r};")
            w.line(f"l_red[grp * {BM}u + {r}u] = select(l{r}, {NAN}, nan{r});")
    w.line("workgroupBarrier();")
    _merge_rows(w, sh, lay, NG, "atomicLoad(&wg_bad) != 0u")
    w.line("workgroupBarrier();")
    for r in range(BM):
        w.line(f"let al{r} = exp_sub(m{r}, m_fin[{r}]);")
        for j in range(NV):
            w.line(f"o{r}_{j} = o{r}_{j} * al{r};")
    owned = [(r, j) for r in range(BM) for j in range(NV)]  # the lane's vec4s, merged RV per round
    for a in range(0, len(owned), lay.RV):
        batch = owned[a:a + lay.RV]
        for slot, (r, j) in enumerate(batch):
            w.line(f"o_red[{slot * WG}u + lid] = o{r}_{j};")
        w.line("workgroupBarrier();")
        # the round's len(batch) x KL (vec4, lane) pairs, which may outnumber the invocations
        with w.block(f"for (var e = lid; e < {len(batch) * KL}u; e = e + {WG}u)"):
            w.line(f"let slot = e / {KL}u;")
            w.line(f"let pp = e % {KL}u;")
            w.line("var acc = vec4<f32>();")
            with w.block(f"for (var g = 0u; g < {NG}u; g = g + 1u)"):
                w.line(f"acc = acc + o_red[slot * {WG}u + g * {KL}u + pp];")
            w.line(f"let own = {a}u + slot;  // (row, vec4) pair own / NV, own % NV")
            w.line(f"let row = own / {NV}u;")
            own = _own_vec4(lay, v_runs, "pp", f"own % {NV}u")
            _store_merged(w, sh, f"dvc * {sh.plan.value_columns}u + ({own}) * 4u")
        w.line("workgroupBarrier();")


def _own_vec4(lay: StreamLayout, runs: bool, part: str, j: int | str) -> str:
    """The vec4 of the Dv chunk that lane `part` of a key owns as its j-th: every KL-th, or
    (`runs`, a q8_0 or q4_0 V) the lane's own run of NV, whose blocks share scales and words."""
    jj = f"{j}u" if isinstance(j, int) else f"({j})"
    return f"{part} * {lay.NV}u + {jj}" if runs else f"{part} + {lay.KL}u * {jj}"


def _value_groups(sh: Shader, lay: StreamLayout) -> list[list[int]] | None:
    """SMX=3: a quantized V's vec4s j < NV of a lane grouped by the scale they share, where its
    codes are kept unscaled and each scale multiplies the probability instead (o += (p d) q: one
    product per key and block, not one per value, and no guard per value against a NaN or inf
    value, integer codes being finite): one group for an int8 row, one per block of a q8_0 or
    q4_0 run of whole blocks or inside one. None otherwise (float V, or runs across blocks)."""
    vt = sh.spec.value.tensor
    if vt not in sh.quant:
        return None
    if sh.quant_block_words(vt) is None:
        return [list(range(lay.NV))]
    if not block_runs(sh, vt) or (lay.NV % 8 and 8 % lay.NV):
        return None
    return [list(range(g, min(g + 8, lay.NV))) for g in range(0, lay.NV, 8)]


def _step_loads(sh: Shader, lay: StreamLayout, k_runs: bool, u: int) -> tuple[list[str], list[tuple[str, Fetched]]]:
    """SMX=3: key u of a step (its index `kj` in scope): the lines that find its K and V rows and
    blocks, and what the step uses of them as (name, Fetched): K vec4s k{u}_{i}, the scales
    d{u}_{g} of a quantized K's groups, V vec4s v{u}_{j} and the scales vd{u}_{g} of a quantized
    V's groups (_value_groups). With PF=1 quantized codes, scales and f16 pairs stay as stored
    until the step that uses them (registers carried across an iteration); without, each is
    unpacked where it is loaded."""
    kt, vt = sh.spec.dot.b.tensor, sh.spec.value.tensor
    KL, n = lay.KL, lay.D4 // lay.KL
    lines = [f"let vb = {_v_row_base(sh, 'min(kj, n_keys - 1)')};", f"let kb = {_k_row('kj')};"]
    out: list[tuple[str, Fetched]] = []
    groups = _key_groups(sh, lay, k_runs)
    if groups is None:  # float K: vec4 part + KL i, zero past the head dim
        for i in range(n):
            f = sh.fetch4(kt, f"kb + min(part + {KL * i}u, n_dot4 - 1u)")
            out.append((f"k{u}_{i}", Fetched(f.ty, f.load, lambda x, f=f, i=i:
                                             f"select(vec4<f32>(), {f.use(x)}, part + {KL * i}u < n_dot4)")))
    else:  # quantized K past the head dim read clamped and unmasked: it meets q's zeros there and
        # integer codes are finite, so it adds exactly nothing (H200, with the scaled probabilities,
        # 0.88-0.94 of the time; SMX=2 keeps the mask, Dawn 1.19-1.21x slower without it over int8)
        words = sh.quant_block_words(kt)
        lines.append(f"let kw = {sh.quant_row_words(kt, 'kb')};")
        for g, members in enumerate(groups):
            if words is None:
                lines.append(f"let kw{g} = kw;")
            elif k_runs:
                lines.append(f"let kw{g} = kw + min((k_run0 >> 3u) + {g}u, (n_dot4 >> 3u) - 1u) * {words}u;")
            else:
                lines.append(f"let kw{g} = kw + min({g}u, (n_dot4 >> 3u) - 1u) * {words}u;")
            out.append((f"d{u}_{g}", sh.fetch_scale(kt, f"kw{g}")))
            for i in members:
                c: int | str
                if k_runs:
                    c = i % 8 if n % 8 == 0 else f"(k_run0 & 7u) + {i % 8}u"
                else:
                    c = f"min(part + {KL * i}u, n_dot4 - 1u)" + (" & 7u" if words is not None else "")
                out.append((f"k{u}_{i}", sh.fetch_codes(kt, f"kw{g}", c, as_int8=bool(sh.plan.int_dot))))
    v_groups = _value_groups(sh, lay)
    if v_groups is not None and sh.block_quantized(vt):  # a run of whole blocks, or inside one
        words = sh.quant_block_words(vt)
        for g, members in enumerate(v_groups):  # blocks clamped to the row's last: columns past Dv are never stored
            lines.append(f"let vb{g} = vb + min((v_run0 >> 3u) + {g}u, (n_width >> 5u) - 1u) * {words}u;")
            out.append((f"vd{u}_{g}", sh.fetch_scale(vt, f"vb{g}")))
            for j in members:
                c = j % 8 if lay.NV % 8 == 0 else f"(v_run0 & 7u) + {j % 8}u"
                out.append((f"v{u}_{j}", sh.fetch_codes(vt, f"vb{g}", c)))
    elif v_groups is not None:  # int8: the row's scale
        out.append((f"vd{u}_0", sh.fetch_scale(vt, "vb")))
        out.extend((f"v{u}_{j}", sh.fetch_codes(vt, "vb", f"cin{j} >> 2u")) for j in range(lay.NV))
    elif vt in sh.quant:
        out.extend((f"v{u}_{j}", Fetched("vec4<f32>", f"ldr4_{vt}(vb, cin{j} >> 2u)")) for j in range(lay.NV))
    else:
        out.extend((f"v{u}_{j}", sh.fetch4(vt, f"(vb + cin{j}) >> 2u")) for j in range(lay.NV))
    if not sh.plan.prefetch:  # loaded and used in the same step: unpacked where loaded (H200: as fast)
        out = [(name, f.unpacked()) for name, f in out]
    return lines, out


def _step_registers(loads: list[tuple[str, Fetched]], u: int) -> dict[str, tuple[str, str]]:
    """The fetch registers of key u's loads: one per distinct load (q4_0's vec4s c and c + 4
    share a word), as load -> (register, WGSL type)."""
    regs: dict[str, tuple[str, str]] = {}
    for _, f in loads:
        regs.setdefault(f.load, (f"f{u}_{len(regs)}", f.ty))
    return regs


def _group_registers(w: Writer, sh: Shader, lay: StreamLayout, k_runs: bool) -> list[list[int]] | None:
    """SMX=3: the registers one step's loads go to (per key u of the step: its index fkj{u} and
    its loads as stored, _step_loads; fful, whether the step's tile is full in the block map);
    returns the K scale groups (_key_groups)."""
    if k_runs:
        w.line(f"let k_run0 = part * {lay.D4 // lay.KL}u;  // the first vec4 of the lane's run of K")
    if _value_groups(sh, lay) is not None and sh.block_quantized(sh.spec.value.tensor):
        w.line(f"let v_run0 = dvc * {sh.plan.value_columns // 4}u + part * {lay.NV}u;  // and of V")
    for u in range(lay.KC):
        w.line(f"var fkj{u} = 0;")
        for reg, ty in _step_registers(_step_loads(sh, lay, k_runs, u)[1], u).values():
            w.line(f"var {reg} = {ty}();")
    if sh.block_mask is not None:
        w.line("var fful = false;")
    return _key_groups(sh, lay, k_runs)


def _group_fetch(w: Writer, sh: Shader, lay: StreamLayout, k_runs: bool, step: str) -> None:
    """SMX=3: issue the loads of the group's step `step` (of the workgroup's tiles, NK / KC
    steps each) into the fetch registers."""
    KC, per = lay.KC, lay.NK // lay.KC
    with w.block(""):
        w.line(f"let st = {step};")
        w.line(f"let t = t_lo + st / {per};")
        w.line(f"let i0 = u32(st % {per}) * {KC}u;")
        if sh.block_mask is not None:
            w.line("let listed = t_blocks[blk_rec + 1u + u32(t)];")
            w.line(f"let k0 = {_first_key('listed', lay.BN)};")
            w.line(f"fful = listed >= {FULL_BIT:#x}u;")
        else:
            w.line(f"let k0 = t * {lay.BN};")
        for u in range(KC):
            with w.block(""):
                w.line(f"let kj = k0 + i32(grp + {lay.NG}u * (i0 + {u}u));")
                w.line(f"fkj{u} = kj;")
                lines, loads = _step_loads(sh, lay, k_runs, u)
                for line in lines:
                    w.line(line)
                for load, (reg, _) in _step_registers(loads, u).items():
                    w.line(f"{reg} = {load};")


def _group_take(w: Writer, sh: Shader, lay: StreamLayout, k_runs: bool) -> None:
    """SMX=3: the fetched step's loads as stored (x{u}_{n}: kj{u}, tile_full), taken from the
    fetch registers before they take the next step's loads."""
    for u in range(lay.KC):
        w.line(f"let kj{u} = fkj{u};")
        for reg, _ in _step_registers(_step_loads(sh, lay, k_runs, u)[1], u).values():
            w.line(f"let x{reg[1:]} = {reg};")
    if sh.block_mask is not None:
        w.line("let tile_full = fful;")


def _group_unpack(w: Writer, sh: Shader, lay: StreamLayout, k_runs: bool) -> None:
    """SMX=3: the taken step's values (k{u}_{i}, d{u}_{g}, v{u}_{j}, vd{u}_{g}), unpacked after
    the next step's loads are issued, so that those do not wait on this step's."""
    for u in range(lay.KC):
        loads = _step_loads(sh, lay, k_runs, u)[1]
        regs = _step_registers(loads, u)
        for name, f in loads:
            w.line(f"let {name} = {f.use('x' + regs[f.load][0][1:])};")


def _group_math(w: Writer, sh: Shader, lay: StreamLayout, groups: list[list[int]] | None) -> None:
    """SMX=3: the step's dots summed across the KL lanes by a shuffle butterfly, the online
    softmax and o += p.v per row."""
    KL, KC, BM, NV = lay.KL, lay.KC, lay.BM, lay.NV
    for u in range(KC):
        if sh.plan.int_dot:
            terms = _int_dot_terms(sh, groups, lay, u)
        else:
            terms = _dot_terms(groups, lay, lambda r, i: f"qv{r}_{i}", lambda i, u=u: f"k{u}_{i}",
                               lambda g, u=u: f"d{u}_{g}")
        for r in range(BM):
            w.line(f"var s{u}_{r} = {terms[r]};")
            k = 1
            while k < KL:  # every lane of the group ends with the same sum (a + b == b + a)
                w.line(f"s{u}_{r} = s{u}_{r} + subgroupShuffleXor(s{u}_{r}, {k}u);")
                k *= 2
    v_group = {j: g for g, members in enumerate(_value_groups(sh, lay) or []) for j in members}
    for r in range(BM):
        _online_step(w, sh, r, "x", [f"s{u}_{r}" for u in range(KC)],
                     [(f"o{r}_{j}", lambda u, j=j: f"v{u}_{j}") for j in range(NV)],
                     (lambda u, j: f"vd{u}_{v_group[j]}") if v_group else None)


# The largest integer whose three balanced base-256 digits (each -128..127) fit int8: 0x7F7F7F.
QUERY_INT_MAX = 0x7F7F7F


def _int_queries(w: Writer, sh: Shader, lay: StreamLayout, groups: list[list[int]], r: int) -> None:
    """IDP=1: row r's query vec4s of each K scale group g as integers n = round(q / qs{r}_{g})
    of at most QUERY_INT_MAX (qs{r}_{g} = the group's max |q| / QUERY_INT_MAX: the error is
    2^-24 of that maximum, an f32 rounding), each split into three balanced base-256 digits
    packed as int8 words qd{r}_{i}_{0,1,2} for dot4I8Packed; for a q4_0 K (codes 8 above their
    values) each digit's sum over the group, qsum{r}_{g}_{l}. A group holding an inf or NaN
    gets a NaN scale, so its dots are NaN as its f32 products would make them."""
    top = f"{float(QUERY_INT_MAX)}"
    bias = sh.quant[sh.spec.dot.b.tensor] is ir.DType.Q4_0
    for g, members in enumerate(groups):
        mx = f"abs(qv{r}_{members[0]})"
        for i in members[1:]:
            mx = f"max({mx}, abs(qv{r}_{i}))"
        w.line(f"let qm{r}_{g} = {mx};")
        w.line(f"let qa{r}_{g} = max(max(qm{r}_{g}.x, qm{r}_{g}.y), max(qm{r}_{g}.z, qm{r}_{g}.w));")
        finite = " && ".join(f"all((bitcast<vec4<u32>>(qv{r}_{i}) & vec4<u32>(0x7fffffffu)) < vec4<u32>(0x7f800000u))"
                             for i in members)  # by bits: holds where a compiler assumes finite math
        w.line(f"let qok{r}_{g} = {finite};")
        w.line(f"let qs{r}_{g} = select({NAN}, qa{r}_{g} / {top}, qok{r}_{g});")
        for i in members:
            n = f"qn{r}_{i}"
            w.line(f"let {n} = select(vec4<i32>(), vec4<i32>(clamp(round(qv{r}_{i} / qa{r}_{g} * {top}), "
                   f"vec4<f32>(-{top}), vec4<f32>({top}))), qok{r}_{g} && qa{r}_{g} > 0.0);")
            for digit in range(2):  # the low digit in -128..127, the rest carried on; the top one is what is left
                w.line(f"let {n}d{digit} = (({n} + vec4<i32>(128)) & vec4<i32>(255)) - vec4<i32>(128);")
                w.line(f"let qd{r}_{i}_{digit} = pack4xI8({n}d{digit});")
                w.line(f"let qn{r}_{i}_{digit + 1} = ({n} - {n}d{digit}) >> vec4<u32>(8u);")
                n = f"qn{r}_{i}_{digit + 1}"
            w.line(f"let qd{r}_{i}_2 = pack4xI8({n});")
        if bias:
            for digit in range(3):
                total = " + ".join(f"dot4I8Packed(qd{r}_{i}_{digit}, 0x01010101u)" for i in members)
                w.line(f"let qsum{r}_{g}_{digit} = {total};")


def _int_dot_terms(sh: Shader, groups: list[list[int]] | None, lay: StreamLayout, u: int) -> list[str]:
    """IDP=1: per query row, key u's partial dot from K's int8 codes k{u}_{i} and the row's
    digits (_int_queries): per scale group and digit an exact i32 sum of dot4I8Packed (at most
    32 x 128 x 128 in magnitude, so exact in f32 too), the digits weighed 65536 / 256 / 1 in
    f32, times the group's K scale and q scale."""
    assert groups is not None
    bias = sh.quant[sh.spec.dot.b.tensor] is ir.DType.Q4_0
    rows = []
    for r in range(lay.BM):
        parts = []
        for g, members in enumerate(groups):
            sums = []
            for digit in range(3):
                total = " + ".join(f"dot4I8Packed(k{u}_{i}, qd{r}_{i}_{digit})" for i in members)
                sums.append(f"f32({total} - 8 * qsum{r}_{g}_{digit})" if bias else f"f32({total})")
            parts.append(f"d{u}_{g} * qs{r}_{g} * ({sums[2]} * 65536.0 + ({sums[1]} * 256.0 + {sums[0]}))")
        rows.append(" + ".join(parts))
    return rows


def _online_step(w: Writer, sh: Shader, r: int, name: str, dots: list[str],
                 accs: list[tuple[str, Callable[[int], str]]],
                 value_scale: Callable[[int, int], str] | None = None) -> None:
    """Row r's online-softmax step over the keys kj{u} of `dots` (their dot products): scores
    `{name}{u}` (NaN flagged in nan{r}), the new maximum, m{r} and l{r} rescaled with every
    accumulator of `accs`, and each accumulator += p_u times its value vec4 `value(u)`; with
    `value_scale` (the scale of key u's value vec4 j, whose codes are finite integers) p_u times
    that scale once per scale, then times the codes, unguarded. (Rescaling only where the maximum
    rose, behind a branch, made lavapipe's f16 lane groups 1.2-1.45x slower.)"""
    with w.block(""):
        w.line(f"let qi = q0 + {r};")
        for u, dot in enumerate(dots):
            w.line(f"let {name}{u} = select({NEG_INF}, {_score(sh, dot, f'kj{u}')}, kj{u} < n_keys);")
            w.line(f"nan{r} = nan{r} || is_nan({name}{u});")
        mx = f"{name}0"
        for u in range(1, len(dots)):
            mx = f"max({mx}, {name}{u})"
        w.line(f"let mn = max(m{r}, {mx});")
        w.line(f"let al = {_rescale(f'm{r}', 'mn')};")
        for acc, _ in accs:
            w.line(f"{acc} = {acc} * al;")
        w.line(f"var ps = l{r} * al;")
        for u in range(len(dots)):
            w.line(f"let p{u} = exp_sub({name}{u}, mn);")
            w.line(f"ps = ps + p{u};")
            if value_scale is not None:
                scaled: dict[str, str] = {}
                for j, (acc, value) in enumerate(accs):
                    d = value_scale(u, j)
                    if d not in scaled:  # a key with p = 0 adds nothing, even over an inf/NaN scale
                        scaled[d] = f"pd{u}_{len(scaled)}"
                        w.line(f"let {scaled[d]} = select(p{u} * {d}, 0.0, p{u} == 0.0);")
                    w.line(f"{acc} = fma(vec4<f32>({scaled[d]}), {value(u)}, {acc});")
                continue
            for acc, value in accs:  # a key with p = 0 adds nothing, even an inf/NaN value
                w.line(f"{acc} = fma(vec4<f32>(p{u}), select({value(u)}, vec4<f32>(), p{u} == 0.0), {acc});")
        w.line(f"l{r} = ps;")
        w.line(f"m{r} = mn;")


def _store_merged(w: Writer, sh: Shader, column: str) -> None:
    """A merge's end for tile row `row` and output column `column` (its vec4 summed in `acc`):
    the row's final maximum and sum, and the store where row and column exist."""
    w.line("let qi = q0 + i32(row);")
    w.line(f"let c = {column};")
    w.line("let mm = m_fin[row];")
    w.line("let ll = l_fin[row];")
    with w.block("if (qi < n_rows && c < n_width)"):
        _store(w, sh)


def _store(w: Writer, sh: Shader) -> None:
    """Four output columns of one row: the split's partial state, or normalised output (+ lse)."""
    s = sh.spec
    if s.split_var:
        w.line(f"let pr = {sh.part_row('qi', 'n_width')};")
        with w.block("if (c == 0u)"):
            w.line("t_part[pr] = mm;")
            w.line("t_part[pr + 1u] = ll;")
        for i, comp in enumerate("xyzw"):
            w.line(f"t_part[pr + 2u + c + {i}u] = acc.{comp};")
        return
    w.line("let bad = is_nan(ll);")
    w.line("let inv = select(1.0 / ll, 0.0, ll == 0.0);")
    if s.lse:
        with w.block("if (c == 0u)"):
            w.line(f"let lse = select(mm + log(ll), {NEG_INF}, ll == 0.0);")
            w.line(f"t_lse[lse_base(qi)] = select(lse, {NAN}, bad);")
    if sh.half_out:  # float16: columns c..c+3 (Dv is a multiple of 4 here) as two words of halves
        w.line(f"let x = select(acc * inv, vec4<f32>({NAN}), bad);")
        sh.store_o2(w, "o_base(qi)", "c", "x.x", "x.y")
        sh.store_o2(w, "o_base(qi)", "c + 2u", "x.z", "x.w")
        return
    for i, comp in enumerate("xyzw"):
        w.line(f"t_o[o_base(qi) + (c + {i}u) * P.s_o_{len(s.axes)}] = select(acc.{comp} * inv, {NAN}, bad);")
