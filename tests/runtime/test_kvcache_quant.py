"""attnc.KVCache with quantized K/V (k_format=, v_format=): appends quantize the new rows on the
device with the DSL store kernel, at each row's length (ragged too, from host data and from
float32/float16 GPU tensors of any strides), writing no row past a row's new length, and
attention over the quantized buffers equals the float64 reference on the dequantized cache over
each row's prefix.

One cache shape (GQA) and three format pairs, so each compiles its store kernels and one
attention variant once; hypothesis draws the appends, the steps and the sources.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import quant
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, max_examples=3,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
B, HQ, HKV, CAP, D = 2, 4, 2, 40, 32
PAIRS = [("q8_0", "q4_0"), ("int8", None), (None, "q8_0")]


def _source(dev, x, kind: str):
    if kind == "numpy":
        return x
    if kind == "gpu-f16":
        return attnc.tensor(x.astype(np.float16), dev)
    return attnc.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)), dev).permute(0, 2, 1, 3)  # [B, n, H, D]


def _values(t, fmt):
    """The cache's values as the kernels read them."""
    return quant.dequantize(t.numpy()) if fmt else t.numpy().astype(np.float64)


@pytest.mark.sanitize
@pytest.mark.parametrize(("kf", "vf"), PAIRS, ids=[f"{k}-{v}" for k, v in PAIRS])
@RUN
@given(data=st.data())
def test_quantized_appends_and_attention_match_the_dequantized_reference(kf, vf, data, require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    cache = attnc.KVCache(B, HKV, CAP, D, device=dev, k_format=kf, v_format=vf)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    rows_k = [np.zeros((HKV, 0, D), np.float32) for _ in range(B)]
    rows_v = [np.zeros((HKV, 0, D), np.float32) for _ in range(B)]
    for step in range(data.draw(st.integers(1, 3), label="steps")):
        n = data.draw(st.integers(1, 9), label="rows")
        room = CAP - cache.lengths
        counts = [data.draw(st.integers(0, min(n, int(r)))) for r in room]
        kinds = ["numpy", "bshd"] + (["gpu-f16"] if kf and vf else [])  # a float32 K or V takes float32 rows
        kind = data.draw(st.sampled_from(kinds), label=f"source{step}")
        k_new = rng.standard_normal((B, HKV, n, D)).astype(np.float32)
        v_new = rng.standard_normal((B, HKV, n, D)).astype(np.float32)
        if kind == "gpu-f16":  # the rows the cache sees
            k_new, v_new = k_new.astype(np.float16).astype(np.float32), v_new.astype(np.float16).astype(np.float32)
        cache.append(_source(dev, k_new, kind), _source(dev, v_new, kind), counts)
        for b in range(B):
            rows_k[b] = np.concatenate([rows_k[b], k_new[b, :, :counts[b]]], axis=1)
            rows_v[b] = np.concatenate([rows_v[b], v_new[b, :, :counts[b]]], axis=1)
    lens = np.array([r.shape[1] for r in rows_k])
    np.testing.assert_array_equal(cache.lengths, lens)
    np.testing.assert_array_equal(cache.kv_lens.numpy(), lens)
    kd, vd = _values(cache.k, kf), _values(cache.v, vf)
    for b in range(B):  # each prefix holds its rows as attnc.quant quantizes them (f32: as given)
        for got, rows, fmt in ((kd, rows_k, kf), (vd, rows_v, vf)):
            want = rows[b] if fmt is None or not rows[b].size else quant.dequantize(quant.quantize(rows[b], fmt))
            np.testing.assert_array_equal(got[b, :, :lens[b]], want)
            # and nothing past it: a ragged append writes exactly counts[b] rows (the cache
            # starts zeroed, which every format reads as 0)
            np.testing.assert_array_equal(got[b, :, lens[b]:], 0)
    S = data.draw(st.integers(1, 2), label="S")
    q = rng.standard_normal((B, HQ, S, D)).astype(np.float32)
    ref = attention_ref(q, kd, vd, kv_lens=lens, causal=True)
    assert_close(cache.attend(q, causal=True), ref, 1e-5)
    o = cache.attend(attnc.tensor(q, dev), causal=True)
    assert isinstance(o, attnc.Tensor)
    assert_close(o.numpy(), ref, 1e-5)


def test_float16_queries_over_a_quantized_cache_on_dawn(require_adapters) -> None:
    """A decode step on another backend: f16 q over q4_0 K and int8 V (o in float16)."""
    (dev,) = require_adapters("dawn:vulkan")
    cache = attnc.KVCache(1, 2, 64, 64, dtype=np.float16, device=dev, k_format="q4_0", v_format="int8")
    rng = np.random.default_rng(3)
    k, v = rng.standard_normal((2, 1, 2, 50, 64)).astype(np.float16)
    cache.append(k, v)
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float16)
    o = cache.attend(q)
    assert o.dtype == np.float16
    ref = attention_ref(q, quant.dequantize(cache.k.numpy()), quant.dequantize(cache.v.numpy()), kv_lens=np.array([50]))
    assert_close(o, ref, 2e-3)


def test_errors_name_the_problem(require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    with pytest.raises(ValueError, match=r"head_dim: head dim 48 cannot be stored as q8_0.*multiple of 32 \(pad it "
                                         r"with zeros to 64\)"):
        attnc.KVCache(1, 1, 8, 48, device=dev, k_format="q8_0")
    with pytest.raises(ValueError, match=r"value_dim: head dim 6 cannot be stored as int8.*multiple of 4"):
        attnc.KVCache(1, 1, 8, 32, 6, device=dev, v_format="int8")
    with pytest.raises(ValueError, match="unknown KV format 'q5_0'"):
        attnc.KVCache(1, 1, 8, 32, device=dev, v_format="q5_0")
    cache = attnc.KVCache(1, 2, 8, 32, device=dev, k_format="q8_0", v_format="q4_0")
    rows = np.zeros((1, 2, 1, 32), np.float32)
    with pytest.raises(ValueError, match=r"k_new: expected shape \(1, 2, n, 32\), got \(1, 2, 1, 16\)"):
        cache.append(rows[..., :16], rows)
    with pytest.raises(ValueError, match="v_new: expected floating point values, got int32"):
        cache.append(rows, rows.astype(np.int32))
    with pytest.raises(ValueError, match="k_new: dtype int32; a q8_0 cache quantizes float32 or float16 rows"):
        cache.append(attnc.tensor(rows.astype(np.int32), dev), rows)
    with pytest.raises(ValueError, match="v_new: a q4_0 QuantGPUTensor; append takes float rows"):
        cache.append(rows, attnc.tensor(quant.quantize(rows, "q4_0"), dev))
    assert cache.lengths.tolist() == [0]  # nothing was appended
    cache.append(rows + 1, rows - 1)
    q = np.ones((1, 2, 1, 32), np.float32)
    op = attnc.prepare(q, cache.k, cache.v, kv_lens=cache.kv_lens)
    assert "K=q8_0" in op.variant and "V=q4_0" in op.variant
    other = attnc.KVCache(1, 2, 8, 32, device=dev, k_format="q4_0", v_format="q4_0")
    with pytest.raises(ValueError, match="k: this op reads k stored as q8_0; got a q4_0 QuantGPUTensor"):
        op(q, other.k, other.v, kv_lens=other.kv_lens)
    plain = attnc.KVCache(1, 2, 8, 32, device=dev)
    with pytest.raises(ValueError, match=r"k: this op reads k stored as q8_0; got float32 values \(quantize"):
        op(q, plain.k, cache.v, kv_lens=cache.kv_lens)
    with pytest.raises(ValueError, match="k: this op reads k as float32 values; got a q8_0 QuantGPUTensor"):
        attnc.prepare(q, plain.k, plain.v, kv_lens=plain.kv_lens)(q, cache.k, plain.v, kv_lens=plain.kv_lens)
    o = op(q, cache.k, cache.v, kv_lens=cache.kv_lens, output="numpy")  # one key: o is its value row, -1
    np.testing.assert_array_equal(o, np.full((1, 2, 1, 32), -1, np.float32))
    # attention() itself: k uploaded from a host QuantTensor (read back from the cache), v on the host
    k_gpu = attnc.tensor(cache.k.numpy(), dev)
    assert k_gpu.fmt == "q8_0" and k_gpu.shape == cache.k.shape
    o = attnc.attention(q, k_gpu, cache.v.numpy(), kv_lens=np.array([1]), output="numpy")
    np.testing.assert_array_equal(o, np.full((1, 2, 1, 32), -1, np.float32))


def test_a_quantized_cache_of_another_device_is_refused(require_adapters) -> None:
    dev, other = require_adapters("wgpu:vulkan", "dawn:vulkan")
    cache = attnc.KVCache(1, 1, 8, 32, device=dev, k_format="int8", v_format="int8")
    far = attnc.KVCache(1, 1, 8, 32, device=other, k_format="int8", v_format="int8")
    q = np.zeros((1, 1, 1, 32), np.float32)
    op = attnc.prepare(q, cache.k, cache.v, kv_lens=cache.kv_lens)
    with pytest.raises(ValueError, match="k: the tensor is on .*dawn.*; this op runs on .*wgpu"):
        op(q, far.k, cache.v, kv_lens=cache.kv_lens)
    with pytest.raises(ValueError, match="k_new: the tensor is on .*dawn.*; the cache is on .*wgpu"):
        cache.append(attnc.tensor(np.zeros((1, 1, 1, 32), np.float32), other), np.zeros((1, 1, 1, 32), np.float32))


def test_a_quantized_decode_step_uploads_only_the_new_rows_and_creates_nothing(require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    cache = attnc.KVCache(B, HKV, CAP, D, device=dev, k_format="q4_0", v_format="int8")
    rng = np.random.default_rng(4)
    cache.append(*rng.standard_normal((2, B, HKV, 5, D)).astype(np.float32))
    q = attnc.zeros((B, HQ, 1, D), device=dev)
    out = attnc.zeros((B, HQ, 1, D), device=dev)
    for _ in range(2):  # first steps: the store kernels' and the op's buffers and bind groups
        cache.append(*rng.standard_normal((2, B, HKV, 1, D)).astype(np.float32))
        cache.attend(q, causal=True, out=out)
    before = dev.counters.snapshot()
    q_host = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
    k_row, v_row = rng.standard_normal((2, B, HKV, 1, D)).astype(np.float32)
    q.write(q_host)
    cache.append(k_row, v_row)
    cache.attend(q, causal=True, out=out)
    made = dev.counters.since(before)
    assert made["bytes_uploaded"] == q_host.nbytes + k_row.nbytes + v_row.nbytes, made
    assert made["buffers_created"] == made["bind_groups_created"] == made["pipelines_compiled"] == 0, made
    kd, vd = quant.dequantize(cache.k.numpy()), quant.dequantize(cache.v.numpy())
    assert_close(out.numpy(), attention_ref(q_host, kd, vd, kv_lens=cache.lengths, causal=True), 1e-5)


@pytest.mark.parametrize(("kf", "vf"), [("q4_0", "int8"), ("q8_0", "q8_0"), ("int8", "q4_0")])
def test_quantized_k_and_v_append_in_one_store_dispatch(kf, vf, require_adapters) -> None:
    """A decode step's append over quantized K and V (head dims 32 and 64) records two
    dispatches, the pair store and the length advance, and each cache holds its rows."""
    (dev,) = require_adapters("wgpu:vulkan")
    cache = attnc.KVCache(B, HKV, CAP, 32, 64, device=dev, k_format=kf, v_format=vf)
    rng = np.random.default_rng(5)
    k_rows, v_rows = rng.standard_normal((B, HKV, 3, 32)), rng.standard_normal((B, HKV, 3, 64))
    cache.append(k_rows.astype(np.float32), v_rows.astype(np.float32), [3, 1])
    (recorded,) = cache._passes.values()
    assert len(recorded.items) == 2
    np.testing.assert_array_equal(cache.kv_lens.numpy(), [3, 1])
    for t, rows, fmt in ((cache.k, k_rows, kf), (cache.v, v_rows, vf)):
        got = quant.dequantize(t.numpy())
        for b, n in enumerate((3, 1)):
            np.testing.assert_array_equal(got[b, :, :n], quant.dequantize(quant.quantize(rows[b, :, :n], fmt)))
