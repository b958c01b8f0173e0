"""Planning (lowering/schedule.py, lowering/candidates.py): the heuristic plans and split counts
for device facts (the H200's among them, without that GPU), and the tuner's candidates."""

from __future__ import annotations

import pytest

from attnc.lowering import candidates, schedule
from tests.gpu_facts import h200_like


def test_decode_candidates_start_with_valid_stream_plans(require_adapters) -> None:
    """Short rows: stream-strategy variants lead the list (a --max cut keeps them), each
    valid and within the device's limits; head dims that are not multiples of 4 get none."""
    from attnc.lowering.plan import Family, Strategy, stream_layout

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=1, Hq=16, Hkv=2, S=1, T=5000, D=64, Dv=64)
    base, _ = schedule.plan_for(dev.capabilities, Family.PORTABLE, dims, explicit_family=True)
    cands = list(candidates.candidates(dev.capabilities, dims, base, [Family.PORTABLE], 8))
    kinds = [p.strategy for p, _, _ in cands]
    assert kinds[:6] == [Strategy.STREAM] * 6 and Strategy.TILED in kinds
    limit = int(dev.gpu.limits["max-compute-workgroup-storage-size"])
    for p, tun, ns in cands:
        if p.strategy is Strategy.STREAM:
            assert 4 * stream_layout(p, tun["BM"], tun["BN"]).smem_words <= limit and ns >= 1
    odd = dict(dims, D=30)
    odd_cands = candidates.candidates(dev.capabilities, odd, base, [Family.PORTABLE], 8)
    assert Strategy.STREAM not in [p.strategy for p, _, _ in odd_cands]


def test_strategy_environment_variable_limits_the_heuristics(require_adapters, monkeypatch) -> None:
    from attnc.lowering.plan import Family, Strategy

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=1, Hq=8, Hkv=2, S=1, T=500, D=64, Dv=64)
    assert schedule.plan_for(dev.capabilities, Family.PORTABLE, dims)[0].strategy is Strategy.STREAM
    monkeypatch.setenv("ATTNC_STRATEGY", "tiled")
    assert schedule.plan_for(dev.capabilities, Family.PORTABLE, dims)[0].strategy is Strategy.TILED
    monkeypatch.setenv("ATTNC_STRATEGY", "fast")
    with pytest.raises(ValueError, match="ATTNC_STRATEGY must be one of"):
        schedule.plan_for(dev.capabilities, Family.PORTABLE, dims)


# --------------------------------------------------------------------------- split counts
def test_prefill_splits_only_when_a_gpu_has_few_row_tiles() -> None:
    """Long rows split over KV on a GPU only when the row tiles make fewer than 96 workgroups
    (about 192 with the splits, >= 2 KV tiles each); never on a CPU adapter."""
    gpu = h200_like()
    cpu = h200_like(adapter_type="CPU")
    gemma = dict(B=1, Hq=4, Hkv=1, S=512, T=512, D=256, Dv=256)
    phi = dict(B=1, Hq=32, Hkv=32, S=501, T=501, D=96, Dv=96)
    assert schedule.prefill_split_count(gpu, gemma, 32, 64) == 3  # 64 workgroups of 32 rows
    assert schedule.prefill_split_count(cpu, gemma, 32, 64) == 1
    assert schedule.prefill_split_count(gpu, phi, 128, 64) == 1  # 128 workgroups: no split
    assert schedule.prefill_split_count(gpu, dict(gemma, T=100), 32, 64) == 1  # 2 KV tiles: 1 split
    assert schedule.prefill_split_count(gpu, dict(gemma, Hq=1, S=40), 32, 64) == 4  # 2 workgroups, 8 tiles


# --------------------------------------------------------------------------- GPU heuristics
def test_gpu_decode_with_many_packed_rows_takes_32_row_tiles() -> None:
    """GQA decode with >= 32 query rows per KV head (dec4_gqa8: 8 heads x 4 queries): 32x64
    tiles of the tiled strategy, 4 rows per invocation, 8-key value blocks (a small workgroup),
    >= 2 KV tiles per split; fewer packed rows (dec_gqa8, whisper) stay with the stream strategy."""
    from attnc.lowering.plan import Family, Strategy, layout

    gpu = h200_like()
    dec4 = dict(B=1, Hq=64, Hkv=8, S=4, T=7680, D=64, Dv=64)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dec4)
    assert plan.strategy is Strategy.TILED and tun == {"BM": 32, "BN": 64}
    assert (plan.workgroup_size, plan.rows_per_invocation, plan.value_stage_columns, plan.value_block_keys, plan.unroll,
            plan.prefetch) == (128, 4, 64, 8, 64, 1)
    assert 4 * layout(plan, 32, 64).smem_words <= 12 * 1024  # four per SM on the H200
    assert schedule.split_count(gpu, dec4, 32, 64, packed=True) == 60  # 120 KV tiles, 2 per split
    for dims in (dict(dec4, S=1), dict(B=1, Hq=6, Hkv=6, S=4, T=1500, D=64, Dv=64)):
        assert schedule.plan_for(gpu, Family.SUBGROUPS, dims)[0].strategy is Strategy.STREAM
    cpu = h200_like(adapter_type="CPU")
    assert schedule.plan_for(cpu, Family.PORTABLE, dec4)[0].strategy is not Strategy.TILED


def test_gpu_decode_with_8_packed_rows_takes_a_softmax_phase_and_long_splits() -> None:
    """8 query rows per KV head (dec_gqa8: S = 1, 8 heads per KV head): the stream strategy with
    its softmax phase (each probability computed once) and >= 2 KV tiles per split; 4 rows
    (whisper) and 1 row (dec_h128) keep every invocation's own softmax and 1 tile per split."""
    from attnc.lowering.plan import Family, Strategy

    gpu = h200_like()
    dec = dict(B=1, Hq=64, Hkv=8, S=1, T=7680, D=64, Dv=64)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dec)
    assert plan.strategy is Strategy.STREAM and plan.softmax_phase == 1 and tun["BM"] == 8
    assert schedule.split_count(gpu, dec, 8, 64, packed=True, stream=True) == 60  # 120 KV tiles, 2 per split
    whisper = dict(B=1, Hq=6, Hkv=6, S=4, T=1500, D=64, Dv=64)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, whisper)
    assert plan.strategy is Strategy.STREAM and plan.softmax_phase == 0 and tun["BM"] == 4
    assert schedule.split_count(gpu, whisper, 4, 64, packed=True, stream=True) == 24  # one tile each
    h128 = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128)
    assert schedule.split_count(gpu, h128, 1, 128, packed=True, stream=True) == 64  # 512 workgroups


def test_gpu_decode_of_one_long_row_reads_each_key_with_8_lanes() -> None:
    """One query row per tile and a head dim of 128 or more (multiple of 32) on a GPU: 8 lanes
    per key (f16 and f32), a query dim without padding, a layout that maps; shorter heads,
    head dims 8 lanes would pad, more rows per tile and CPU adapters keep 2 lanes."""
    from attnc.lowering.plan import Family, stream_layout

    gpu = h200_like()
    for D, f16 in ((128, True), (128, False), (256, True)):
        dims = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=D, Dv=D)
        plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dims, f16=f16)
        assert (plan.lanes_per_key, plan.query_dim, tun["BM"]) == (8, D, 1)
        stream_layout(plan, tun["BM"], tun["BN"])
    h128 = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128)
    for dims in (dict(h128, D=64, Dv=64), dict(h128, D=136), dict(h128, S=4)):
        assert schedule.plan_for(gpu, Family.SUBGROUPS, dims)[0].lanes_per_key == 2
    cpu = h200_like(adapter_type="CPU", subgroup_size=8, subgroup_lanes_contiguous=8)
    assert schedule.plan_for(cpu, Family.PORTABLE, h128)[0].lanes_per_key != 8


def test_gpu_f16_decode_of_4_or_more_rows_sums_lanes_by_shuffles() -> None:
    """f16 stream tiles of 4 or 8 packed rows on a GPU with subgroups sum each key's partial
    dots by shuffles (LS=1), in a layout that maps; f32, one row per tile (8 lanes), the
    portable family, CPU adapters and the lane groups of a CPU do not; the tuner tries the
    other setting too."""
    from attnc.lowering import candidates as cands
    from attnc.lowering.plan import Family, Strategy, stream_layout

    gpu, cpu = h200_like(), h200_like(adapter_type="CPU", subgroup_size=8, subgroup_lanes_contiguous=8)
    for dims in (dict(B=1, Hq=8, Hkv=2, S=1, T=16384, D=128, Dv=128), dict(B=1, Hq=64, Hkv=8, S=1, T=7680, D=64, Dv=64),
                 dict(B=1, Hq=8, Hkv=8, S=4, T=16384, D=128, Dv=128)):
        plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dims, f16=True)
        assert plan.strategy is Strategy.STREAM and tun["BM"] >= 4 and plan.lane_sum == 1, (dims, plan)
        stream_layout(plan, tun["BM"], tun["BN"])
        assert schedule.plan_for(gpu, Family.SUBGROUPS, dims)[0].lane_sum == 0  # f32
        assert schedule.plan_for(gpu, Family.PORTABLE, dims, f16=True)[0].lane_sum == 0
        assert schedule.plan_for(cpu, Family.SUBGROUPS, dims, f16=True)[0].lane_sum == 0
        sums = {c.lane_sum for c, _, _ in cands.candidates(gpu, dims, plan, [Family.PORTABLE, Family.SUBGROUPS], 8)
                if c.strategy is Strategy.STREAM and c.softmax_phase in (0, 1) and c.lanes_per_key > 1}
        assert sums == {0, 1}
    one_row = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128)
    assert schedule.plan_for(gpu, Family.SUBGROUPS, one_row, f16=True)[0].lane_sum == 0


def test_gpu_decode_over_a_quantized_k_with_one_row_per_tile() -> None:
    """A quantized K with one query row per tile (kv_dec1_h128): over q8_0 and q4_0, and int8 at
    D = 16, 32, 64 and 128, lane groups of 4 lanes per key (SMX=3, 128 invocations, 128-key tiles,
    2 keys per step), where the device keeps 4 lanes contiguous; over int8 at other head dims
    (48, 96, 256), one lane per key, a key per invocation in each tile, probabilities in the
    dot phase (SMX=2), as for every format without 4 contiguous lanes or in the portable family;
    each plan valid for the layout. The same shape over f16 K and packed GQA rows over a
    quantized K keep their plans on a GPU; a CPU adapter takes SMX=2 over f16 K as well, not
    over f32 K."""
    from attnc.lowering.plan import Family, Strategy, stream_layout

    gpu = h200_like()
    h128 = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128)
    h64 = dict(h128, Hq=16, Hkv=16, D=64, Dv=64)
    narrow = h200_like(subgroup_lanes_contiguous=2)  # lanes the probe did not find contiguous

    def assert_shared_maximum(caps, family, dims, fmt, f16=True) -> None:
        plan, tun = schedule.plan_for(caps, family, dims, f16=f16, k_format=fmt)
        assert (plan.strategy, plan.softmax_phase, plan.lanes_per_key) == (Strategy.STREAM, 2, 1), (dims, fmt)
        assert tun["BM"] == 1 and tun["BN"] >= plan.workgroup_size
        stream_layout(plan, tun["BM"], tun["BN"])  # (raises if it does not map)

    for dims in (dict(h128, D=96, Dv=96), dict(h128, D=48, Dv=48), dict(h128, D=256, Dv=256)):
        assert_shared_maximum(gpu, Family.SUBGROUPS, dims, "int8")
    for fmt in ("q8_0", "q4_0", "int8"):
        assert_shared_maximum(narrow, Family.SUBGROUPS, h128, fmt)
        assert_shared_maximum(gpu, Family.PORTABLE, h64, fmt, f16=False)
    lane_group_cases = [(dims, fmt) for fmt in ("q8_0", "q4_0") for dims in (h128, h64, dict(h128, D=96, Dv=96))]
    lane_group_cases += [(dict(h64, D=d, Dv=d), "int8") for d in (16, 32, 64, 128)]
    for dims, fmt in lane_group_cases:
        for f16 in (True, False):
            plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dims, f16=f16, k_format=fmt)
            assert (plan.strategy, plan.softmax_phase, plan.lanes_per_key) == (Strategy.STREAM, 3, 4), (dims, fmt)
            assert (plan.workgroup_size, plan.keys_per_step, tun) == (128, 2, {"BM": 1, "BN": 128}), (dims, fmt)
            assert (plan.query_dim // 16) % 8 == 0 or 8 % (plan.query_dim // 16) == 0  # whole blocks per lane
            if fmt == "int8":
                assert plan.query_dim == max(16, dims["D"])  # no padded lanes
            stream_layout(plan, tun["BM"], tun["BN"])
    assert schedule.plan_for(gpu, Family.SUBGROUPS, h128, f16=True)[0].softmax_phase == 0
    gqa8 = dict(h128, Hq=64, D=64, Dv=64)
    for fmt in ("q8_0", "q4_0"):
        assert schedule.plan_for(gpu, Family.SUBGROUPS, gqa8, k_format=fmt)[0].softmax_phase == 1
    # CPU adapters (portable family; with subgroups they take lane groups): over f16 and
    # quantized K too, not over f32 K
    cpu = h200_like(adapter_type="CPU", subgroup_size=8, subgroup_lanes_contiguous=8)
    for f16, fmt, smx in ((True, None, 2), (False, "q8_0", 2), (False, None, 0)):
        plan, tun = schedule.plan_for(cpu, Family.PORTABLE, h128, f16=f16, k_format=fmt)
        assert plan.softmax_phase == smx and tun["BM"] == 1
        stream_layout(plan, tun["BM"], tun["BN"])


def test_cpu_decode_of_one_or_two_rows_takes_lane_groups() -> None:
    """A CPU adapter with subgroups decodes up to 2 packed rows per tile with lane groups
    (SMX=3): 8 lanes per key from D = 80, 4 below, no more than the lanes the probe found in one
    subgroup or the output vec4s; f16, f32 and quantized K; a block-quantized K's query dim padded
    so that each lane reads whole blocks or part of one; every plan maps. More packed rows, the
    portable family and GPUs keep their plans."""
    from attnc.lowering.plan import LANE_GROUP_MAX_VEC4, Family, Strategy, stream_layout

    cpu = h200_like(adapter_type="CPU", subgroup_size=8, subgroup_lanes_contiguous=8)
    h128 = dict(B=1, Hq=4, Hkv=4, S=1, T=8192, D=128, Dv=128)
    cases = [  # (dims, quantized K's format, expected (KL, DQ, BM))
        (h128, None, (8, 128, 1)), (h128, "q4_0", (8, 128, 1)), (dict(h128, D=64, Dv=64), None, (4, 64, 1)),
        (dict(h128, Hq=8, D=64, Dv=64), "q8_0", (4, 64, 2)), (dict(h128, D=80, Dv=80), None, (8, 96, 1)),
        (dict(h128, D=96, Dv=96), "int8", (4, 128, 1)), (dict(h128, D=64, Dv=8), None, (2, 64, 1)),
        (dict(h128, Hq=8, Dv=256), None, (8, 128, 2)),
    ]
    for dims, fmt, (kl, dq, bm) in cases:
        quantized = fmt is not None
        for f16 in (True, False):
            plan, tun = schedule.plan_for(cpu, Family.SUBGROUPS, dims, f16=f16, k_format=fmt)
            assert (plan.strategy, plan.softmax_phase) == (Strategy.STREAM, 3), dims
            assert (plan.lanes_per_key, plan.query_dim, tun["BM"]) == (kl, dq, bm), dims
            lay = stream_layout(plan, tun["BM"], tun["BN"])
            assert lay.BM * lay.NV <= LANE_GROUP_MAX_VEC4
            run = dq // (4 * kl)
            assert not quantized or 8 % run == 0 or run % 8 == 0
    narrow = h200_like(adapter_type="CPU", subgroup_size=4, subgroup_lanes_contiguous=4)
    assert schedule.plan_for(narrow, Family.SUBGROUPS, h128)[0].lanes_per_key == 4
    for dims in (dict(h128, Hq=16), dict(h128, S=4)):  # 4 packed rows
        assert schedule.plan_for(cpu, Family.SUBGROUPS, dims)[0].softmax_phase != 3
    assert schedule.plan_for(cpu, Family.PORTABLE, h128)[0].softmax_phase != 3
    assert schedule.plan_for(h200_like(), Family.SUBGROUPS, h128)[0].softmax_phase != 3


def test_gpu_prefill_tiles_over_24_kib_write_p_in_chunks() -> None:
    """A 128x64 prefill tile with 32 outputs per invocation (vit: Dv = 64) takes the chunked-p
    plan, under SHARED_SMEM (the whole p tile needs 42 KiB); 48 outputs (Dv 72 or 96) with many
    row tiles only, through Naga with the prefetch registers; CPU adapters keep the whole p tile."""
    import dataclasses

    from attnc.lowering.plan import Family, layout

    gpu = h200_like()
    vit = dict(B=1, Hq=16, Hkv=16, S=4096, T=4096, D=64, Dv=64)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, vit)
    assert tun == {"BM": 128, "BN": 64}
    assert (plan.workgroup_size, plan.rows_per_invocation, plan.p_chunk_keys, plan.value_block_keys,
            plan.value_stage_columns, plan.unroll, plan.prefetch) == (256, 4, 32, 16, 64, 64, 0)
    whole = dataclasses.replace(plan, p_chunk_keys=0, value_block_keys=32, prefetch=1)
    assert 4 * layout(plan, 128, 64).smem_words <= schedule.SHARED_SMEM < 4 * layout(whole, 128, 64).smem_words
    for d in (72, 96):
        plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dict(vit, D=d, Dv=d))
        assert tun["BM"] == 128 and (plan.p_chunk_keys, plan.value_block_keys, plan.prefetch) == (32, 16, 1)
        plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dict(vit, S=1024, T=1024, D=d, Dv=d))
        assert tun["BM"] == 128 and (plan.p_chunk_keys, plan.value_block_keys, plan.prefetch) == (0, 32,
                                                                                                  1)  # 128 row tiles
    # Tint's shaders take it with 48 outputs too (head-dim chunks of 16), given >= 256 row tiles
    tint = h200_like(dialect="tint")
    vision = dict(vit, S=5776, T=5776, D=72, Dv=72)
    plan, tun = schedule.plan_for(tint, Family.SUBGROUPS, vision)
    assert tun["BM"] == 128 and (plan.p_chunk_keys, plan.value_block_keys, plan.prefetch, plan.head_chunk) == (32, 16,
                                                                                                               0, 16)
    assert 4 * layout(plan, 128, 64).smem_words <= schedule.SHARED_SMEM
    plan = schedule.plan_for(gpu, Family.SUBGROUPS, vision)[0]  # Naga
    assert (plan.p_chunk_keys, plan.value_block_keys, plan.prefetch, plan.head_chunk) == (32, 16, 1, 16)
    plan, tun = schedule.plan_for(tint, Family.SUBGROUPS, dict(vision, S=1024, T=1024))  # 128 tiles
    assert tun["BM"] == 128 and plan.p_chunk_keys == 0
    cpu = h200_like(adapter_type="CPU")
    assert schedule.plan_for(cpu, Family.PORTABLE, vit)[0].p_chunk_keys == 0


def test_gpu_causal_prefill_takes_long_tiles_first_in_64_row_tiles() -> None:
    """Causal prefill on a GPU takes the query tiles last first (QO=1); where 128-row tiles would
    make fewer than 256 workgroups (phi35: 128), 64-row tiles of 256 invocations. Non-causal
    problems and CPU adapters keep the index order, long causal prefill its 128-row tiles."""
    from attnc.lowering.plan import Family

    gpu = h200_like()
    phi = dict(B=1, Hq=32, Hkv=32, S=501, T=501, D=96, Dv=96)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, phi, causal=True)
    assert (tun["BM"], plan.workgroup_size, plan.rows_per_invocation, plan.last_tile_first,
            plan.value_block_keys) == (64, 256, 4, 1, 32)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, phi)
    assert (tun["BM"], plan.last_tile_first) == (128, 0)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dict(phi, S=4096, T=4096), causal=True)
    assert (tun["BM"], plan.last_tile_first) == (128, 1)
    cpu = h200_like(adapter_type="CPU")
    assert schedule.plan_for(cpu, Family.PORTABLE, phi, causal=True)[0].last_tile_first == 0


def test_gpu_prefill_with_one_value_block_per_tile_unrolls_its_key_loop_16_times() -> None:
    """Dv <= 32 (minilm): P.V over the whole key tile in one block, its 64-key loop in 16 copies
    per iteration; wider value blocks keep their loops whole (UN=64), CPU adapters plain loops."""
    from attnc.lowering.plan import Family

    gpu = h200_like()
    minilm = dict(B=1, Hq=12, Hkv=12, S=128, T=128, D=32, Dv=32)
    plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, minilm)
    assert (plan.value_block_keys, plan.value_stage_columns, plan.unroll, plan.prefetch) == (0, 32, 16, 1)
    assert tun == {"BM": 32, "BN": 64}
    assert schedule.plan_for(gpu, Family.SUBGROUPS, dict(minilm, D=64, Dv=64))[0].unroll == 64
    cpu = h200_like(adapter_type="CPU")
    assert schedule.plan_for(cpu, Family.PORTABLE, minilm)[0].unroll == 1


@pytest.mark.parametrize("smem", [16384, 24576, 32768, 49152])
@pytest.mark.parametrize("cpu", [False, True])
def test_f16_tile_plans_fit_the_device_by_what_they_stage(smem, cpu) -> None:
    """The f16-tile targets' plans are sized by their own layout (q/k/v tiles in halves, p in f32
    words beside them, more than half an f32 plan's memory): each fits the device's workgroup
    memory, for prefill, decode and GQA shapes of several head dims."""
    from attnc.lowering.plan import Family, Storage, layout

    caps = h200_like(adapter_type="CPU" if cpu else "DiscreteGPU", features=frozenset({"subgroups", "f16"}),
                     limits={"max-compute-workgroup-storage-size": smem,
                             "max-compute-invocations-per-workgroup": 1024})
    for S, T, D, Hq, Hkv in ((4096, 4096, 64, 16, 16), (501, 501, 96, 32, 32), (5776, 5776, 72, 16, 16),
                             (512, 512, 256, 4, 1), (4, 7680, 64, 64, 8), (1, 1500, 128, 8, 8)):
        dims = dict(B=1, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=D)
        plan, tun = schedule.plan_for(caps, Family.SUBGROUPS, dims, f16=True, f16_math=True, explicit_family=True)
        assert plan.storage is Storage.F16A
        assert 4 * layout(plan, tun["BM"], tun["BN"]).smem_words <= smem, (dims, plan, tun)


SUBGROUPS = frozenset({"subgroups", "timestamps"})
# (device facts changed from the H200's, plan fields, the refusal's words or None): each fact
# device_refuses checks, one plan past it and one within it
REFUSALS = [
    (dict(features=frozenset({"timestamps"})), dict(family="subgroups"), "does not offer"),
    (dict(subgroup_lanes_contiguous=2), dict(family="subgroups"), "does not offer"),
    (dict(subgroup_lanes_contiguous=4), dict(family="subgroups"), None),
    (dict(subgroup_min_size=8), dict(family="subgroups", min_subgroup=16), "SGMIN=16"),
    (dict(subgroup_min_size=8), dict(family="subgroups", min_subgroup=8), None),
    (dict(subgroup_min_size=8, subgroup_lanes_contiguous=4), dict(family="subgroups", min_subgroup=8), "SGMIN=8"),
    (dict(subgroup_min_size=64, subgroup_lanes_contiguous=64), dict(family="subgroups", min_subgroup=64), "SGMIN=64"),
    (dict(subgroup_lanes_contiguous=8), dict(family="subgroups", shuffle_only_lanes=16), "SGFAST=16"),
    (dict(subgroup_lanes_contiguous=16), dict(family="subgroups", shuffle_only_lanes=16), None),
    (dict(subgroup_size=16), dict(family="subgroups", strategy="lanes", subgroup_width=32), "SGB=32"),
    (dict(subgroup_size=16), dict(family="subgroups", strategy="lanes", subgroup_width=16), None),
    (dict(), dict(storage="f16a"), "need shader-f16"),
    (dict(features=SUBGROUPS | {"f16"}), dict(storage="f16a"), None),
]


@pytest.mark.parametrize(("facts", "fields", "words"), REFUSALS)
def test_every_device_fact_a_plan_assumes_is_checked(facts, fields, words) -> None:
    """A plan stored elsewhere (a tuning cache of another device, a damaged one) that assumes
    subgroup facts the device lacks would reduce over lanes of another subgroup, and f16 tiles
    need shader-f16: device_refuses names each such fact and accepts a plan within it."""
    from attnc.lowering.plan import Family, Plan, Storage, Strategy

    kinds = {"family": Family, "strategy": Strategy, "storage": Storage}
    plan = Plan(**{k: kinds[k](v) if k in kinds else v for k, v in fields.items()})
    why = schedule.device_refuses(h200_like(**facts), plan)
    if words is None:
        assert why is None, why
    else:
        assert why is not None and words in why, why
