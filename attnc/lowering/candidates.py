"""The tuner's search space: the valid plans worth timing for a problem on a device.

`attnc tune` (runtime/tune.py) times these and keeps the fastest; the heuristic plan
(lowering/schedule.py) is always among them. Candidates come the likeliest first, so that a
`--max` cut keeps variety.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from attnc.errors import AttncError
from attnc.lowering.capabilities import Capabilities
from attnc.lowering.plan import Family, Plan, Strategy, layout, stream_layout
from attnc.lowering.schedule import (
    chunked_p,
    lanes_widths,
    pow2ceil,
    row_tiles,
    rows_fit,
    split_count,
    stream_plan,
    wide_value_block,
)

# (BN, WG, KL, KC) of the stream strategy, most promising first
STREAM_SHAPES = [(64, 128, 2, 4), (128, 128, 2, 4), (64, 64, 2, 4), (128, 256, 2, 4), (64, 128, 1, 4),
                 (32, 64, 2, 4), (256, 128, 1, 4), (128, 256, 8, 4)]

# (BN, WG, KL, KC) of the stream strategy's lane groups (SMX=3, subgroups family)
LANE_GROUP_SHAPES = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 1)]


def fits(caps: Capabilities, plan: Plan, tun: dict[str, int]) -> bool:
    """Whether a candidate is valid and fits the device's limits (and default limits if portable-only)."""
    if plan.strategy is Strategy.ROWS:
        return tun["BM"] <= caps.limit("max-compute-invocations-per-workgroup") and rows_fit(plan)
    if plan.strategy is Strategy.LANES:
        return tun["BM"] // plan.rows_per_invocation <= caps.limit("max-compute-invocations-per-workgroup")
    if plan.strategy is Strategy.STREAM:
        try:
            slay = stream_layout(plan, tun["BM"], tun["BN"])
        except AttncError:
            return False
        smem = caps.limit("max-compute-workgroup-storage-size")
        inv = caps.limit("max-compute-invocations-per-workgroup")
        return 4 * slay.smem_words <= smem and plan.workgroup_size <= inv
    try:
        lay = layout(plan, tun["BM"], tun["BN"])
    except AttncError:
        return False
    smem = caps.limit("max-compute-workgroup-storage-size")
    wg = caps.limit("max-compute-invocations-per-workgroup")
    return 4 * lay.smem_words <= smem and lay.WG <= wg and lay.TN >= 1 and lay.TD >= 1


def fits_default_limits(plan: Plan, tun: dict[str, int]) -> bool:
    """Whether a plan fits a device that grants only WebGPU's default limits (any browser)."""
    return fits(Capabilities(cpu=False, dialect=plan.dialect), plan, tun)


def candidates(caps: Capabilities, dims: dict[str, int], base: Plan, families: list[Family],
               nsplit: int | None) -> Iterator[tuple[Plan, dict[str, int], int | None]]:
    """Valid plans to time for a problem, the likeliest first (a `--max` cut keeps variety):
    every tile shape with default knobs, then each with one knob changed, then two, ...
    Knobs: split count, family, head-dim chunk DK, value blocks (DVC, DVS, VK), unrolling and
    prefetching (UN, PF) where the heuristic unrolls, and there p in chunks (schedule.chunked_p)."""
    dq = max(pow2ceil(dims["D"]), 4)
    dv = min(max(pow2ceil(dims["Dv"]), 32), 256)
    dv32 = min(-(-dims["Dv"] // 32) * 32, 128)
    short = dims["S"] <= 16
    splits = [nsplit] if nsplit is None else list(dict.fromkeys([nsplit, nsplit * 2, max(1, nsplit // 2), nsplit * 4]))
    dks = [16, 64] if short else list(dict.fromkeys([base.head_chunk, 16, 32] + ([24] if dims["D"] % 24 == 0 else [])))
    # value chunks that cover Dv exactly (72 = 3 x 24, 80 = 2 x 40) instead of padding to 32s
    dv8 = -(-dims["Dv"] // 8) * 8
    exact = {(dv8, dv8 // k) for k in (2, 3) if dv8 % k == 0 and (dv8 // k) % 8 == 0 and dv8 <= 128}
    # (DVC, DVS, key tile / VK): the heuristic's first, value blocks of half the key tile too
    wide = wide_value_block(dv32)
    dvs_opts = [(dv32, 32, 1)] if short else list(dict.fromkeys(
        [(dv32, base.value_stage_columns, 2 if base.value_block_keys else 1), (dv32, 32, 1), (dv32, wide, 2), (64, 32,
                                                                                                               1)]
        + ([(dv32, 64, 1)] if dv32 % 64 == 0 else []) + sorted((c, x, 1) for c, x in exact)))
    if short:  # decoding is memory bound: the family matters little, try the device's default only
        families = families[-1:]
    few = row_tiles(dims, 64) < 512  # prefill with few 64-row tiles
    if short:  # few rows: small row tiles, long key tiles, many splits
        shapes = [(4, 64, 128, 1), (4, 64, 64, 1), (8, 64, 128, 1), (4, 128, 128, 1), (4, 32, 64, 1),
                  (16, 64, 128, 1), (16, 64, 64, 2), (4, 128, 256, 1), (4, 64, 256, 1), (8, 128, 256, 1)]
    elif few:  # more, smaller workgroups
        shapes = [(32, 32, 64, 2), (16, 32, 64, 1), (32, 64, 128, 2), (64, 32, 64, 4), (64, 64, 128, 4),
                  (64, 64, 64, 8), (128, 64, 256, 4)]
    else:
        shapes = [(128, 64, 256, 4), (64, 64, 256, 4), (128, 32, 128, 8), (128, 32, 256, 4), (128, 64, 128, 8),
                  (64, 64, 64, 8), (64, 64, 128, 4), (128, 32, 128, 4),
                  (64, 32, 64, 4), (128, 64, 128, 4), (64, 64, 64, 4), (64, 64, 256, 2)]
    # loop unrolling and prefetching: the heuristic's, then partial unrolling, then the other prefetch setting
    other = [(16, base.prefetch), (base.unroll, 1 - base.prefetch)] if base.unroll > 1 else []
    loops = list(dict.fromkeys([(base.unroll, base.prefetch)] + other))
    found: list[tuple[int, int, Plan, dict[str, int], int | None]] = []
    seen = set()
    # shuffled lane sums (LS) are a stream knob: the others never carry it; the heuristic's
    # setting is tried first
    sums_first = base.lane_sum
    base = dataclasses.replace(base, lane_sum=0)

    def add(rank: int, plan: Plan, tun: dict[str, int], ns: int | None) -> None:
        sig = (plan, tuple(tun.items()), ns)
        if sig not in seen and fits(caps, plan, tun):
            seen.add(sig)
            found.append((rank, len(found), plan, tun, ns))

    if short and dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0:  # K/V streamed from storage (decoding)
        group = dims["Hq"] // dims["Hkv"]
        bm0 = min(32, max(1, pow2ceil(dims["S"] * group)))
        for bi, bm in enumerate(dict.fromkeys([bm0, max(1, bm0 // 2), max(1, bm0 // 4)])):
            for bn, wg, kl, kc in STREAM_SHAPES:
                ns0 = split_count(caps, dims, bm, bn, group > 1, stream=True)
                for si, ns in enumerate(dict.fromkeys([ns0, 2 * ns0, max(1, ns0 // 2)])):
                    # the shared maximum (SMX=2) where a lane scores a key and a tile covers the workgroup
                    for smx in (1, 0) if bm >= 4 else ((0, 2) if kl == 1 and bn >= wg else (0,)):
                        # lane sums: a key's lanes shuffle within the device's contiguous lanes
                        sums = base.family is Family.SUBGROUPS and smx != 2 and 1 < kl <= caps.subgroup_lanes_contiguous
                        for ls in (0, 1) if sums else (0,):
                            add(si + bi + int(ls != sums_first),
                                stream_plan(base, dims, workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc,
                                            softmax_phase=smx, lane_sum=ls), {"BM": bm, "BN": bn}, ns)
            if base.family is Family.SUBGROUPS and bm <= 4:  # lane groups (SMX=3): KL within a subgroup
                for bn, wg, kl, kc in LANE_GROUP_SHAPES:
                    if kl <= caps.subgroup_lanes_contiguous:
                        add(bi, stream_plan(base, dims, workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc,
                                            softmax_phase=3), {"BM": bm, "BN": bn},
                            split_count(caps, dims, bm, bn, group > 1, stream=True))
    for si, ns in enumerate(splits):
        for fi, fam in enumerate(reversed(families)):
            for bm, bn, wg, tm in shapes:
                for ki, dk in enumerate(dks):
                    for vi, (dvc, dvs, vkd) in enumerate(dvs_opts):
                        for ui, (un, pf) in enumerate(loops):
                            plan = dataclasses.replace(base, family=fam, strategy=Strategy.TILED, workgroup_size=wg,
                                                       rows_per_invocation=tm,
                                                       value_columns=dvc, head_chunk=dk, value_stage_columns=dvs,
                                                       value_block_keys=bn // vkd if vkd > 1 else 0,
                                                       unroll=un, prefetch=pf, p_chunk_keys=0)
                            rank = (si > 0) + (fi > 0) + (ki > 0) + (vi > 0) + (ui > 0)
                            add(rank, plan, {"BM": bm, "BN": bn}, ns)
                            for small_pf in (0, 1) if ui == 0 and base.unroll > 1 else ():
                                small = chunked_p(plan, bm, bn, small_pf)
                                if small is not None:  # (GPUs) half the workgroup memory, p in chunks
                                    add(rank + (base.p_chunk_keys == 0) + small_pf, small, {"BM": bm, "BN": bn}, ns)
        sg = caps.subgroup_size
        if not short and Family.SUBGROUPS in families and sg and dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0:
            # query rows in registers, keys shared across the subgroup (lowering/lanes.py)
            d8, dv8 = lanes_widths(dims)
            for tm in (2, 1):
                plan = dataclasses.replace(base, family=Family.SUBGROUPS, strategy=Strategy.LANES,
                                           rows_per_invocation=tm, subgroup_width=sg,
                                           query_dim=d8, value_columns=dv8, vector_width=4)
                add(1, plan, {"BM": max(64, tm * sg), "BN": 64}, ns)
        if not short:  # the query tile resident in workgroup memory (no restaging per KV tile)
            dqr = -(-dims["D"] // 16) * 16
            for fam in families:
                for bm, bn, wg, tm in [(64, 64, 128, 4), (64, 32, 64, 4), (64, 64, 256, 2), (128, 32, 256, 4)]:
                    plan = dataclasses.replace(base, family=fam, strategy=Strategy.TILED, workgroup_size=wg,
                                               rows_per_invocation=tm, value_columns=dv32,
                                               head_chunk=16, value_stage_columns=32, value_block_keys=0,
                                               resident_query=True, query_dim=dqr)
                    add(3, plan, {"BM": bm, "BN": bn}, ns)
        for bm in (8, 32):
            plan = dataclasses.replace(base, family=Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=4,
                                       query_dim=dq, value_columns=dv)
            add(2, plan, {"BM": bm, "BN": 64}, ns)
    for _, _, plan, tun, ns in sorted(found, key=lambda f: (f[0], f[1])):
        yield plan, tun, ns
