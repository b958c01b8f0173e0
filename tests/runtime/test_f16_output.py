"""float16 inputs give a float16 o written by the kernel (docs/API.md, float16): attention()
returns it as the kernel wrote it, checked against the float64 reference ON THE F16 OUTPUT
within 2e-3, on every adapter and family that offers f16 (f16 storage everywhere, wgpu:opengl
included; f16 tiles where shader-f16 is offered).

- every option, drawn: shapes with S = 1 and odd, T not a tile multiple, head dims 32 ... 256
  and odd Dv (padded output rows), GQA, prefill and split-KV decode, score_mod/mask_mod;
- |s| ~ 1e4 (exact integer scores times a power-of-two scale) and rows of T >= 16384 keys;
- NaN in one query row stays in that row, fully masked rows are exactly 0, also through the
  split-KV combine;
- the buffer the kernel writes holds halves (2 bytes an element, rows at an even stride), and
  problems past the binding limit (pieces merged on the host) stay within 2e-3.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy
from attnc.runtime import api
from attnc.runtime import dispatch as rt
from tests.runtime.test_attention_options import BIAS_SHAPES, RUN, _seed, bias_of, kv_lens_for, qkv
from tests.targets import TARGETS
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

TOL = 2e-3
# (adapter, target): f16 storage with f32 math on every family of every adapter, and f16
# arithmetic (shader-f16) where offered (the fixture skips, or fails in CI, where it is not)
F16_TARGETS = [pytest.param((spec, fam), id=f"{spec}-{fam}") for spec, fam in TARGETS] + [
    pytest.param((spec, fam), id=f"{spec}-{fam}") for spec in ("wgpu:vulkan", "dawn:vulkan")
    for fam in ("portable-f16", "subgroups-f16")]
HEAD_DIMS = [32, 64, 72, 80, 96, 128, 256]


@pytest.fixture
def target(request, require_adapters, missing_adapter):
    """(device, target) for an F16_TARGETS param: a family the adapter lacks fails in CI."""
    spec, fam = request.param
    dev = require_adapters(spec)[0]
    if "subgroups" in fam and "subgroups" not in dev.features:
        missing_adapter(f"{spec} does not offer subgroups")
    if fam.endswith("-f16") and "f16" not in dev.features:
        missing_adapter(f"{spec} does not offer shader-f16")
    return dev, fam


def check(target, q, k, v, opts: dict, ref_mods: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """attention() on float16 q/k/v: a float16 o (and float32 lse) within 2e-3 of the float64
    reference on the same values; returns (o, lse)."""
    dev, fam = target
    out = attnc.attention(q, k, v, device=dev, target=fam, **opts)
    o, lse = out if opts.get("return_lse") else (out, None)
    assert o.dtype == np.float16 and o.shape == q.shape[:3] + v.shape[3:] and o.flags.c_contiguous
    ref = attention_ref(q, k, v, **{n: x for n, x in opts.items() if n not in ("score_mod", "mask_mod")},
                        **(ref_mods or {}))
    o_ref, lse_ref = ref if opts.get("return_lse") else (ref, None)
    assert_close(o, o_ref, TOL, "o")
    if lse is not None:
        assert lse.dtype == np.float32
        assert_close(lse, lse_ref, TOL, "lse")
    return o, lse


def relpos_dsl(s, b, h, q_idx, kv_idx):
    return s - 0.05 * attnc.f32(abs(q_idx - kv_idx))


def relpos_np(s, b, h, i, j):
    return s - 0.05 * np.abs(i - j)


def stripes_dsl(b, h, q_idx, kv_idx):
    return (kv_idx % 3 != 1) | (h == 0)


def stripes_np(b, h, i, j):
    return (j % 3 != 1) | (h == 0)


@st.composite
def problems(draw):
    """Shapes (prefill or split-KV decode, head dims of the models or odd ones) and a random
    subset of the options, values drawn."""
    Hkv = draw(st.integers(1, 2))
    D = draw(st.sampled_from(HEAD_DIMS) | st.integers(1, 40))
    Dv = draw(st.sampled_from([D, D, 33, 5]) | st.integers(1, 40))
    decode = draw(st.booleans())
    S = draw(st.integers(1, 8)) if decode else draw(st.sampled_from([1, 17, 33, 63]) | st.integers(9, 70))
    T = draw(st.integers(1000, 2100)) if decode else draw(st.integers(1, 150))
    sh = dict(B=draw(st.integers(1, 2)), Hq=Hkv * draw(st.integers(1, 3)), Hkv=Hkv, S=S, T=T, D=D, Dv=Dv)
    rng = _seed(draw)
    B, Hq = sh["B"], sh["Hq"]
    pool = {
        "causal": True, "window": (draw(st.integers(0, 40)), draw(st.none() | st.integers(0, 40))),
        "kv_lens": kv_lens_for(draw, B, T), "sinks": rng.uniform(-3, 3, Hq).astype(np.float32),
        "alibi_slopes": (2.0 ** -np.arange(1, Hq + 1)).astype(np.float32),
        "softcap": draw(st.sampled_from([5.0, 30.0])),
        "bias": bias_of(rng, draw(st.sampled_from(BIAS_SHAPES)), B, Hq, S, T), "return_lse": True,
        "scale": draw(st.sampled_from([0.05, 0.3])),
    }
    opts = {n: pool[n] for n in draw(st.sets(st.sampled_from(sorted(pool)), max_size=len(pool)))}
    mods = None
    # traced score_mod / mask_mod (with causal: rows keep a key), on prefill rows: over the
    # decode shapes' 1000+ keys the raw-index penalty would leave every key ~e^-50 below a sink,
    # an o far below f16's smallest subnormal (0 in f16, whatever computes it)
    if not decode and draw(st.integers(0, 2)) == 0:
        opts.update(score_mod=relpos_dsl, mask_mod=stripes_dsl, causal=True)
        mods = dict(score_mod=relpos_np, mask_mod=stripes_np)
    return sh, opts, mods, rng


@pytest.mark.sanitize
@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
@settings(RUN, max_examples=3)
@given(data=st.data())
def test_f16_output_with_drawn_options(target, data) -> None:
    sh, opts, mods, rng = data.draw(problems())
    check(target, *qkv(rng, **sh, dtype=np.float16), opts, mods)


@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
@pytest.mark.parametrize("S", [1, 37])
def test_f16_output_with_large_logits(target, S) -> None:
    """|s| ~ 1e4: integer q, k (exact in f16, their products and sums exact in f32 and, for f16
    arithmetic, in f16) times a power-of-two scale, so every score is exact and the softmax is
    as peaked as it gets; S = 1 over 1200 keys runs split-KV."""
    rng = np.random.default_rng(21)
    T = 1200 if S == 1 else 77
    q = rng.integers(-8, 9, (1, 2, S, 64)).astype(np.float16)
    k = rng.integers(-8, 9, (1, 1, T, 64)).astype(np.float16)
    v = rng.standard_normal((1, 1, T, 33)).astype(np.float16)
    s = np.einsum("bhid,bjd->bhij", q.astype(np.float64), k[:, 0].astype(np.float64)) * 32.0
    assert np.abs(s).max() > 5e3
    o, _ = check(target, q, k, v, dict(scale=32.0, return_lse=True))
    assert np.isfinite(o).all()


@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
def test_f16_output_with_large_near_tied_logits(target) -> None:
    """Scores of ~6e3 a few units apart, from q and k of large norm whose products are not
    halves (an f16 product rounds them to 11 bits: the scores would be 4 apart, 0.23 relative
    error once), and a score of 1.1e4 from one product past f16's largest value (90000: an f16
    product is inf, the row NaN). Every target computes both within 2e-3 (the same kernel as
    S = 37 above: same shapes and options)."""
    rng = np.random.default_rng(23)
    u = 30 * rng.standard_normal((1, 1, 1, 64))
    q = (np.repeat(u, 2, axis=1) + 0.05 * rng.standard_normal((1, 2, 37, 64))).astype(np.float16)
    k = (u + 0.05 * rng.standard_normal((1, 1, 77, 64))).astype(np.float16)
    v = rng.standard_normal((1, 1, 77, 33)).astype(np.float16)
    s = np.einsum("bhid,bjd->bhij", q.astype(np.float64), k[:, 0].astype(np.float64)) / 8
    assert np.abs(s).min() > 4e3 and np.ptp(s, axis=-1).max() < 40
    check(target, q, k, v, dict(scale=0.125, return_lse=True))
    q[...], k[...] = 0, 0
    q[..., 0], k[..., 0, 0], k[..., 1, 0] = 300, 300, 299  # q.k = 90000 and 89700: past 65504
    o, _ = check(target, q, k, v, dict(scale=0.125, return_lse=True))
    assert np.isfinite(o).all()


def _keys_scoring(k: np.ndarray, rows: slice, score: float) -> None:
    """Set k[..., rows, :4] so that q = [1, 1, 1, 1, 0, ...] scores `score` against them: a
    sum of four halves, exact in f32."""
    for c in range(4):
        k[..., rows, c] = np.float16(score)
        score -= float(np.float16(score))


# S = 1 (split-KV) on every f16-tile target and one family of each backend; S = 37 on all
WEIGHTED_MEAN_CASES = [pytest.param(p.values[0], 37, id=f"37-{p.id}") for p in F16_TARGETS] + [
    pytest.param(p.values[0], 1, id=f"1-{p.id}") for p in F16_TARGETS
    if p.values[0][1].endswith("-f16") or p.values[0] in (("wgpu:vulkan", "subgroups"), ("dawn:vulkan", "portable"))]


@pytest.mark.parametrize(("target", "S"), WEIGHTED_MEAN_CASES, indirect=["target"])
def test_f16_output_stays_a_weighted_mean_where_probabilities_round(target, S) -> None:
    """Probabilities just past a rounding boundary of f16 (0.5 + 2^-12 +- 2^-16): a kernel that
    rounds p for its products but not for its row sums (an f16 p tile) gives o = +inf where
    every value is 65504, and 0.5 relative error where values of +-1000 cancel to 0.52.
    Every target keeps both within 2e-3, 65504 exactly (S = 1: split-KV)."""
    T = 2048
    q = np.zeros((1, 1, S, 64), np.float16)
    q[..., :4] = 1
    k = np.zeros((1, 1, T, 64), np.float16)
    _keys_scoring(k, slice(1, None), float(np.log(0.5 + 2**-12 + 2**-18)))  # key 0 scores 0: p = 1
    v = np.full((1, 1, T, 33), 65504, np.float16)
    o, _ = check(target, q, k, v, dict(scale=1.0))
    assert (o == 65504).all()
    _keys_scoring(k, slice(1, None, 2), float(np.log(0.5 + 2**-12 + 2**-16)))  # p rounds up in f16
    _keys_scoring(k, slice(2, None, 2), float(np.log(0.5 + 2**-12 - 2**-16)))  # p rounds down
    v[:, :, 0], v[:, :, 1::2], v[:, :, 2::2] = 0, 1000, -1000
    check(target, q, k, v, dict(scale=1.0))


@pytest.mark.parametrize("S", [1, 5, 40])
def test_f16_output_over_long_rows(device, S) -> None:
    """T = 16500 keys (split-KV for the short rows): the f16 output keeps 2e-3."""
    rng = np.random.default_rng(22)
    q, k, v = qkv(rng, 1, 2, 1, S, 16500, 64, 63 if S == 5 else 64, np.float16)
    q *= np.float16(3)  # peaky enough that the row max moves along the row
    check((device, None), q, k, v, dict(return_lse=True, causal=S == 40))


@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
@pytest.mark.parametrize("S", [1, 37])
def test_f16_output_nan_rows_and_fully_masked_rows(target, S) -> None:
    """A NaN in one query row makes exactly that row NaN (every column, odd Dv); rows that see
    no key (kv_lens = 0 for batch 1; window (None, 0) for the rows before the first key) are
    exactly 0, also through the split-KV combine (S = 1 over 1100 keys)."""
    rng = np.random.default_rng(23)
    T = 1100 if S == 1 else 30
    q, k, v = qkv(rng, 2, 2, 1, S, T, 64, 35, np.float16)
    r = S // 2
    q[0, 1, r, 7] = np.nan
    kv_lens = np.array([T, 0], np.int32)
    window = (None, 0) if S > T else None
    opts = dict(kv_lens=kv_lens, return_lse=True) | ({"window": window} if window else {})
    dev, fam = target
    o, lse = attnc.attention(q, k, v, device=dev, target=fam, **opts)
    assert o.dtype == np.float16
    bad = np.zeros(o.shape[:3], bool)
    bad[0, 1, r] = True
    assert np.isnan(o[bad]).all() and not np.isnan(o[~bad]).any()
    assert np.all(o[1] == 0) and not np.signbit(o[1]).any() and np.all(np.isneginf(lse[1]))
    if window:  # i_abs = i - 7 < 0: no key at or before it
        assert np.all(o[:, :, :7] == 0) and np.all(np.isneginf(lse[:, :, :7]))
    o_ref = attention_ref(q, k, v, **{n: x for n, x in opts.items() if n != "return_lse"})
    assert_close(o, o_ref, TOL, "o")


def test_the_kernel_writes_halves_in_rows_of_even_stride(require_adapters) -> None:
    """The o buffer holds 2 bytes an element at rows of Dv + 1 (odd Dv): what the kernel wrote
    is what attention() returns, with no conversion on the host."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(24)
    q, k, v = qkv(rng, 1, 2, 1, 9, 20, 16, 7, np.float16)
    dims = api.validate(q, k, v)
    op = api.prepare(dims, np.float16, device=dev)
    op.bind(q, k, v).run()
    assert op.o_dtype == np.float16 and op.o_row_stride == 8
    assert op.bufs["o"].size == 2 * 2 * 9 * 8
    o, _ = op.result()
    raw = rt.readback(dev, op.bufs["o"], np.float16, (1, 2, 9, 8))
    np.testing.assert_array_equal(o.view(np.uint16), raw[..., :7].view(np.uint16))
    np.testing.assert_array_equal(attnc.attention(q, k, v, device=dev).view(np.uint16), o.view(np.uint16))


@pytest.mark.parametrize("limit", [4096, 1 << 15])
def test_f16_problems_past_the_binding_limit(require_adapters, monkeypatch, limit) -> None:
    """Pieces of the batch and heads (32 KiB) or of rows x keys (4 KiB: f16 pieces merged by
    log-sum-exp in float64, then rounded again) stay within 2e-3 with every positional option."""
    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", limit)
    rng = np.random.default_rng(25)
    B, Hq, Hkv, S, T = (2, 4, 2, 24, 300) if limit > 4096 else (1, 1, 1, 50, 300)
    q, k, v = qkv(rng, B, Hq, Hkv, S, T, 16, 15, np.float16)
    opts = dict(causal=True, window=(100, None), kv_lens=np.full(B, 250), sinks=np.full(Hq, 0.5, np.float32),
                alibi_slopes=np.full(Hq, 0.1, np.float32), softcap=20.0, return_lse=True)
    check((dev, None), q, k, v, opts)


# --------------------------------------------------------------------------- the output contract
# o in q's dtype everywhere, as the kernel wrote it: numpy results, GPU tensors (a float16 o with
# an odd Dv: a strided view, rows Dv + 1 apart, its padding never in the view), out= tensors of
# the layouts the kernel can write; float32 inputs and outputs alongside as the control.
# (plan, tunables, split count) per strategy; None: the heuristic (attention() with a target).
# The tiled plans hold Dv <= 8 in two value stages of 4 (the second partial for Dv = 5): each
# stage is unrolled with two barriers, and lavapipe compiles a shader as a coroutine suspending
# at every barrier, so 32 value columns (8 stages) took its LLVM 30-66 s per shader, 8 take 3 s.
CONTRACT_PLANS = {
    "heuristic": None,
    "tiled": (Plan(Family.PORTABLE, workgroup_size=32, head_chunk=8, value_columns=8, value_stage_columns=4,
                   vector_width=1), {"BM": 16, "BN": 32}, 1),
    "tiled_exchange": (Plan(Family.PORTABLE, workgroup_size=64, head_chunk=8, value_columns=8,
                            value_stage_columns=4, vector_width=1), {"BM": 16, "BN": 32}, 1),
    "rows_split": (Plan(Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=2, query_dim=8, value_columns=16,
                        vector_width=1), {"BM": 16, "BN": 32}, 2),
    "stream_split": (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=32, lanes_per_key=1,
                          keys_per_step=1, query_dim=8, value_columns=16, vector_width=4), {"BM": 2, "BN": 32}, 2),
    "lanes": (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, query_dim=8, value_columns=16,
                   vector_width=4), {"BN": 32}, 1),
}
CONTRACT_TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5}


def contract_op(dev, name: str, dims: dict, dtype, causal: bool, out):
    """The op of a forced plan (float16: its f16-storage form), prepared as attnc.prepare does
    for an `out` example (no packed GQA rows for a layout that cannot take them)."""
    plan, tun, nsplit = CONTRACT_PLANS[name]
    if dtype == np.float16:
        plan = dataclasses.replace(plan, storage=Storage.F16)
    if plan.strategy is Strategy.LANES:
        sg = dev.subgroup_size
        plan = dataclasses.replace(plan, subgroup_width=sg, dialect=Dialect.TINT if dev.dialect == "tint"
                                   else Dialect.NAGA)
        tun = {**tun, "BM": 4 * sg}
    return api.prepare_dims(dims, dtype, device=dev, plan=plan, tunables=tun, nsplit=nsplit, causal=causal,
                            return_lse=True, vector_loads=plan.vector_width == 4,
                            pack_gqa=None if api.rows_packable(dims, out) else False)


def out_tensor(dev, kind: str, shape: tuple, dtype) -> attnc.Tensor | None:
    """An out= tensor the kernel can write: rows padded to an even length for float16 ("padded":
    [B, Hq, S, Dv] rows; "bshd": a [B, S, Hq, Dv'] buffer viewed as [B, Hq, S, Dv]), filled with
    a sentinel so that what the kernel writes outside the view shows."""
    if kind == "none":
        return None
    B, Hq, S, Dv = shape
    pad = Dv + Dv % 2 if dtype == np.float16 else Dv + 1
    full = (B, Hq, S, pad) if kind == "padded" else (B, S, Hq, pad)
    t = attnc.tensor(np.full(full, 7, dtype), dev)
    return (t if kind == "padded" else t.permute(0, 2, 1, 3))[..., :Dv]


def check_o_tensor(o: attnc.Tensor, shape: tuple, dtype) -> None:
    """A GPU o: q's dtype, [B, Hq, S, Dv], last dim contiguous; a float16 o rows at an even stride
    (odd Dv: Dv + 1, the padding element zero and outside the view)."""
    assert isinstance(o, attnc.Tensor) and o.dtype == dtype and o.shape == shape and o.strides[-1] == 1
    if dtype == np.float16:
        assert all(s % 2 == 0 for s in o.strides[:-1]), o.strides


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("strategy", list(CONTRACT_PLANS))
@settings(RUN, max_examples=2)
@given(data=st.data())
def test_o_in_q_dtype_with_its_layout_everywhere(spec, strategy, data, require_adapters) -> None:
    """dtype (f32 / f16) x odd / even Dv x host / GPU inputs x out= (none, padded rows, a
    [B, S, H, D] view) x strategy (forced plans through prepared ops, the heuristic through
    attention()): o's dtype, shape, strides and values against float64 (2e-3 for a float16 o,
    1e-5 for float32), lse float32; the padding of an odd Dv is never in a result; a repeated
    call creates no buffers or bind groups."""
    dev = require_adapters(spec)[0]
    dtype = np.dtype(data.draw(st.sampled_from([np.float16, np.float32]), label="dtype"))
    vec4 = strategy in ("stream_split", "lanes")  # vec4 loads: head dims multiples of 4
    odd = False if vec4 else data.draw(st.booleans(), label="odd Dv")
    Dv = (5 if odd else 8) if not vec4 else 8
    gpu_in = data.draw(st.booleans(), label="GPU inputs")
    out_kind = data.draw(st.sampled_from(["none", "padded", "bshd"]), label="out")
    causal = data.draw(st.booleans(), label="causal")
    S = data.draw(st.sampled_from([1, 3]), label="S")
    dims = dict(B=2, Hq=4, Hkv=2, S=S, T=data.draw(st.integers(1, 40), label="T"), D=8, Dv=Dv)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    q = rng.standard_normal((2, 4, S, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, dims["T"], 8)).astype(dtype)
    v = rng.standard_normal((2, 2, dims["T"], Dv)).astype(dtype)
    shape = (2, 4, S, Dv)
    ref_o, ref_lse = attention_ref(q, k, v, causal=causal, return_lse=True)
    args = [attnc.tensor(x, dev) for x in (q, k, v)] if gpu_in else [q, k, v]
    out = out_tensor(dev, out_kind, shape, dtype)
    if strategy == "heuristic":
        family = data.draw(st.sampled_from(["portable", "subgroups"]), label="family")

        def call():
            return attnc.attention(*args, causal=causal, return_lse=True, target=family, out=out)
    else:
        op = contract_op(dev, strategy, dims, dtype, causal, out)
        assert op.plan.strategy.value == strategy.split("_")[0] and op.o_dtype == dtype

        def call():
            return op(*args, out=out)
    o, lse = call()
    if out is not None:
        assert o is out
    if gpu_in or out is not None:
        check_o_tensor(o, shape, dtype)
        assert isinstance(lse, attnc.Tensor) and lse.dtype == np.float32 and lse.shape == shape[:3]
        if out is None and dtype == np.float16:  # its own buffer: rows of Dv + Dv % 2 halves
            row = Dv + Dv % 2
            assert o.strides == (4 * S * row, S * row, row, 1) and o.buffer.size == 2 * 2 * 4 * S * row
            raw = np.frombuffer(dev.gpu.queue.read_buffer(o.buffer), np.float16).reshape(2, 4, S, row)
            assert np.all(raw[..., Dv:] == 0)
        o_host, lse_host = o.numpy(), lse.numpy()
    else:
        assert isinstance(o, np.ndarray) and o.flags.c_contiguous
        o_host, lse_host = o, lse
    assert o_host.dtype == dtype and o_host.shape == shape and lse_host.dtype == np.float32
    assert_close(o_host, ref_o, CONTRACT_TOL[dtype], "o")
    assert_close(lse_host, ref_lse, CONTRACT_TOL[dtype], "lse")
    if out is not None:  # outside the view: the sentinel, but the padding element of a float16 row (0)
        whole = attnc.as_tensor(out.buffer, (out.buffer.size // dtype.itemsize,), dtype).numpy()
        inside = np.zeros(whole.shape, bool)
        idx = np.indices(shape).reshape(4, -1)
        flat = (idx * np.array(out.strides)[:, None]).sum(0) + out.offset // dtype.itemsize
        inside[flat] = True
        pad = np.zeros(whole.shape, bool)
        if dtype == np.float16 and Dv % 2:
            pad[flat.reshape(shape)[..., -1] + 1] = True
        assert np.all(whole[pad] == 0) and np.all(whole[~inside & ~pad] == 7)
    before = dev.counters.snapshot()
    again = call()
    made = dev.counters.since(before)
    if gpu_in and out is None and strategy == "heuristic":  # attention() allocates a new GPU output per call
        assert made["buffers_created"] == 2, made
    else:
        assert made["buffers_created"] == made["bind_groups_created"] == made["pipelines_compiled"] == 0, made
    assert_close(again[0].numpy() if isinstance(again[0], attnc.Tensor) else again[0], ref_o, CONTRACT_TOL[dtype])


@pytest.mark.gpu
def test_out_layouts_the_kernel_cannot_write_are_refused(require_adapters) -> None:
    """A float32 out= with float16 inputs, a float16 one with a strided last dim or odd row
    strides: ValueErrors naming out, from prepared ops, attention() and KVCache.attend alike,
    before anything runs; a float16 out= with odd strides on size-1 dims only is fine."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float16)
    k = rng.standard_normal((1, 1, 9, 8)).astype(np.float16)
    v = rng.standard_normal((1, 1, 9, 5)).astype(np.float16)
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    op = attnc.prepare(qt, kt, vt)
    cache = attnc.KVCache(1, 1, 16, 8, 5, dtype=np.float16, device=dev)
    cache.append(k, v)
    bad = {
        "float32": (attnc.zeros((1, 2, 3, 5), np.float32, dev), r"^out: dtype float32; this op writes o in float16"),
        "dense odd rows": (attnc.zeros((1, 2, 3, 5), np.float16, dev), r"^out: strides \(30, 15, 5, 1\).*even"),
        "strided last dim": (attnc.zeros((1, 2, 3, 10), np.float16, dev)[..., ::2],
                             r"^out: strides \(60, 30, 10, 2\).*contiguous"),
    }
    for what, (out, msg) in bad.items():
        before = dev.counters.snapshot()
        for run in (lambda o: op(qt, kt, vt, out=o), lambda o: attnc.attention(qt, kt, vt, out=o),
                    lambda o: attnc.attention(q, k, v, out=o), lambda o: cache.attend(qt, out=o)):
            with pytest.raises(ValueError, match=msg):
                run(out)
        assert dev.counters.since(before)["submits"] == 0, what
    ok = attnc.zeros((1, 2, 3, 6), np.float16, dev)[:, :1, :1, :5]  # [1, 1, 1, 5]: odd strides of size-1 dims
    one = attnc.attention(qt[:, :1, :1], kt, vt, out=ok)
    assert one is ok
    assert_close(ok.numpy(), attention_ref(q[:, :1, :1], k, v), 2e-3)


@pytest.mark.gpu
def test_a_float16_kv_cache_gives_a_float16_o_without_allocating(require_adapters) -> None:
    """KVCache.attend on a float16 cache with an odd Dv: a float16 o (the op's own: rows Dv + 1
    apart; or out=), within 2e-3 of float64; a decode step with out= creates no buffers."""
    dev = require_adapters("dawn:vulkan")[0]
    rng = np.random.default_rng(4)
    B, Hkv, Hq, D, Dv = 2, 2, 4, 13, 7
    cache = attnc.KVCache(B, Hkv, 32, D, Dv, dtype=np.float16, device=dev)
    cache.append(rng.standard_normal((B, Hkv, 6, D)).astype(np.float16),
                 rng.standard_normal((B, Hkv, 6, Dv)).astype(np.float16), counts=[6, 4])
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float16)
    qt = attnc.tensor(q, dev)
    o = cache.attend(qt, causal=True)
    check_o_tensor(o, (B, Hq, 1, Dv), np.float16)
    assert o.strides == (Hq * (Dv + 1), Dv + 1, Dv + 1, 1)
    ref = attention_ref(q, cache.k.numpy(), cache.v.numpy(), kv_lens=cache.lengths, causal=True)
    assert_close(o.numpy(), ref, 2e-3)
    host = cache.attend(q, causal=True)
    assert host.dtype == np.float16 and host.shape == (B, Hq, 1, Dv)
    assert_close(host, ref, 2e-3)
    out = attnc.zeros((B, Hq, 1, Dv + 1), np.float16, dev)[..., :Dv]
    for _ in range(2):
        cache.append(rng.standard_normal((B, Hkv, 1, D)).astype(np.float16),
                     rng.standard_normal((B, Hkv, 1, Dv)).astype(np.float16))
        qt.write(q)
        cache.attend(qt, causal=True, out=out)
    before = dev.counters.snapshot()
    cache.append(rng.standard_normal((B, Hkv, 1, D)).astype(np.float16),
                 rng.standard_normal((B, Hkv, 1, Dv)).astype(np.float16))
    assert cache.attend(qt, causal=True, out=out) is out
    made = dev.counters.since(before)
    assert made["buffers_created"] == made["bind_groups_created"] == made["pipelines_compiled"] == 0, made
    ref = attention_ref(q, cache.k.numpy(), cache.v.numpy(), kv_lens=cache.lengths, causal=True)
    assert_close(out.numpy(), ref, 2e-3)
