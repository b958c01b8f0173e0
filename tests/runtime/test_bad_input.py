"""attention() inputs beyond tests/runtime/test_attention_options.py's BAD_INPUTS table (ranks,
dims, Hq % Hkv, float64/int dtypes, empty arrays, kv_lens range/shape/dtype, bias broadcast,
negative window, softcap 0, unknown target, subgroups on OpenGL are covered there):

* strided inputs must WORK (attnc copies them): transposed BSHD views, negative strides,
  broadcast (0-stride) views, Fortran order;
* more bad values: each a ValueError/DeviceError naming the argument, never a raw WebGPU
  error or a Python error from deep inside; the ones attnc gets wrong today are
  xfail(strict) with the fix location in the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnc
from attnc.errors import AttncError, DeviceError
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu


def qkv(B=1, Hq=2, Hkv=1, S=3, T=5, D=8, Dv=8, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, Dv)).astype(dtype))


# --------------------------------------------------------------------------- strided inputs work
def _views(q, k, v):
    bshd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (q, k, v)]
    return {
        "bshd_views": bshd,
        "negative_strides": [np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1] for x in (q, k, v)],
        "fortran_order": [np.asfortranarray(x) for x in (q, k, v)],
        "every_other_head_dim": [np.repeat(x, 2, axis=3)[..., ::2] for x in (q, k, v)],
    }


@pytest.mark.parametrize("kind", ["bshd_views", "negative_strides", "fortran_order",
                                  "every_other_head_dim"])
def test_non_contiguous_inputs_give_the_right_answer(require_adapters, kind) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(B=2, Hq=4, Hkv=2, S=5, T=9, D=16, Dv=8, seed=1)
    qs, ks, vs = _views(q, k, v)[kind]
    assert not all(x.flags.c_contiguous for x in (qs, ks, vs))
    np.testing.assert_array_equal(qs, q)
    bias = np.random.default_rng(2).standard_normal((9, 5)).astype(np.float32).T  # [S, T] view
    lens = np.array([9, 4, 7, 1], np.int32)[::2]  # strided kv_lens
    o = attnc.attention(qs, ks, vs, causal=True, bias=bias, kv_lens=lens, device=dev)
    assert_close(o, attention_ref(q, k, v, causal=True, bias=bias, kv_lens=lens), 1e-5)


def test_broadcast_zero_stride_query_heads(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(Hq=4, Hkv=4, S=4, T=6)
    qb = np.broadcast_to(q[:, :1], q.shape)  # every head the same query, stride 0
    o = attnc.attention(qb, k, v, device=dev)
    assert_close(o, attention_ref(np.array(qb), k, v), 1e-5)


# --------------------------------------------------------------------------- more bad values
FAR_PAST_F32 = 1e300
BIG_TABLE = np.array([0.0, np.inf, 1e39, np.nan, -np.inf])  # float64: inf and NaN are meant, 1e39 is not
BIG_GRID = np.array([[0.0] * 5, [0.0, 1.0, 2.0, -5e40, 3.0]])
BAD = {
    "q_not_array_scalar": (dict(q=np.float32(1.0)), ValueError, r"\bq\b"),
    "q_big_endian": (dict(q=qkv()[0].astype(">f4")), ValueError, r"\bq\b.*dtype"),
    "q_zero_heads": (dict(q=np.zeros((1, 0, 3, 8), np.float32)), ValueError, r"\bq\b.*empty"),
    "kv_zero_heads": (dict(k=np.zeros((1, 0, 5, 8), np.float32), v=np.zeros((1, 0, 5, 8), np.float32)),
                      ValueError, r"\bk\b.*empty"),
    "v_head_count": (dict(v=np.zeros((1, 2, 5, 8), np.float32)), ValueError, r"\bv\b.*\(1, 2, 5, 8\)"),
    "kv_lens_bool": (dict(kv_lens=np.array([True])), ValueError, "kv_lens.*bool"),
    "kv_lens_uint64_huge": (dict(kv_lens=np.array([2**40], np.uint64)), ValueError, r"kv_lens.*T=5"),
    "kv_lens_list": (dict(kv_lens=[3]), ValueError, "kv_lens"),
    "kv_lens_2d": (dict(kv_lens=np.array([[3]], np.int32)), ValueError, "kv_lens.*got 2"),
    "bias_python_scalar": (dict(bias=1.0), ValueError, "bias"),
    "bias_more_dims": (dict(bias=np.zeros((1, 1, 1, 3, 5), np.float32)), ValueError, r"bias.*\(1, 2, 3, 5\)"),
    "bias_wrong_T": (dict(bias=np.zeros((3, 4), np.float32)), ValueError, r"bias.*\(3, 4\).*\(1, 2, 3, 5\)"),
    "alibi_list": (dict(alibi_slopes=[0.1, 0.2]), ValueError, "alibi_slopes"),
    "alibi_per_kv_head": (dict(alibi_slopes=np.zeros(1, np.float32)), ValueError, r"alibi_slopes.*\(2,\)"),
    "sinks_2d": (dict(sinks=np.zeros((1, 2), np.float32)), ValueError, "sinks"),
    "window_bool": (dict(window=(True, None)), ValueError, "window left"),
    "window_float": (dict(window=(None, 1.5)), ValueError, "window right"),
    "window_list": (dict(window=[1, 2]), ValueError, "window"),
    "window_triple": (dict(window=(1, 2, 3)), ValueError, "window"),
    "softcap_negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "softcap_nan": (dict(softcap=float("nan")), ValueError, "softcap"),
    "softcap_bool": (dict(softcap=True), ValueError, "softcap"),
    # numbers past float32, in which the kernel computes (1e39 was struct's OverflowError)
    "scale_past_f32": (dict(scale=1e39), ValueError, "scale.*float32"),
    "scale_negative_past_f32": (dict(scale=-1e300), ValueError, "scale.*float32"),
    "softcap_past_f32": (dict(softcap=1e39), ValueError, "softcap.*float32"),
    "score_mod_captures_past_f32": (dict(score_mod=lambda s, b, h, i, j: s * FAR_PAST_F32), ValueError,
                                    "FAR_PAST_F32.*1e\\+300.*float32"),
    "scalar_input_past_f32": (dict(score_mod=lambda s, b, h, i, j: s * attnc.scalar("gain"), inputs={"gain": -1e39}),
                              ValueError, "gain.*float32"),
    # tables past float32 (float64) or float16 (a declared f16 input): they became inf silently
    # (numpy's overflow warning only), where a captured number of 1e39 is a ValueError
    "score_mod_captures_table_past_f32": (dict(score_mod=lambda s, b, h, i, j: s + BIG_TABLE[j] * 1e-38), ValueError,
                                          r"captures as 'BIG_TABLE': 1e\+39 at index \[2\] is outside float32's range"),
    "mask_mod_captures_2d_table_past_f32": (dict(mask_mod=lambda b, h, i, j: BIG_GRID[h, j] > 0), ValueError,
                                            r"'BIG_GRID': -5e\+40 at index \[1, 3\] is outside float32's range"),
    "f16_input_past_f16": (dict(score_mod=lambda s, b, h, i, j: s + attnc.input("rel", attnc.f16["T"])[j],
                                inputs={"rel": np.array([0, 1, 65504, 7e4, -np.inf], np.float32)}), ValueError,
                           r"rel.*70000\.0 at index \[3\] is outside float16's range"),
    # flags are bools: a string from a config file ("False") would read as True
    "causal_string": (dict(causal="False"), ValueError, "causal must be True or False.*str"),
    "causal_none": (dict(causal=None), ValueError, "causal must be True or False"),
    "return_lse_string": (dict(return_lse="no"), ValueError, "return_lse must be True or False"),
    "target_case": (dict(target="Portable"), ValueError, "target.*portable.*subgroups"),
    "target_int": (dict(target=1), ValueError, "target"),
    "device_int": (dict(device=3), DeviceError, "device"),
    "device_unknown_backend": (dict(device="metal"), DeviceError, r"'metal'.*backend"),
    "device_unknown_api": (dict(device="wgpu:d3d12"), DeviceError, "wgpu:d3d12"),
}


def _call(overrides: dict):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    kw = {"device": "wgpu:vulkan"}
    for name, val in overrides.items():
        if name in args:
            args[name] = val
        else:
            kw[name] = val
    return attnc.attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_raise_errors_naming_the_argument(require_adapters, case) -> None:
    require_adapters("wgpu:vulkan")
    overrides, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        _call(overrides)


def test_tables_keep_their_infinities_and_nans_and_values_within_range(require_adapters) -> None:
    """What the range check above leaves alone: inf, -inf and NaN of a float64 table (a -inf
    masks its key) and finite values up to float32's largest; a float32 table past float16 for an
    f16 input is refused only where a value rounds to inf (65519 rounds to 65504)."""
    from attnc.runtime.params import host_param

    t = np.array([-np.inf, 0.5, 3.4028234e38, np.inf, np.nan, -3.4e38])
    arr, _ = host_param(t, attnc.f32.dtype, (6,), "t")
    assert arr.dtype == np.float32 and np.array_equal(arr, t.astype(np.float32), equal_nan=True)
    arr, _ = host_param(np.array([65519.0, -65519.0, np.inf, np.nan]), attnc.f16.dtype, (4,), "h")
    assert np.array_equal(arr, np.array([65504, -65504, np.inf, np.nan], np.float16), equal_nan=True)
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv()
    table = np.array([-np.inf, 0.0, 1.0, -np.inf, 2.0])
    o = attnc.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[j], device=dev)
    assert_close(o, attention_ref(q, k, v, bias=np.broadcast_to(table, (3, 5))), 1e-5)


def test_unknown_device_lists_the_available_ones(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(DeviceError) as e:
        attnc.attention(*qkv(), device="webgl")
    assert "available: wgpu:vulkan" in e.value.render()


def test_subgroups_on_opengl_names_the_feature_and_the_alternative(require_adapters) -> None:
    gl = require_adapters("wgpu:opengl")[0]
    with pytest.raises(DeviceError) as e:
        attnc.attention(*qkv(), device=gl, target="subgroups")
    text = e.value.render()
    assert "'subgroups' feature" in text and "target='portable'" in text and "OpenGL" in text


# --------------------------------------------------------------------------- found: bugs
def test_softcap_inf_is_rejected_or_means_no_cap(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    q, k, v = qkv()
    try:
        o = attnc.attention(q, k, v, softcap=float("inf"), device="wgpu:vulkan")
    except ValueError as e:
        assert "softcap" in str(e)
        return
    assert_close(o, attention_ref(q, k, v), 1e-5)


def test_complex_bias_is_rejected(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(ValueError, match="bias"):
        _call(dict(bias=np.full((3, 5), 1j, np.complex64)))


def test_non_numeric_scale_names_the_argument(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(ValueError, match="scale"):
        _call(dict(scale="a"))


def test_non_numeric_sinks_names_the_argument(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(ValueError, match="sinks"):
        _call(dict(sinks=np.array(["a", "b"])))


def test_non_callable_score_mod_names_the_argument(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(ValueError, match="score_mod"):
        _call(dict(score_mod=3))


def test_mask_mod_returning_none_is_an_error(require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    with pytest.raises(AttncError, match="mask_mod"):
        _call(dict(mask_mod=lambda b, h, i, j: None))


# --------------------------------------------------------------------------- numbers of any numpy type
NUMPY_NUMBERS = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint16]


@pytest.mark.parametrize("kind", NUMPY_NUMBERS, ids=lambda t: t.__name__)
def test_numbers_of_every_numpy_type_work_without_warnings(require_adapters, kind) -> None:
    """scale, softcap, window sides (integer types) and a mod's captured number as numpy scalars
    of any type are the numbers they hold, with warnings as errors (np.float32(0.5) as scale warned of an
    overflow: the float32 range check compared it to a float64 past float32's range)."""
    import warnings

    (dev,) = require_adapters("wgpu:vulkan")
    q, k, v = qkv(S=4, T=9)
    two = kind(2)
    sides = (kind(3), kind(1)) if np.issubdtype(kind, np.integer) else (3, 1)  # window sides are ints
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = attnc.attention(q, k, v, device=dev, scale=kind(2), softcap=kind(4), window=sides,
                              score_mod=lambda s, b, h, qi, kj: s + two * kj)
    ref = attention_ref(q, k, v, scale=2.0, softcap=4.0, window=(3, 1),
                        score_mod=lambda s, b, h, qi, kj: s + 2.0 * kj)
    assert_close(got, ref, 1e-5)


def test_host_tensors_numpy_cannot_read_are_errors_naming_them(require_adapters) -> None:
    """A bfloat16 torch tensor as bias, sinks or captured by a mod: an error naming the argument
    or the capture and its dtype at the user's line (torch's own TypeError from attnc's size
    count, and an IndexError from indexing the uncaptured tensor with a traced value)."""
    import torch

    (dev,) = require_adapters("wgpu:vulkan")
    q, k, v = qkv(S=3, T=5)
    half = torch.ones(5, dtype=torch.bfloat16)
    for name, value in (("bias", half), ("sinks", torch.ones(2, dtype=torch.bfloat16))):
        with pytest.raises(ValueError, match=f"^{name}: numpy cannot read this Tensor"):
            attnc.attention(q, k, v, device=dev, **{name: value})
    with pytest.raises(AttncError, match=r"captured array 'half' has dtype torch.bfloat16 \(numpy cannot read it\)"
                       ) as exc:
        attnc.attention(q, k, v, device=dev, score_mod=lambda s, b, h, qi, kj: s + half[kj])
    assert exc.value.span is not None and exc.value.span.file == __file__
