"""attnc.KVCache on every CI adapter: appends write only the new rows, in place (contiguous
and ragged, from host data and from GPU tensors of any strides), and attention over the cache
equals numpy attention over each row's concatenated prefix, queries aligned to its end.

One cache shape per dtype, so each adapter compiles the store kernel and one attention
variant per dtype once; hypothesis draws the append counts, the steps and the lengths.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import quant
from attnc.runtime import dispatch as rt
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, max_examples=8,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
B, HQ, HKV, CAP = 3, 4, 2, 48
SHAPES = {np.float32: (16, 8), np.float16: (13, 6)}  # (D, Dv); the f16 D is odd: rows share words
TOL = {np.float32: 1e-5, np.float16: 2e-3}


class Mirror:
    """The host twin of a cache: every row's keys and values as appended."""

    def __init__(self, D: int, Dv: int, dtype):
        self.k = [[np.zeros((0, D), dtype) for _ in range(HKV)] for _ in range(B)]
        self.v = [[np.zeros((0, Dv), dtype) for _ in range(HKV)] for _ in range(B)]

    def append(self, k_new, v_new, counts):
        for b in range(B):
            for h in range(HKV):
                self.k[b][h] = np.concatenate([self.k[b][h], k_new[b, h, :counts[b]]])
                self.v[b][h] = np.concatenate([self.v[b][h], v_new[b, h, :counts[b]]])

    def lengths(self):
        return np.array([self.k[b][0].shape[0] for b in range(B)])

    def padded(self):
        """k, v [B, Hkv, CAP, D] with the rows past each prefix zero, and the lengths."""
        D, Dv = self.k[0][0].shape[1], self.v[0][0].shape[1]
        k = np.zeros((B, HKV, CAP, D), self.k[0][0].dtype)
        v = np.zeros((B, HKV, CAP, Dv), self.v[0][0].dtype)
        for b in range(B):
            for h in range(HKV):
                n = self.k[b][h].shape[0]
                k[b, h, :n], v[b, h, :n] = self.k[b][h], self.v[b][h]
        return k, v, self.lengths()


def source(dev, x, kind: str):
    """The new rows as host data, a dense GPU tensor or a GPU [B, n, Hkv, D] buffer viewed as
    [B, Hkv, n, D]."""
    if kind == "numpy":
        return x
    if kind == "gpu":
        return attnc.tensor(x, dev)
    return attnc.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)), dev).permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", [pytest.param(np.float32, id="f32"), pytest.param(np.float16, id="f16")])
@RUN
@given(data=st.data())
def test_appends_and_attention_match_numpy_over_the_prefix(device, dtype, data) -> None:
    D, Dv = SHAPES[dtype]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, dtype=dtype, device=device)
    mirror = Mirror(D, Dv, dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    for step in range(data.draw(st.integers(1, 4))):
        n = data.draw(st.integers(1, 9), label="rows")
        room = CAP - mirror.lengths()
        ragged = data.draw(st.booleans(), label="ragged")
        counts = [data.draw(st.integers(0, min(n, int(r)))) for r in room] if ragged else None
        if not ragged and np.any(room < n):
            break
        k_new = rng.standard_normal((B, HKV, n, D)).astype(dtype)
        v_new = rng.standard_normal((B, HKV, n, Dv)).astype(dtype)
        kind = data.draw(st.sampled_from(["numpy", "gpu", "bshd"]), label=f"source{step}")
        cache.append(source(device, k_new, kind), source(device, v_new, kind), counts)
        mirror.append(k_new, v_new, counts if counts is not None else [n] * B)
        np.testing.assert_array_equal(cache.lengths, mirror.lengths())
    k, v, lens = mirror.padded()
    # the rows past each prefix were never written: the cache holds exactly the mirror
    np.testing.assert_array_equal(cache.k.numpy(), k)
    np.testing.assert_array_equal(cache.v.numpy(), v)
    np.testing.assert_array_equal(cache.kv_lens.numpy(), lens)
    S = data.draw(st.integers(1, 3), label="S")
    q = rng.standard_normal((B, HQ, S, D)).astype(dtype)
    ref = attention_ref(q, k, v, kv_lens=lens, causal=True)
    assert_close(cache.attend(q, causal=True), ref, TOL[dtype])
    # the result in the op's own tensor, or written into the caller's: dense, or a [B, S, Hq, Dv]
    # buffer viewed as [B, Hq, S, Dv], whose query heads' rows do not follow one another (GQA
    # ops that pack those rows cannot write it: the cache must prepare one that does not)
    layout = data.draw(st.sampled_from(["own", "dense", "bshd"]), label="out")
    out = None if layout == "own" else attnc.zeros((B, HQ, S, Dv), dtype, device=device) if layout == "dense" \
        else attnc.zeros((B, S, HQ, Dv), dtype, device=device).permute(0, 2, 1, 3)
    o = cache.attend(attnc.tensor(q, device), causal=True, out=out)
    assert isinstance(o, attnc.Tensor) and (out is None or o is out)
    assert_close(o.numpy(), ref, TOL[dtype])


def test_a_decode_step_uploads_only_the_new_rows_and_creates_nothing(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    D, Dv = SHAPES[np.float32]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, device=dev)
    rng = np.random.default_rng(1)
    cache.append(rng.standard_normal((B, HKV, 5, D)).astype(np.float32),
                 rng.standard_normal((B, HKV, 5, Dv)).astype(np.float32))
    q = attnc.zeros((B, HQ, 1, D), device=dev)
    out = attnc.zeros((B, HQ, 1, Dv), device=dev)
    for _ in range(2):  # first steps: the store kernel's and the op's buffers and bind groups
        q.write(rng.standard_normal((B, HQ, 1, D)).astype(np.float32))
        cache.append(rng.standard_normal((B, HKV, 1, D)).astype(np.float32),
                     rng.standard_normal((B, HKV, 1, Dv)).astype(np.float32))
        cache.attend(q, causal=True, out=out)
    before = dev.counters.snapshot()
    q_host = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
    k_row = rng.standard_normal((B, HKV, 1, D)).astype(np.float32)
    v_row = rng.standard_normal((B, HKV, 1, Dv)).astype(np.float32)
    q.write(q_host)
    cache.append(k_row, v_row)
    cache.attend(q, causal=True, out=out)
    made = dev.counters.since(before)
    assert made["bytes_uploaded"] == q_host.nbytes + k_row.nbytes + v_row.nbytes, made
    assert made["buffers_created"] == made["bind_groups_created"] == made["pipelines_compiled"] == 0, made
    k, v = cache.k.numpy(), cache.v.numpy()
    assert_close(out.numpy(), attention_ref(q_host, k, v, kv_lens=cache.lengths, causal=True), 1e-5)


def test_appending_past_capacity_is_an_error_that_changes_nothing(require_adapters) -> None:
    dev = require_adapters("dawn:vulkan")[0]
    D, Dv = SHAPES[np.float32]
    cache = attnc.KVCache(B, HKV, 8, D, Dv, device=dev)
    cache.append(np.ones((B, HKV, 6, D), np.float32), np.ones((B, HKV, 6, Dv), np.float32), counts=[6, 2, 0])
    with pytest.raises(ValueError, match="batch row 0 holds 6 keys; 3 more exceed the cache's capacity of 8"):
        cache.append(np.ones((B, HKV, 3, D), np.float32), np.ones((B, HKV, 3, Dv), np.float32))
    np.testing.assert_array_equal(cache.lengths, [6, 2, 0])
    np.testing.assert_array_equal(cache.kv_lens.numpy(), [6, 2, 0])
    cache.append(np.ones((B, HKV, 3, D), np.float32), np.ones((B, HKV, 3, Dv), np.float32), counts=[2, 3, 3])
    np.testing.assert_array_equal(cache.lengths, [8, 5, 3])


@pytest.mark.parametrize(("D", "Dv"), [(4, 3), (3, 4), (3, 5), (4, 6)])
def test_f16_caches_filled_to_capacity_in_one_append(require_adapters, D, Dv) -> None:
    """f16 rows of an odd K or V width share 32-bit words, so a cache of an odd capacity would let
    a word span two (batch, head) sequences, which one append writing every row to capacity
    writes from two workgroups at once: each parity of D and Dv, the odd capacity asked for."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(D * 10 + Dv)
    cache = attnc.KVCache(B, HKV, 3, D, Dv, dtype=np.float16, device=dev)
    cap = cache.capacity
    k = rng.standard_normal((B, HKV, cap, D)).astype(np.float16)
    v = rng.standard_normal((B, HKV, cap, Dv)).astype(np.float16)
    cache.append(k, v)
    np.testing.assert_array_equal(cache.k.numpy(), k)
    np.testing.assert_array_equal(cache.v.numpy(), v)
    q = rng.standard_normal((B, HQ, 1, D)).astype(np.float16)
    assert_close(cache.attend(q), attention_ref(q, k, v), TOL[np.float16])


def test_misuse_names_the_argument(require_adapters) -> None:
    vk, dawn = require_adapters("wgpu:vulkan", "dawn:vulkan")
    D, Dv = SHAPES[np.float32]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, device=vk)
    k = np.ones((B, HKV, 2, D), np.float32)
    v = np.ones((B, HKV, 2, Dv), np.float32)
    with pytest.raises(ValueError, match=r"^k_new: expected shape \(3, 2, n, 16\)"):
        cache.append(k[:, :1], v)
    with pytest.raises(ValueError, match="^v_new: 1 new rows, but k_new has 2"):
        cache.append(k, v[:, :, :1])
    with pytest.raises(ValueError, match="^k_new: the tensor is on .*Dawn|^k_new: the tensor is on .*dawn"):
        cache.append(attnc.tensor(k, dawn), v)
    with pytest.raises(ValueError, match="^k_new: dtype float16; the cache holds float32"):
        cache.append(attnc.tensor(k.astype(np.float16), vk), v)
    with pytest.raises(ValueError, match=r"^counts: values must be in \[0, n=2\]"):
        cache.append(k, v, counts=[1, 3, 0])
    with pytest.raises(ValueError, match="^k_new: host data cannot be recorded"):
        cache.append(k, v, encoder=vk.gpu.create_command_encoder())
    with pytest.raises(ValueError, match="^q: host data cannot be recorded"):  # (it spoke of an output='numpy')
        cache.attend(np.ones((B, HQ, 1, 16), np.float32), encoder=vk.gpu.create_command_encoder())
    dead = attnc.tensor(k, vk)
    dead.buffer.destroy()
    with pytest.raises(ValueError, match="^k_new: its GPU buffer was destroyed"):
        cache.append(dead, v)
    with pytest.raises(ValueError, match=r"^q: expected shape \(3, Hq, S, 16\)"):
        cache.attend(np.ones((B, HQ, 1, 8), np.float32))
    np.testing.assert_array_equal(cache.lengths, [0, 0, 0])


def test_appends_recorded_into_the_applications_encoder(require_adapters) -> None:
    """GPU sources, ragged counts, recorded with the attention into one encoder: the
    application submits once."""
    dev = require_adapters("wgpu:vulkan")[0]
    D, Dv = SHAPES[np.float32]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, device=dev)
    mirror = Mirror(D, Dv, np.float32)
    rng = np.random.default_rng(2)
    encoder = dev.gpu.create_command_encoder()
    for counts in ([3, 1, 0], [2, 2, 2], [0, 3, 1]):
        k_new = rng.standard_normal((B, HKV, 3, D)).astype(np.float32)
        v_new = rng.standard_normal((B, HKV, 3, Dv)).astype(np.float32)
        cache.append(attnc.tensor(k_new, dev), attnc.tensor(v_new, dev), counts, encoder=encoder)
        mirror.append(k_new, v_new, counts)
    q = rng.standard_normal((B, HQ, 2, D)).astype(np.float32)
    out = attnc.zeros((B, HQ, 2, Dv), device=dev)
    cache.attend(attnc.tensor(q, dev), out=out, encoder=encoder)
    dev.gpu.queue.submit([encoder.finish()])
    k, v, lens = mirror.padded()
    assert_close(out.numpy(), attention_ref(q, k, v, kv_lens=lens), 1e-5)


FORMATS = [(np.float32, None, None), (np.float16, None, None), (np.float32, "q8_0", "int8"),
           (np.float16, "q4_0", None)]


@pytest.mark.sanitize
@pytest.mark.parametrize(("dtype", "kf", "vf"), FORMATS, ids=["f32", "f16", "q8_0-int8", "f16-q4_0-f16"])
@RUN
@given(data=st.data())
def test_append_inside_attend_is_append_then_attend(dtype, kf, vf, data, require_adapters) -> None:
    """attend(q, append=(k_new, v_new[, counts])) gives what append() then attend() give, bit for
    bit (the same kernels in one compute pass), with host or GPU rows, ragged counts, recorded
    into an encoder or submitted, for float and quantized caches; one submission a step."""
    dev = require_adapters("wgpu:vulkan")[0]
    D, Dv = (32, 64) if kf or vf else SHAPES[dtype]
    caches = [attnc.KVCache(B, HKV, CAP, D, Dv, dtype=dtype, device=dev, k_format=kf, v_format=vf)
              for _ in range(2)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    for step in range(data.draw(st.integers(1, 3), label="steps")):
        n = data.draw(st.integers(1, 4), label="rows")
        room = CAP - caches[0].lengths
        counts = [data.draw(st.integers(0, min(n, int(r)))) for r in room] \
            if data.draw(st.booleans(), label=f"ragged{step}") else None
        if counts is None and np.any(room < n):
            break
        k_new = rng.standard_normal((B, HKV, n, D)).astype(dtype)
        v_new = rng.standard_normal((B, HKV, n, Dv)).astype(dtype)
        S = data.draw(st.integers(1, 2), label=f"S{step}")
        q = rng.standard_normal((B, HQ, S, D)).astype(dtype)
        recorded = data.draw(st.booleans(), label=f"encoder{step}") and not rt.sanitizing()
        outs = []
        for i, cache in enumerate(caches):
            kn, vn = (attnc.tensor(k_new, dev), attnc.tensor(v_new, dev)) if recorded else (k_new, v_new)
            qi = attnc.tensor(q, dev) if recorded else q
            encoder = dev.gpu.create_command_encoder() if recorded else None
            submits = dev.counters.submits
            if i == 0:
                cache.append(kn, vn, counts, encoder=encoder)
                o = cache.attend(qi, causal=True, encoder=encoder)
            else:
                o = cache.attend(qi, causal=True, encoder=encoder,
                                 append=(kn, vn) if counts is None else (kn, vn, counts))
                if not recorded and not rt.sanitizing():
                    assert dev.counters.submits == submits + 1
            if recorded:
                dev.gpu.queue.submit([encoder.finish()])
            outs.append(o.numpy() if isinstance(o, attnc.Tensor) else o)
        np.testing.assert_array_equal(caches[1].lengths, caches[0].lengths)
        np.testing.assert_array_equal(caches[1].kv_lens.numpy(), caches[0].kv_lens.numpy())
        np.testing.assert_array_equal(outs[1], outs[0])
    for name in ("k", "v"):
        a, b = (getattr(c, name).numpy() for c in caches)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(b, a)
        else:
            np.testing.assert_array_equal(b.words, a.words)


def test_append_inside_attend_names_its_misuse(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    D, Dv = SHAPES[np.float32]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, device=dev)
    q = np.ones((B, HQ, 1, D), np.float32)
    k, v = np.ones((B, HKV, 1, D), np.float32), np.ones((B, HKV, 1, Dv), np.float32)
    with pytest.raises(ValueError, match=r"^append: expected \(k_new, v_new\) or \(k_new, v_new, counts\), got list"):
        cache.attend(q, append=[k, v])
    with pytest.raises(ValueError, match=r"^append: expected .*, got tuple of 1"):
        cache.attend(q, append=(k,))
    with pytest.raises(ValueError, match="^v_new: 2 new rows, but k_new has 1"):
        cache.attend(q, append=(k, np.ones((B, HKV, 2, Dv), np.float32)))
    with pytest.raises(ValueError, match="^k_new: host data cannot be recorded"):
        cache.attend(attnc.tensor(q, dev), append=(k, v), encoder=dev.gpu.create_command_encoder())
    np.testing.assert_array_equal(cache.lengths, [0, 0, 0])
    np.testing.assert_array_equal(cache.kv_lens.numpy(), [0, 0, 0])


LENGTH_CACHES = [(np.float32, None, None), (np.float16, None, None), (np.float32, "q8_0", "int8")]


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize(("dtype", "kf", "vf"), LENGTH_CACHES, ids=["f32", "f16", "q8_0-int8"])
def test_set_lengths_and_reset_move_the_valid_prefixes(spec, dtype, kf, vf, require_adapters) -> None:
    """set_lengths shrinks (or grows back over rows written before: appends touch nothing else)
    each row's prefix on the host and the GPU; the next append lands right behind it and attend
    reads exactly that prefix; reset empties every row. Out-of-range lengths are a ValueError
    that changes nothing."""
    (dev,) = require_adapters(spec)
    D, Dv = (32, 32) if kf else SHAPES[dtype]
    cache = attnc.KVCache(B, HKV, CAP, D, Dv, dtype=dtype, device=dev, k_format=kf, v_format=vf)
    rng = np.random.default_rng(7)
    # what each position holds, as the kernels read it (float64): the rows written there last
    held_k, held_v = np.zeros((B, HKV, CAP, D)), np.zeros((B, HKV, CAP, Dv))

    def stored(x, fmt):
        return quant.dequantize(quant.quantize(x, fmt)) if fmt else x.astype(np.float64)

    def append(n: int, counts: list[int]) -> None:
        k_new = rng.standard_normal((B, HKV, n, D)).astype(dtype)
        v_new = rng.standard_normal((B, HKV, n, Dv)).astype(dtype)
        at = cache.lengths
        cache.append(k_new, v_new, counts)
        for b, c in enumerate(counts):
            held_k[b, :, at[b]:at[b] + c] = stored(k_new[b, :, :c], kf)
            held_v[b, :, at[b]:at[b] + c] = stored(v_new[b, :, :c], vf)
        np.testing.assert_array_equal(cache.lengths, at + counts)

    def check(lens: list[int]) -> None:
        np.testing.assert_array_equal(cache.lengths, lens)
        np.testing.assert_array_equal(cache.kv_lens.numpy(), lens)
        # the reference sees only the live rows: the rest are NaN (a row reading one is NaN)
        live = np.arange(CAP)[None, None, :, None] < np.asarray(lens)[:, None, None, None]
        k, v = np.where(live, held_k, np.nan), np.where(live, held_v, np.nan)
        q = rng.standard_normal((B, HQ, 2, D)).astype(dtype)
        assert_close(cache.attend(q, causal=True), attention_ref(q, k, v, kv_lens=lens, causal=True),
                     TOL[dtype])

    append(10, [10, 7, 9])
    check([10, 7, 9])
    cache.set_lengths([4, 7, 0])  # shrink, keep, empty
    check([4, 7, 0])
    append(3, [2, 3, 1])  # lands at 4, 7 and 0, over rows written before
    check([6, 10, 1])
    cache.set_lengths(np.array([9, 5, 1]))  # row 0 grows back over rows 6..8 of the first append
    check([9, 5, 1])
    for bad, match in (([9, 5, CAP + 1], rf"^lengths: values must be in \[0, capacity={CAP}\]"),
                       ([-1, 0, 0], r"^lengths: values must be in \[0, capacity="),
                       ([1, 2], "^lengths: expected 3 ints"),
                       ([1.0, 2.0, 3.0], "^lengths: expected 3 ints")):
        with pytest.raises(ValueError, match=match):
            cache.set_lengths(bad)
        np.testing.assert_array_equal(cache.lengths, [9, 5, 1])
        np.testing.assert_array_equal(cache.kv_lens.numpy(), [9, 5, 1])
    cache.reset()
    check([0, 0, 0])
    append(4, [4, 1, 3])
    check([4, 1, 3])
    cache.set_lengths([CAP, CAP - 1, 0])  # the whole capacity is a valid length
    np.testing.assert_array_equal(cache.kv_lens.numpy(), [CAP, CAP - 1, 0])
    append(1, [0, 1, 1])
    with pytest.raises(ValueError, match="capacity"):
        append(1, [1, 0, 0])
