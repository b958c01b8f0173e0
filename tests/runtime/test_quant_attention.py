"""Attention over quantized K/V (q8_0, q4_0, int8; attnc/quant.py) through every strategy.

Each strategy's plan is forced (tiled with vec4 and scalar loads, stream, rows, lanes) with
random formats for K and V (one of them at least quantized, the other maybe f32), GQA, K/V of
batch 1 shared by every query batch, KV splits and option sets, against the textbook reference
on the dequantized K/V: the kernels must dequantize exactly what attnc.quant.dequantize does,
so the f32 contract (1e-5) holds.
Masked keys whose quantized rows dequantize to NaN add nothing (tests/forced_plan.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import quant
from attnc.errors import LoweringError
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime import api
from tests.forced_plan import OPTION_SETS, check_forced_plan, dialect
from tests.textbook import assert_close, attention_ref

RUN = settings(deadline=None, max_examples=3,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# (plan, tunables, largest S drawn, head dims drawn): small tiles, so that several tiles and splits
# are visited; lavapipe compiles the scalar-load tiled and the rows shaders slowly for D = 64
PLANS = {
    "tiled": (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=2, head_chunk=16, value_columns=32,
                   value_stage_columns=16, vector_width=4, prefetch=1), {"BM": 16, "BN": 32}, 40, (32, 64)),
    "tiled-scalar": (Plan(Family.PORTABLE, workgroup_size=32, rows_per_invocation=1, head_chunk=16, value_columns=32,
                          value_stage_columns=16, vector_width=1), {"BM": 16, "BN": 16}, 20, (32,)),
    "stream": (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=64, lanes_per_key=2, keys_per_step=4,
                    query_dim=64, value_columns=64, vector_width=4), {"BM": 4, "BN": 32}, 6, (32, 64)),
    "rows": (Plan(Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=4, query_dim=32, value_columns=32,
                  vector_width=4), {"BM": 16, "BN": 32}, 20, (32,)),
    "lanes": (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, subgroup_width=8, query_dim=64,
                   value_columns=64, vector_width=4), {"BM": 8, "BN": 32}, 6, (32, 64)),
    # a query dim of 2.5 blocks and value chunks of half a block: the lanes strategy's per-vec4
    # reads of V, and K's blocks clamped to the row's last
    "lanes-narrow": (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, subgroup_width=8,
                          query_dim=80, value_columns=16, vector_width=4), {"BM": 8, "BN": 32}, 4, (32, 64)),
}
FORMATS = st.sampled_from([None, *quant.FORMATS])


@st.composite
def problems(draw, max_s: int, head_dims: tuple[int, ...]):
    kf, vf = draw(FORMATS), draw(FORMATS)
    if kf is None and vf is None:
        kf = draw(st.sampled_from(quant.FORMATS))
    group = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.integers(1, 2))
    dims = dict(B=draw(st.integers(1, 2)), Hq=group * hkv, Hkv=hkv, S=draw(st.integers(1, max_s)),
                T=draw(st.integers(1, 150)), D=draw(st.sampled_from(head_dims)), Dv=draw(st.sampled_from(head_dims)))
    shared = dims["B"] > 1 and draw(st.booleans())  # K/V of batch 1 serving every query batch
    return dims, (kf, vf), draw(st.sampled_from([None, 1, 3])), draw(OPTION_SETS), draw(st.integers(0, 2**16)), shared


def _check(strategy: str, data: st.DataObject, require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    plan, tun, max_s, head_dims = PLANS[strategy]
    if plan.family is Family.SUBGROUPS:  # lanes at the device's subgroup size (a row's lanes share one)
        plan = dataclasses.replace(plan, dialect=dialect(dev), subgroup_width=dev.subgroup_size)
        tun = {**tun, "BM": max(tun["BM"], plan.rows_per_invocation * dev.subgroup_size)}
    dims, formats, nsplit, opts, seed, shared = data.draw(problems(max_s, head_dims))
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed, kv_formats=formats, shared_kv=shared)
    assert op.plan.strategy is plan.strategy
    for name, fmt in zip("kv", formats, strict=True):
        assert (op.kern.param(name).type.dtype.value == fmt) if fmt else not op.kern.param(name).type.dtype.is_quant


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("strategy", sorted(set(PLANS) - {"tiled-scalar"}))
@RUN
@given(data=st.data())
def test_quantized_kv_matches_reference(strategy, data, require_adapters) -> None:
    _check(strategy, data, require_adapters)


def _every_code_plan(name: str, dev, kf: str) -> tuple[Plan, dict[str, int], int, int]:
    """(plan, tunables, S, D) of one load path for the every-code test: a forced CPU plan of
    PLANS, or the H200's decode plan over a K of format kf (lane groups; the shared maximum where
    its lanes are not contiguous), in `dev`'s dialect."""
    from attnc.lowering import schedule
    from tests.gpu_facts import h200_like

    if name in PLANS:
        plan, tun, max_s, head_dims = PLANS[name]
        if plan.family is Family.SUBGROUPS:
            plan = dataclasses.replace(plan, dialect=dialect(dev), subgroup_width=dev.subgroup_size)
            tun = {**tun, "BM": max(tun["BM"], plan.rows_per_invocation * dev.subgroup_size)}
        return plan, tun, min(max_s, 5), max(head_dims)
    caps = h200_like(subgroup_lanes_contiguous=32 if name == "gpu-lane-groups" else 2)
    dims = dict(B=1, Hq=2, Hkv=2, S=1, T=64, D=64, Dv=64)
    plan, tun = schedule.plan_for(caps, Family.SUBGROUPS, dims, k_format=kf)
    assert plan.softmax_phase == (3 if name == "gpu-lane-groups" else 2)
    return dataclasses.replace(plan, dialect=dialect(dev)), tun, 1, 64


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["tiled", "tiled-scalar", "stream", "lanes", "gpu-lane-groups", "gpu-shared-max"])
@pytest.mark.parametrize(("kf", "vf"), [("q8_0", "q4_0"), ("q4_0", "int8"), ("int8", "q8_0")])
def test_every_code_of_every_format(path, kf, vf, require_adapters) -> None:
    """K and V whose stored bytes take every value (int8's and q8_0's -128 too, which quantize()
    never writes but a runtime filling a cache may; every pair of q4_0 nibbles), through each load
    path that dequantizes them (vec4 and one-value loads, block runs, whole-block reads, lane
    groups), each format as K and as V: the kernels' exact integer-to-float conversions against
    attnc.quant.dequantize, within the f32 contract."""
    (dev,) = require_adapters("wgpu:vulkan")
    plan, tun, S, D = _every_code_plan(path, dev, kf)
    dims = dict(B=1, Hq=4, Hkv=2, S=S, T=64, D=D, Dv=D)  # >= 256 bytes of K and of V
    check_forced_plan(dev, dims, plan, tun, None, {"return_lse": True}, seed=5, kv_formats=(kf, vf),
                      kv_codes="every")


@pytest.mark.gpu
@pytest.mark.sanitize
@settings(RUN, max_examples=1)  # lavapipe compiles the scalar-load tiled shaders slowly
@given(data=st.data())
def test_quantized_kv_scalar_loads(data, require_adapters) -> None:
    """The tiled strategy's one-value loads (VEC=1), which dequantize a single value."""
    _check("tiled-scalar", data, require_adapters)


@pytest.mark.gpu
@pytest.mark.parametrize(("spec", "vec"), [("wgpu:vulkan", 4), ("dawn:vulkan", 4), ("wgpu:vulkan", 1)])
def test_int8_rows_of_every_length(spec, vec, require_adapters) -> None:
    """int8 rows hold D/4 + 1 words (a scale, then D values), so loads find a value's row from
    the run-time head dim: head dims that are multiples of 4 but not powers of two (12, 20, 96)
    and one that is (16), K and V of different kinds, vec4 and one-value loads, prefill and
    decode (the other quantized-KV tests draw head dims 32 and 64 only)."""
    (dev,) = require_adapters(spec)
    plan = Plan(Family.PORTABLE, workgroup_size=32, rows_per_invocation=1, head_chunk=16, value_columns=32,
                value_stage_columns=16, vector_width=vec)
    rng = np.random.default_rng(vec)
    for D, Dv, S in ((12, 16, 5), (96, 20, 1)):
        q = rng.standard_normal((1, 2, S, D)).astype(np.float32)
        k = quant.quantize(rng.standard_normal((1, 2, 40, D)).astype(np.float32), "int8")
        v = quant.quantize(rng.standard_normal((1, 2, 40, Dv)).astype(np.float32), "int8")
        op = api.prepare_dims(dict(B=1, Hq=2, Hkv=2, S=S, T=40, D=D, Dv=Dv), causal=True, device=dev, plan=plan,
                              tunables={"BM": 16, "BN": 16}, k_format="int8", v_format="int8")
        assert_close(op(q, k, v), attention_ref(q, quant.dequantize(k), quant.dequantize(v), causal=True),
                     1e-5, f"D={D}, Dv={Dv}")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:opengl", "dawn:vulkan"])
@pytest.mark.parametrize(("S", "kf", "vf"), [(1, "q4_0", "int8"), (37, "int8", "q8_0")])
def test_heuristic_plans_on_other_adapters(spec, S, kf, vf, require_adapters) -> None:
    """attention() with QuantTensors (the heuristic's decode and prefill plans), GQA, causal."""
    (dev,) = require_adapters(spec)
    rng = np.random.default_rng(S)
    q = rng.standard_normal((1, 4, S, 64)).astype(np.float32)
    k = quant.quantize(rng.standard_normal((1, 2, 90, 64)).astype(np.float32), kf)
    v = quant.quantize(rng.standard_normal((1, 2, 90, 32)).astype(np.float32), vf)
    o, lse = api.attention(q, k, v, causal=True, return_lse=True, device=dev)
    o_ref, lse_ref = attention_ref(q, quant.dequantize(k), quant.dequantize(v), causal=True, return_lse=True)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


@pytest.mark.gpu
def test_f16_queries_with_quantized_kv(require_adapters) -> None:
    """float16 q with quantized K and f16 V: f16 storage for q, v and the output (2e-3)."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2, 5, 32)).astype(np.float16)
    kf = rng.standard_normal((2, 1, 70, 32)).astype(np.float32)
    k = quant.quantize(kf, "q8_0")
    v = rng.standard_normal((2, 1, 70, 32)).astype(np.float16)
    o = api.attention(q, k, v, device=dev)
    assert o.dtype == np.float16
    ref = attention_ref(q.astype(np.float32), quant.dequantize(k), v.astype(np.float32))
    assert_close(o.astype(np.float32), ref, 2e-3, "o")


@pytest.mark.gpu
@pytest.mark.parametrize(("kf", "vf"), [("q8_0", None), (None, "int8"), ("q4_0", "q8_0")])
def test_quantized_kv_of_one_batch_serves_every_query_batch(kf, vf, require_adapters) -> None:
    """[1, Hkv, T, D] K and V serve every query batch (API.md) when stored quantized too, from the
    host and as GPU tensors, prefill and split-KV decode rows; a batch of 2 for 3 is refused
    naming the batch dims, and by a prepared op naming the shape (a quantized K of batch 1 was
    refused as if its shape were wrong)."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    k_host = quant.quantize(k, kf) if kf else k
    v_host = quant.quantize(v, vf) if vf else v
    k_ref = quant.dequantize(k_host) if kf else k
    v_ref = quant.dequantize(v_host) if vf else v
    lens = np.array([300, 17, 250], np.int32)
    for S in (1, 20):
        q = rng.standard_normal((3, 4, S, 64)).astype(np.float32)
        ref = attention_ref(q, np.repeat(k_ref, 3, 0), np.repeat(v_ref, 3, 0), kv_lens=lens)
        assert_close(api.attention(q, k_host, v_host, kv_lens=lens, device=dev), ref, 1e-5, "o (host)")
        k_gpu, v_gpu = attnc.tensor(k_host, dev), attnc.tensor(v_host, dev)
        assert_close(api.attention(q, k_gpu, v_gpu, kv_lens=lens, device=dev, output="numpy"), ref, 1e-5, "o (GPU)")
    two = quant.quantize(np.concatenate([k, k]), kf) if kf else np.concatenate([k, k])
    with pytest.raises(ValueError, match=r"batch dims differ: q 3, k 2, v 1"):
        api.attention(q, two, v_host, device=dev)
    op = api.prepare(q, k_host, v_host, device=dev)  # a prepared op's own check of each binding
    with pytest.raises(ValueError, match=r"k: shape \(2, 2, 300, 64\); this op takes \(3, 2, 300, 64\)"):
        op.bind(q, two, v_host)


@pytest.mark.parametrize(("fmt", "D", "rule"), [("q8_0", 80, "multiple of 32"), ("int8", 6, "multiple of 4")])
def test_prepare_refuses_head_dims_the_format_cannot_hold(fmt, D, rule) -> None:
    dims = dict(B=1, Hq=1, Hkv=1, S=1, T=8, D=D, Dv=D)
    with pytest.raises(ValueError, match=f"k: head dim {D} cannot be stored as {fmt}.*{rule}"):
        api.prepare(dims, np.float32, k_format=fmt, device="wgpu:vulkan")


def test_bind_refuses_the_wrong_format_or_shape(require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    dims = dict(B=1, Hq=2, Hkv=1, S=1, T=8, D=32, Dv=32)
    op = api.prepare(dims, np.float32, k_format="q8_0", device=dev)
    q = np.zeros((1, 2, 1, 32), np.float32)
    v = np.zeros((1, 1, 8, 32), np.float32)
    with pytest.raises(ValueError, match="k: this op reads k stored as q8_0; got a q4_0 QuantTensor"):
        op.bind(q, quant.quantize(v, "q4_0"), v)
    with pytest.raises(ValueError, match=r"k: shape \(1, 1, 9, 32\); this op takes \(1, 1, 8, 32\)"):
        op.bind(q, quant.quantize(np.zeros((1, 1, 9, 32), np.float32), "q8_0"), v)
    with pytest.raises(ValueError, match="v: this op reads v as float32 values; got a int8 QuantTensor"):
        op.bind(q, quant.quantize(v, "q8_0"), quant.quantize(v, "int8"))
    with pytest.raises(ValueError, match="unknown KV format 'q5_0'"):
        api.prepare(dims, np.float32, v_format="q5_0", device=dev)


def test_lowering_refuses_a_non_quantized_format() -> None:
    from attnc.kernels.flash import flash_attention
    from attnc.lowering.retype import with_kv_formats

    with pytest.raises(LoweringError, match="'f16' is not a quantized format"):
        with_kv_formats(flash_attention.trace(), "f16", None)


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@RUN
@given(data=st.data())
def test_stream_plans_over_quantized_caches(spec, data, require_adapters) -> None:
    """The stream strategy reads a quantized K block by block (each scale once per lane, applied
    to its block's partial dot; int8: once per row) and a quantized V through each key's first
    word, found once per tile: lanes per key 1 to 16 (16 does not divide a block: plain loads),
    each softmax placement (SMX 0, 1, 2), head dims 32 to 128 (96: three blocks) with the query
    dim exact or padded past them, GQA, splits, options, K and V in different formats."""
    dev = require_adapters(spec)[0]
    BM, BN = data.draw(st.sampled_from([(1, 32), (4, 32), (8, 64)]))
    # lanes per key; the partial dots take BN * KL * BM words of the 32 KiB lavapipe grants
    smx = data.draw(st.integers(0, 2))
    KL = 1 if smx == 2 else data.draw(st.sampled_from([x for x in (1, 2, 4, 8, 16) if x * BM * BN <= 4096]))
    if smx == 2:  # a key per lane: tiles of at least the workgroup's 64 keys
        BN = max(BN, 64)
    kf, vf = data.draw(st.sampled_from(quant.FORMATS)), data.draw(FORMATS)
    D, Dv = data.draw(st.sampled_from([32, 64, 96, 128])), data.draw(st.sampled_from([32, 96]))
    group, hkv = data.draw(st.sampled_from([1, 3])), data.draw(st.integers(1, 2))
    dims = dict(B=data.draw(st.integers(1, 2)), Hq=group * hkv, Hkv=hkv, S=data.draw(st.integers(1, 4)),
                T=data.draw(st.integers(1, 150)), D=D, Dv=Dv)
    dq = -(-D // (4 * KL)) * 4 * KL
    if data.draw(st.booleans()):  # a query dim padded past D (CPU plans: a power of two): blocks past D
        dq = -(-max(dq, 1 << (D - 1).bit_length()) // (4 * KL)) * 4 * KL
    plan = Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=64, lanes_per_key=KL, keys_per_step=4,
                softmax_phase=smx, query_dim=dq, value_columns=128 if Dv > 64 else Dv, vector_width=4)
    op = check_forced_plan(dev, dims, plan, {"BM": BM, "BN": BN}, data.draw(st.sampled_from([None, 1, 3])),
                           data.draw(OPTION_SETS), data.draw(st.integers(0, 2**16)), kv_formats=(kf, vf))
    main = next(p for p in op.progs if p.name == "main")
    assert ("qs_k(kw" in main.wgsl) == (KL < 16 or kf == "int8")  # the scale read once per block or row
    assert ("vb_sh" in main.wgsl) == (vf is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_paged_quantized_caches(fmt, require_adapters) -> None:
    """attnc.paged_attention over pools of a quantized format, host QuantTensors and GPU ones
    (decode rows, GQA, a split KV, prefill rows), against the reference on the dequantized
    keys; K and V of different formats; a float pool of another dtype than q is named."""
    import attnc
    from tests.runtime.test_paged import paged_problem

    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(5)
    other = quant.FORMATS[(quant.FORMATS.index(fmt) + 1) % len(quant.FORMATS)]
    for S, group, gpu in ((1, 1, False), (1, 4, True), (3, 2, False), (20, 1, True)):
        q, kp, vp, table, _, _ = paged_problem(rng, 2, 2 * group, 2, S, 64, 16, 6, spare=3)
        qk, qv = quant.quantize(kp, fmt), quant.quantize(vp, other)
        dk, dv = quant.dequantize(qk), quant.dequantize(qv)
        k = dk[table].transpose(0, 2, 1, 3, 4).reshape(2, 2, 96, 64)
        v = dv[table].transpose(0, 2, 1, 3, 4).reshape(2, 2, 96, 64)
        lens = np.array([96, 41], np.int32)
        pools = (attnc.tensor(qk, device=dev), attnc.tensor(qv, device=dev)) if gpu else (qk, qv)
        o = attnc.paged_attention(q, *pools, table, kv_lens=lens, causal=True, device=dev)
        o = o.numpy() if isinstance(o, attnc.Tensor) else o
        assert_close(o, attention_ref(q, k, v, kv_lens=lens, causal=True), 1e-5, f"S={S} group={group} gpu={gpu}")
    with pytest.raises(ValueError, match=r"q, k_pages, v_pages must share a dtype \(or the pools be quantized\), "
                                         rf"got float16, {fmt}, float32"):
        attnc.paged_attention(q.astype(np.float16), qk, vp, table, device=dev)
