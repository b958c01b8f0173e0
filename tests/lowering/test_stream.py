"""The stream strategy (attnc/lowering/stream.py) with its knobs forced, on every adapter.

attention() picks it by heuristic for short query rows with head dims that are multiples of 4,
so tests/runtime covers every option through it with the heuristic knobs; here hypothesis
draws the knobs too (workgroup size, lanes per key, keys per softmax step, row and key tiles,
column chunks, splits) with random option sets, and the layout rules are checked directly.
A tiled decode is forced as well, since the heuristics no longer pick it for these shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc import quant
from attnc.errors import LoweringError
from attnc.lowering.plan import LANE_GROUP_MAX_VEC4, Family, Plan, Storage, Strategy, stream_layout
from attnc.runtime import api
from tests.forced_plan import OPTION_SETS, check_forced_plan, dialect
from tests.textbook import assert_close, attention_ref

ADAPTERS = ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]
SUBGROUP_ADAPTERS = ["wgpu:vulkan", "dawn:vulkan"]
RUN = settings(deadline=None, max_examples=5,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def stream(family: Family = Family.PORTABLE, **kw) -> Plan:
    base = dict(workgroup_size=64, lanes_per_key=2, keys_per_step=4, query_dim=64, value_columns=64, vector_width=4)
    return Plan(family, strategy=Strategy.STREAM, **(base | kw))


def lane_groups(dev, **kw) -> Plan:
    """An SMX=3 stream plan (subgroups family) in the dialect of `dev`'s compiler."""
    return stream(Family.SUBGROUPS, softmax_phase=3, dialect=dialect(dev), **kw)


def lane_sums(dev, **kw) -> Plan:
    """An LS=1 stream plan (subgroups family, SMX 0 or 1) in the dialect of `dev`'s compiler."""
    return stream(Family.SUBGROUPS, lane_sum=1, dialect=dialect(dev), **kw)


# --------------------------------------------------------------------------- layout rules
@pytest.mark.parametrize(("kw", "BM", "BN", "msg"), [
    (dict(vector_width=1), 4, 64, "needs VEC=4"),
    (dict(query_dim=36, lanes_per_key=2), 4, 64, r"multiple of 4\*KL"),
    (dict(value_columns=48), 4, 64, "power of two"),
    (dict(value_columns=512, workgroup_size=64), 4, 64, "no larger than WG"),
    (dict(workgroup_size=128, keys_per_step=8), 4, 32, "split evenly"),
    (dict(lanes_per_key=3), 4, 64, "power of two"),
    (dict(), 3, 64, "BM=3 must be a power of two"),
    (dict(softmax_phase=4), 4, 64, "SMX=4 must be 0, 1, 2 or 3"),
    (dict(softmax_phase=3), 1, 64, "SMX=3 reduces each key's dot .* by subgroup shuffles: use the subgroups family"),
    (dict(family=Family.SUBGROUPS, softmax_phase=3, lanes_per_key=8, value_columns=16, query_dim=64), 1, 64,
     "KL=8 lanes per key must divide the 4 output vec4s"),
    (dict(family=Family.SUBGROUPS, softmax_phase=3, lanes_per_key=2, keys_per_step=4), 1, 64,
     "BN=64 keys must split evenly over 32 lane groups x KC=4"),
    (dict(family=Family.SUBGROUPS, softmax_phase=3, lanes_per_key=1, keys_per_step=1, value_columns=128), 1, 64,
     "32 output vec4s per lane in registers; at most 16"),
    (dict(softmax_phase=2), 4, 64, "SMX=2 scores each key whole in one invocation: it needs KL=1"),
    (dict(softmax_phase=2, lanes_per_key=1, workgroup_size=128), 4, 64, "BN=64 >= WG=128"),
    # LS=1: a key's partial dots summed by shuffles in the dot phase
    (dict(lane_sum=1), 4, 64, r"LS=1 sums a key's partial dots by subgroup shuffles in the dot phase: it needs the "
     r"subgroups family, SMX=0 or 1, KL >= 2 and BN x KL = 128 a multiple of WG=64 \(got portable, SMX=0, KL=2\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, softmax_phase=2, lanes_per_key=1), 4, 64,
     r"LS=1 sums .* it needs the subgroups family, SMX=0 or 1, KL >= 2 .*\(got subgroups, SMX=2, KL=1\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, softmax_phase=3, keys_per_step=2), 1, 64,
     r"LS=1 sums .*\(got subgroups, SMX=3, KL=2\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, lanes_per_key=1), 4, 64, r"LS=1 sums .*\(got subgroups, SMX=0, KL=1\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, softmax_phase=1, lanes_per_key=1), 4, 64,
     r"LS=1 sums .*\(got subgroups, SMX=1, KL=1\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, lanes_per_key=2, workgroup_size=128, value_columns=128,
          keys_per_step=1), 4, 32, r"LS=1 sums .*BN x KL = 64 a multiple of WG=128 \(got subgroups, SMX=0, KL=2\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=1, lanes_per_key=4, workgroup_size=128, value_columns=128,
          keys_per_step=1, softmax_phase=1), 4, 16,
     r"BN x KL = 64 a multiple of WG=128 \(got subgroups, SMX=1, KL=4\)"),
    (dict(family=Family.SUBGROUPS, lane_sum=2), 4, 64, "tunable LS=2 must be 0 or 1"),
])
def test_stream_layout_rejects_what_it_cannot_map(kw, BM, BN, msg) -> None:
    kw = dict(kw)
    with pytest.raises(LoweringError, match=msg):
        stream_layout(stream(kw.pop("family", Family.PORTABLE), **kw), BM, BN)


def test_stream_layout_counts() -> None:
    lay = stream_layout(stream(workgroup_size=128, value_columns=128, query_dim=128, lanes_per_key=2, keys_per_step=4),
                        4, 128)
    assert (lay.CG, lay.KG, lay.NK, lay.D4) == (32, 4, 32, 32)
    assert lay.RC * lay.CG <= lay.WG  # a merge round stores one vec4 per invocation
    assert not lay.merge_in_sp and (lay.RC, lay.sp_words) == (4, 128 * 2 * 4)  # o_red: 4 rows per round
    assert lay.smem_words == 4 * 4 * 32 + 128 * 2 * 4 + 2 * 4 * 4 + 2 * 4 + 4 * 4 * 4 * 32 + 2
    # from 8 rows the merge reuses the partial dots' array, rounds no larger than its 2048 words
    eight = stream_layout(stream(workgroup_size=128, value_columns=128, query_dim=128, lanes_per_key=2,
                                 keys_per_step=4), 8, 128)
    assert eight.merge_in_sp
    assert (eight.RC, eight.sp_words) == (4, 128 * 2 * 8) == (4, 4 * eight.KG * 4 * eight.CG)
    gqa8 = stream_layout(stream(workgroup_size=128, value_columns=64, query_dim=64, lanes_per_key=2, keys_per_step=4,
                                softmax_phase=1), 8, 64)  # dec_gqa8's
    assert (gqa8.RC, gqa8.sp_words, 4 * gqa8.smem_words) == (2, 64 * 2 * 8, 9032)
    smx = stream_layout(stream(workgroup_size=128, value_columns=128, query_dim=128, lanes_per_key=2, keys_per_step=4,
                               softmax_phase=1), 4, 128)
    assert smx.smem_words == lay.smem_words + 128 * 4 + 4 * 4  # probabilities and rescale factors
    # SMX=3: 16 groups of 8 lanes, 4 output vec4s a lane, merged in one round of 4 x 128 vec4s
    groups = stream_layout(stream(Family.SUBGROUPS, workgroup_size=128, value_columns=128, query_dim=128,
                                  lanes_per_key=8, keys_per_step=2, softmax_phase=3), 1, 128)
    assert (groups.NG, groups.NV, groups.RV, groups.NK) == (16, 4, 4, 8)
    assert groups.smem_words == 4 * 32 + 2 * 16 + 2 + 4 * 4 * 128 + 3  # q, group states, row states, merge, flags
    two = stream_layout(stream(Family.SUBGROUPS, workgroup_size=256, value_columns=128, query_dim=128,
                               lanes_per_key=4, keys_per_step=2, softmax_phase=3), 2, 128)
    assert (two.NV, two.RV) == (8, 2) and two.BM * two.NV == LANE_GROUP_MAX_VEC4  # 16 vec4s: 8 rounds of 2


# --------------------------------------------------------------------------- against the reference
@st.composite
def problems(draw):
    group = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.integers(1, 2))
    dims = dict(B=draw(st.integers(1, 2)), Hq=group * Hkv, Hkv=Hkv, S=draw(st.integers(1, 6)),
                T=draw(st.integers(1, 300)), D=4 * draw(st.integers(1, 24)), Dv=4 * draw(st.integers(1, 24)))
    smx = draw(st.integers(0, 2))
    kl = 1 if smx == 2 else draw(st.sampled_from([1, 2, 4]))  # SMX=2: one lane per key
    wg = draw(st.sampled_from([32, 64, 128]))
    dvc = draw(st.sampled_from([4, 8, 16, 32, 64, 128]).filter(lambda c: c // 4 <= wg))
    kg = wg // (dvc // 4)
    kc = draw(st.sampled_from([1, 2, 4]))
    bn = draw(st.sampled_from([32, 64, 128]).filter(lambda b: b % (kg * kc) == 0 and (smx < 2 or b >= wg)))
    plan = stream(workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc, query_dim=-(-dims["D"] // (4 * kl)) * 4 * kl,
                  value_columns=dvc, softmax_phase=smx)
    # row tiles up to 4 here (lavapipe compiles 8-row stream tiles for seconds); 8 rows run
    # in test_stream_many_rows
    tun = {"BM": draw(st.sampled_from([1, 2, 4])), "BN": bn}
    nsplit = draw(st.sampled_from([1, 1, 2, 5]))
    opts = draw(OPTION_SETS)
    return dims, plan, tun, nsplit, opts, draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=problems())
def test_stream_matches_reference(spec, problem, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = problem
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed)
    assert op.plan.strategy is Strategy.STREAM


@pytest.mark.gpu
@pytest.mark.parametrize(("spec", "smx", "ls"), [(a, x, 0) for a in ADAPTERS for x in (0, 1, 2, 3)
                                                 if x < 3 or a in SUBGROUP_ADAPTERS]  # 3: lane groups, subgroups
                         + [(a, x, 1) for a in SUBGROUP_ADAPTERS for x in (0, 1)])  # LS=1: subgroups
def test_stream_nan_value_of_a_visible_key_poisons_only_its_rows(spec, smx, ls, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, 2, 64)).astype(np.float32)
    k = rng.standard_normal((1, 2, 200, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 200, 64)).astype(np.float32)
    v[0, 1, 17, 5] = np.nan
    dims = dict(B=1, Hq=4, Hkv=2, S=2, T=200, D=64, Dv=64)
    if smx == 3:
        plan = lane_groups(dev, lanes_per_key=min(4, dev.subgroup_size), keys_per_step=2)
    elif ls:  # a key's 2 partial dots summed by shuffles
        plan = lane_sums(dev, softmax_phase=smx)
    else:
        plan = stream(softmax_phase=smx, lanes_per_key=1 if smx == 2 else 2)
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 4, "BN": 64}, nsplit=2)
    assert op.plan.lane_sum == ls
    op.bind(q, k, v)
    op.run()
    o, _ = op.result()
    ref = attention_ref(q, k, v)
    assert np.array_equal(np.isnan(o), np.isnan(ref))
    assert np.isnan(o[0, 2:, :, 5]).all() and not np.isnan(o[0, :2]).any()
    assert_close(np.nan_to_num(o), np.nan_to_num(ref), 1e-5, "o")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
def test_tiled_decode_still_matches_reference(spec, require_adapters) -> None:
    """The tiled strategy on a packed-GQA split decode (a tuning cache may still choose it)."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(4)
    dims = dict(B=2, Hq=8, Hkv=2, S=2, T=333, D=64, Dv=32)
    q = rng.standard_normal((2, 8, 2, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 333, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 333, 32)).astype(np.float32)
    kv_lens = np.array([333, 101], np.int32)
    plan = Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=32,
                value_stage_columns=32, vector_width=4)
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 8, "BN": 64}, nsplit=3,
                     causal=True, kv_lens=kv_lens)
    assert op.plan.strategy is Strategy.TILED
    op.bind(q, k, v)
    op.run()
    o, _ = op.result()
    assert_close(o, attention_ref(q, k, v, causal=True, kv_lens=kv_lens), 1e-5, "o")


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize(("smx", "nsplit"), [(0, 3), (1, 3), (1, 1), (2, 3)])
def test_stream_many_rows(smx, nsplit, require_adapters) -> None:
    """Packed GQA decode with 16 query heads per KV head in 8-row tiles (the merge through the
    partial-dot array, in rounds of 4 rows, or of 2 where one lane per key halves that
    array), split or not."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(5)
    dims = dict(B=1, Hq=32, Hkv=2, S=1, T=700, D=64, Dv=64)
    q = rng.standard_normal((1, 32, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 2, 700, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 700, 64)).astype(np.float32)
    plan = stream(softmax_phase=smx, lanes_per_key=1 if smx == 2 else 2)
    lay = stream_layout(plan, 8, 64)
    assert lay.merge_in_sp and lay.RC == (2 if smx == 2 else 4)  # as many rows as the partial dots' array holds
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 8, "BN": 64}, nsplit=nsplit,
                     softcap=30.0, return_lse=True)
    op.bind(q, k, v)
    op.run()
    o, lse = op.result()
    o_ref, lse_ref = attention_ref(q, k, v, softcap=30.0, return_lse=True)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


# --------------------------------------------------------------- subgroup plans: lane groups, lane sums
def _formats_and_head_dims(draw) -> tuple[str | None, str | None, int, int]:
    """K's and V's storage (float or quantized) and head dims that fit them."""
    kf = draw(st.sampled_from([None, None, "q8_0", "q4_0", "int8"]))
    vf = draw(st.sampled_from([None, None, "q8_0", "q4_0", "int8"]))
    quantized = kf is not None or vf is not None
    D = 32 * draw(st.integers(1, 4)) if quantized else 4 * draw(st.integers(1, 24))
    Dv = 32 * draw(st.integers(1, 3)) if vf is not None else 4 * draw(st.integers(1, 24))
    return kf, vf, D, Dv


def _query_dim(D: int, kl: int, kf: str | None) -> int:
    """D padded to a multiple of 4 KL; for a q8_0 / q4_0 K, so that a lane's run of vec4s
    divides a block or is whole blocks."""
    dq = -(-D // (4 * kl)) * 4 * kl
    n = dq // 4 // kl
    if kf in ("q8_0", "q4_0") and 8 % n and n % 8:
        dq = -(-dq // (32 * kl)) * 32 * kl
    return dq


def _subgroup_problem(draw, D: int, Dv: int, groups: list[int], max_T: int, fields: dict, tun: dict,
                      formats: tuple[str | None, str | None]) -> tuple:
    """A problem for a drawn subgroup plan: batch, GQA group, rows, keys, splits, options,
    seed, dtype (what lane_group_problems and lane_sum_problems return)."""
    group = draw(st.sampled_from(groups))
    Hkv = draw(st.integers(1, 2))
    dims = dict(B=draw(st.integers(1, 2)), Hq=group * Hkv, Hkv=Hkv, S=draw(st.integers(1, 4)),
                T=draw(st.integers(1, max_T)), D=D, Dv=Dv)
    return (dims, fields, tun, draw(st.sampled_from([1, 1, 2, 5])), draw(OPTION_SETS),
            draw(st.integers(0, 2**16)), formats, draw(st.sampled_from([np.float32, np.float16])))


@st.composite
def lane_group_problems(draw, lanes: int):
    """An SMX=3 plan (KL up to `lanes`, the device's subgroup size) and a problem for it: head
    dims with padded query dims, Dv in chunks, 1-4 rows, keys per step, tiles, splits, the
    next step's loads issued early or not, K and V each float or quantized (a quantized K's
    dots by f32 products or by int8 dot products, IDP), f32 or f16."""
    kf, vf, D, Dv = _formats_and_head_dims(draw)
    kl = draw(st.sampled_from([x for x in (1, 2, 4, 8, 16) if x <= lanes]))
    dq = _query_dim(D, kl, kf)
    dvc = draw(st.sampled_from([c for c in (16, 32, 64, 128)
                                if (c // 4) % kl == 0 and kl <= c // 4 <= kl * LANE_GROUP_MAX_VEC4]))
    # unrolled vec4 loads and products per step (KC keys x BM rows x the lane's K and V vec4s) kept
    # to 48: lavapipe takes minutes to compile much larger shaders
    per_key = dq // 4 // kl + dvc // 4 // kl
    bm = draw(st.sampled_from([b for b in (1, 2, 4) if b * dvc // 4 // kl <= LANE_GROUP_MAX_VEC4
                               and (b == 1 or b * per_key <= 48)]))
    wg = draw(st.sampled_from([w for w in (32, 64, 128) if w >= kl]))
    kc = draw(st.sampled_from([c for c in (1, 2, 4) if wg // kl * c <= 256 and (c == 1 or c * bm * per_key <= 48)]))
    bn = draw(st.sampled_from([b for b in (32, 64, 128, 256) if b % (wg // kl * kc) == 0]))
    fields = dict(workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc, query_dim=dq, value_columns=dvc,
                  prefetch=draw(st.sampled_from([0, 1])),
                  int_dot=draw(st.sampled_from([0, 1])) if kf is not None else 0)
    return _subgroup_problem(draw, D, Dv, [1, 2], 400, fields, {"BM": bm, "BN": bn}, (kf, vf))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@RUN
@given(data=st.data())
def test_lane_groups_match_reference(spec, data, require_adapters) -> None:
    """SMX=3 against the reference with every option set, quantized caches, f16, splits."""
    dev = require_adapters(spec)[0]
    dims, fields, tun, nsplit, opts, seed, formats, dtype = data.draw(lane_group_problems(dev.subgroup_size))
    op = check_forced_plan(dev, dims, lane_groups(dev, **fields), tun, nsplit, opts, seed, dtype, kv_formats=formats)
    assert op.plan.softmax_phase == 3
    main = next(p for p in op.progs if p.name == "main")
    assert ("dot4I8Packed" in main.wgsl) == bool(fields["int_dot"])
    assert ("subgroupShuffleXor(s0_0" in main.wgsl) == (fields["lanes_per_key"] > 1)  # a key's dot summed
    assert "workgroupBarrier" not in main.wgsl.split("n < n_steps")[1].split("atomicOr(&wg_bad")[0]  # none in the loop


@pytest.mark.gpu
@pytest.mark.subgroup_sizes
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@pytest.mark.parametrize(("WG", "KL", "BM", "DVC"), [(32, 8, 2, 128), (32, 4, 4, 64), (32, 4, 2, 128)])
def test_lane_group_merge_rounds_larger_than_the_workgroup(spec, WG, KL, BM, DVC, require_adapters) -> None:
    """A merge round holds RV output vec4s of each of a key's KL lanes; where RV x KL passes the
    workgroup's invocations (small workgroups, many rows or columns), every (vec4, lane) pair is
    still summed and stored: each row and column against the reference (the second row of
    such a round was left unwritten once). A key's lanes share a subgroup, so KL = 8 runs
    where subgroups have 8 lanes or more (scripts/test.sh's reruns at 256 and 512)."""
    dev = require_adapters(spec)[0]
    if KL > dev.subgroup_size:
        pytest.skip(f"{KL} lanes per key need subgroups of {KL}; this adapter's have {dev.subgroup_size} "
                    "(test_key_lanes_wider_than_the_subgroup_write_nan covers that case)")
    lay = stream_layout(lane_groups(dev, workgroup_size=WG, lanes_per_key=KL, keys_per_step=1, query_dim=32,
                                    value_columns=DVC), BM, 64)
    assert lay.RV * KL > WG  # the case this test is for
    rng = np.random.default_rng(WG + KL + BM)
    dims = dict(B=1, Hq=1, Hkv=1, S=BM, T=70, D=32, Dv=DVC)
    q = rng.standard_normal((1, 1, BM, 32)).astype(np.float32)
    k = rng.standard_normal((1, 1, 70, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, 70, DVC)).astype(np.float32)
    plan = lane_groups(dev, workgroup_size=WG, lanes_per_key=KL, keys_per_step=1, query_dim=32, value_columns=DVC)
    for nsplit in (None, 2):
        op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": BM, "BN": 64}, nsplit=nsplit)
        assert_close(op(q, k, v), attention_ref(q, k, v), 1e-5, f"nsplit={nsplit}")


@pytest.mark.gpu
@pytest.mark.subgroup_sizes
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@pytest.mark.parametrize("kind", ["lane groups", "LS=1 SMX=0", "LS=1 SMX=1"])
def test_key_lanes_wider_than_the_subgroup_write_nan(spec, kind, require_adapters) -> None:
    """A key's lanes must be neighbours in one subgroup (lane groups, and lane sums in the dot
    phase): at the device's subgroup size the plan matches the reference; with twice as many
    lanes per key the shader's check writes NaN (o and lse), never a wrong number
    (scripts/test.sh reruns this at 4 and 16 lanes)."""
    dev = require_adapters(spec)[0]
    size = dev.subgroup_size
    rng = np.random.default_rng(9)
    dims = dict(B=1, Hq=2, Hkv=2, S=1, T=300, D=128, Dv=128)
    q = rng.standard_normal((1, 2, 1, 128)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 300, 128)).astype(np.float32) for _ in range(2))
    for kl, ok in ((size, True), (2 * size, False)):
        if kl > 32 or (kind != "lane groups" and kl < 2):  # KL divides a key's 32 vec4s; LS needs KL >= 2
            continue
        fields = dict(workgroup_size=64, lanes_per_key=kl, keys_per_step=1, query_dim=128, value_columns=128)
        plan = lane_groups(dev, **fields) if kind == "lane groups" else \
            lane_sums(dev, softmax_phase=int(kind[-1]), **fields)
        op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 1, "BN": 64}, nsplit=2,
                         return_lse=True)
        assert op.plan.lane_sum == (kind != "lane groups")
        op.bind(q, k, v)
        op.run()
        o, lse = op.result()
        if ok:
            o_ref, lse_ref = attention_ref(q, k, v, return_lse=True)
            assert_close(o, o_ref, 1e-5, f"o KL={kl}")
            assert_close(lse, lse_ref, 1e-5, f"lse KL={kl}")
        else:
            assert np.isnan(o).all() and np.isnan(lse).all(), f"KL={kl} on {size}-lane subgroups"


# --------------------------------------------------------------------------- LS=1's summed scores
def test_lane_sum_layout_holds_one_score_per_key() -> None:
    """LS=1 keeps one score per key and row in sp (KL partial dots without it), plus the flag
    of the lane check; the merge through sp (8 rows) still fits its rounds."""
    for smx in (0, 1):
        fields = dict(workgroup_size=64, lanes_per_key=4, keys_per_step=4, query_dim=64, value_columns=64,
                      softmax_phase=smx)
        plain = stream_layout(stream(Family.SUBGROUPS, **fields), 4, 64)
        summed = stream_layout(stream(Family.SUBGROUPS, lane_sum=1, **fields), 4, 64)
        assert summed.LS and not plain.LS
        assert (plain.sp_words, summed.sp_words) == (64 * 4 * 4, 64 * 4)
        assert summed.smem_words == plain.smem_words - 64 * 3 * 4 + 1
    eight = stream_layout(stream(Family.SUBGROUPS, lane_sum=1, workgroup_size=128, value_columns=128, query_dim=128,
                                 lanes_per_key=2, keys_per_step=4), 8, 128)
    assert eight.merge_in_sp and eight.sp_words == max(128 * 8, 4 * eight.KG * eight.RC * eight.CG)


@st.composite
def lane_sum_problems(draw, lanes: int):
    """An LS=1 plan (SMX 0 or 1, KL from 2 up to `lanes`, the device's subgroup size) and a
    problem for it: head dims with padded query dims, Dv in chunks, 1-4 rows, keys per step,
    tiles with BN x KL a multiple of WG, splits, K and V each float or quantized, f32 or f16."""
    kf, vf, D, Dv = _formats_and_head_dims(draw)
    kl = draw(st.sampled_from([x for x in (2, 4, 8, 16) if x <= lanes]))
    dq = _query_dim(D, kl, kf)
    n = dq // 4 // kl  # the lane's K vec4s per key
    wg = draw(st.sampled_from([w for w in (32, 64, 128) if w >= kl]))
    dvc = draw(st.sampled_from([c for c in (4, 8, 16, 32, 64, 128) if c // 4 <= wg]))
    kg = wg // (dvc // 4)
    # unrolled work kept small (lavapipe takes minutes over much larger shaders): BM rows x the
    # lane's K vec4s in the dot phase, for each of an invocation's BN x KL / WG key parts of a
    # tile (up to 8 of them may be written out one after another); KC keys x BM rows in the P.V
    # phase

    def tiles(bm: int) -> list[tuple[int, int]]:
        return [(c, b) for c in (1, 2, 4) for b in (32, 64, 128)
                if (c == 1 or c * bm * n <= 48) and b % (kg * c) == 0 and b * kl % wg == 0
                and (b * kl // wg > 8 or b * kl // wg * bm * n <= 96)]

    bm = draw(st.sampled_from([b for b in (1, 2, 4) if (b == 1 or b * n <= 48) and tiles(b)]))
    kc, bn = draw(st.sampled_from(tiles(bm)))
    fields = dict(workgroup_size=wg, lanes_per_key=kl, keys_per_step=kc, query_dim=dq, value_columns=dvc,
                  softmax_phase=draw(st.sampled_from([0, 1])))
    return _subgroup_problem(draw, D, Dv, [1, 2, 4], 300, fields, {"BM": bm, "BN": bn}, (kf, vf))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@RUN
@given(data=st.data())
def test_lane_sums_match_reference(spec, data, require_adapters) -> None:
    """LS=1 (SMX 0 and 1) against the reference with every option set, quantized caches, f16,
    splits, GQA groups and row tiles."""
    dev = require_adapters(spec)[0]
    dims, fields, tun, nsplit, opts, seed, formats, dtype = data.draw(lane_sum_problems(dev.subgroup_size))
    op = check_forced_plan(dev, dims, lane_sums(dev, **fields), tun, nsplit, opts, seed, dtype, kv_formats=formats)
    assert op.plan.lane_sum == 1 and op.plan.softmax_phase == fields["softmax_phase"]
    main = next(p for p in op.progs if p.name == "main")
    assert "subgroupShuffleXor(s0" in main.wgsl  # a key's partial dots summed in the dot phase


# --------------------------------------------------------------------------- SMX=2's shared maximum
def _lazy_case(rng, kind: str, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (one KV head, two query heads, 3 rows) whose scores (scale 1, exact in f32)
    exercise the shared maximum: `rising` passes it by more than the margin on every tile
    (a raise per tile), `below` stays within the margin after the first tile (no raise),
    `huge` has |s| in the thousands in both signs, `late` puts the row's largest scores
    (about 40x the others) in the last 40 keys."""
    q = rng.integers(-3, 4, (1, 2, 3, 32)).astype(np.float32)
    k = rng.integers(-3, 4, (1, 1, T, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, T, 32)).astype(np.float32)
    if kind == "rising":  # the score of key j is 0.5 j (+ q's row sum / 64): 32 more per 64-key tile
        k[0, 0] = np.arange(T, dtype=np.float32)[:, None] / 64 + rng.integers(0, 2, (T, 32)) / 64
        q[...] = 1.0
    elif kind == "below":
        q, k = q / 8, k / 8
    elif kind == "huge":
        q = rng.integers(-25, 26, (1, 2, 3, 32)).astype(np.float32)
        k = rng.integers(-25, 26, (1, 1, T, 32)).astype(np.float32)
    elif kind == "late":
        k[0, 0, T - 40:] *= 40.0
    return q, k, v


def _check_scale_one(dev, dims: dict, plan: Plan, nsplit: int, opts: dict, q, k, v,
                     v_format: str | None = None) -> None:
    """Run `plan` (scores unscaled, BM=4, BN=64) on q, k, v (a QuantTensor of `v_format` where
    given) and check o, and the lse where asked, against float64 on the dequantized V (1e-5)."""
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 4, "BN": 64}, nsplit=nsplit,
                     scale=1.0, v_format=v_format, **opts)
    assert op.plan.softmax_phase == plan.softmax_phase
    op.bind(q, k, v)
    op.run()
    o, lse = op.result()
    v_ref = v if v_format is None else quant.dequantize(v)
    ref_o, ref_lse = attention_ref(q, k, v_ref, scale=1.0, **{**opts, "return_lse": True})
    assert_close(o, ref_o, 1e-5, f"o {opts}")
    if opts.get("return_lse"):
        assert_close(lse, ref_lse, 1e-5, f"lse {opts}")


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@pytest.mark.parametrize("kind", ["rising", "below", "huge", "late"])
@pytest.mark.parametrize("nsplit", [1, 3])
def test_shared_maximum_raises_where_scores_pass_it(spec, kind, nsplit, require_adapters) -> None:
    """SMX=2 against the reference where the shared maximum rises on every tile, never after
    the first, by thousands, or on the last tile only; also under a sliding window that masks
    a split's first tiles whole (its maximum stays -inf there), soft-capping and the lse."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(11)
    T = 450
    q, k, v = _lazy_case(rng, kind, T)
    if kind == "huge":
        assert np.abs(np.einsum("bhid,bjd->bhij", q, k[:, 0])).max() > 3e3
    dims = dict(B=1, Hq=2, Hkv=1, S=3, T=T, D=32, Dv=32)
    plan = stream(softmax_phase=2, lanes_per_key=1, query_dim=32, value_columns=32)
    for opts in (dict(), dict(window=(100, 0), return_lse=True), dict(softcap=50.0, return_lse=True)):
        _check_scale_one(dev, dims, plan, nsplit, opts, q, k, v)


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@pytest.mark.parametrize("kind", ["rising", "below", "huge", "late"])
@pytest.mark.parametrize("v_format", [None, "q8_0", "int8"])
def test_lane_groups_rescale_where_the_maximum_rises(spec, kind, v_format, require_adapters) -> None:
    """SMX=3's online softmax (each lane group's maximum, its accumulators rescaled as it rises;
    over a quantized V each key's probability times its block's or row's scale) against the
    reference where the maximum rises with every key, never after the first keys, by thousands,
    or in the last keys only; under a sliding window (a split's first keys all masked),
    soft-capping, the lse, one split or three."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(12)
    T = 450
    q, k, v = _lazy_case(rng, kind, T)
    v_dev = v if v_format is None else quant.quantize(v, v_format)
    dims = dict(B=1, Hq=2, Hkv=1, S=3, T=T, D=32, Dv=32)
    plan = lane_groups(dev, workgroup_size=64, lanes_per_key=4, keys_per_step=2, query_dim=32, value_columns=32)
    for nsplit, opts in ((1, dict()), (3, dict(window=(100, 0), return_lse=True)), (3, dict(softcap=50.0))):
        _check_scale_one(dev, dims, plan, nsplit, opts, q, k, v_dev, v_format)


# --------------------------------------------------------------------------- workgroup flags
@pytest.mark.gpu
def test_workgroup_flags_are_stored_before_use(require_adapters) -> None:
    """Every atomic flag in workgroup memory (SMX=2's raise, SMX=3's and LS=1's lane check, the tiled
    strategy's inf/NaN value flag, the block map's classification) is stored 0 before anything
    sets or reads it: wgpu-native over lavapipe does not zero-initialise workgroup memory, and
    SMX=3 wrote NaN at random while its flag relied on that."""
    import re

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=1, Hq=2, Hkv=2, S=1, T=300, D=64, Dv=64)
    keep = np.ones((1, 300), bool)
    plans = [
        (stream(softmax_phase=2, lanes_per_key=1), {"BM": 1, "BN": 64}, {}),
        (lane_groups(dev, lanes_per_key=4, keys_per_step=2), {"BM": 1, "BN": 64}, {}),
        (lane_sums(dev, lanes_per_key=2), {"BM": 1, "BN": 64}, {}),
        (stream(), {"BM": 1, "BN": 64}, {"mask_mod": lambda b, h, i, j: keep[b, j]}),
        (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=64,
              value_stage_columns=32, vector_width=4), {"BM": 8, "BN": 64}, {}),
    ]
    seen = set()
    for plan, tun, mods in plans:
        op = api.prepare_dims(dims, device=dev, plan=plan, tunables=tun, nsplit=2, **mods)
        for prog in op.progs:
            for name in re.findall(r"var<workgroup> (\w+): atomic<u32>;", prog.wgsl):
                seen.add(name)
                body = prog.wgsl.split("fn main", 1)[1]
                uses = [f"{op_}(&{name}" for op_ in ("atomicOr", "atomicLoad", "workgroupUniformLoad")]
                first_use = min(body.index(u) for u in uses if u in body)
                assert body.find(f"atomicStore(&{name}, 0u)") in range(0, first_use), (prog.name, name)
    assert {"wg_raise", "wg_bad", "seen"} <= seen  # (the flags this test is about were emitted)


@pytest.mark.parametrize(("fmt", "register"), [("f16", "vec2<u32>"), ("q8_0", "u32"), ("q4_0", "u32"),
                                               ("int8", "u32")])
def test_lane_group_prefetch_registers_hold_loads_as_stored(fmt, register) -> None:
    """With PF=1 the registers that carry a step's loads into the next iteration hold them as
    stored (f16 pairs, quantized words and scales) and are unpacked after the next step's loads
    are issued: f32 registers (twice to four times as many) made the H200's PF=1 lane groups
    1.35-1.57x slower. A q4_0 word serves two vec4s and is loaded once. Without prefetch the
    values are unpacked where loaded, as before."""
    from attnc.lowering import lower
    from attnc.runtime.build import Options, build_kernel

    quantized = None if fmt == "f16" else fmt
    kern = build_kernel(Options(f16=True, k_format=quantized, v_format=quantized), {"BM": 1, "BN": 128})
    for pf in (0, 1):
        plan = stream(Family.SUBGROUPS, softmax_phase=3, lanes_per_key=4, keys_per_step=2, workgroup_size=128,
                      query_dim=128, value_columns=128, prefetch=pf, storage=Storage.F16)
        main = lower(kern, plan)[0].wgsl
        regs = [line.split("=")[0].split()[1] for line in main.splitlines() if line.strip().startswith("var f0_")]
        types = {line.split("=")[1].strip(" ;") for line in main.splitlines() if line.strip().startswith("var f0_")}
        fetch = main.split("if (n + 1 < n_steps)")[1].split("\n    }\n")[0] if pf else ""
        if pf:
            assert types == {register + "()"}, types
            assert "qx_" not in fetch and "unpack2x16float" not in fetch and "qsx_" not in fetch
            per_key = {"f16": 16, "q8_0": 18, "q4_0": 10, "int8": 18}[fmt]  # K and V, D = Dv = 128, 4 lanes
            assert len(regs) == per_key
        else:
            assert types <= {"vec4<f32>()", "f32()"}, types


# ------------------------------------------------------------------ K's dots by int8 dot products
# (D, KL, WG): a lane's run of whole blocks (D 128 / KL 4: one block; D 256: two), a run inside
# one block (D 64 / KL 4), int8's every-KL-th vec4s (D 128 / KL 2 and D 32 / KL 4)
INT_DOT_SHAPES = [(128, 4, 128), (256, 4, 64), (64, 4, 64), (64, 2, 32), (32, 4, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8"])
@pytest.mark.parametrize(("D", "KL", "WG"), INT_DOT_SHAPES)
def test_int_dot_matches_reference(spec, fmt, D, KL, WG, require_adapters) -> None:
    """IDP=1 against float64 on the dequantized K/V: K's codes as stored (every byte value,
    -128 included) with f32 q within 1e-5, quantized normal values with f16 q within 2e-3; every
    option, GQA, splits, the next step's loads early or not (by shape: each compile is seconds
    on lavapipe with an empty shader cache)."""
    dev = require_adapters(spec)[0]
    dims = dict(B=2, Hq=4, Hkv=2, S=2, T=277, D=D, Dv=64)
    opts = {"bias": "full", "sinks": "draw", "kv_lens": "draw", "return_lse": True, "softcap": 20.0}
    odd = INT_DOT_SHAPES.index((D, KL, WG)) % 2  # the prefetch setting alternates with the shape
    for seed, (dtype, codes, pf) in enumerate([(np.float32, "every", odd), (np.float16, "quantized", 1 - odd)]):
        plan = lane_groups(dev, workgroup_size=WG, lanes_per_key=KL, keys_per_step=2, query_dim=D, value_columns=64,
                           int_dot=1, prefetch=pf)
        op = check_forced_plan(dev, dims, plan, {"BM": 2, "BN": 64}, 3, dict(opts), seed, dtype,
                               kv_formats=(fmt, "q8_0"), kv_codes=codes)
        assert "dot4I8Packed" in op.main_program.wgsl


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SUBGROUP_ADAPTERS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8"])
def test_int_dot_large_logits_and_non_finite_queries(spec, fmt, require_adapters) -> None:
    """q held as 24-bit integers per scale group keeps f32's accuracy where scores reach 1e4
    (one key takes nearly all the weight) and where a group mixes large and tiny values; a
    query row holding an inf or a NaN gives NaN, as f32 products do, and no other row changes."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(11)
    B, H, S, T, D = 1, 2, 4, 300, 128
    q = rng.standard_normal((B, H, S, D)).astype(np.float32)
    q[0, 0, 0] *= 3000.0  # scores up to ~1e4
    q[0, 0, 1, :16] *= 1e-6  # tiny values beside normal ones in a block
    k = quant.dequantize(quant.quantize(rng.standard_normal((B, H, T, D)).astype(np.float32), fmt))
    v = rng.standard_normal((B, H, T, 64)).astype(np.float32)
    kq = quant.quantize(k, fmt)
    assert np.array_equal(quant.dequantize(kq), k)
    dims = dict(B=B, Hq=H, Hkv=H, S=S, T=T, D=D, Dv=64)
    plan = lane_groups(dev, workgroup_size=64, lanes_per_key=4, keys_per_step=2, query_dim=D, value_columns=64,
                       int_dot=1)
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 1, "BN": 64}, nsplit=2, k_format=fmt)
    assert_close(op(q, kq, v), attention_ref(q, k, v), 1e-5, "o")
    bad = q.copy()
    bad[0, 1, 2, 5], bad[0, 0, 3, 100] = np.inf, np.nan
    o = op(bad, kq, v)
    assert np.isnan(o[0, 1, 2]).all() and np.isnan(o[0, 0, 3]).all()
    keep = np.ones((B, H, S), bool)
    keep[0, 1, 2] = keep[0, 0, 3] = False
    assert_close(o[keep], attention_ref(q, k, v)[keep], 1e-5, "o")


@pytest.mark.parametrize(("kw", "k_format", "msg"), [
    (dict(softmax_phase=2, lanes_per_key=1, workgroup_size=64), "q8_0", "IDP=1 takes integer dots in lane groups"),
    (dict(softmax_phase=3, keys_per_step=2), None, "K must be q8_0, q4_0 or int8"),
    (dict(softmax_phase=3, keys_per_step=2, int_dot=2), "q8_0", "IDP=2 must be 0 or 1")])
def test_int_dot_plan_errors(kw, k_format, msg) -> None:
    """IDP=1 outside lane groups or over a float K is refused, naming the rule."""
    from attnc.lowering import lower
    from attnc.runtime.build import Options, build_kernel

    kern = build_kernel(Options(k_format=k_format), {"BM": 1, "BN": 64})
    plan = stream(Family.SUBGROUPS, **({"int_dot": 1, "query_dim": 64, "value_columns": 64} | kw))
    with pytest.raises(LoweringError, match=msg):
        lower(kern, plan)
