"""The DSL store kernels (attnc/kernels/store.py) on the device: rows quantized and written at
each row's position, contiguous or through a block table, against the interpreter (which
quantizes with attnc.quant); then attention over the cache they wrote; and the errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import quant
from attnc.errors import VerifyError
from attnc.frontend.dsl import f32, grid, i32, store, store_kernel
from attnc.ir.interp import interpret_store
from attnc.kernels.store import kv_store, kv_store_paged, kv_store_pair, kv_store_pair_paged
from attnc.runtime import api
from attnc.runtime.store import store_pair_rows, store_rows
from tests.textbook import assert_close, attention_ref

RUN = settings(deadline=None, max_examples=12,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CACHE_FORMATS = ("f32", "f16", *quant.FORMATS)


def _cache(fmt: str, x: np.ndarray):
    if fmt == "f32":
        return x.astype(np.float32)
    if fmt == "f16":
        return x.astype(np.float16)
    return quant.quantize(x, fmt)


def _counts(rng, B: int, N: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Rows to write per entry: None (all N) half the time, else ragged counts in [0, N]; and
    the counts the kernel binds."""
    if rng.integers(0, 2):
        return None, np.full(B, N, np.int32)
    counts = rng.integers(0, N + 1, B).astype(np.int32)
    return counts, counts


def _same(got, ref) -> None:
    if isinstance(ref, quant.QuantTensor):
        assert got.fmt == ref.fmt and got.shape == ref.shape
        np.testing.assert_array_equal(got.words, ref.words)
    else:
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


@pytest.mark.gpu
@pytest.mark.sanitize
@RUN
@given(fmt=st.sampled_from(CACHE_FORMATS), f16_rows=st.booleans(), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 5), D=st.sampled_from([32, 64, 128, 320]), seed=st.integers(0, 2**16), paged=st.booleans())
def test_store_matches_interpreter(fmt, f16_rows, B, H, N, D, seed, paged, require_adapters) -> None:
    """Every word the device writes equals the interpreter's (attnc.quant's quantization); rows
    not stored (past an entry's count in a ragged store) keep their old words."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, H, N, D)) * rng.choice([1e-3, 1.0, 300.0])).astype(np.float16 if f16_rows
                                                                                  else np.float32)
    x[..., : D // 4] *= rng.integers(0, 2)  # blocks of zeros now and then
    counts, bound = _counts(rng, B, N)
    if paged:
        P, NP = 4, 6
        pool = _cache(fmt, rng.standard_normal((B * NP, H, P, D)).astype(np.float32))
        table = rng.permutation(B * NP).reshape(B, NP).astype(np.int32)
        pos = rng.integers(0, NP * P - N + 1, B).astype(np.int32)
        got = store_rows(pool, x, pos, table=table, counts=counts, device=dev)
        ref = interpret_store(kv_store_paged.trace(cache_dtype=fmt, x_dtype="f16" if f16_rows else "f32"),
                              dict(x=x, pos=pos, counts=bound, table=table, cache=pool))["cache"]
    else:
        C = 9
        cache = _cache(fmt, rng.standard_normal((B, H, C, D)).astype(np.float32))
        pos = rng.integers(0, C - N + 1, B).astype(np.int32)
        got = store_rows(cache, x, pos, counts=counts, device=dev)
        ref = interpret_store(kv_store.trace(cache_dtype=fmt, x_dtype="f16" if f16_rows else "f32"),
                              dict(x=x, pos=pos, counts=bound, cache=cache))["cache"]
    _same(got, ref)


@pytest.mark.gpu
@pytest.mark.sanitize
@RUN
@given(k_fmt=st.sampled_from(CACHE_FORMATS), v_fmt=st.sampled_from(CACHE_FORMATS), k16=st.booleans(),
       v16=st.booleans(), B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 4),
       D=st.sampled_from([32, 64, 128]), Dv=st.sampled_from([32, 96, 288]), seed=st.integers(0, 2**16),
       paged=st.booleans())
def test_pair_store_matches_interpreter(k_fmt, v_fmt, k16, v16, B, H, N, D, Dv, seed, paged,
                                        require_adapters) -> None:
    """K's and V's rows written by one dispatch (kv_store_pair, what a KV cache's append runs):
    every word of both caches equals the interpreter's, for any pair of formats, row dtypes and
    head dims (D != Dv), contiguous or paged, all rows or ragged counts; rows not stored keep
    their old words."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(seed)

    def rows(width, half):
        x = rng.standard_normal((B, H, N, width)) * rng.choice([1e-3, 1.0, 300.0])
        return x.astype(np.float16 if half else np.float32)

    k_rows, v_rows = rows(D, k16), rows(Dv, v16)
    counts, bound = _counts(rng, B, N)
    opts = dict(k_cache_dtype=k_fmt, v_cache_dtype=v_fmt, k_dtype="f16" if k16 else "f32",
                v_dtype="f16" if v16 else "f32")
    if paged:
        P, NP = 4, 5
        lead = (B * NP, H, P)
        table = rng.permutation(B * NP).reshape(B, NP).astype(np.int32)
        pos = rng.integers(0, NP * P - N + 1, B).astype(np.int32)
    else:
        lead, table = (B, H, 7), None
        pos = rng.integers(0, 7 - N + 1, B).astype(np.int32)
    k_cache = _cache(k_fmt, rng.standard_normal((*lead, D)).astype(np.float32))
    v_cache = _cache(v_fmt, rng.standard_normal((*lead, Dv)).astype(np.float32))
    got = store_pair_rows(k_cache, v_cache, k_rows, v_rows, pos, table=table, counts=counts, device=dev)
    kern = (kv_store_pair_paged if paged else kv_store_pair).trace(**opts)
    args = dict(k=k_rows, v=v_rows, pos=pos, counts=bound, k_cache=k_cache, v_cache=v_cache)
    ref = interpret_store(kern, args | ({"table": table} if paged else {}))
    _same(got[0], ref["k_cache"])
    _same(got[1], ref["v_cache"])


def _paged_by_hand(pool, x: np.ndarray, pos: np.ndarray, counts: np.ndarray | None, table: np.ndarray):
    """The page pool after a paged store, written from the docs, not from the DSL kernel: row
    t = pos[b] + n (n < counts[b]) of entry b goes to slot t % P of page table[b, t // P], as
    attnc.quant quantizes that one (token, head) row (f32 / f16: as cast); the rest untouched."""
    P = pool.shape[2]
    quantized = isinstance(pool, quant.QuantTensor)
    out = pool.words.reshape(*pool.shape[:3], -1).copy() if quantized else pool.copy()
    for b in range(x.shape[0]):
        for n in range(x.shape[2] if counts is None else int(counts[b])):
            t = int(pos[b]) + n
            row = x[b, :, n].astype(np.float32)
            out[table[b, t // P], :, t % P] = (quant.quantize(row, pool.fmt).words.reshape(row.shape[0], -1)
                                               if quantized else row.astype(pool.dtype))
    return quant.QuantTensor(pool.fmt, pool.shape, out.reshape(-1)) if quantized else out


def _crossing_pages(rng, B: int = 3, H: int = 2, P: int = 4, pages: int = 4):
    """A permuted block table (two pool pages left unmapped) and two appends, of entries at
    different positions crossing one or two page boundaries, the second ragged:
    (table, [(pos, counts, N), ...])."""
    table = rng.permutation(B * pages + 2)[:B * pages].reshape(B, pages).astype(np.int32)
    first = (np.array([2, 5, 7], np.int32), None, 6)  # t 2..7, 5..10, 7..12: pages 0-1, 1-2, 1-2-3
    second = (np.array([8, 11, 13], np.int32), np.array([4, 3, 3], np.int32), 4)  # t 8..11, 11..13, 13..15
    return table, [first, second]


@pytest.mark.gpu
@pytest.mark.parametrize("f16_rows", [False, True], ids=["f32-rows", "f16-rows"])
@pytest.mark.parametrize("fmt", CACHE_FORMATS)
def test_paged_store_across_pages_matches_a_hand_written_reference(fmt, f16_rows, require_adapters) -> None:
    """store_rows through a block table: appends of several entries at different positions that
    cross page boundaries land in the page each position's own t // P names (pages of 4 keys,
    a permuted table), every word as the hand-written reference has it."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(11)
    B, H, P, D = 3, 2, 4, 32
    table, appends = _crossing_pages(rng, B, H, P)
    pool = _cache(fmt, rng.standard_normal((table.size + 2, H, P, D)).astype(np.float32))
    for pos, counts, N in appends:
        x = rng.standard_normal((B, H, N, D)).astype(np.float16 if f16_rows else np.float32)
        want = _paged_by_hand(pool, x, pos, counts, table)
        pool = store_rows(pool, x, pos, table=table, counts=counts, device=dev)
        _same(pool, want)


@pytest.mark.gpu
@pytest.mark.parametrize(("k_fmt", "v_fmt"), [("f32", "q8_0"), ("q4_0", "f16"), ("int8", "f32"), ("f16", "int8"),
                                              ("q8_0", "q4_0")])
def test_paged_pair_store_across_pages_matches_a_hand_written_reference(k_fmt, v_fmt, require_adapters) -> None:
    """store_pair_rows (kv_store_pair_paged) through one block table, K and V of other head dims
    and formats: both pools as the hand-written reference has them, appends crossing pages."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(12)
    B, H, P, D, Dv = 3, 2, 4, 32, 64
    table, appends = _crossing_pages(rng, B, H, P)
    k_pool = _cache(k_fmt, rng.standard_normal((table.size + 2, H, P, D)).astype(np.float32))
    v_pool = _cache(v_fmt, rng.standard_normal((table.size + 2, H, P, Dv)).astype(np.float32))
    for i, (pos, counts, N) in enumerate(appends):
        k = rng.standard_normal((B, H, N, D)).astype(np.float32)
        v = rng.standard_normal((B, H, N, Dv)).astype(np.float16 if i else np.float32)
        want_k, want_v = _paged_by_hand(k_pool, k, pos, counts, table), _paged_by_hand(v_pool, v, pos, counts, table)
        k_pool, v_pool = store_pair_rows(k_pool, v_pool, k, v, pos, table=table, counts=counts, device=dev)
        _same(k_pool, want_k)
        _same(v_pool, want_v)


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
@pytest.mark.parametrize("fmt", ["f32", "q8_0", "int8"])
def test_paged_store_writes_no_position_its_table_row_does_not_hold(fmt, pair, require_adapters) -> None:
    """The paged store kernels with positions the host checks would refuse (what a runtime
    holding its lengths on the device, or loading the manifest's store, can hand them): rows at
    positions past the NB * P keys a table row holds, or before 0, are not written, as a
    contiguous cache's rows past C; the others land as the hand-written reference has them.
    A clamped table read would write them into a mapped page."""
    from attnc.runtime import dispatch as rt
    from attnc.runtime.store import _read, _upload, pair_store_dispatch, store_dispatch

    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(13)
    H, P, D, NB = 2, 4, 32, 3
    table = np.array([[4, 0, 2], [5, 3, 1]], np.int32)
    pool = _cache(fmt, rng.standard_normal((6, H, P, D)).astype(np.float32))
    x = rng.standard_normal((2, H, 4, D)).astype(np.float32)
    pos = np.array([NB * P - 2, -3], np.int32)  # entry 0: rows 2, 3 past the table; entry 1: rows 0-2 before 0
    want = _paged_by_hand(pool, x[:1, :, :2], pos[:1], None, table[:1])
    want = _paged_by_hand(want, x[1:, :, 3:], np.zeros(1, np.int32), None, table[1:])
    buf = _upload(dev, pool)
    target = (fmt, buf, tuple(pool.shape))
    if pair:
        other = _upload(dev, pool)
        rt.run(dev, [pair_store_dispatch(dev, target, (fmt, other, tuple(pool.shape)), x, x, pos, table)])
        _same(_read(dev, other, pool), want)
    else:
        rt.run(dev, [store_dispatch(dev, fmt, buf, tuple(pool.shape), x, pos, table)])
    _same(_read(dev, buf, pool), want)


def test_pair_store_errors() -> None:
    """The pair store names which cache or rows is wrong."""
    k = quant.quantize(np.zeros((1, 2, 4, 64), np.float32), "q8_0")
    v = quant.quantize(np.zeros((1, 2, 4, 32), np.float32), "q4_0")
    kx, vx, pos = np.zeros((1, 2, 1, 64), np.float32), np.zeros((1, 2, 1, 32), np.float32), np.zeros(1, np.int32)
    with pytest.raises(ValueError, match=r"v_rows: shape \(1, 2, 1, 64\) does not match the cache: expected "
                                         r"\[B=1, H=2, N, D=32\]"):
        store_pair_rows(k, v, kx, kx, pos)
    with pytest.raises(ValueError, match=r"v_rows: shape \(1, 2, 2, 32\); k_rows has \(1, 2, 1, 64\)"):
        store_pair_rows(k, v, kx, np.zeros((1, 2, 2, 32), np.float32), pos)
    with pytest.raises(ValueError, match=r"v_cache: shape \(1, 2, 8, 32\); k_cache has \(1, 2, 4, 64\)"):
        store_pair_rows(k, quant.quantize(np.zeros((1, 2, 8, 32), np.float32), "q4_0"), kx, vx, pos)
    with pytest.raises(ValueError, match="k_cache: expected a float32/float16 array or a QuantTensor"):
        store_pair_rows(np.zeros((1, 2, 4, 64), np.int8), v, kx, vx, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", CACHE_FORMATS)
def test_zero_and_tiny_blocks_store_ggml_words(fmt, require_adapters) -> None:
    """Blocks and rows whose scale is a zero in f16 or below f32's normal range (all +0, all
    -0, mixed zeros, tiny values of either sign, 2^-25 * 8 at f16's rounding edge) store exactly
    the words attnc.quant (ggml's reference) does, the sign of a zero scale included."""
    (dev,) = require_adapters("wgpu:vulkan")
    tiny = np.float32(2.0**-25 * 8)
    rows = [np.zeros(64), -np.zeros(64), np.where(np.arange(64) % 2, -0.0, 0.0), np.full(64, 1e-30),
            np.full(64, -1e-30), np.full(64, 1e-39), np.full(64, -tiny), np.full(64, tiny * 1.5)]
    x = np.stack(rows).astype(np.float32).reshape(1, 8, 1, 64)
    cache = _cache(fmt, np.ones((1, 8, 2, 64), np.float32))
    pos = np.array([1], np.int32)
    got = store_rows(cache, x, pos, device=dev)
    ref = interpret_store(kv_store.trace(cache_dtype=fmt, x_dtype="f32"),
                          dict(x=x, pos=pos, counts=np.ones(1, np.int32), cache=cache))["cache"]
    _same(got, ref)


def test_interpreter_store_is_quantize() -> None:
    """The interpreter writes exactly attnc.quant.quantize's words at the rows' positions, the
    first counts[b] rows of entry b, and nothing else."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 64)).astype(np.float32)
    cache = quant.quantize(np.zeros((2, 2, 8, 64), np.float32), "q4_0")
    out = interpret_store(kv_store.trace(cache_dtype="q4_0"),
                          dict(x=x, pos=np.array([0, 5]), counts=np.array([3, 2]), cache=cache))["cache"]
    rows = out.words.reshape(2, 2, 8, -1)
    np.testing.assert_array_equal(rows[0, :, 0:3].reshape(-1), quant.quantize(x[0], "q4_0").words)
    np.testing.assert_array_equal(rows[1, :, 5:7].reshape(-1), quant.quantize(x[1, :, :2], "q4_0").words)
    old = cache.words.reshape(2, 2, 8, -1)  # (q4_0 zeros: d = -0.0, every nibble 8)
    np.testing.assert_array_equal(rows[0, :, 3:], old[0, :, 3:])
    np.testing.assert_array_equal(rows[1, :, :5], old[1, :, :5])
    np.testing.assert_array_equal(rows[1, :, 7:], old[1, :, 7:])  # past entry 1's count


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_append_then_attend(fmt, require_adapters) -> None:
    """Decode steps: append one token per step with the store kernel, attend over the valid prefix
    (kv_lens) of the quantized cache; matches the reference on the dequantized rows."""
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(7)
    B, Hq, Hkv, C, D = 2, 4, 2, 16, 64
    k = quant.quantize(np.zeros((B, Hkv, C, D), np.float32), fmt)
    v = quant.quantize(np.zeros((B, Hkv, C, D), np.float32), fmt)
    lens = np.array([3, 0], np.int32)
    k = store_rows(k, rng.standard_normal((B, Hkv, 3, D)).astype(np.float32), np.zeros(B, np.int32), device=dev)
    v = store_rows(v, rng.standard_normal((B, Hkv, 3, D)).astype(np.float32), np.zeros(B, np.int32), device=dev)
    for _ in range(2):
        k = store_rows(k, rng.standard_normal((B, Hkv, 1, D)).astype(np.float32), lens, device=dev)
        v = store_rows(v, rng.standard_normal((B, Hkv, 1, D)).astype(np.float32), lens, device=dev)
        lens = lens + 1
        q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
        o = api.attention(q, k, v, kv_lens=lens, device=dev)
        ref = attention_ref(q, quant.dequantize(k), quant.dequantize(v), kv_lens=lens)
        assert_close(o, ref, 1e-5, "o")


def test_store_errors() -> None:
    x = np.zeros((1, 2, 2, 64), np.float32)
    cache = quant.quantize(np.zeros((1, 2, 4, 64), np.float32), "q8_0")
    pos = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match=r"pos: rows 3..4 of entry 0 run past the cache's capacity C=4"):
        store_rows(cache, x, np.array([3]))
    with pytest.raises(ValueError, match=r"rows: shape \(1, 2, 2, 32\) does not match the cache: expected "
                                         r"\[B=1, H=2, N, D=64\]"):
        store_rows(cache, np.zeros((1, 2, 2, 32), np.float32), pos)
    with pytest.raises(ValueError, match="rows: expected a float32 or float16 array"):
        store_rows(cache, x.astype(np.float64), pos)
    with pytest.raises(ValueError, match="rows: inf or NaN"):
        store_rows(cache, np.full_like(x, np.nan), pos)
    with pytest.raises(ValueError, match="cache: expected a float32/float16 array or a QuantTensor, got a int8"):
        store_rows(np.zeros((1, 2, 4, 64), np.int8), x, pos)
    pool = quant.quantize(np.zeros((3, 2, 4, 64), np.float32), "int8")
    with pytest.raises(ValueError, match="table: entry 0 points at page 7, past the page pool of 3 pages"):
        store_rows(pool, x, np.array([3]), table=np.array([[0, 7]]))
    with pytest.raises(ValueError, match="block table has 2 pages per entry"):
        store_rows(pool, x, np.array([7]), table=np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"counts: expected 1 integers \(one per batch entry\), got int64 \(2,\)"):
        store_rows(cache, x, pos, counts=np.array([1, 1]))
    with pytest.raises(ValueError, match=r"counts: values must be in \[0, N=2\] \(the rows given\), got \[3\]"):
        store_rows(cache, x, pos, counts=np.array([3]))
    with pytest.raises(ValueError, match="cache: an f16 cache stores two values per 32-bit word; head dim 3 is odd"):
        store_rows(np.zeros((1, 2, 4, 3), np.float16), np.zeros((1, 2, 2, 3), np.float16), pos)


@pytest.mark.gpu
def test_checks_follow_the_rows_written(require_adapters) -> None:
    """The capacity and block-table checks look at the rows counts writes, not at all N: a
    ragged store that ends within the cache, or skips an entry whose pages are not mapped, runs."""
    (dev,) = require_adapters("wgpu:vulkan")
    x = np.ones((2, 1, 3, 32), np.float32)
    cache = quant.quantize(np.zeros((2, 1, 4, 32), np.float32), "q8_0")
    out = quant.dequantize(store_rows(cache, x, np.array([3, 0]), counts=np.array([1, 3]), device=dev))
    np.testing.assert_array_equal(out[:, 0, :, 0] != 0, [[0, 0, 0, 1], [1, 1, 1, 0]])  # rows written
    pool = np.zeros((2, 1, 2, 32), np.float32)
    out = store_rows(pool, x, np.array([0, 0]), table=np.array([[1, -1], [9, 9]]), counts=np.array([2, 0]), device=dev)
    np.testing.assert_array_equal(out[:, 0, :, 0], [[0, 0], [1, 1]])


BD, DB, BE, B_ = f32["B", "D"], f32["D", "B"], f32["B", "E"], i32["B"]


def test_store_kernel_verifier() -> None:
    @store_kernel
    def reads_its_target(x: BD, cache: BD):
        (b,) = grid(b="B")
        store(cache[b, :], cache[b, :])

    with pytest.raises(VerifyError, match="'cache' is both stored to and read"):
        reads_its_target.trace()

    @store_kernel
    def wrong_width(x: BE, pos: B_, cache: BD):
        (b,) = grid(b="B")
        store(cache[b, :], x[b, :])

    with pytest.raises(VerifyError, match="writes a row of 'E' into a row of 'D'"):
        wrong_width.trace()
    with pytest.raises(VerifyError, match="stored as q8_0 along its last dim"):
        @store_kernel
        def across(x: BD, cache: DB):
            (b,) = grid(b="B")
            store(cache[:, b], x[b, :])

        across.trace(cache_dtype="q8_0")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@settings(RUN, max_examples=6)
@given(fmt=st.sampled_from(quant.FORMATS), f16_rows=st.booleans(), N=st.integers(1, 4),
       D=st.sampled_from([32, 64, 128]), bad=st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1,
                                                      max_size=4), seed=st.integers(0, 2**16))
def test_non_finite_rows_read_as_nan_not_numbers(spec, fmt, f16_rows, N, D, bad, seed, require_adapters) -> None:
    """GPU rows holding inf or NaN (which attnc.quant.quantize and host appends refuse) appended
    to a quantized KVCache: each block (q8_0, q4_0) or row (int8) holding one gets a NaN scale,
    so it reads as NaN, never as numbers made up from it; every other block stores exactly
    quantize's words. Host rows with them are a ValueError naming the argument."""
    (dev,) = require_adapters(spec)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, N, D)).astype(np.float16 if f16_rows else np.float32)
    flat = x.reshape(-1)
    for value in bad:
        flat[rng.integers(0, flat.size)] = value
    cache = attnc.KVCache(1, 2, 8, D, k_format=fmt, dtype=np.float16 if f16_rows else np.float32, device=dev)
    with pytest.raises(ValueError, match=f"k_new: inf or NaN cannot be stored as {fmt}"):
        cache.append(x, np.zeros_like(x))
    cache.append(attnc.tensor(x, device=dev), attnc.tensor(np.zeros_like(x), device=dev))
    got = cache.k.numpy()
    unit = D if fmt == "int8" else quant.BLOCK  # the values one scale covers
    values = quant.dequantize(got)[:, :, :N].reshape(-1, unit)
    units = x.astype(np.float32).reshape(-1, unit)
    poisoned = ~np.isfinite(units).all(axis=1)
    assert np.isnan(values[poisoned]).all()
    clean = np.where(poisoned[:, None], 0.0, units).astype(np.float32).reshape(1, 2, N, D)
    per = quant.words_per_row(fmt, unit)
    want = quant.quantize(clean, fmt).words.reshape(-1, per)
    words = got.words.reshape(1, 2, 8, -1)[:, :, :N].reshape(-1, per)
    np.testing.assert_array_equal(words[~poisoned], want[~poisoned])


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_scales_past_float16_read_as_nan(spec, fmt, require_adapters) -> None:
    """f32 rows whose q8_0 or q4_0 block scale would round past f16's 65504 (host rows refuse them,
    as quantize does): from GPU rows that block gets a NaN scale and reads as NaN, never as inf or
    numbers; a block just below the limit stores the scale 65504 as quantize does, and the other
    blocks quantize's words."""
    (dev,) = require_adapters(spec)
    limit = np.float32(quant.LARGEST_STORABLE[fmt])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 3, 64)).astype(np.float32)
    x[0, 0, 1, 3] = -limit * np.float32(1.5)  # past the limit: block 0 of row (0, 1)
    x[0, 1, 2, 33] = limit  # the limit itself: block 1 of row (1, 2)
    x[0, 1, 0, 40] = np.nextafter(limit, np.float32(0))  # just below: block 1 of row (1, 0), scale 65504
    cache = attnc.KVCache(1, 2, 8, 64, k_format=fmt, device=dev)
    with pytest.raises(ValueError, match=rf"k_new: a block of 32 values holds \|x\| = .*{fmt} keeps each block's "
                                         "scale as float16"):
        cache.append(x, np.zeros_like(x))
    with pytest.raises(ValueError, match=r"rows: a block of 32 values holds"):
        store_rows(quant.quantize(np.zeros((1, 2, 8, 64), np.float32), fmt), x, np.zeros(1, np.int32), device=dev)
    cache.append(attnc.tensor(x, device=dev), attnc.tensor(np.zeros_like(x), device=dev))
    got = cache.k.numpy()
    values = quant.dequantize(got)[:, :, :3].reshape(-1, quant.BLOCK)
    poisoned = np.abs(x.reshape(-1, quant.BLOCK)).max(axis=1) >= limit
    assert poisoned.sum() == 2 and np.isnan(values[poisoned]).all()
    clean = np.where(poisoned[:, None], 0.0, x.reshape(-1, quant.BLOCK)).astype(np.float32).reshape(x.shape)
    per = quant.words_per_row(fmt, quant.BLOCK)
    want = quant.quantize(clean, fmt).words.reshape(-1, per)
    words = got.words.reshape(1, 2, 8, -1)[:, :, :3].reshape(-1, per)
    np.testing.assert_array_equal(words[~poisoned], want[~poisoned])
    assert np.nanmax(np.abs(quant.codes(got)[0])) == 65504.0
