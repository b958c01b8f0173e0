"""The quantized KV formats' numpy reference (attnc/quant.py) against ggml's definitions.

`_ggml_q8_0` and `_ggml_q4_0` transcribe ggml-quants.c's quantize_row_q8_0_ref and
quantize_row_q4_0_ref loop by loop in float32 scalars and return ggml's block bytes
(block_q8_0: f16 d, int8 qs[32]; block_q4_0: f16 d, uint8 qs[16]); attnc's u32 words must
hold the same d and qs bytes, and dequantize to ggml's dequantize_row_*. Where ggml's
reference is undefined (a scale below the normal f32 range makes 1/d overflow) the
transcription takes attnc's rule, a zero scale of the same sign.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnc import quant

F = np.float32


def _roundf(x: np.float32) -> int:
    """C roundf: half away from zero."""
    return int(math.copysign(math.floor(abs(float(x)) + 0.5), float(x)))


def _f16_bytes(d: np.float32) -> bytes:
    return np.array([d], np.float32).astype(np.float16).tobytes()


def _ggml_q8_0(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(F).reshape(-1, 32):
        amax = F(0.0)
        for v in blk:
            amax = max(amax, F(abs(v)))
        d = F(amax / F(127))
        if 0 < abs(d) < quant.FLT_MIN:  # ggml's 1/d overflows (undefined): attnc's zero scale
            d = d * F(0)
        idd = F(F(1.0) / d) if d else F(0.0)
        qs = [_roundf(F(v * idd)) for v in blk]
        out += _f16_bytes(d) + struct.pack("32b", *qs)
    return out


def _ggml_q4_0(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(F).reshape(-1, 32):
        amax, mx = F(0.0), F(0.0)
        for v in blk:
            if amax < F(abs(v)):
                amax, mx = F(abs(v)), v
        d = F(mx / F(-8))
        if 0 < abs(d) < quant.FLT_MIN:  # as above
            d = d * F(0)
        idd = F(F(1.0) / d) if d else F(0.0)
        qs = []
        for j in range(16):
            x0, x1 = F(blk[j] * idd), F(blk[16 + j] * idd)
            xi0 = min(15, int(F(x0 + F(8.5))))  # (int8_t) truncates toward zero
            xi1 = min(15, int(F(x1 + F(8.5))))
            qs.append(xi0 | (xi1 << 4))
        out += _f16_bytes(d) + bytes(qs)
    return out


def _ggml_dequant(fmt: str, blocks: bytes, n: int) -> np.ndarray:
    size = 34 if fmt == "q8_0" else 18
    out = []
    for i in range(n // 32):
        b = blocks[i * size:(i + 1) * size]
        d = float(np.frombuffer(b[:2], np.float16)[0])
        if fmt == "q8_0":
            out += [F(d) * F(q) for q in struct.unpack("32b", b[2:])]
        else:
            lo = [F(d) * F((q & 15) - 8) for q in b[2:]]
            hi = [F(d) * F((q >> 4) - 8) for q in b[2:]]
            out += lo + hi
    return np.array(out, np.float32)


def _as_ggml_blocks(t: quant.QuantTensor) -> bytes:
    """attnc's words rewritten as ggml's packed blocks (d's two bytes, then the qs bytes)."""
    nw = 9 if t.fmt == "q8_0" else 5
    words = t.words.reshape(-1, nw).astype("<u4")
    out = b""
    for w in words:
        assert w[0] >> 16 == 0, "the high half of a block's scale word is zero"
        out += w[:1].tobytes()[:2] + w[1:].tobytes()
    return out


values = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])),
                    elements=st.floats(-1e4, 1e4, width=32))
RUN = settings(max_examples=60, deadline=None)


@RUN
@given(x=values, fmt=st.sampled_from(["q8_0", "q4_0"]))
def test_block_formats_hold_ggml_bytes(x, fmt) -> None:
    t = quant.quantize(x, fmt)
    ref = (_ggml_q8_0 if fmt == "q8_0" else _ggml_q4_0)(x)
    assert _as_ggml_blocks(t) == ref
    np.testing.assert_array_equal(quant.dequantize(t).reshape(-1), _ggml_dequant(fmt, ref, x.size))


@RUN
@given(x=values, fmt=st.sampled_from(quant.FORMATS), exponent=st.sampled_from([0, 0, 0, -20, -36, -38, -40]))
def test_error_within_half_a_step(x, fmt, exponent) -> None:
    """Each value lies within half a quantization step of its dequantized value (q4_0: one step,
    its top code being clamped), the step computed from the data (max |x| / 127, or the largest
    value / 8), plus what rounding the scale to f16 (relative 2^-11, absolute 2^-25 below f16's
    normal range) costs, times the largest code; an int8 row whose f32 scale would lie below the
    normal range dequantizes to zeros (the module's rule). Magnitudes down to f32's subnormals."""
    x = (x.astype(np.float64) * 10.0**exponent).astype(np.float32)
    t = quant.quantize(x, fmt)
    y = quant.dequantize(t)
    _d, q = quant.codes(t)
    xs = np.abs(x.astype(np.float64))
    unit = x.shape[-1] if fmt == "int8" else 32
    amax = np.repeat(xs.reshape(-1, unit).max(axis=1), unit).reshape(x.shape)
    err = np.abs(x.astype(np.float64) - y)
    slack = 1e-6 * xs
    if fmt == "int8":
        flushed = amax / 127 < quant.FLT_MIN
        assert not y[flushed].any()
        assert np.all(err[~flushed] <= (0.5 * amax / 127 + slack)[~flushed])
        assert np.abs(q).max() <= 127
    elif fmt == "q8_0":
        step = amax / 127
        assert np.all(err <= 0.5 * step + 127 * np.maximum(2**-11 * step, 2**-25) + slack)
        assert np.abs(q).max() <= 127
    else:
        step = amax / 8
        assert np.all(err <= step + 8 * np.maximum(2**-11 * step, 2**-25) + slack)
        assert q.min() >= 0 and q.max() <= 15


def test_scales_below_the_normal_range_are_zero() -> None:
    """Blocks or rows of values so small that 1/d would overflow get a zero scale of d's sign."""
    tiny = np.full((1, 32), 1.1754944e-38, np.float32)
    for fmt, zero in (("q8_0", 0x0000), ("q4_0", 0x8000)):
        t = quant.quantize(tiny, fmt)
        assert t.words[0] == zero and not quant.dequantize(t).any()
    t = quant.quantize(tiny, "int8")
    assert t.words[0] == 0 and not t.words[1:].any()


def test_int8_rows_hold_scale_then_bytes() -> None:
    x = np.array([[1.0, -2.0, 0.5, 127.0 / 64, 0, 0, 0, 0.25]], np.float32)
    t = quant.quantize(x, "int8")
    s = np.float32(2.0) / np.float32(127)
    assert t.words.shape == (3,)
    assert t.words[:1].view(np.float32)[0] == s
    qb = t.words[1:].astype("<u4").tobytes()
    want = [_roundf(np.float32(v * (np.float32(1) / s))) for v in x[0]]
    assert list(struct.unpack("8b", qb)) == want
    assert want[1] == -127


def test_zero_blocks_and_layout_sizes() -> None:
    z = np.zeros((2, 64), np.float32)
    for fmt in quant.FORMATS:
        t = quant.quantize(z, fmt)
        assert t.words.size == 2 * quant.words_per_row(fmt, 64)
        np.testing.assert_array_equal(quant.dequantize(t), z)
    assert (quant.words_per_row("q8_0", 128), quant.words_per_row("q4_0", 128), quant.words_per_row("int8", 128)) \
        == (36, 20, 33)


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (3, 0, 0, 32)])
def test_no_rows_quantize_and_dequantize_to_no_rows(fmt, shape) -> None:
    """A count of 0 rows (a finished sequence's ragged append, mirrored on the host) round-trips
    to an empty array of the same shape in every format (q8_0 / q4_0 dequantize raised numpy's
    reshape error)."""
    t = quant.quantize(np.zeros(shape, np.float32), fmt)
    assert t.words.size == 0
    out = quant.dequantize(t)
    assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize(("fmt", "d", "rule"), [("q8_0", 48, "multiple of 32"), ("q4_0", 80, "multiple of 32"),
                                                ("int8", 6, "multiple of 4")])
def test_head_dim_rule(fmt, d, rule) -> None:
    with pytest.raises(ValueError, match=rule):
        quant.quantize(np.zeros((1, d), np.float32), fmt)


def test_bad_words_and_values() -> None:
    with pytest.raises(ValueError, match="expected 9 uint32 words"):
        quant.QuantTensor("q8_0", (1, 32), np.zeros(8, np.uint32))
    with pytest.raises(ValueError, match="unknown KV format 'q5_0'"):
        quant.quantize(np.zeros((1, 32), np.float32), "q5_0")
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize(np.full((1, 32), np.inf, np.float32), "q8_0")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_scales_past_float16_are_refused(fmt) -> None:
    """A block whose f16 scale would round past 65504 (ggml stores an inf: its values read back as
    inf and NaN) is refused naming the limit, either sign; the largest |x| below it stores a scale
    of 65504 and reads back finite; int8's f32 scale has no such limit below inf."""
    limit = np.float32(quant.LARGEST_STORABLE[fmt])
    below = np.nextafter(limit, np.float32(0))
    x = np.zeros((2, 64), np.float32)
    x[1, 40] = below
    t = quant.quantize(x, fmt)
    assert np.abs(quant.codes(t)[0]).max() == 65504.0 and np.isfinite(quant.dequantize(t)).all()
    for sign in (1, -1):
        x[0, 5] = sign * limit
        with pytest.raises(ValueError, match=rf"quantize: a block of 32 values holds \|x\| = {int(limit)}; {fmt} "
                                             r"keeps each block's scale as float16, which overflows"):
            quant.quantize(x, fmt)
    assert np.isfinite(quant.dequantize(quant.quantize(x * np.float32(1e30), "int8"))).all()
