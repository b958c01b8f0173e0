"""Every option of attnc.attention()'s contract against the textbook reference, f32 and f16,
on every adapter x variant family; plus input validation.

Each distinct option set is a new kernel (a pipeline per adapter per family, seconds to
compile on these CPU adapters), so options are grouped: one option set per test function,
its values (window sizes, kv_lens, bias shapes, slopes, caps, sinks, scale) drawn per example
as runtime values. Shapes stay in one variant per group: prefill S >= 17 (no split-KV), Dv in
the 64 bucket; decode and split-KV get their own groups.

f16 inputs are float16 storage with f32 math: the reference runs in float64 on the same
float16 values, tolerance 2e-3 (float32: 1e-5), both as Frobenius relative error.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.errors import DeviceError
from tests.targets import targets
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

TOL = {np.float32: 1e-5, np.float16: 2e-3}
TARGET_PARAMS = targets()
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float16, id="f16")]
# most single options run in f32; f16 storage is covered by the combined-options (every
# built-in option at once), split-KV, bias/scale, score_mod, large-logit, fully-masked and
# NaN tests, which use the same f16 loaders (CI time)
F32_ONLY = DTYPES[:1]
RUN = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])


def qkv(rng, B, Hq, Hkv, S, T, D, Dv, dtype):
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, Dv)).astype(dtype))


def compare(target, dtype, q, k, v, opts: dict, ref_mods: dict | None = None):
    """attention() vs attention_ref() on the same values; returns (o, lse) from the device."""
    dev, family = target
    lse_on = bool(opts.get("return_lse"))
    out = attnc.attention(q, k, v, device=dev, target=family, **opts)
    o, lse = out if lse_on else (out, None)
    assert o.dtype == dtype and o.shape == q.shape[:3] + v.shape[3:]
    ref_opts = {n: x for n, x in opts.items() if n not in ("score_mod", "mask_mod")}
    ref = attention_ref(q, k, v, **ref_opts, **(ref_mods or {}))
    o_ref, lse_ref = ref if lse_on else (ref, None)
    assert_close(o, o_ref, TOL[dtype], "o")
    if lse_on:
        assert lse.dtype == np.float32 and lse.shape == q.shape[:3]
        assert_close(lse, lse_ref, TOL[dtype], "lse")
    return o, lse


@st.composite
def prefill(draw):
    """Prefill shapes of one variant: S 17..70 (no split-KV), T 1..150, Dv in the 64 bucket."""
    Hkv = draw(st.integers(1, 2))
    return dict(B=draw(st.integers(1, 2)), Hq=Hkv * draw(st.integers(1, 3)), Hkv=Hkv,
                S=draw(st.sampled_from([17, 33, 63]) | st.integers(17, 70)), T=draw(st.integers(1, 150)),
                D=draw(st.sampled_from([32, 48, 64, 80])), Dv=draw(st.sampled_from([40, 64])))


def kv_lens_for(draw, B, T):
    """Per-batch lengths, often exactly 0 or T."""
    return np.array([draw(st.sampled_from([0, T]) | st.integers(0, T)) for _ in range(B)], dtype=np.int32)


SIDE = st.integers(0, 40)
SCALES = st.sampled_from([None, 0.05, 0.3, 1.0])
BIAS_SHAPES = ("T", "ST", "1H1T", "B1S1", "full")


def bias_of(rng, kind, B, Hq, S, T):
    shape = {"T": (T,), "ST": (S, T), "1H1T": (1, Hq, 1, T), "B1S1": (B, 1, S, 1),
             "full": (B, Hq, S, T)}[kind]
    return rng.standard_normal(shape).astype(np.float32)


def _seed(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


# --------------------------------------------------------------------------- option groups
@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", F32_ONLY)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_window_both_sides(target, dtype, data) -> None:
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    window = (data.draw(SIDE), data.draw(SIDE))
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype), dict(window=window, return_lse=True))


# window sides from 0 to far past i32: a side past every distance between a query and a key
# bounds nothing (2^31 - 1 wrapped the kernel's `qpos + right` to all-masked rows)
EDGE_SIDES = (0, 3, 2**30 - 1, 2**30, 2**31 - 1, 2**32, 2**62)


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
def test_window_sides_up_to_and_past_the_integer_range(target) -> None:
    """Every pair of sides from EDGE_SIDES, queries fewer and more than the keys (rows before
    the first key), prefill and decode."""
    rng = np.random.default_rng(11)
    for S, T in ((20, 45), (45, 20), (1, 45)):
        q, k, v = qkv(rng, B=1, Hq=2, Hkv=1, S=S, T=T, D=32, Dv=40, dtype=np.float32)
        for window in itertools.product(EDGE_SIDES, EDGE_SIDES):
            compare(target, np.float32, q, k, v, dict(window=window, return_lse=True))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", F32_ONLY)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_sliding_window_left_causal_with_sinks(target, dtype, data) -> None:
    """window=(left, None) + causal (the usual sliding window) + sinks, with lse."""
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    sinks = rng.uniform(-3, 3, sh["Hq"]).astype(np.float32)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            dict(window=(data.draw(SIDE), None), causal=True, sinks=sinks, return_lse=True))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", F32_ONLY)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_window_right_only_with_kv_lens(target, dtype, data) -> None:
    """window=(None, right) + kv_lens (0 and T included: queries align to each batch's length)."""
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    lens = kv_lens_for(data.draw, sh["B"], sh["T"])
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            dict(window=(None, data.draw(SIDE)), kv_lens=lens, return_lse=True))


@pytest.mark.sanitize
@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(RUN, max_examples=6)
@given(data=st.data())
def test_bias_broadcast_and_scale(target, dtype, data) -> None:
    """bias of shape [T], [S,T], [1,Hq,1,T], [B,1,S,1] or full; scale drawn (None = 1/sqrt(D))."""
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    bias = bias_of(rng, data.draw(st.sampled_from(BIAS_SHAPES)), sh["B"], sh["Hq"], sh["S"], sh["T"])
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype), dict(bias=bias, scale=data.draw(SCALES)))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", F32_ONLY)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_alibi_causal(target, dtype, data) -> None:
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    slopes = (2.0 ** -np.arange(1, sh["Hq"] + 1) * data.draw(st.sampled_from([1.0, -0.5, 4.0]))).astype(np.float32)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype), dict(alibi_slopes=slopes, causal=True))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", F32_ONLY)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_softcap(target, dtype, data) -> None:
    """softcap with scale drawn large enough that tanh saturates on some scores."""
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            dict(softcap=data.draw(st.sampled_from([1.0, 5.0, 30.0])), scale=data.draw(SCALES)))


def relpos_dsl(s, b, h, q_idx, kv_idx):
    return s - 0.1 * attnc.f32(abs(q_idx - kv_idx))


def relpos_np(s, b, h, i, j):
    return s - 0.1 * np.abs(i - j)


def stripes_dsl(b, h, q_idx, kv_idx):
    return (kv_idx % 3 != 1) | (h == 0)


def stripes_np(b, h, i, j):
    return (j % 3 != 1) | (h == 0)


@pytest.mark.sanitize
@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_score_mod_and_mask_mod(target, dtype, data) -> None:
    """User mods (FlexAttention style) combined with causal; q_idx is the RAW query row index."""
    sh = data.draw(prefill())
    rng = _seed(data.draw)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            dict(score_mod=relpos_dsl, mask_mod=stripes_dsl, causal=True, return_lse=True),
            dict(score_mod=relpos_np, mask_mod=stripes_np))


def raw_causal_dsl(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
def test_mask_mod_sees_raw_query_index(target) -> None:
    """Documents that mask_mod's q_idx is the row index i, not i_abs = i + T - S: with T > S,
    `kv <= q` is causality aligned to the START of the keys, unlike causal=True."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 2, 1, 20, 50, 32, 64, np.float32)
    dev, family = target
    o = attnc.attention(q, k, v, mask_mod=raw_causal_dsl, device=dev, target=family)
    start = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: j <= i)
    assert_close(o, start, 1e-5)
    end = attention_ref(q, k, v, causal=True)
    assert np.linalg.norm(o - end) > 0.1 * np.linalg.norm(end)


COMBINED = st.sampled_from([1, 2, 5, 8]) | st.integers(1, 8) | st.integers(17, 70)


def combined_opts(draw, rng, B, Hq, S, T):
    """window + kv_lens + sinks + lse + alibi + softcap + bias + causal, values drawn."""
    return dict(
        causal=True, window=(draw(SIDE), draw(st.none() | SIDE)), kv_lens=kv_lens_for(draw, B, T),
        sinks=rng.uniform(-3, 3, Hq).astype(np.float32),
        alibi_slopes=(2.0 ** -np.arange(1, Hq + 1)).astype(np.float32),
        softcap=draw(st.sampled_from([5.0, 30.0])),
        bias=bias_of(rng, draw(st.sampled_from(BIAS_SHAPES)), B, Hq, S, T), return_lse=True)


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(RUN, max_examples=6)
@given(data=st.data())
def test_combined_options_gqa(target, dtype, data) -> None:
    """Everything at once with GQA (ratio 2-4), decode (S <= 8) and prefill (S >= 17) shapes."""
    Hkv = data.draw(st.integers(1, 2))
    sh = dict(B=data.draw(st.integers(1, 2)), Hq=Hkv * data.draw(st.integers(2, 4)), Hkv=Hkv,
              S=data.draw(COMBINED), T=data.draw(st.integers(1, 150)), D=64, Dv=data.draw(st.sampled_from([48, 64])))
    rng = _seed(data.draw)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            combined_opts(data.draw, rng, sh["B"], sh["Hq"], sh["S"], sh["T"]))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_split_kv_decode_with_options(target, dtype, data) -> None:
    """Decode S <= 8 against T >= 1000 runs split-KV plus the combine step; all options on."""
    Hkv = data.draw(st.integers(1, 2))
    sh = dict(B=data.draw(st.integers(1, 2)), Hq=Hkv * data.draw(st.integers(1, 4)), Hkv=Hkv,
              S=data.draw(st.integers(1, 8)), T=data.draw(st.integers(1000, 2100)), D=64, Dv=64)
    rng = _seed(data.draw)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype),
            combined_opts(data.draw, rng, sh["B"], sh["Hq"], sh["S"], sh["T"]))


SPLIT_CASES = {
    # Whisper decoder cross-attention: 4 queries (beam) over 1500 encoder frames, 6 heads of 64
    "whisper_S4_T1500": dict(B=1, Hq=6, Hkv=6, S=4, T=1500, D=64, Dv=64),
    "S1_T2048_gqa4": dict(B=2, Hq=8, Hkv=2, S=1, T=2048, D=64, Dv=64),
}


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_kv_decode_cases(target, dtype, case) -> None:
    sh = SPLIT_CASES[case]
    rng = np.random.default_rng(7)
    B, Hq, S, T = sh["B"], sh["Hq"], sh["S"], sh["T"]
    opts = dict(causal=True, window=(900, None), kv_lens=np.array([T, T - 333][:B], np.int32),
                sinks=np.linspace(-1, 1, Hq).astype(np.float32),
                alibi_slopes=(2.0 ** -np.arange(1, Hq + 1)).astype(np.float32), softcap=30.0,
                bias=bias_of(rng, "T", B, Hq, S, T), return_lse=True)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype), opts)


# --------------------------------------------------------------------------- masked rows, NaN, range
@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(target, dtype) -> None:
    """kv_lens = 0, or a window that excludes every key: o = 0, lse = -inf, never NaN."""
    rng = np.random.default_rng(11)
    B, Hq, S, T = 2, 2, 30, 20
    q, k, v = qkv(rng, B, Hq, 1, S, T, 64, 64, dtype)
    # kv_lens: batch 0 sees nothing; window right side: i_abs = i + 20 - 30, rows with i_abs < -5
    # (i < 5) have no key in (-inf, i_abs + 5]
    o, lse = compare(target, dtype, q, k, v,
                     dict(window=(None, 5), kv_lens=np.array([0, T], np.int32), return_lse=True))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert np.all(o[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(o[1, :, :5] == 0) and np.all(np.isneginf(lse[1, :, :5]))
    assert np.all(np.isfinite(lse[1, :, 5:]))
    # both sides: [i_abs - 2, i_abs + 3], i_abs = i - 10 -> rows i < 7 see nothing
    o, lse = compare(target, dtype, q, k, v, dict(window=(2, 3), return_lse=True))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert np.all(o[:, :, :7] == 0) and np.all(np.isneginf(lse[:, :, :7]))


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [3, 37])
def test_large_logits(target, dtype, S) -> None:
    """|s| ~ 1e4: integer q, k with scale 1 make every score exact in f32 (and in f16 storage),
    so only the softmax's max-subtraction is tested: f32 stays accurate, f16 does not overflow."""
    rng = np.random.default_rng(5)
    B, Hq, T, D = 1, 2, 77, 64
    q = rng.integers(-25, 26, (B, Hq, S, D)).astype(dtype)
    k = rng.integers(-25, 26, (B, 1, T, D)).astype(dtype)
    v = rng.standard_normal((B, 1, T, D)).astype(dtype)
    ref = attention_ref(q, k, v, scale=1.0)
    s = np.einsum("bhid,bjd->bhij", q.astype(np.float64), k[:, 0].astype(np.float64))
    assert np.abs(s).max() > 5e3
    o = compare(target, dtype, q, k, v, dict(scale=1.0))[0]
    assert np.isfinite(o).all() and np.isfinite(ref).all()


@pytest.mark.parametrize("target", TARGET_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [3, 37])
def test_nan_in_one_query_row_propagates_to_that_row(target, dtype, S) -> None:
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 1, 2, 1, S, 50, 64, 64, dtype)
    q[0, 1, S // 2, 7] = np.nan
    dev, family = target
    o = attnc.attention(q, k, v, device=dev, target=family)
    bad = np.zeros(o.shape[:3], bool)
    bad[0, 1, S // 2] = True
    assert np.isnan(o[bad]).all(), "the NaN row must be NaN in every output element"
    assert not np.isnan(o[~bad]).any(), "NaN leaked into other rows"
    assert_close(o, attention_ref(q, k, v), TOL[dtype])


# --------------------------------------------------------------------------- input validation
def _arrays(B=1, Hq=2, Hkv=1, S=3, T=5, D=8, Dv=8, dtype=np.float32):
    return qkv(np.random.default_rng(0), B, Hq, Hkv, S, T, D, Dv, dtype)


BAD_INPUTS = {
    "q_rank3": (lambda q, k, v: (q[0], k, v), {}, r"\bq\b"),
    "k_rank5": (lambda q, k, v: (q, k[None], v), {}, r"\bk\b"),
    "v_list": (lambda q, k, v: (q, k, v.tolist()), {}, r"\bv\b"),
    "head_dim_mismatch": (lambda q, k, v: (q, k[..., :4], v), {}, r"\bD\b"),
    "batch_mismatch": (lambda q, k, v: (q, np.concatenate([k, k]), np.concatenate([v, v])), {}, "batch"),
    "v_T_mismatch": (lambda q, k, v: (q, k, v[:, :, :4]), {}, r"\bv\b"),
    "gqa_not_multiple": (lambda q, k, v: (np.concatenate([q, q[:, :1]], 1), np.concatenate([k, k], 1),
                                          np.concatenate([v, v], 1)), {}, "Hq"),
    "float64": (lambda q, k, v: (q.astype(np.float64), k, v), {}, "dtype"),
    "int32": (lambda q, k, v: (q, k.astype(np.int32), v), {}, "dtype"),
    "mixed_f16_f32": (lambda q, k, v: (q, k, v.astype(np.float16)), {}, "dtype"),
    "empty_q": (lambda q, k, v: (q[:, :, :0], k, v), {}, r"\bq\b.*empty|empty.*\bq\b"),
    "empty_kv": (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}, "empty"),
    "kv_lens_above_T": (None, dict(kv_lens=np.array([6], np.int32)), "kv_lens"),
    "kv_lens_negative": (None, dict(kv_lens=np.array([-1], np.int32)), "kv_lens"),
    "kv_lens_shape": (None, dict(kv_lens=np.array([1, 2], np.int32)), "kv_lens"),
    "kv_lens_float": (None, dict(kv_lens=np.array([2.0])), "kv_lens"),
    "bias_not_broadcastable": (None, dict(bias=np.zeros((3, 4), np.float32)), "bias"),
    "bias_rank5": (None, dict(bias=np.zeros((1, 1, 2, 3, 5), np.float32)), "bias"),
    "alibi_shape": (None, dict(alibi_slopes=np.zeros(3, np.float32)), "alibi_slopes"),
    "sinks_shape": (None, dict(sinks=np.zeros((2, 1), np.float32)), "sinks"),
    "window_negative": (None, dict(window=(-1, 2)), "window"),
    "window_not_pair": (None, dict(window=3), "window"),
    "softcap_zero": (None, dict(softcap=0.0), "softcap"),
    "bad_target": (None, dict(target="tensorcores"), "target"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_invalid_inputs_raise_value_error_naming_the_argument(case: str) -> None:
    change, kwargs, pattern = BAD_INPUTS[case]
    q, k, v = _arrays()
    if change is not None:
        q, k, v = change(q, k, v)
    with pytest.raises(ValueError, match=pattern):
        attnc.attention(q, k, v, **kwargs)


def test_subgroups_target_on_opengl_is_a_device_error(require_adapters) -> None:
    gl = require_adapters("wgpu:opengl")[0]
    with pytest.raises(DeviceError, match="subgroups"):
        attnc.attention(*_arrays(), device=gl, target="subgroups")
