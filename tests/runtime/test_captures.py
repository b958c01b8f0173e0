"""Data of their own in score/mask functions, through the public API: inputs passed by name with
dims of any name, captured tables of every dtype, values that change without new kernels, the
errors that name the tensor, K/V shared by the batch, and custom kernels run with attnc.build."""

from __future__ import annotations

import re

import numpy as np
import pytest

import attnc
from attnc.ir.interp import interpret
from attnc.ir.nodes import LOWERING_NAMES
from attnc.kernels.flash import flash_attention
from attnc.runtime import api, build
from tests.textbook import assert_close, attention_ref, capture_dtypes

pytestmark = pytest.mark.gpu


def qkv(rng, B=2, Hq=4, Hkv=2, S=21, T=33, D=16, Dv=16, dtype=np.float32, Bkv=None):
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype),
            rng.standard_normal((Bkv or B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((Bkv or B, Hkv, T, Dv)).astype(dtype))


REL = attnc.input("rel", attnc.f32["Hq"])
TABLE = attnc.input("table", attnc.f32["NB", "Hq"])
BUCKET = attnc.input("bucket", attnc.i32["NR"])


def declared(score, b, h, q_idx, kv_idx):
    """Declared inputs: a per-head bias, a [NB, Hq] table read through an i32 bucket array."""
    return score * attnc.scalar("temp") + REL[h] + TABLE[BUCKET[kv_idx - q_idx + attnc.scalar("off", attnc.i32)], h]


def test_declared_inputs_are_passed_by_name_with_dims_of_any_name(device) -> None:
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    S, T = q.shape[2], k.shape[2]
    rel = rng.standard_normal(4).astype(np.float32)
    table = rng.standard_normal((7, 4))  # float64: bound as f32
    bucket = rng.integers(0, 7, S + T - 1).astype(np.int64)
    inputs = {"rel": rel, "table": table, "bucket": bucket, "temp": 0.6, "off": S - 1}
    o = attnc.attention(q, k, v, score_mod=declared, inputs=inputs, device=device)
    i, j = np.arange(S)[:, None], np.arange(T)[None, :]
    bias = rel[None, :, None, None] + table.astype(np.float32)[bucket[j - i + S - 1]].transpose(2, 0, 1)[None]
    assert_close(o, attention_ref(q, k, v, score_mod=lambda s, *_: s * 0.6 + bias), 1e-5)


def test_input_errors_name_the_tensor(device) -> None:
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng)
    S, T = q.shape[2], k.shape[2]
    good = {"rel": np.zeros(4), "table": np.zeros((7, 4)), "bucket": np.zeros(S + T - 1, np.int32),
            "temp": 1.0, "off": 0}

    def fails(inputs, match):
        with pytest.raises(ValueError, match=match):
            attnc.attention(q, k, v, score_mod=declared, inputs=inputs, device=device)

    fails({n: x for n, x in good.items() if n != "table"}, r"needs 'table': pass it with inputs=")
    fails({**good, "tabel": 1},
          r"has no input 'tabel'; its inputs declared .* are \['bucket', 'off', 'rel', 'table', 'temp'\]")
    fails({**good, "rel": np.zeros((4, 1))}, r"inputs\['rel'\]: expected 1 dims \['Hq'\], got shape \(4, 1\)")
    fails({**good, "rel": np.zeros(5)}, r"inputs\['rel'\]: dim Hq is 5, but 4 in q, k, v")
    fails({**good, "table": np.zeros((7, 3))}, r"inputs\['table'\]: dim Hq is 3, but 4 in q, k, v")
    fails({**good, "bucket": np.zeros(4, np.float32)}, r"inputs\['bucket'\]: expected integers for an i32 tensor")
    fails({**good, "bucket": np.array([2**40])}, r"inputs\['bucket'\]: values must be in \[-2147483648, 2147483647\]")
    fails({**good, "rel": np.zeros(4, bool)}, r"inputs\['rel'\]: expected real numbers")
    fails({**good, "temp": np.zeros(2)}, r"inputs\['temp'\]: expected a number, got an array of shape \(2,\)")
    fails({**good, "off": 0.5}, r"inputs\['off'\]: expected an integer in the i32 range")
    fails({**good, "rel": np.zeros(0)}, r"inputs\[.rel.\]: empty \(shape \(0,\)\)")
    big = np.full(3, 2**31, np.uint32)
    with pytest.raises(ValueError, match=r"the value a mod captures as 'big': values must be in \[0, 2147483647\]"):
        attnc.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + attnc.f32(big[h]), device=device)


def test_named_dims_that_disagree_between_inputs_name_both(device) -> None:
    a = attnc.input("a", attnc.f32["NB"])
    b = attnc.input("b2", attnc.f32["NB"])
    q, k, v = qkv(np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"inputs\['b2'\]: dim NB is 3, but 5 in inputs\['a'\]"):
        attnc.attention(q, k, v, score_mod=lambda s, bb, h, i, j: s + a[i] + b[j], device=device,
                        inputs={"a": np.zeros(5), "b2": np.zeros(3)})


def _integer_tables() -> dict[str, np.ndarray]:
    """A table of each dtype the capture table stores as i32: the lowest and highest value each
    may hold within int32, and two between."""
    ints = {}
    for name, (_, stored) in capture_dtypes().items():
        if stored == "i32":
            lo, hi = max(np.iinfo(name).min, -(2**31)), min(np.iinfo(name).max, 2**31 - 1)
            ints[name] = np.array([lo, hi, 1, (lo + hi) // 3], name)
    return ints


def test_tables_of_every_dtype(device) -> None:
    """Tables of the float, u32, u8 and bool dtypes of docs/API.md's capture table, read by a
    mod over a prefill with a block map; the integers stored as i32 below (both tests together
    cover every dtype of the table, which tests/textbook.py reads from the page)."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, S=19, T=27)
    S, T = q.shape[2], k.shape[2]
    f64 = rng.standard_normal(S)  # bound as f32
    f16 = rng.standard_normal(T).astype(np.float16)
    u32 = rng.integers(0, 2**31 - 1, 4).astype(np.uint32)
    u8 = rng.integers(0, 256, (S, T)).astype(np.uint8)
    flags = rng.random((S, T)) < 0.8
    covered = {a.dtype.name for a in (f64, f16, u32, u8, flags, *_key_tables().values())}
    assert covered == set(capture_dtypes()) and "uint16" in covered  # every dtype the table lists

    def score_mod(s, b, h, i, j):
        return s + f64[i] + f16[j] + attnc.f32(u32[h] % 7) * 0.1 + attnc.f32(u8[i, j]) * 0.01

    def mask_mod(b, h, i, j):
        return flags[i, j] == (j <= i + 100)  # == between two bools

    o = attnc.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, device=device)
    hh = np.arange(4)[None, :, None, None]
    ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: flags[i, j],
                        score_mod=lambda s, b, h, i, j: s + f64.astype(np.float32)[i] + f16[j]
                        + (u32[hh] % 7) * np.float32(0.1) + u8[i, j] * np.float32(0.01))
    assert_close(o, ref, 1e-5)


def _key_tables() -> dict[str, np.ndarray]:
    """A float32 and a uint32 table, and one of each dtype the capture table stores as i32 (every
    width, signed or not: uint16 was a TraceError): the lowest and highest value each may hold
    within int32, and two between."""
    tables = {"float32": np.array([0.5, -2.0, 1e-3, 3.0], np.float32),
              "uint32": np.array([0, 2**31 - 1, 7, 2**20], np.uint32)}
    for name, (_, stored) in capture_dtypes().items():
        if stored == "i32":
            lo, hi = max(np.iinfo(name).min, -(2**31)), min(np.iinfo(name).max, 2**31 - 1)
            tables[name] = np.array([lo, hi, 1, (lo + hi) // 3], name)
    return tables


def test_tables_read_per_key(device) -> None:
    """Each table of _key_tables read per key (a per-head read adds a constant to a row, which
    the softmax hides), in a kernel of its own: one shader reading every table of both tests
    compiles for 40 s on lavapipe."""
    q, k, v = qkv(np.random.default_rng(4), S=19, T=27)
    tables = _key_tables()

    def score_mod(s, b, h, i, j):
        out = s
        for n, x in enumerate(tables.values()):
            out = out + attnc.f32(x[j % 4]) * (2.0**-32 * (n + 1))
        return out

    o = attnc.attention(q, k, v, score_mod=score_mod, device=device)
    jj = np.arange(k.shape[2]) % 4
    by_key = sum(x.astype(np.float64)[jj] * 2.0**-32 * (n + 1) for n, x in enumerate(tables.values()))
    assert_close(o, attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s + by_key), 1e-5)


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])  # both WGSL compilers
@pytest.mark.parametrize("name", sorted(LOWERING_NAMES))
def test_captures_named_like_attncs_own_buffers(require_adapters, spec, name) -> None:
    """Variables named like the buffers the lowering adds (o, lse, part, blocks) captured by a
    score_mod and (with a suffix) a mask_mod, over a prefill with its block map and a split-KV
    decode: bound under other names, right on every path (a float table named `blocks` was
    read through the block map's u32 binding, wrong by 0.8; `o` and `part` failed to compile)."""
    device = require_adapters(spec)[0]
    rng = np.random.default_rng(19)
    code = (f"def make({name}, {name}_m):\n"
            f"    return (lambda s, b, h, i, j: s + {name}[h]), (lambda b, h, i, j: {name}_m[b, j] != 0)\n")
    ns: dict = {}
    exec(code, ns)  # the variables' names are the point: written out, as a user's module would
    table = np.array([0.5, -0.5, 1.0, 0.25], np.float32)
    for S, T in ((21, 33), (1, 600)):
        q, k, v = qkv(rng, S=S, T=T)
        keep = (rng.random((2, T)) < 0.7).astype(np.int32)
        score_mod, mask_mod = ns["make"](table, keep)
        o, lse = attnc.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, causal=S > 1, return_lse=True,
                                 device=device)
        ref_o, ref_lse = attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h],
                                       mask_mod=lambda b, h, i, j, m=keep: m[b, j] != 0, causal=S > 1, return_lse=True)
        assert_close(o, ref_o, 1e-5, f"o, S={S}")
        assert_close(lse, ref_lse, 1e-5, f"lse, S={S}")


def test_new_values_reuse_the_traced_kernel(device) -> None:
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng)

    def run(table, scale, window):
        def score_mod(s, b, h, i, j):
            return s * scale + table[h, j]

        def mask_mod(b, h, i, j):
            return (i - j <= window) & (j - i <= window)
        return attnc.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, device=device)

    run(np.zeros((4, 33), np.float32), 1.0, 3)
    traces = build._CACHE.traces
    for scale, window in ((0.5, 1), (2.0, 40), (1.5, 0)):
        table = rng.standard_normal((4, 33)).astype(np.float32)
        o = run(table, scale, window)
        ref = attention_ref(q, k, v, score_mod=lambda s, b, h, i, j, t=table, c=scale: s * c + t[h, j],
                            mask_mod=lambda b, h, i, j, w=window: (i - j <= w) & (j - i <= w))
        assert_close(o, ref, 1e-5)
    assert build._CACHE.traces == traces  # new values: new bindings and uniforms only
    new_shape = (4, 40 + sum(map(ord, device.spec)) % 1000)  # a shape no other test traced
    run(np.zeros(new_shape, np.float32), 1.0, 3)  # a new shape of a captured table: traced again
    assert build._CACHE.traces == traces + 1


@pytest.mark.sanitize
def test_reads_out_of_range_stay_in_bounds_and_match_the_interpreter(device) -> None:
    """A table read at indices far outside it (rows and keys past the last tile too): every
    read clamped, on the device as in the interpreter; rerun under ATTNC_SANITIZE=bounds."""
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, S=37, T=45)
    table = rng.standard_normal((3, 5)).astype(np.float32)
    lookup = rng.integers(-50, 50, 11).astype(np.int32)

    def score_mod(s, b, h, i, j):
        return s + table[lookup[i - j] - 7, j * 3 - 60]

    prep = api.prepare(api.validate(q, k, v), q.dtype, score_mod=score_mod, device=device)
    prep.bind(q, k, v).run()
    o, _ = prep.result()
    ref, _ = interpret(prep.kern, {"q": q, "k": k, "v": v, "scale": prep.scalars["scale"], "table": table,
                                   "lookup": lookup})
    assert_close(o, ref, 1e-5)


def test_kv_shared_by_the_batch_with_built_in_options(device) -> None:
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, B=3, Bkv=1)
    opts = dict(causal=True, kv_lens=np.array([33, 10, 0], np.int32), sinks=rng.standard_normal(4), return_lse=True)
    o, lse = attnc.attention(q, k, v, device=device, **opts)
    kb, vb = np.broadcast_to(k, (3,) + k.shape[1:]), np.broadcast_to(v, (3,) + v.shape[1:])
    o_ref, lse_ref = attention_ref(q, kb, vb, **opts)
    assert_close(o, o_ref, 1e-5)
    assert_close(lse, lse_ref, 1e-5)
    with pytest.raises(ValueError, match="batch dims differ"):
        attnc.attention(q, k[:, :, :, :], v[[0, 0]], device=device)


def test_kv_shared_by_the_batch_when_the_problem_is_chunked(require_adapters, monkeypatch) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, B=4, Bkv=1, S=40, T=40, D=32, Dv=32)
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", q.nbytes // 3)
    o = attnc.attention(q, k, v, device=dev, causal=True)
    full = (4,) + k.shape[1:]
    assert_close(o, attention_ref(q, np.broadcast_to(k, full), np.broadcast_to(v, full), causal=True), 1e-5)


# ------------------------------------------------------------------ attnc.build
def test_build_runs_the_flash_kernel_with_a_split_and_its_lse(device) -> None:
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, S=2, T=150)
    lens = np.array([150, 61], np.int32)
    op = attnc.build(flash_attention, device=device, split=True, causal=True, kv_lens=True, lse=True)
    o, lse = op(q=q, k=k, v=v, scale=0.3, kv_lens=lens)
    assert op.last.scalars["NSPLIT"] >= 1 and len(op.last.progs) == 2
    o_ref, lse_ref = attention_ref(q, k, v, scale=0.3, causal=True, kv_lens=lens, return_lse=True)
    assert_close(o, o_ref, 1e-5)
    assert_close(lse, lse_ref, 1e-5)
    o3, _ = op(q=q, k=k, v=v, scale=0.3, kv_lens=lens, NSPLIT=3)  # a split count of one's own
    assert op.last.scalars["NSPLIT"] == 3
    assert_close(o3, o_ref, 1e-5)
    traces = op.traces
    op(q=q, k=k, v=v, scale=0.5, kv_lens=lens)
    assert op.traces == traces


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_build_with_host_and_gpu_operands_and_a_mod(device, dtype) -> None:
    """Host arrays and GPU tensors of either dtype: o in the operands' dtype, the same values
    (float16 GPU tensors were refused as if the kernel read f32: the op bound them to the kernel
    before giving it f16 operands)."""
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, dtype=dtype)
    slopes = rng.uniform(0, 0.2, 4).astype(np.float32)
    op = attnc.build(flash_attention, device=device,
                     score_mod=lambda s, b, h, i, j: s + slopes[h] * attnc.f32(j - i))
    o = op(q=q, k=k, v=v, scale=0.25)
    assert o.dtype == dtype
    ref = attention_ref(q, k, v, scale=0.25, score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i))
    assert_close(o, ref, 2e-3 if dtype == np.float16 else 1e-5)
    o_gpu = op(q=attnc.tensor(q, device), k=attnc.tensor(k, device), v=attnc.tensor(v, device), scale=0.25)
    assert isinstance(o_gpu, attnc.Tensor) and o_gpu.dtype == dtype and o_gpu.shape == o.shape
    np.testing.assert_array_equal(o_gpu.numpy(), o)


def test_build_errors_are_clear(device) -> None:
    q, k, v = qkv(np.random.default_rng(10))
    with pytest.raises(ValueError, match="attnc.build takes a kernel written with @attnc.kernel"):
        attnc.build(lambda q: q, device=device)
    with pytest.raises(ValueError, match=r"attnc.build: kernel flash_attention has no option 'causual'; its options "
                                         r"are \['BM', 'BN', 'alibi', .*'window'\]"):
        attnc.build(flash_attention, device=device, causual=True)  # refused when built, not at the first call
    op = attnc.build(flash_attention, device=device)
    with pytest.raises(ValueError, match=r"kernel flash_attention has no param 'queries'"):
        op(queries=q, k=k, v=v, scale=0.1)
    with pytest.raises(ValueError, match=r"kernel flash_attention needs 'scale'"):
        op(q=q, k=k, v=v)
    with pytest.raises(ValueError, match=r"'v': dim Hkv is 3, but 2 in 'k'"):
        op(q=q, k=k, v=np.zeros((2, 3, 33, 16), np.float32), scale=0.1)
    for dt in (np.int32, np.float64):  # refused as attention() refuses them, not converted
        with pytest.raises(ValueError, match=rf"k: dtype {np.dtype(dt)}; the operands \['k', 'q', 'v'\] of kernel "
                                             "flash_attention are float32 or float16"):
            op(q=q, k=k.astype(dt), v=v, scale=0.1)
    half = attnc.build(flash_attention, device=device, q_dtype="f16", k_dtype="f16", v_dtype="f16")
    with pytest.raises(ValueError, match="k: float32 values; kernel flash_attention declares k f16: pass float16"):
        half(q=q.astype(np.float16), k=k, v=v.astype(np.float16), scale=0.1)
    from examples.flex.paged_kv import paged_attention

    paged = attnc.build(paged_attention, device=device)
    pool = np.zeros((4, 2, 8, 16), np.float32)
    with pytest.raises(ValueError, match=r"no tensor has dim 'T': pass its size with dims=\{'T': n\}"):
        paged(q=q, k_pages=pool, v_pages=pool, scale=0.1, seq_lens=np.zeros(2, np.int32),
              page_table=np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("value", [0, -4, "x", 2.5, True, None])
def test_build_refuses_tunables_that_are_not_positive_integers(value) -> None:
    """Checked when built, naming the tunable (0 was a VerifyError pointing into attnc, "x" and
    None Python's errors, 2.5 and True ran as 2 and 1)."""
    with pytest.raises(ValueError, match=f"attnc.build: tunable BM of kernel flash_attention is a positive integer, "
                                         f"got {re.escape(repr(value))}"):
        attnc.build(flash_attention, device="wgpu:vulkan", BM=value)


def test_build_runs_any_power_of_two_tiles_its_options_fix(require_adapters) -> None:
    """Tiles a kernel's options fix are the tiled strategy's, its workgroup no larger than
    they hold (BM=1, BN=1 failed: "WG=64 invocations over BM=1 rows ... more than BN=1 keys";
    decode shapes failed in the stream strategy's key groups); a tile size that is not a power
    of two is refused naming it. (Planning, on the host: one adapter; the tiled shaders run on
    every adapter elsewhere.)"""
    device = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(14)
    for S, T, (bm, bn) in ((29, 40, (1, 1)), (1, 50, (1, 8)), (3, 70, (16, 2))):
        q, k, v = qkv(rng, S=S, T=T)
        op = attnc.build(flash_attention, device=device, BM=bm, BN=bn)
        assert_close(op(q=q, k=k, v=v, scale=0.3), attention_ref(q, k, v, scale=0.3), 1e-5, (S, T, bm, bn))
        assert f"BM={bm},BN={bn}," in op.last.variant
    with pytest.raises(ValueError, match="tunable BN=24 of kernel flash_attention sizes its key tiles, which are "
                                         "powers of two"):
        attnc.build(flash_attention, device=device, BN=24)(q=q, k=k, v=v, scale=0.3)


@pytest.mark.sanitize
def test_paged_kernel_with_a_corrupt_page_table_reads_in_bounds(device) -> None:
    """Page ids outside the pool are clamped (the slice rule): the device matches the
    interpreter and, under ATTNC_SANITIZE=bounds, never reads outside the pool."""
    from examples.flex.paged_kv import paged_attention

    rng = np.random.default_rng(11)
    B, Hq, Hkv, S, D, P, pages = 2, 4, 2, 3, 16, 8, 5
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    pool_k, pool_v = (rng.standard_normal((pages, Hkv, P, D)).astype(np.float32) for _ in range(2))
    table = np.array([[0, 9, -4, 2], [4, 1, 100, -1]], np.int32)  # ids 9, -4, 100, -1 are out of range
    lens = np.array([32, 25], np.int32)
    op = attnc.build(paged_attention, device=device)
    args = dict(q=q, k_pages=pool_k, v_pages=pool_v, scale=0.25, seq_lens=lens, page_table=table)
    o = op(**args, dims={"T": 32})
    ref, _ = interpret(op.last.kern, args, dims=op.last.dims)
    assert_close(o, ref, 1e-5)


def test_chunked_problems_give_mods_the_whole_problems_indices(require_adapters, monkeypatch) -> None:
    """A problem split into batch and head halves (larger than a binding): the mods still see
    absolute b and h, so captured per-batch and per-head data line up."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, B=4, Hq=4, Hkv=2, S=24, T=24, D=32, Dv=32)
    doc = rng.integers(0, 3, (4, 24))
    head_bias = rng.standard_normal(4).astype(np.float32)
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", q.nbytes // 5)
    o = attnc.attention(q, k, v, device=dev, score_mod=lambda s, b, h, i, j: s + head_bias[h] * attnc.f32(b + 1),
                        mask_mod=lambda b, h, i, j: doc[b, i] == doc[b, j])
    ref = attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s + head_bias[h] * (b + 1),
                        mask_mod=lambda b, h, i, j: doc[b, i] == doc[b, j])
    assert_close(o, ref, 1e-5)
