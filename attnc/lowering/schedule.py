"""Planning: the plan (strategy, family, tile shapes, tunables) and split count a problem gets
on a device, chosen from the device's capabilities by rules measured on real adapters.

No vendor names are consulted: the rules read only `Capabilities` (adapter kind, dialect,
subgroup facts, limits) and the problem's dims. `attnc tune` may replace a rule's choice by a
measured one (runtime/tune.py, whose candidates come from lowering/candidates.py). Where a
rule names a measurement, docs/PLANS.md and docs/BENCHMARKS.md give the numbers.
"""

from __future__ import annotations

import dataclasses
import os

from attnc.errors import DeviceError, LoweringError
from attnc.lowering.capabilities import Capabilities
from attnc.lowering.combine import combine_groups
from attnc.lowering.plan import (
    LANE_GROUP_MAX_VEC4,
    Dialect,
    Family,
    Plan,
    Storage,
    Strategy,
    layout,
    owned_run,
    stream_layout,
)

TARGETS = {"portable": Family.PORTABLE, "subgroups": Family.SUBGROUPS,
           "portable-f16": Family.PORTABLE, "subgroups-f16": Family.SUBGROUPS}
# targets whose products are computed in f16 (shader-f16); the others compute in f32
F16_MATH_TARGETS = frozenset({"portable-f16", "subgroups-f16"})


def pick_family(caps: Capabilities, target: str | None) -> Family:
    """The requested variant family, or the default for the device (subgroups if offered)."""
    usable = "subgroups" in caps.features and caps.subgroup_lanes_contiguous >= 4
    if target is None:
        return Family.SUBGROUPS if usable else Family.PORTABLE
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    fam = TARGETS[target]
    if fam is Family.SUBGROUPS and "subgroups" not in caps.features:
        raise DeviceError(f"{caps.name} does not offer the 'subgroups' feature",
                          notes=("use target='portable', which needs no subgroup operations",))
    if fam is Family.SUBGROUPS and not usable:
        raise DeviceError(f"{caps.name} does not place consecutive invocations in aligned groups of 4 lanes "
                          "of one subgroup (checked by a probe shader), which the subgroups family relies on",
                          notes=("use target='portable', which needs no subgroup operations",))
    if target in F16_MATH_TARGETS and "f16" not in caps.features:
        raise DeviceError(f"{caps.name} does not offer the 'shader-f16' feature that target {target!r} needs",
                          notes=("float16 inputs also run with target='portable' or 'subgroups' "
                                 "(f16 storage, f32 math), which need no shader-f16",))
    return fam


def check_target_inputs(target: str | None, operands: str, quantized: dict[str, str]) -> None:
    """ValueError where a target cannot take these inputs: the f16-tile targets stage float16
    operands (`operands`: their dtype, e.g. "float32") and no quantized K or V (`quantized`:
    format by tensor name), whose values d * q need up to 19 bits and would be rounded there."""
    if target not in F16_MATH_TARGETS:
        return
    if operands != "float16":
        raise ValueError(f"target {target!r} stages f16 tiles: pass float16 q, k, v (got {operands})")
    for name, fmt in quantized.items():
        raise ValueError(f"target {target!r} stages K and V in f16 tiles, which would round the values of a {fmt} "
                         f"{name} (d * q: up to 19 bits); a quantized cache runs with target 'portable' or "
                         "'subgroups' (or None), which read it in f32")


def device_refuses(caps: Capabilities, plan: Plan) -> str | None:
    """Why a plan that lowers would still not run correctly on this device, or None: the
    subgroup facts a subgroups-family plan assumes must be the device's (a tuning-cache entry
    written elsewhere or damaged may claim others), and f16 tiles need shader-f16."""
    if plan.family is Family.SUBGROUPS:
        if "subgroups" not in caps.features or caps.subgroup_lanes_contiguous < 4:
            return f"its family is subgroups, which {caps.name} does not offer (or fails the subgroup probe)"
        sg_min = max(1, min(caps.subgroup_min_size or 4, 32, caps.subgroup_lanes_contiguous))
        if plan.min_subgroup > sg_min:
            return f"SGMIN={plan.min_subgroup}: {caps.name} keeps only {sg_min} lanes together for certain"
        if plan.shuffle_only_lanes > caps.subgroup_lanes_contiguous:
            return (f"SGFAST={plan.shuffle_only_lanes}: the subgroup probe found {caps.subgroup_lanes_contiguous} "
                    f"contiguous lanes on {caps.name}")
        key_lanes = plan.strategy is Strategy.STREAM and (plan.softmax_phase == 3 or plan.lane_sum)
        if key_lanes and plan.lanes_per_key > caps.subgroup_lanes_contiguous:  # its lane check would write NaN
            return (f"KL={plan.lanes_per_key} lanes per key shuffle within one subgroup, but the subgroup probe found "
                    f"{caps.subgroup_lanes_contiguous} contiguous lanes on {caps.name}")
    if plan.strategy is Strategy.LANES and plan.subgroup_width != caps.subgroup_size:
        return f"SGB={plan.subgroup_width}: {caps.name} runs subgroups of {caps.subgroup_size} lanes"
    if plan.storage is Storage.F16A and "f16" not in caps.features:
        return f"f16 tiles (F16A) need shader-f16, which {caps.name} does not offer"
    return None


def pow2ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def row_tiles(dims: dict[str, int], bm: int) -> int:
    """Workgroups of an unsplit prefill plan with bm-row tiles: one per (batch, head, row tile)."""
    return dims["B"] * dims["Hq"] * -(-dims["S"] // bm)


def plan_for(caps: Capabilities, family: Family, dims: dict[str, int], *, causal: bool = False,
             f16: bool = False, explicit_family: bool = False, f16_math: bool = False,
             vector_loads: bool = True, k_format: str | None = None, strategy: str = ""
             ) -> tuple[Plan, dict[str, int]]:
    """The heuristic plan and kernel tunables for a shape (a tuned choice overrides it).

    From the tuning runs in docs/bench/ (no vendor names: adapter type and limits only);
    `k_format` is K's storage format when it is quantized ("q8_0", "q4_0", "int8"):
    - short query rows on a CPU adapter with subgroups, up to LANE_GROUP_MAX_ROWS packed rows
      per tile, and one row per tile over a block-quantized K (int8 up to D = 64) on a GPU with
      subgroups: the stream strategy's lane groups (`lane_groups_plan`: lavapipe 2-4x faster;
      H200 q8_0 3-25 %, q4_0 5-14 %, int8 at D = 64 14-17 %);
    - short query rows (S <= 16: decoding, cross-attention): the stream strategy (K/V read
      straight from storage) with row tiles of up to 16 rows (4 on a CPU adapter; query heads
      of a KV head packed into rows), split over KV, with a softmax phase (SMX) from 8 rows
      (H200 dec_gqa8 about 10 % faster with it) and >= 2 KV tiles per split; on a GPU, a
      quantized K with one row per tile where lane groups do not apply (int8 from D = 128, the
      portable family) takes one lane per key, tiles of a
      key per invocation and the probabilities in the dot phase (SMX=2: H200 kv_dec1_h128,
      q8_0, q4_0 and int8, 5-11 % faster; slower with f16 K, whose rows one lane reads in
      8-byte pieces, and with 4 or 8 rows per tile), and so does an f16 or quantized K on a
      CPU adapter (lavapipe kv_lp_dec1_h128: 8-24 % faster; f32 K not); f16 tiles of 4 or
      more rows on a GPU sum a key's partial dots by shuffles (LS=1: H200 dec4_h128, gqa8
      3-9 % faster on both backends in three processes; one row with 8 lanes per key, and
      f32, not faster); on a CPU adapter
      without GQA, the rows strategy (one query row per invocation) from ROWS_TILE rows, and
      below that where stream does not apply (with fewer rows its workgroups idle: stream is
      1.1-3.6x faster at S = 1 and 4 on lavapipe, llvmpipe GL and Dawn, 2026-12-04); on a GPU with at least 32
      packed rows per KV head (GQA with several queries), 32x64 tiles of the tiled strategy with
      4 rows per invocation and 8-key value blocks (H200 dec4_gqa8 1.6x faster than stream, and
      1.15x again in a workgroup of 11.5 KiB with 60 splits); the tiled strategy where
      none applies (head dims not multiples of 4, D over STREAM_MAX_D, f16 tiles; the
      rows strategy only where its registers fit FUNCTION_VAR_BYTES);
    - longer rows: the largest of 128x64 (256 invocations), 64x64 and 64x32 tiles with 4 rows
      per invocation that the device's limits allow (CPU adapters skip the 256-wide one);
      on a GPU, when 128-row tiles would make fewer than 64 workgroups, 32x64 tiles first;
    - causal masks on a GPU: the query tiles are taken last tile first across all heads (QO=1:
      the tiles that see the most keys start first), and where 128-row tiles would make fewer
      than 256 workgroups, 64-row tiles of 256 invocations, twice as many pieces of work for the
      GPU to balance (H200 phi35: 128 workgroups of 2-8 KV tiles; 0.166 -> 0.129 ms on
      wgpu-native; 64-row tiles without QO 0.195, QO alone 0.163; docs/BENCHMARKS.md);
    - q/k/v load as vec4 when both head dims are multiples of 4 (and `vector_loads`: False for
      strided views whose head dim is not contiguous, which only scalar loads can read);
    - tiled plans on a GPU unroll their tile loops completely (UN=64) and prefetch the next
      staged block into registers (PF=1): 1.2-1.5x on the H200 prefill cases; CPU adapters keep
      the loops (lavapipe takes minutes to compile fully unrolled tiles);
    - on a GPU, value blocks of half the key tile (VK) by all of Dv up to 96 columns, 64 above
      (DVS), where they fit: each p read from workgroup memory then feeds 8-12 products, not 4
      (H200: vit, vision_h72 and gemma about 5 % faster, phi35 within 4 %);
    - on a GPU, a tile that needs more than SHARED_SMEM of workgroup memory and holds at most
      32 outputs per invocation takes `chunked_p`'s plan instead (p in chunks, 16-key value
      blocks, no prefetch), about half the memory, so that two workgroups share an SM; with
      Tint's shaders up to 48 outputs when there are at least 256 row tiles (`tiled_plan`);
    - on a CPU adapter with 8-lane subgroups, large problems with head dims up to 96: the lanes
      strategy (`lanes_plan`; lavapipe ci_prefill and ci_vision about 3x faster than tiled,
      the decode cases 2.5-3.5x faster than rows and stream).
    The split count is chosen after the plan: split_count for short rows,
    prefill_split_count for long ones (GPUs with few row tiles only).
    The environment variable ATTNC_STRATEGY (tiled, stream or rows) limits these choices to
    one strategy where it applies (tiled always does), e.g. to test or compare one of them;
    `strategy` does the same for a caller (tiles a kernel's options fix are the tiled
    strategy's: its tiles are BM rows by BN keys whatever their sizes).
    """
    sg_min = max(1, min(caps.subgroup_min_size or 4, 32, caps.subgroup_lanes_contiguous or 4))
    # lanes the probe found contiguous: tiled row groups up to that wide reduce by shuffles alone
    # when the shader's run-time subgroup size allows (H200: 32 lanes, a reported minimum of 4)
    sg_fast = caps.subgroup_lanes_contiguous if family is Family.SUBGROUPS else 0
    dialect = caps.dialect
    storage = Storage.F16A if f16_math else Storage.F16 if f16 else Storage.F32  # layouts count what each stages
    vec = 4 if vector_loads and dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0 else 1
    dv = min(max(pow2ceil(dims["Dv"]), 32), 256)
    cpu = caps.cpu
    group = dims["Hq"] // dims["Hkv"]
    only = strategy or os.environ.get("ATTNC_STRATEGY", "").strip()  # heuristics restricted to one strategy
    if only and only not in {x.value for x in Strategy}:
        raise ValueError(f"ATTNC_STRATEGY must be one of {sorted(x.value for x in Strategy)}, got {only!r}")
    # GPUs: tile loops unrolled in the WGSL and the next block's loads issued before the math
    gpu = {} if cpu else {"unroll": 64, "prefetch": 1}
    # causal on a GPU: the query tiles that see the most keys start first (Plan.QO)
    causal = causal and not cpu
    tiled_base = Plan(family, storage, dialect, min_subgroup=sg_min, shuffle_only_lanes=sg_fast, vector_width=vec,
                      last_tile_first=int(causal), **gpu)
    if dims["S"] <= 16:
        groups = lane_groups_plan(caps, family, dims, storage, dialect, vec, f16_math, only, k_format)
        if groups is not None:
            return groups
        lanes = lanes_plan(caps, family, dims, storage, dialect, vec, f16_math, only)
        if lanes is not None:
            return lanes
        if not cpu and group * dims["S"] >= 32 and only in ("", "tiled"):
            # many packed rows per KV head (GQA, several queries each): 32-row tiles of 4 rows per
            # invocation (H200 dec4_gqa8: 0.063 ms against the stream plan's 0.102)
            tiled = tiled_plan(caps, tiled_base, dims, [(32, 64, 128, 4)])
            if tiled is not None:
                # 8-key value blocks: 11.5 KiB, four workgroups per SM on the H200, so twice the
                # splits run in one wave (dec4_gqa8 with 60 splits: 0.052-0.057 ms against
                # 0.062-0.064 with 32-key blocks and 30)
                return dataclasses.replace(tiled[0], value_block_keys=8), tiled[1]
        # the rows strategy: one query row per invocation in workgroups of ROWS_TILE rows
        rows = Plan(Family.PORTABLE, storage, dialect, strategy=Strategy.ROWS, keys_per_step=4,
                    query_dim=max(pow2ceil(dims["D"]), 4), value_columns=dv, vector_width=vec)
        rows_apply = cpu and group == 1 and not explicit_family and only in ("", "rows") and rows_fit(rows)
        if rows_apply and dims["S"] >= ROWS_TILE:  # fewer rows would leave invocations idle
            return rows, {"BM": ROWS_TILE, "BN": 64}
        if vec == 4 and not f16_math and dims["D"] <= STREAM_MAX_D and only in ("", "stream"):
            dvc = max(4, pow2ceil(dims["Dv"]))
            if cpu:  # small tiles: lavapipe compiles large unrolled row tiles slowly (seconds)
                wg, bn, bm = 64, 64, min(4, pow2ceil(group * dims["S"]))
            else:
                wg, bn = (256, 128) if dvc >= 128 else (128, 64)
                bm = min(16, pow2ceil(group * dims["S"]))
            wg = min(wg, max(dvc // 4 * 16, 32))  # at most 16 key groups
            # a vec4 of output columns per invocation of a key group at most (Dv > 256 on a CPU
            # adapter, > 1024 on a GPU): a grid axis covers Dv in chunks of these columns
            dvc = min(dvc, 4 * wg)
            # packed GQA: a softmax phase from 8 rows, one lane per key from 16 (tuned on the H200)
            # one row per tile: SMX=2 over a quantized K on GPUs (where the lane groups above do not
            # apply: int8 from D = 128, the portable family), and over f16 or quantized K on
            # CPU adapters, where each exponential taken once instead of once per column group
            # pays more (lavapipe kv_lp_dec1_h128: 0.76-0.92 of the time; f32 K: 1.0-1.17)
            shared_max = bm == 1 and (k_format is not None or (cpu and f16))
            # one row of a long head on a GPU: 8 lanes per key, so that a load instruction reads
            # 64 or 128 contiguous bytes of each key's row, not 16 or 32 (H200 kv_dec1_h128:
            # 10-14 % faster in f16 and f32; 2 lanes stay best below D = 128 and with more rows;
            # head dims that are multiples of 32, which 8 lanes of vec4 cover without padding)
            long_row = bm == 1 and dims["D"] >= 128 and dims["D"] % 32 == 0 and not cpu
            kl = 1 if bm >= 16 or shared_max else (8 if long_row else 2)
            # the query dim: a multiple of 4 * KL (CPU: a power of two, fewer shaders to compile)
            dq = max(8, pow2ceil(dims["D"]) if cpu else -(-dims["D"] // (4 * kl)) * 4 * kl)
            tun = {"BM": bm, "BN": max(bn, wg // (dvc // 4) * 4, wg if shared_max else 0)}
            # 4 or more rows per tile in f16 on a GPU: a key's lanes sum its partial dots by
            # shuffles, one score per key and row in workgroup memory (H200, 2 lanes per key:
            # 3-9 % faster on both backends for 4 and 8 rows; one row with 8 lanes, and f32, not)
            lane_sum = int(not cpu and f16 and family is Family.SUBGROUPS and 2 <= kl and bm >= 4
                           and tun["BN"] * kl % wg == 0)
            plan = stream_plan(Plan(family, storage, dialect), dims, workgroup_size=wg,
                               lanes_per_key=kl, keys_per_step=4, lane_sum=lane_sum,
                               softmax_phase=2 if shared_max else int(bm >= 8), query_dim=dq, value_columns=dvc)
            if 4 * stream_layout(plan, tun["BM"], tun["BN"]).smem_words <= \
                    caps.limit("max-compute-workgroup-storage-size"):
                return plan, tun
        if rows_apply:
            return rows, {"BM": ROWS_TILE, "BN": 64}
        bm = min(16, max(4, pow2ceil(group * dims["S"])))
        plan = dataclasses.replace(tiled_base, workgroup_size=64 if cpu else 128, rows_per_invocation=1, head_chunk=16,
                                   value_columns=dv, value_stage_columns=32)
        return plan, {"BM": bm, "BN": 64}
    lanes = lanes_plan(caps, family, dims, storage, dialect, vec, f16_math, only)
    if lanes is not None:
        return lanes
    tiles128 = row_tiles(dims, 128)
    few = tiles128 < 64  # 128-row tiles would leave SMs idle
    if cpu:
        shapes = [(64, 64, 64, 4), (64, 32, 64, 4)]
    elif few:
        shapes = [(32, 64, 128, 2), (64, 64, 128, 4), (64, 32, 64, 4)]
    elif causal and tiles128 < 256:  # twice the causal tiles, longest first, for the GPU to balance
        shapes = [(64, 64, 256, 4), (128, 64, 256, 4), (64, 64, 128, 4), (64, 32, 64, 4)]
    else:
        shapes = [(128, 64, 256, 4), (64, 64, 128, 4), (64, 32, 64, 4)]
    # then smaller tiles, for a device granting less workgroup memory than WebGPU's 16 KiB
    # (wgpu-native honours a lower request), and else the smallest (its lowering names the limit)
    chosen = tiled_plan(caps, tiled_base, dims, shapes + SMALL_TILE_SHAPES) or \
        tiled_plan(caps, tiled_base, dims, SMALL_TILE_SHAPES[-1:], fit=False)
    assert chosen is not None
    return chosen


# tiled shapes (BM, BN, WG, TM) below the usual ones, tried where none of those fits
SMALL_TILE_SHAPES = [(32, 32, 64, 2), (16, 16, 32, 2), (8, 8, 16, 2)]


# What WGSL promises a function's variables at least (the spec's limits: 8 KiB in the function
# address space): the rows strategy holds its query row and its value columns there.
FUNCTION_VAR_BYTES = 8192


# Query rows per workgroup of the rows strategy (one per invocation).
ROWS_TILE = 8


def rows_fit(plan: Plan) -> bool:
    """Whether a rows plan's query row (DQ) and accumulator (DVC) fit FUNCTION_VAR_BYTES: D up
    to 1024 with 256 value columns (above, short rows take the tiled plan). lavapipe compiles
    more, but slowly: 144-166 s for DQ = 4096 on a loaded machine, where tiled decode shaders
    for D = 2048-4096 took 17-35 s."""
    return 4 * (plan.query_dim + plan.value_columns) <= FUNCTION_VAR_BYTES


# The stream strategy's largest D: its dot phase issues all of a key's loads before using any
# (D / 4 / KL vec4s, unrolled, all live in registers: 32 of them, 128 registers, at D = 256 with
# KL = 2, the largest D it was measured at) and holds the query rows in workgroup memory, so
# its shader and its registers grow with D; above this the tiled strategy (head-dim chunks in
# a loop) serves short rows too. Not measured on a GPU above D = 256; on lavapipe the stream
# plan for D = 576 was 46 KB of WGSL, against 24 KB for D = 256.
STREAM_MAX_D = 256


def fit_workgroup(plan: Plan, BM: int, BN: int) -> Plan:
    """A tiled plan with its invocations per workgroup halved until its layout gives each row
    of a BM x BN tile no more invocations than keys: tiles a kernel's options fix (attnc.build's
    BM=1, BN=8) may hold less work than the heuristic's workgroup."""
    fitted = plan
    while fitted.strategy is Strategy.TILED and fitted.workgroup_size > 1:
        try:
            layout(fitted, BM, BN)
            return fitted
        except LoweringError as exc:
            if "per row" not in exc.message:  # another rule: the lowering says it of the plan given
                return plan
        fitted = dataclasses.replace(fitted, workgroup_size=fitted.workgroup_size // 2)
    return fitted


def tiled_plan(caps: Capabilities, base: Plan, dims: dict[str, int], shapes: list[tuple[int, int, int, int]],
               fit: bool = True) -> tuple[Plan, dict[str, int]] | None:
    """The first of the (BM, BN, WG, TM) tile shapes whose tiled plan fits the device (with
    fit=False: the first shape, 32-column value chunks), with head-dim chunks and value blocks
    chosen for the adapter type; None if none fits.

    GPUs: head-dim chunks of 8 when 16 does not divide D (D = 72: 9 chunks, not 5 with 8 of 80
    padding), value blocks of half the key tile by all of Dv up to 96 columns (64 above), and
    `chunked_p` for tiles over SHARED_SMEM with at most 32 outputs per invocation, or 48 when
    the row tiles make at least 256 workgroups (H200 vision_h72 on Dawn 7.18 -> 6.14 ms; with
    128 workgroups (phi35) it was 9 % slower on Dawn: two workgroups per SM only pay with more
    than one per SM). Naga's 48-output shaders keep PF=1 there: without Naga's runtime checks
    (attnc's kernels are in bounds) 6.47 ms against the whole-p plan's 6.75 and 8.39 with
    PF=0; with the checks the same plan was 1.3 % faster, PF=0 1.25x slower."""
    cpu = caps.cpu
    dvc = min(-(-dims["Dv"] // 32) * 32, 128)
    smem = caps.limit("max-compute-workgroup-storage-size")
    inv = caps.limit("max-compute-invocations-per-workgroup")
    dk = 8 if not cpu and dims["D"] % 16 and dims["D"] % 8 == 0 else 16
    wide = wide_value_block(dvc) if not cpu and dvc > 32 else 0
    for bm, bn, wg, tm in shapes:
        for dvs, vk in ([(wide, bn // 2)] if wide and fit else []) + [(32, 0)]:
            plan = dataclasses.replace(base, workgroup_size=wg, rows_per_invocation=tm, head_chunk=dk,
                                       value_columns=dvc, value_stage_columns=dvs, value_block_keys=vk)
            if vk == 0 and plan.unroll > 16:
                # P.V over the whole key tile in one block (Dv <= 32): 16 copies of its key loop
                # (H200 minilm 0.0167 ms against 0.0190 fully unrolled on wgpu-native, 3 % on Dawn)
                plan = dataclasses.replace(plan, unroll=16)
            lay = layout(plan, bm, bn)
            if not fit or (4 * lay.smem_words <= smem and wg <= inv):
                outs = 48 if row_tiles(dims, bm) >= 256 else 32
                if not cpu and fit and 4 * lay.smem_words > SHARED_SMEM and lay.TM * lay.TD <= outs:
                    # 48 outputs: Naga's shaders keep the prefetch registers (H200 vision_h72
                    # without Naga's checks 6.47 ms with them, 8.39 without, 6.75 with the whole p)
                    pf = int(lay.TM * lay.TD > 32 and plan.dialect is Dialect.NAGA)
                    small = chunked_p(plan, bm, bn, pf)
                    if small is not None and 4 * layout(small, bm, bn).smem_words <= SHARED_SMEM:
                        plan = small
                return plan, {"BM": bm, "BN": bn}
    return None


# Workgroup memory up to which two workgroups share an SM: the H200's Vulkan driver gives an SM
# 48-52 KiB for all its workgroups (scripts/gpu_smem_probe.py: 256-invocation workgroups of 16
# KiB fit 3 per SM, of 20-24 KiB 2, of 28 KiB or more 1).
SHARED_SMEM = 24 * 1024


def chunked_p(plan: Plan, bm: int, bn: int, pf: int = 0) -> Plan | None:
    """A tiled plan cut down to about half its workgroup memory, or None where it cannot be: p
    written in chunks of the keys a row group owns in one group of runs (PC), 16-key value
    blocks, and no prefetch registers (PF=0, unless `pf`), so that two 256-invocation workgroups
    fit an SM's registers (at most 128 each) as well as its workgroup memory; head-dim chunks of at least
    16 (they fit beside the smaller p tile). With at most 32 outputs per invocation (TM x TD):
    H200 vit 11 % (Dawn) and 7 % (wgpu-native) faster, two workgroups per SM instead of one;
    with 48 outputs (Dv 72 or 96) vision_h72 15 % faster on Dawn (6.14 ms; 6.42 with head-dim
    chunks of 8), and through Naga with pf=1 only (docs/BENCHMARKS.md)."""
    try:
        lay = layout(plan, bm, bn)
        pc = lay.CT * owned_run(lay.TN)
        small = dataclasses.replace(plan, p_chunk_keys=pc, value_block_keys=16, prefetch=pf,
                                    head_chunk=max(plan.head_chunk, 16))
        layout(small, bm, bn)  # (PC below 16 keys cannot hold a 16-key value block)
    except LoweringError:
        return None
    return small if pc < bn else None


# the lanes strategy on CPU adapters: the smallest problem (B*Hq*S*T score elements) worth its
# longer compile, and the largest head dims it takes (its compile time grows faster than D)
LANES_MIN_SCORES = 1 << 18
LANES_SPLIT_KEYS = 2048
LANES_MIN_DECODE = 1 << 15  # short rows: one row per invocation, shaders as quick to compile as the others
LANES_MAX_D = 96


# Packed rows per tile up to which CPU adapters decode with lane groups (SMX=3).
LANE_GROUP_MAX_ROWS = 2


def gpu_lane_groups_read(k_format: str | None, d: int) -> bool:
    """Whether one query row over a K of this format and head dim reads faster on a GPU with lane
    groups (4 lanes per key) than with the shared maximum (one lane per key, SMX=2).

    H200, f16 q, both backends, two processes each, time over the shared maximum's
    (docs/BENCHMARKS.md): q8_0 0.80-0.97 and q4_0 0.86-0.95 (dec_h128_kv16384,
    kv_dec1_h128_t16384, kv_dec1_h128_t32768, kv_dec1_h64_t32768); int8 0.83-0.86 at D = 64 and,
    since lane groups' per-key work was cut (c742fe7), 0.86-0.93 at D = 128 on wgpu-native (three
    processes) and 0.86-0.99 on Dawn (two), so int8 for head dims that 4 lanes split into whole
    vec4s without padding, up to the measured 128. Float K: no (0.99-1.10 on the H200)."""
    if k_format in ("q8_0", "q4_0"):
        return True
    return k_format == "int8" and d in (16, 32, 64, 128)


def lane_groups_plan(caps: Capabilities, family: Family, dims: dict[str, int], storage: Storage, dialect: Dialect,
                     vec: int, f16_math: bool, only: str, k_format: str | None) -> tuple[Plan, dict[str, int]] | None:
    """The stream strategy's lane groups (SMX=3: a key's KL lanes in one subgroup, no barrier
    in the KV loop) for decoding on a CPU adapter with subgroups, and for one query row per tile
    over a quantized K on a GPU with subgroups (`gpu_lane_groups_read`); None where they do not
    apply.

    Measured on lavapipe, f16, both backends, one process each (docs/BENCHMARKS.md): one row per
    tile 0.46-0.54 of the time of the shared-maximum plan (kv_lp_dec1_h128), 0.22-0.39 of the lanes
    plan's at D = 64 (dl_mha_d64, dl_gqa2_d64), 0.64-0.69 at D = 80; with 4 packed rows (gqa8)
    1.7-2.5x slower than the lanes plan, so up to LANE_GROUP_MAX_ROWS rows. 8 lanes per key from
    D = 80, 4 below (at most the lanes the probe found in one subgroup). On the H200 over float K
    they were 0.99-1.10x the time of the plans GPUs take (their loads overlap the math less), so
    GPUs take them only over a quantized K with one row per tile: 4 lanes per key, 128
    invocations, 128-key tiles, 2 keys per step (the measurements: `gpu_lane_groups_read`).
    A block-quantized K is read in runs of whole blocks or parts of one: where the head dim does
    not split so, 4 lanes per key and the query dim padded to blocks of 4 (D = 96 -> 128)."""
    if family is not Family.SUBGROUPS or vec != 4 or f16_math or only not in ("", "stream"):
        return None
    rows = dims["Hq"] // dims["Hkv"] * dims["S"]
    if dims["D"] > STREAM_MAX_D:
        return None
    if caps.cpu:
        if rows > LANE_GROUP_MAX_ROWS:
            return None
        wg, kc, kl_max = 64, 2, 8 if dims["D"] >= 80 else 4
    elif rows == 1 and caps.subgroup_lanes_contiguous >= 4 and gpu_lane_groups_read(k_format, dims["D"]):
        wg, kc, kl_max = 128, 2, 4
    else:
        return None
    bm = pow2ceil(rows)
    dvc = max(4, pow2ceil(dims["Dv"]))
    kl = max(1, min(kl_max, caps.subgroup_lanes_contiguous, dvc // 4))
    dq = -(-dims["D"] // (4 * kl)) * 4 * kl
    run = dq // (4 * kl)  # K vec4s per lane
    if k_format is not None and 8 % run and run % 8:  # a lane's run must be whole blocks or part of one
        kl = min(kl, 4)
        dq = -(-dims["D"] // (32 * kl)) * 32 * kl
    # outputs held in registers, at most a vec4 per invocation: a grid axis covers the rest of Dv
    dvc = min(dvc, 4 * kl * LANE_GROUP_MAX_VEC4 // bm, 4 * wg)
    plan = stream_plan(Plan(family, storage, dialect), dims, workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc,
                       softmax_phase=3, query_dim=dq, value_columns=dvc)
    tun = {"BM": bm, "BN": max(64 if caps.cpu else 128, wg // kl * kc)}
    if 4 * stream_layout(plan, bm, tun["BN"]).smem_words > caps.limit("max-compute-workgroup-storage-size"):
        return None  # (stream_layout raises for a plan that does not map: none is built here)
    return plan, tun


def lanes_plan(caps: Capabilities, family: Family, dims: dict[str, int], storage: Storage, dialect: Dialect,
               vec: int, f16_math: bool, only: str) -> tuple[Plan, dict[str, int]] | None:
    """The lanes-strategy plan for long query rows on a CPU adapter, or None where it does not apply.

    Measured on lavapipe (docs/BENCHMARKS.md): with 8-lane subgroups, two rows per invocation
    run ci_prefill (3.9 -> 1.3 ms) and ci_vision (39.5 -> 11 ms) about 3x faster than the tiled
    plan; with 4 or 16 lanes it is slower than tiled, so it needs a device whose subgroups are 8
    lanes (the shader checks the size it runs with and writes NaN on any other). Its
    shaders take 6-9 s to compile (tiled: about 2 s), so it is left to problems of at least
    LANES_MIN_SCORES score elements and head dims up to LANES_MAX_D (ATTNC_STRATEGY=lanes
    lifts both limits). Short rows (decoding) take one row per invocation in a workgroup of
    one subgroup, GQA heads packed into rows (ci_cross 3.5 -> 1.0-1.1 ms, ci_dec_gqa4 3.0 ->
    0.8-1.2 ms), from LANES_MIN_DECODE score elements, unsplit up to LANES_SPLIT_KEYS keys."""
    forced = only == "lanes"
    if only not in ("", "lanes") or family is not Family.SUBGROUPS or vec != 4 or f16_math:
        return None
    if not caps.cpu and not forced:
        return None
    size = caps.subgroup_size  # measured by a probe shader (lavapipe reports a range of 4..128)
    if not size or size < 4:
        return None
    short = dims["S"] <= 16  # decoding: one subgroup of packed (GQA) rows, one row per invocation
    big = dims["B"] * dims["Hq"] * dims["S"] * dims["T"] >= (LANES_MIN_DECODE if short else LANES_MIN_SCORES)
    if not forced and (size != 8 or not big or max(dims["D"], dims["Dv"]) > LANES_MAX_D):
        return None
    d8, dv8 = lanes_widths(dims)
    tm = 1 if short else 2
    plan = Plan(family, storage, dialect, strategy=Strategy.LANES, rows_per_invocation=tm, subgroup_width=size,
                query_dim=d8, value_columns=dv8, vector_width=4)
    return plan, {"BM": size if short else max(64, 2 * size), "BN": 64}


def lanes_widths(dims: dict[str, int]) -> tuple[int, int]:
    """DQ and DVC of a lanes plan: the head dims rounded up to 8 (registers, no padded loads to
    speak of), value columns in chunks of at most 128."""
    return -(-dims["D"] // 8) * 8, min(-(-dims["Dv"] // 8) * 8, 128)


def wide_value_block(dvc: int) -> int:
    """Value columns per block when a block holds half a key tile (VK = BN / 2): all of the
    DVC columns up to 96, 64 above (128 columns would not fit beside the p tile)."""
    return dvc if dvc <= 96 else 64


def stream_plan(base: Plan, dims: dict[str, int], **kw: int) -> Plan:
    """A stream-strategy plan for these head dims: all of Dv in one workgroup unless DVC is
    given, DQ >= D (the smallest multiple of 4*KL unless DQ is given)."""
    kl = kw.get("lanes_per_key", base.lanes_per_key)
    kw.setdefault("query_dim", -(-dims["D"] // (4 * kl)) * 4 * kl)
    kw.setdefault("value_columns", max(4, pow2ceil(dims["Dv"])))
    return dataclasses.replace(base, strategy=Strategy.STREAM, vector_width=4, **kw)


def split_count(caps: Capabilities, dims: dict[str, int], BM: int, BN: int, packed: bool = False,
                stream: bool = False) -> int:
    """How many KV splits fill the device: aim for enough workgroups (2048 tiled, 512 stream on
    a GPU), keep >= 2 tiles each (stream: >= 1, >= 2 with 8 rows or more). Measured in docs/bench/
    on the H200, where workgroup memory decides how many workgroups an SM holds and so how many
    splits run in one wave: dec4_gqa8 in 32-row tiles of 11.5 KiB (four per SM) 0.052-0.057 ms
    with 60 splits, 0.066-0.068 with 30 or 120 (of 17.5 KiB, two per SM: 0.063 with 30, 0.067-0.069
    with 60); dec_gqa8 in 8-row stream tiles of 8.8 KiB (five per SM) 0.036 ms with 60 splits,
    0.041-0.044 with 30 or 120 (each split stages its query rows, merges and stores a partial
    state)."""
    if packed:
        base = dims["B"] * dims["Hkv"] * -(-(dims["Hq"] // dims["Hkv"]) * dims["S"] // BM)
    else:
        base = row_tiles(dims, BM)
    target = 64 if caps.cpu else (512 if stream else 2048)
    tiles = -(-dims["T"] // BN)
    per = (2 if BM >= 8 else 1) if stream else 2
    return max(1, min(-(-target // base), tiles // per or 1))


def prefill_split_count(caps: Capabilities, dims: dict[str, int], BM: int, BN: int) -> int:
    """KV splits for long query rows: on a GPU whose row tiles alone make fewer than 96
    workgroups, enough for about 192, keeping >= 2 KV tiles each. Measured on the H200
    (docs/BENCHMARKS.md): gemma's 64 workgroups of causal rows 2.1x faster with 3 splits;
    with 128 workgroups (phi35) the partial states and the combine cost more than they gain."""
    base = row_tiles(dims, BM)
    if caps.cpu or base >= 96:
        return 1
    return max(1, min(-(-192 // base), -(-dims["T"] // BN) // 2))


def packs_gqa(dims: dict[str, int], plan: Plan) -> bool:
    """Whether the query heads that share a KV head become rows of one tile (short rows with
    GQA, so K/V are read once per KV head), which every strategy but rows supports."""
    return dims["S"] <= 16 and dims["Hq"] > dims["Hkv"] and plan.strategy is not Strategy.ROWS


def kv_splits(caps: Capabilities, dims: dict[str, int], plan: Plan, tunables: dict[str, int], packed: bool) -> int:
    """The KV split count of a plan: lanes plans split every LANES_SPLIT_KEYS keys (a lane sums
    its row one key after the other: 100000 keys in one run gave relerr 1.5e-4; lavapipe
    ci_cross 1.9 ms unsplit, 2.3-2.7 with 2-4 splits); others fill the device (split_count for
    short rows, prefill_split_count for long ones)."""
    if plan.strategy is Strategy.LANES:
        return max(1, -(-dims["T"] // LANES_SPLIT_KEYS))
    if dims["S"] <= 16:
        return split_count(caps, dims, tunables["BM"], tunables["BN"], packed, plan.strategy is Strategy.STREAM)
    return prefill_split_count(caps, dims, tunables["BM"], tunables["BN"])


def with_combine(plan: Plan, nsplit: int) -> Plan:
    """The plan with its split-KV combine's groups set from the split count (unless given)."""
    return plan if plan.combine_groups else dataclasses.replace(plan, combine_groups=combine_groups(nsplit))
