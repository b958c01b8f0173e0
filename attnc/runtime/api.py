"""`attnc.attention`: validate inputs, pick the kernel variant and plan, dispatch, read back."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnc.errors import DeviceError, LoweringError
from attnc.ir import nodes as ir
from attnc.lowering import Family, Plan, Storage, Strategy, lower
from attnc.lowering.combine import combine_groups
from attnc.lowering.plan import DEFAULT_LIMITS, Dialect, fast_reduce, layout, owned_run, stream_layout
from attnc.lowering.program import Access, Program
from attnc.lowering.retype import retype
from attnc.runtime import dispatch as rt
from attnc.runtime.chunking import binding_limit, chunked, largest_binding
from attnc.runtime.devices import Device, get_device

TARGETS = {"portable": Family.PORTABLE, "subgroups": Family.SUBGROUPS,
           "portable-f16": Family.PORTABLE, "subgroups-f16": Family.SUBGROUPS}
# targets whose products are computed in f16 (shader-f16); the others compute in f32
F16_MATH_TARGETS = frozenset({"portable-f16", "subgroups-f16"})


@dataclass(frozen=True)
class Options:
    """The kernel-shaping options of one attention call (what the traced IR depends on)."""

    causal: bool = False
    window: tuple[int | None, int | None] | None = None  # which sides are bounded (0); values are uniforms
    softcap: bool = False
    alibi: bool = False
    bias: bool = False
    sinks: bool = False
    kv_lens: bool = False
    offsets: bool = False
    lse: bool = False
    split: bool = False
    pack_gqa: bool = False
    f16: bool = False
    score_mod: Callable[..., Any] | None = None
    mask_mod: Callable[..., Any] | None = None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _array(name: str, x: Any, ndim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {x.ndim} (shape {x.shape})")
    return x


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _real_array(name: str, x: Any, ndim: int | None = None) -> np.ndarray:
    """A numpy array of real numbers (ints or floats), else a ValueError naming the argument."""
    x = _array(name, x, ndim)
    _check(x.dtype.kind in "iuf", f"{name}: expected real numbers, got dtype {x.dtype}")
    return x


def validate(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, int]:
    """Check q/k/v against the contract; return the dims B, Hq, Hkv, S, T, D, Dv."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        _array(n, x, 4)
        _check(x.dtype in (np.float32, np.float16),
               f"{n}: dtype must be float32 or float16, got {x.dtype}")
        _check(x.size > 0, f"{n}: empty array (shape {x.shape})")
    _check(q.dtype == k.dtype == v.dtype,
           f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, S, D = q.shape
    _, Hkv, T, Dk = k.shape
    _check(k.shape[0] == B and v.shape[0] == B,
           f"batch dims differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    _check(Dk == D, f"head dim D differs: q has {D}, k has {Dk}")
    _check(v.shape[1] == Hkv and v.shape[2] == T,
           f"v shape {v.shape} does not match k shape {k.shape} in (B, Hkv, T)")
    _check(Hq % Hkv == 0, f"Hq={Hq} query heads is not a multiple of Hkv={Hkv} kv heads")
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v.shape[3])


def pick_family(device: Device, target: str | None) -> Family:
    """The requested variant family, or the default for the device (subgroups if offered)."""
    usable = "subgroups" in device.features and device.subgroup_lanes_contiguous >= 4
    if target is None:
        return Family.SUBGROUPS if usable else Family.PORTABLE
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    fam = TARGETS[target]
    if fam is Family.SUBGROUPS and "subgroups" not in device.features:
        raise DeviceError(f"{device!r} does not offer the 'subgroups' feature",
                          notes=("use target='portable', which needs no subgroup operations",))
    if fam is Family.SUBGROUPS and not usable:
        raise DeviceError(f"{device!r} does not place consecutive invocations in aligned groups of 4 lanes "
                          "of one subgroup (checked by a probe shader), which the subgroups family relies on",
                          notes=("use target='portable', which needs no subgroup operations",))
    if target in F16_MATH_TARGETS and "f16" not in device.features:
        raise DeviceError(f"{device!r} does not offer the 'shader-f16' feature that target {target!r} needs",
                          notes=("float16 inputs also run with target='portable' or 'subgroups' "
                                 "(f16 storage, f32 math), which need no shader-f16",))
    return fam


def pow2ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def row_tiles(dims: dict[str, int], bm: int) -> int:
    """Workgroups of an unsplit prefill plan with bm-row tiles: one per (batch, head, row tile)."""
    return dims["B"] * dims["Hq"] * -(-dims["S"] // bm)


def plan_for(device: Device, family: Family, dims: dict[str, int], opts: Options,
             explicit_family: bool = False, f16_math: bool = False) -> tuple[Plan, dict[str, int]]:
    """The heuristic plan and kernel tunables for a shape (a tuned choice overrides it).

    From the tuning runs in docs/bench/ (no vendor names: adapter type and limits only):
    - short query rows (S <= 16: decoding, cross-attention): the stream strategy (K/V read
      straight from storage) with row tiles of up to 16 rows (4 on a CPU adapter; query heads
      of a KV head packed into rows), split over KV, with a softmax phase (SMX) from 8 rows
      (H200 dec_gqa8 about 10 % faster with it) and >= 2 KV tiles per split; on a CPU adapter
      without GQA, the rows strategy (one query row per invocation); on a GPU with at least 32
      packed rows per KV head (GQA with several queries), 32x64 tiles of the tiled strategy with
      4 rows per invocation and 8-key value blocks (H200 dec4_gqa8 1.6x faster than stream, and
      since session 9 1.15x again in a workgroup of 11.5 KiB with 60 splits); the tiled strategy where
      none applies (head dims not multiples of 4, f16 arithmetic);
    - longer rows: the largest of 128x64 (256 invocations), 64x64 and 64x32 tiles with 4 rows
      per invocation that the device's limits allow (CPU adapters skip the 256-wide one);
      on a GPU, when 128-row tiles would make fewer than 64 workgroups, 32x64 tiles first;
    - causal masks on a GPU: the query tiles are taken last tile first across all heads (QO=1:
      the tiles that see the most keys start first), and where 128-row tiles would make fewer
      than 256 workgroups, 64-row tiles of 256 invocations, twice as many pieces of work for the
      GPU to balance (H200 phi35: 128 workgroups of 2-8 KV tiles; 0.166 -> 0.129 ms on
      wgpu-native; 64-row tiles without QO 0.195, QO alone 0.163; docs/BENCHMARKS.md, session 10);
    - q/k/v load as vec4 when both head dims are multiples of 4;
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
    one strategy where it applies (tiled always does), e.g. to test or compare one of them.
    """
    sg_min = max(1, min(device.subgroup_min_size or 4, 32, device.subgroup_lanes_contiguous or 4))
    # lanes the probe found contiguous: tiled row groups up to that wide reduce by shuffles alone
    # when the shader's run-time subgroup size allows (H200: 32 lanes, a reported minimum of 4)
    sg_fast = device.subgroup_lanes_contiguous if family is Family.SUBGROUPS else 0
    dialect = Dialect.TINT if device.dialect == "tint" else Dialect.NAGA
    storage = Storage.F16 if opts.f16 else Storage.F32
    vec = 4 if dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0 else 1
    dv = min(max(pow2ceil(dims["Dv"]), 32), 256)
    cpu = device.adapter_type == "CPU"
    group = dims["Hq"] // dims["Hkv"]
    only = os.environ.get("ATTNC_STRATEGY", "").strip()  # heuristics restricted to one strategy
    if only and only not in {x.value for x in Strategy}:
        raise ValueError(f"ATTNC_STRATEGY must be one of {sorted(x.value for x in Strategy)}, got {only!r}")
    # GPUs: tile loops unrolled in the WGSL and the next block's loads issued before the math
    gpu = {} if cpu else {"UN": 64, "PF": 1}
    # causal on a GPU: the query tiles that see the most keys start first (Plan.QO)
    causal = opts.causal and not cpu
    tiled_base = Plan(family, storage, dialect, SGMIN=sg_min, SGFAST=sg_fast, VEC=vec, QO=int(causal), **gpu)
    if dims["S"] <= 16:
        lanes = lanes_plan(device, family, dims, storage, dialect, vec, f16_math, only)
        if lanes is not None:
            return lanes
        if not cpu and group * dims["S"] >= 32 and only in ("", "tiled"):
            # many packed rows per KV head (GQA, several queries each): 32-row tiles of 4 rows per
            # invocation (H200 dec4_gqa8: 0.063 ms against the stream plan's 0.102)
            tiled = tiled_plan(device, tiled_base, dims, [(32, 64, 128, 4)])
            if tiled is not None:
                # 8-key value blocks: 11.5 KiB, four workgroups per SM on the H200, so twice the
                # splits run in one wave (dec4_gqa8 with 60 splits: 0.052-0.057 ms against
                # 0.062-0.064 with 32-key blocks and 30)
                return dataclasses.replace(tiled[0], VK=8), tiled[1]
        if cpu and group == 1 and not explicit_family and only in ("", "rows"):
            plan = Plan(Family.PORTABLE, storage, dialect, strategy=Strategy.ROWS, KC=4,
                        DQ=max(pow2ceil(dims["D"]), 4), DVC=dv, VEC=vec)
            return plan, {"BM": 8, "BN": 64}
        if vec == 4 and not f16_math and only in ("", "stream"):
            dvc = max(4, pow2ceil(dims["Dv"]))
            if cpu:  # small tiles: lavapipe compiles large unrolled row tiles slowly (seconds)
                wg, bn, bm = 64, 64, min(4, pow2ceil(group * dims["S"]))
            else:
                wg, bn = (256, 128) if dvc >= 128 else (128, 64)
                bm = min(16, pow2ceil(group * dims["S"]))
            wg = min(wg, max(dvc // 4 * 16, 32))  # at most 16 key groups
            dq = max(8, pow2ceil(dims["D"])) if cpu else -(-dims["D"] // 8) * 8  # CPU: fewer shaders to compile
            # packed GQA: a softmax phase from 8 rows, one lane per key from 16 (tuned on the H200)
            plan = stream_plan(Plan(family, storage, dialect), dims, WG=wg, KL=1 if bm >= 16 else 2, KC=4,
                               SMX=int(bm >= 8), DQ=dq)
            tun = {"BM": bm, "BN": max(bn, wg // (dvc // 4) * 4)}
            if 4 * stream_layout(plan, tun["BM"], tun["BN"]).smem_words <= int(
                    device.gpu.limits.get("max-compute-workgroup-storage-size", 16384)):
                return plan, tun
        bm = min(16, max(4, pow2ceil(group * dims["S"])))
        plan = dataclasses.replace(tiled_base, WG=64 if cpu else 128, TM=1, DK=16, DVC=dv, DVS=32)
        return plan, {"BM": bm, "BN": 64}
    lanes = lanes_plan(device, family, dims, storage, dialect, vec, f16_math, only)
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
    chosen = tiled_plan(device, tiled_base, dims, shapes) or tiled_plan(device, tiled_base, dims, [(64, 32, 64, 4)],
                                                                        fit=False)
    assert chosen is not None
    return chosen


def tiled_plan(device: Device, base: Plan, dims: dict[str, int], shapes: list[tuple[int, int, int, int]],
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
    (attnc's kernels since session 11) 6.47 ms against the whole-p plan's 6.75 and 8.39 with
    PF=0; with the checks the same plan was 1.3 % faster, PF=0 1.25x slower."""
    cpu = device.adapter_type == "CPU"
    dvc = min(-(-dims["Dv"] // 32) * 32, 128)
    lim = device.gpu.limits
    smem = int(lim.get("max-compute-workgroup-storage-size", 16384))
    inv = int(lim.get("max-compute-invocations-per-workgroup", 256))
    dk = 8 if not cpu and dims["D"] % 16 and dims["D"] % 8 == 0 else 16
    wide = wide_value_block(dvc) if not cpu and dvc > 32 else 0
    for bm, bn, wg, tm in shapes:
        for dvs, vk in ([(wide, bn // 2)] if wide and fit else []) + [(32, 0)]:
            plan = dataclasses.replace(base, WG=wg, TM=tm, DK=dk, DVC=dvc, DVS=dvs, VK=vk)
            if vk == 0 and plan.UN > 16:
                # P.V over the whole key tile in one block (Dv <= 32): 16 copies of its key loop
                # (H200 minilm 0.0167 ms against 0.0190 fully unrolled on wgpu-native, 3 % on Dawn)
                plan = dataclasses.replace(plan, UN=16)
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
    chunks of 8), and through Naga with pf=1 only (docs/BENCHMARKS.md, sessions 9-11)."""
    try:
        lay = layout(plan, bm, bn)
        pc = lay.CT * owned_run(lay.TN)
        small = dataclasses.replace(plan, PC=pc, VK=16, PF=pf, DK=max(plan.DK, 16))
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


def lanes_plan(device: Device, family: Family, dims: dict[str, int], storage: Storage, dialect: Dialect,
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
    if device.adapter_type != "CPU" and not forced:
        return None
    size = device.subgroup_size  # measured by a probe shader (lavapipe reports a range of 4..128)
    if not size or size < 4:
        return None
    short = dims["S"] <= 16  # decoding: one subgroup of packed (GQA) rows, one row per invocation
    big = dims["B"] * dims["Hq"] * dims["S"] * dims["T"] >= (LANES_MIN_DECODE if short else LANES_MIN_SCORES)
    if not forced and (size != 8 or not big or max(dims["D"], dims["Dv"]) > LANES_MAX_D):
        return None
    d8, dv8 = lanes_widths(dims)
    tm = 1 if short else 2
    plan = Plan(family, storage, dialect, strategy=Strategy.LANES, TM=tm, SGB=size, DQ=d8, DVC=dv8, VEC=4)
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
    """A stream-strategy plan for these head dims: all of Dv in one workgroup, DQ >= D (the
    smallest multiple of 4*KL unless DQ is given)."""
    kl = kw.get("KL", base.KL)
    kw.setdefault("DQ", -(-dims["D"] // (4 * kl)) * 4 * kl)
    return dataclasses.replace(base, strategy=Strategy.STREAM, DVC=max(4, pow2ceil(dims["Dv"])), VEC=4, **kw)


def split_count(device: Device, dims: dict[str, int], BM: int, BN: int, packed: bool = False,
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
    target = 64 if device.adapter_type == "CPU" else (512 if stream else 2048)
    tiles = -(-dims["T"] // BN)
    per = (2 if BM >= 8 else 1) if stream else 2
    return max(1, min(-(-target // base), tiles // per or 1))


def prefill_split_count(device: Device, dims: dict[str, int], BM: int, BN: int) -> int:
    """KV splits for long query rows: on a GPU whose row tiles alone make fewer than 96
    workgroups, enough for about 192, keeping >= 2 KV tiles each. Measured on the H200
    (docs/BENCHMARKS.md): gemma's 64 workgroups of causal rows 2.1x faster with 3 splits;
    with 128 workgroups (phi35) the partial states and the combine cost more than they gain."""
    base = row_tiles(dims, BM)
    if device.adapter_type == "CPU" or base >= 96:
        return 1
    return max(1, min(-(-192 // base), -(-dims["T"] // BN) // 2))


class _Cache:
    """Traced kernels and lowered programs, keyed by everything that changes them."""

    def __init__(self) -> None:
        self.kernels: dict[Any, ir.Kernel] = {}
        self.programs: dict[Any, tuple[Program, ...]] = {}


_CACHE = _Cache()


def build_kernel(opts: Options, tunables: dict[str, int]) -> ir.Kernel:
    """Trace the shipped flash kernel for these options (cached) and set the storage dtype."""
    from attnc.kernels.flash import flash_attention

    key = (opts, tuple(sorted(tunables.items())))
    kern = _CACHE.kernels.get(key)
    if kern is None:
        kern = flash_attention.trace(
            causal=opts.causal, window=opts.window, softcap=opts.softcap, alibi=opts.alibi,
            bias=opts.bias, sinks=opts.sinks, kv_lens=opts.kv_lens, lse=opts.lse,
            split=opts.split, score_mod=opts.score_mod, mask_mod=opts.mask_mod, pack_gqa=opts.pack_gqa,
            offsets=opts.offsets, **tunables)
        kern = retype(kern, Storage.F16 if opts.f16 else Storage.F32)
        if opts.score_mod is None and opts.mask_mod is None:
            _CACHE.kernels[key] = kern
    return kern


def programs_for(kern: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower (cached by kernel and plan)."""
    key = (kern, plan)
    progs = _CACHE.programs.get(key)
    if progs is None:
        progs = lower(kern, plan)
        _CACHE.programs[key] = progs
    return progs


def fits_portable_limits(plan: Plan, BM: int, BN: int) -> bool:
    """Whether a plan stays inside WebGPU's default limits."""
    lay = layout(plan, BM, BN)
    return (4 * lay.smem_words <= DEFAULT_LIMITS["max-compute-workgroup-storage-size"]
            and lay.WG <= DEFAULT_LIMITS["max-compute-invocations-per-workgroup"])


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def _broadcast_strides(name: str, x: np.ndarray, full: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """A compact array and element strides that read it broadcast to `full` (0 on size-1 dims)."""
    if x.ndim > len(full):
        raise ValueError(f"{name}: shape {x.shape} has more dims than {full}")
    shape = (1,) * (len(full) - x.ndim) + x.shape
    for n, f in zip(shape, full, strict=True):
        if n not in (1, f):
            raise ValueError(f"{name}: shape {x.shape} is not broadcastable to {full}")
    arr = np.ascontiguousarray(x.reshape(shape))
    st = _strides(shape)
    return arr, [0 if n == 1 and f != 1 else s for s, n, f in zip(st, shape, full, strict=True)]


@dataclasses.dataclass(frozen=True)
class Bound:
    """One set of device buffers and the dispatches that use them (see Prepared.bind_copy)."""

    bufs: dict[str, Any]
    dispatches: list[rt.Dispatch]


class Prepared:
    """One attention problem made ready on a device: kernel, programs, uniforms, buffers.

    `bind` uploads q/k/v (and the option tensors), `run` dispatches every program in one
    submission (optionally returning the GPU time in ms), `result` reads o (and lse) back.
    """

    def __init__(self, dev: Device, kern: ir.Kernel, plan: Plan, progs: tuple[Program, ...],
                 dims: dict[str, int], scalars: dict[str, float | int], extra: dict[str, np.ndarray],
                 strides: dict[str, list[int]]):
        self.dev, self.kern, self.plan, self.progs, self.dims = dev, kern, plan, progs, dims
        self.scalars, self.extra, self.strides = scalars, extra, strides
        self.bufs: dict[str, Any] = {}
        self.dispatches: list[rt.Dispatch] = []
        self.has_lse = any(b.name == "lse" for p in progs for b in p.bindings)
        self.options_key = ""

    @property
    def variant(self) -> str:
        """A readable name of the variant: family, storage, tile sizes and plan tunables."""
        pl = self.progs[0]
        tun = ",".join(f"{k}={v}" for k, v in self.kern.tunables)
        split = f",NSPLIT={self.scalars['NSPLIT']},CSG={self.plan.CSG}" if "NSPLIT" in self.scalars else ""
        pn = self.plan
        tiled = f"WG={pl.workgroup_size},TM={pn.TM},DK={pn.DK},DVS={pn.DVS},VK={pn.VK},UN={pn.UN},PF={pn.PF}"
        tiled += f",PC={pn.PC}" if pn.PC else ""
        tiled += f",QO={pn.QO}" if pn.QO else ""
        kt = dict(self.kern.tunables)
        if pn.strategy is Strategy.TILED and fast_reduce(pn, layout(pn, kt["BM"], kt["BN"])):
            tiled += f",SGFAST={pn.SGFAST}"
        stream = f"WG={pl.workgroup_size},KL={pn.KL},KC={pn.KC},SMX={pn.SMX}"
        knobs = {Strategy.ROWS: f"KC={pn.KC},DQ={pn.DQ}", Strategy.LANES: f"TM={pn.TM},SGB={pn.SGB},DQ={pn.DQ}",
                 Strategy.STREAM: stream}.get(pn.strategy, tiled)
        return f"{pl.name}:{pn.name}[{tun},{knobs},DVC={pn.DVC},VEC={pn.VEC}{split}]"

    @property
    def plan_grid(self) -> list[int]:
        env = {**self.dims, **self.scalars}
        return [workgroups(p.grid, env) for p in self.progs]

    def bind(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Prepared:
        """Upload inputs and create the output/scratch buffers and the dispatches."""
        self.bufs, self.dispatches = self._binding(q, k, v)
        return self

    def bind_copy(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Bound:
        """Another set of inputs and outputs for `run(binding=...)`: benchmarks rotate over
        copies so that inputs smaller than the GPU's cache are not timed cache-resident."""
        return Bound(*self._binding(q, k, v))

    def _binding(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[dict[str, Any], list[rt.Dispatch]]:
        dims = self.dims
        B, Hq, S, Dv = dims["B"], dims["Hq"], dims["S"], dims["Dv"]
        arrays = {"q": np.ascontiguousarray(q), "k": np.ascontiguousarray(k),
                  "v": np.ascontiguousarray(v), **self.extra}
        uni: dict[str, float | int] = {f"d_{d}": dims[d] for d in self.kern.dims}
        bufs: dict[str, Any] = {}
        for p in self.kern.params:
            if not p.type.dims:
                if p.name not in self.scalars:
                    raise ValueError(f"no value for kernel scalar {p.name!r}")
                uni[f"p_{p.name}"] = self.scalars[p.name]
                continue
            arr = arrays[p.name]
            st = self.strides.get(p.name) or _strides(arr.shape)
            for i, stride in enumerate(st):
                uni[f"s_{p.name}_{i}"] = stride
            if arr.dtype == np.float16 and arr.size % 2:
                arr = np.concatenate([arr.reshape(-1), np.zeros(1, np.float16)])
            bufs[p.name] = rt.upload(self.dev, arr)
        o_shape = tuple(dims[d] for d in self.kern.output.dims)  # [B, Hq, S, Dv] or packed [B, Hkv, R, Dv]
        for i, stride in enumerate(_strides(o_shape)):
            uni[f"s_o_{i}"] = stride
        if self.has_lse:
            for i, stride in enumerate(_strides(o_shape[:-1])):
                uni[f"s_lse_{i}"] = stride
            bufs["lse"] = rt.empty(self.dev, 4 * B * Hq * S)
        bufs["o"] = rt.empty(self.dev, 4 * B * Hq * S * Dv)
        if len(self.progs) > 1:
            bufs["part"] = rt.empty(self.dev, 4 * B * Hq * S * int(self.scalars["NSPLIT"]) * (Dv + 2))
        dispatches = []
        for p, n in zip(self.progs, self.plan_grid, strict=True):
            names = {b.name for b in p.bindings}
            fields = {f.name for f in p.uniforms} - {"grid_total", "grid_stride_x"}
            dispatches.append(rt.Dispatch(p, {x: b for x, b in bufs.items() if x in names},
                                          {x: uni[x] for x in fields}, n))
        return bufs, dispatches

    def run(self, timestamps: bool = False, binding: Bound | None = None) -> float | None:
        """Dispatch all programs in one submission; with timestamps, the GPU ms from the start
        of the first pass to the end of the last. With `binding` (from bind_copy), on those
        buffers; result() then reads them."""
        if binding is not None:
            self.bufs, self.dispatches = binding.bufs, binding.dispatches
        if not self.dispatches:
            raise RuntimeError("bind() inputs before run()")
        times = rt.run(self.dev, self.dispatches, timestamps=timestamps, span=True)
        return None if times is None else float(sum(times))

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read o (float32) and lse back."""
        B, Hq, S, Dv = (self.dims[x] for x in ("B", "Hq", "S", "Dv"))
        o = rt.readback(self.dev, self.bufs["o"], np.float32, (B, Hq, S, Dv))
        lse = rt.readback(self.dev, self.bufs["lse"], np.float32, (B, Hq, S)) if self.has_lse else None
        return o, lse


def prepare(dims: dict[str, int], dtype: Any = np.float32, *, causal: bool = False,
            scale: float | None = None, window: tuple[int | None, int | None] | None = None,
            bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
            softcap: float | None = None, sinks: np.ndarray | None = None,
            kv_lens: np.ndarray | None = None, return_lse: bool = False,
            device: Device | str | None = None, target: str | None = None,
            score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
            plan: Plan | None = None, tunables: dict[str, int] | None = None,
            nsplit: int | None = None, pack_gqa: bool | None = None,
            offsets: tuple[int, int, int, int] | None = None) -> Prepared:
    """Validate options, choose the variant (tuned, heuristic or the given plan) and lower it."""
    dev = get_device(device)
    fam = pick_family(dev, target)
    f16_math = target in F16_MATH_TARGETS
    if f16_math and np.dtype(dtype) != np.float16:
        raise ValueError(f"target {target!r} computes products in f16: pass float16 q, k, v (got {np.dtype(dtype)})")
    B, Hq, S, T = dims["B"], dims["Hq"], dims["S"], dims["T"]
    extra: dict[str, np.ndarray] = {}
    strides: dict[str, list[int]] = {}
    scalars: dict[str, float | int] = {}
    if window is not None:
        if not (isinstance(window, tuple) and len(window) == 2):
            raise ValueError(f"window must be a (left, right) tuple, got {window!r}")
        for side, val in zip(("left", "right"), window, strict=True):
            if val is not None:
                if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 0:
                    raise ValueError(f"window {side} must be a non-negative int or None, got {val!r}")
                scalars[f"window_{side}"] = int(min(val, 2**31 - 1))
    if softcap is not None:
        if not (_is_real(softcap) and 0 < softcap < math.inf):
            raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
        scalars["softcap"] = float(softcap)
    if scale is not None and not (_is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a function of (score, b, h, q_idx, kv_idx), got {type(fn).__name__}"
                             if name == "score_mod" else
                             f"{name} must be a function of (b, h, q_idx, kv_idx), got {type(fn).__name__}")
    for name, x, shape in (("alibi_slopes", alibi_slopes, (Hq,)), ("sinks", sinks, (Hq,))):
        if x is not None:
            x = _real_array(name, x, 1)
            _check(x.shape == shape, f"{name}: expected shape {shape} (Hq), got {x.shape}")
            extra[name] = np.ascontiguousarray(x, dtype=np.float32)
            strides[name] = [1]
    if kv_lens is not None:
        x = _array("kv_lens", kv_lens, 1)
        _check(x.shape == (B,), f"kv_lens: expected shape ({B},) (B), got {x.shape}")
        _check(np.issubdtype(x.dtype, np.integer), f"kv_lens: expected integers, got {x.dtype}")
        total = T if offsets is None else offsets[3]
        _check(bool(np.all((x >= 0) & (x <= total))), f"kv_lens: values must be in [0, T={total}]")
        extra["kv_lens"] = np.ascontiguousarray(x, dtype=np.int32)
        strides["kv_lens"] = [1]
    if bias is not None:
        _real_array("bias", bias)
        arr, st = _broadcast_strides("bias", bias, (B, Hq, S, T))
        extra["bias"] = arr.astype(np.float32, copy=False)
        strides["bias"] = st
    if scale is None:
        scale = 1.0 / math.sqrt(dims["D"])
    sides = None if window is None else tuple(None if w is None else 0 for w in window)
    opts = Options(causal=bool(causal), window=sides,  # type: ignore[arg-type]
                   softcap=softcap is not None, alibi=alibi_slopes is not None,
                   bias=bias is not None, sinks=sinks is not None, kv_lens=kv_lens is not None,
                   lse=return_lse, f16=np.dtype(dtype) == np.float16, score_mod=score_mod,
                   mask_mod=mask_mod)
    if offsets is not None:  # one chunk of a larger problem: absolute positions
        opts = Options(**{**opts.__dict__, "offsets": True})
        scalars.update(q_offset=offsets[0], q_total=offsets[1], kv_offset=offsets[2], kv_total=offsets[3])
    okey = options_key(opts)
    if plan is None and tunables is None and score_mod is None and mask_mod is None:
        plan, tunables, nsplit = _tuned(dev, okey, dims, opts, fam if target is not None else None, nsplit)
    hplan, htun = plan_for(dev, fam, dims, opts, explicit_family=target is not None, f16_math=f16_math)
    if f16_math:
        hplan = dataclasses.replace(hplan, storage=Storage.F16A)
        if plan is not None and plan.storage is not Storage.F16A:
            plan = None  # a tuned f16-storage plan is not an f16-math plan
    plan = plan or hplan
    tun = tunables or htun
    if pack_gqa is None:
        pack_gqa = S <= 16 and dims["Hq"] > dims["Hkv"] and plan.strategy is not Strategy.ROWS
    if nsplit is None and plan.strategy is Strategy.LANES:
        # a lane accumulates its row over every key of its split one key after the other: at most
        # LANES_SPLIT_KEYS per split keeps f32 accuracy (100000 keys in one run: relerr 1.5e-4);
        # lavapipe ci_cross runs 1.9 ms unsplit, 2.3-2.7 with 2-4 splits (docs/BENCHMARKS.md)
        nsplit = max(1, -(-T // LANES_SPLIT_KEYS))
    if nsplit is None:
        nsplit = split_count(dev, dims, tun["BM"], tun["BN"], pack_gqa,
                             plan.strategy is Strategy.STREAM) if S <= 16 else prefill_split_count(
                                 dev, dims, tun["BM"], tun["BN"])
    if nsplit > 1:
        opts = Options(**{**opts.__dict__, "split": True})
        scalars["NSPLIT"] = nsplit
        if not plan.CSG:
            plan = dataclasses.replace(plan, CSG=combine_groups(nsplit))
    if pack_gqa:
        opts = Options(**{**opts.__dict__, "pack_gqa": True})
        dims = {**dims, "R": (dims["Hq"] // dims["Hkv"]) * S}
    kern = build_kernel(opts, tun)
    progs = programs_for(kern, plan)
    _check_limits(dev, progs, plan, dims)
    prep = Prepared(dev, kern, plan, progs, dims, scalars | {"scale": float(scale)}, extra, strides)
    prep.options_key = okey
    return prep


def _check_limits(dev: Device, progs: tuple[Program, ...], plan: Plan | None = None,
                  dims: dict[str, int] | None = None) -> None:
    """Refuse, with the numbers, a variant that needs more than the device granted."""
    if plan is not None and dims is not None and (plan.QRES or plan.strategy is Strategy.STREAM) \
            and dims["D"] > plan.DQ:
        raise LoweringError(f"the variant keeps queries of at most DQ={plan.DQ} in workgroup memory; D={dims['D']}")
    if plan is not None and dims is not None and plan.strategy is Strategy.LANES and dims["D"] > plan.DQ:
        raise LoweringError(f"the variant keeps queries of at most DQ={plan.DQ} in registers; D={dims['D']}")
    lim = dev.gpu.limits
    for p in progs:
        have = int(lim.get("max-compute-workgroup-storage-size", 16384))
        if p.workgroup_storage_bytes > have:
            raise LoweringError(f"variant {p.name} needs {p.workgroup_storage_bytes} B of workgroup storage; "
                                f"{dev.spec} grants {have} B", notes=("choose smaller tiles (BM, BN, DK)",))
        have = int(lim.get("max-compute-invocations-per-workgroup", 256))
        if p.workgroup_size > have:
            raise LoweringError(f"variant {p.name} needs {p.workgroup_size} invocations per workgroup; "
                                f"{dev.spec} grants {have}", notes=("choose a smaller WG",))
        nbuf = sum(b.access is not Access.UNIFORM for b in p.bindings)
        have = int(lim.get("max-storage-buffers-per-shader-stage", 8))
        if nbuf > have:
            raise DeviceError(f"these options need {nbuf} storage buffers per shader stage; {dev.spec} grants "
                              f"max-storage-buffers-per-shader-stage = {have}",
                              notes=("drop an option (e.g. fold alibi_slopes into bias) or use a device "
                                     "that grants more",))


def options_key(opts: Options) -> str:
    """The kernel-shaping options as a stable string (the tuning cache keys on it)."""
    d = {k: v for k, v in opts.__dict__.items() if k not in ("split", "score_mod", "mask_mod")}
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


def _tuned(dev: Device, okey: str, dims: dict[str, int], opts: Options, family: Family | None,
           nsplit: int | None) -> tuple[Plan | None, dict[str, int] | None, int | None]:
    """The tuned plan for this device and shape bucket, if `attnc tune` stored one that fits."""
    from attnc.runtime import tune

    entry = tune.lookup(dev, okey, dims)
    if entry is None:
        return None, None, nsplit
    dialect = Dialect.TINT if dev.dialect == "tint" else Dialect.NAGA
    plan, tun, ns = tune.entry_to_plan(entry, dialect, Storage.F16 if opts.f16 else Storage.F32)
    if family is not None and plan.family is not family:
        return None, None, nsplit
    if plan.VEC == 4 and (dims["D"] % 4 or dims["Dv"] % 4):
        if plan.strategy in (Strategy.STREAM, Strategy.LANES):
            return None, None, nsplit
        plan = dataclasses.replace(plan, VEC=1)
    if plan.strategy in (Strategy.STREAM, Strategy.LANES) and dims["D"] > plan.DQ:
        return None, None, nsplit
    if dims["S"] > 16:
        ns = 1
    elif ns is not None:  # scale the tuned split count with the KV length of this call
        ns = max(1, min(ns, -(-dims["T"] // tun["BN"])))
    return plan, tun, nsplit if nsplit is not None else ns


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None, window: tuple[int | None, int | None] | None = None,
              bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
              softcap: float | None = None, sinks: np.ndarray | None = None,
              kv_lens: np.ndarray | None = None, return_lse: bool = False,
              device: Device | str | None = None, target: str | None = None,
              score_mod: Callable[..., Any] | None = None,
              mask_mod: Callable[..., Any] | None = None) -> Any:
    """Scaled dot-product attention on a WebGPU device with the DESIGN.md semantics.

    q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv] -> o [B,Hq,S,Dv] in q's dtype
    (and lse [B,Hq,S] float32 with return_lse). score_mod(s, b, h, q_idx, kv_idx) and
    mask_mod(b, h, q_idx, kv_idx) are traced into the kernel (q_idx is the raw query index).
    target: "portable", "subgroups", or (float16 inputs, shader-f16) "portable-f16" /
    "subgroups-f16" for f16 products; None picks the tuned or heuristic variant.
    sinks [Hq]: one more logit per head in the softmax denominator, with no value. A sink of
    +inf takes all the weight: o = 0 and lse = +inf on that head's rows, fully masked rows
    too; -inf is the same as no sink (a fully masked row: o = 0, lse = -inf); NaN makes that
    head's o and lse NaN.
    """
    dims = validate(q, k, v)
    dev = get_device(device)
    kw = dict(causal=causal, scale=scale, window=window, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
              sinks=sinks, kv_lens=kv_lens, return_lse=return_lse, device=dev, target=target,
              score_mod=score_mod, mask_mod=mask_mod)
    if largest_binding(q, k, v, bias) > binding_limit(dev):
        return chunked(q, k, v, kw, binding_limit(dev))
    prep = prepare(dims, q.dtype, causal=causal, scale=scale, window=window, bias=bias,
                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, kv_lens=kv_lens,
                   return_lse=return_lse, device=dev, target=target, score_mod=score_mod,
                   mask_mod=mask_mod)
    prep.bind(q, k, v).run()
    o, lse = prep.result()
    o = o.astype(q.dtype)
    return (o, lse) if return_lse else o


def workgroups(factors: tuple[str, ...], env: dict[str, float | int]) -> int:
    """Evaluate a product of grid factors (`X`, `ceil_div(X,n)`, `ceil_div(A*B,n)`)."""
    total = 1
    for f in factors:
        if f.startswith("ceil_div("):
            num, den = f[len("ceil_div("):-1].split(",")
            n = math.prod(int(env[x]) for x in num.split("*"))
            total *= -(-n // int(den))
        else:
            total *= int(env[f])
    return total


def prepare_attention(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...],
                      dtype: Any = np.float32, **options: Any) -> Prepared:
    """`prepare` from array shapes (what the benchmark harness and the tuner use)."""
    B, Hq, S, D = q_shape
    _, Hkv, T, _ = k_shape
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v_shape[3])
    return prepare(dims, dtype, **options)
