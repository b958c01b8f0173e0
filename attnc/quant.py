"""Quantized KV storage formats: the numpy reference (quantize, dequantize) and the byte layouts.

Formats, for K and V independently (docs/MANIFEST.md has the layouts for runtimes that fill
a cache themselves):

* ``q8_0`` (ggml's): blocks of 32 consecutive head-dim values, one f16 scale d and 32 int8
  q with x = d * q; d = max|x| / 127 and q = round(x / d) (half away from zero), as
  ggml-quants.c ``quantize_row_q8_0_ref``.
* ``q4_0`` (ggml's): blocks of 32, one f16 scale d and 32 4-bit q with x = d * (q - 8);
  d = m / -8 where m is the value of largest magnitude (the first such), and
  q = min(15, trunc(x / d + 8.5)), as ``quantize_row_q4_0_ref``.
* ``int8``: one f32 scale s per (token, head) row of the head dim, x = s * q with
  s = max|x| / 127 and q = round(x / s) (half away from zero).

A scale below the normal f32 range (2^-126; only blocks or rows whose values are all below
about 1e-36) counts as a zero of its sign: ggml's reference divides by zero there (1/d
overflows), and its values dequantize to 0 (f16 scales of that size are 0 anyway).

Values a format cannot store are refused (``storable``): inf and NaN, and q8_0 and q4_0 blocks
whose f16 scale would round past 65504 (a largest |x| of 65520 * 127 = 8321040 or more for
q8_0, 65520 * 8 = 524160 or more for q4_0; ggml stores an inf scale there, whose values read
back as inf and NaN). The GPU store kernel writes a NaN scale for such a block instead.

In WebGPU buffers every format is an array of u32 words (little-endian bytes), the rows of
the logical tensor in row-major order of its other dims:

* q8_0, 9 words a block: word 0 holds the bits of d in its low 16 bits (high 16 bits 0),
  words 1..8 hold q[0..31], value j in byte j % 4 of word 1 + j // 4 (ggml's qs bytes).
* q4_0, 5 words a block: word 0 as q8_0, words 1..4 hold ggml's 16 qs bytes: byte j
  (byte j % 4 of word 1 + j // 4) holds value j in its low nibble and value j + 16 in its
  high nibble.
* int8, D / 4 + 1 words a row: word 0 the bits of s, then q[0..D-1], value j in byte
  j % 4 of word 1 + j // 4.

The shaders address an element by its index in the dense logical tensor (its "element
address", as for f32 storage), so blocks of 32 (q8_0, q4_0) or rows of D (int8) never straddle
two rows: q8_0 and q4_0 need the head dim to be a multiple of 32, int8 a multiple of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("q8_0", "q4_0", "int8")
BLOCK = 32  # values per q8_0 / q4_0 block
_BLOCK_WORDS = {"q8_0": 9, "q4_0": 5}


def check_format(fmt: str) -> str:
    """`fmt` if it is a quantized format, else a ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown KV format {fmt!r}; the quantized formats are {', '.join(FORMATS)}")
    return fmt


def head_dim_rule(fmt: str) -> int:
    """The multiple the head dim must be for `fmt`: 32 (q8_0, q4_0: whole blocks) or 4 (int8)."""
    return BLOCK if check_format(fmt) in _BLOCK_WORDS else 4


def check_head_dim(fmt: str, name: str, d: int) -> None:
    """ValueError naming the rule when a head dim cannot be stored in `fmt`."""
    m = head_dim_rule(fmt)
    if d % m:
        what = "blocks of 32 values along the head dim" if m == BLOCK else "four int8 values per 32-bit word"
        raise ValueError(f"{name}: head dim {d} cannot be stored as {fmt}, which packs {what}: "
                         f"the head dim must be a multiple of {m} (pad it with zeros to {-(-d // m) * m})")


def words_per_row(fmt: str, d: int) -> int:
    """u32 words one row of `d` head-dim values takes in `fmt`."""
    check_head_dim(fmt, "head dim", d)
    if fmt == "int8":
        return d // 4 + 1
    return d // BLOCK * _BLOCK_WORDS[fmt]


@dataclass(frozen=True)
class QuantTensor:
    """A tensor of logical `shape` (head dim last) stored in `fmt` as u32 `words` (1-D)."""

    fmt: str
    shape: tuple[int, ...]
    words: np.ndarray

    def __post_init__(self) -> None:
        check_format(self.fmt)
        if not self.shape:
            raise ValueError("a quantized tensor has at least one dim (the head dim)")
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        want = rows * words_per_row(self.fmt, self.shape[-1])
        if not isinstance(self.words, np.ndarray) or self.words.dtype != np.uint32 or self.words.shape != (want,):
            got = getattr(self.words, "shape", None), getattr(self.words, "dtype", None)
            raise ValueError(f"{self.fmt} tensor of shape {self.shape}: expected {want} uint32 words, got {got}")

    @property
    def ndim(self) -> int:
        """Number of logical dims."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed words."""
        return int(self.words.nbytes)


F16_SCALE_LIMIT = np.float32(65520.0)  # an f32 scale this large or larger rounds to an f16 inf
LARGEST_STORABLE = {"q8_0": 65520.0 * 127, "q4_0": 65520.0 * 8}  # the largest |x| a block may not reach


def storable(x: np.ndarray, fmt: str, name: str) -> None:
    """ValueError naming `name` unless every value of `x` (float, head dim last) can be stored in
    `fmt`: finite, and in q8_0 and q4_0 blocks whose f16 scale stays finite."""
    xs = np.asarray(x, np.float32).reshape(-1, x.shape[-1]) if x.size else np.zeros((0, BLOCK), np.float32)
    if not np.isfinite(xs).all():
        raise ValueError(f"{name}: inf or NaN cannot be stored as {fmt}")
    if fmt not in _BLOCK_WORDS or xs.size == 0:
        return
    amax = np.abs(xs.reshape(-1, BLOCK)).max(axis=1)
    scale = (amax / np.float32(127 if fmt == "q8_0" else 8)).astype(np.float32)
    if (scale >= F16_SCALE_LIMIT).any():
        worst = float(amax.max())
        raise ValueError(f"{name}: a block of 32 values holds |x| = {worst:.7g}; {fmt} keeps each block's scale as "
                         f"float16, which overflows from |x| = {LARGEST_STORABLE[fmt]:.7g} on (a scale past 65504)")


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf on float32 values (half away from zero), exactly (float64 holds x + 0.5)."""
    x64 = x.astype(np.float64)
    return np.sign(x64) * np.floor(np.abs(x64) + 0.5)


FLT_MIN = np.float32(2.0**-126)  # the smallest normal f32


def _flushed(d: np.ndarray) -> np.ndarray:
    """A scale below the normal f32 range as a zero of its sign: ggml's 1/d would overflow there
    (undefined behaviour in its reference), and GPUs may flush such scales to zero anyway."""
    return np.where(np.abs(d) < FLT_MIN, d * np.float32(0), d).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d is 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1.0)), np.float32(0.0)
                        ).astype(np.float32)


def _bytes_to_words(b: np.ndarray) -> np.ndarray:
    """Rows of 4k uint8 to rows of k little-endian u32 words."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    return b.view("<u4").astype(np.uint32)


def _words_to_bytes(w: np.ndarray) -> np.ndarray:
    """Rows of k u32 words to rows of 4k uint8 (little-endian)."""
    return np.ascontiguousarray(w.astype("<u4")).view(np.uint8)


def quantize(x: np.ndarray, fmt: str) -> QuantTensor:
    """Quantize a float array (head dim last) to `fmt` with ggml's reference rules (see module doc)."""
    check_format(fmt)
    x = np.asarray(x)
    if x.ndim < 1 or x.dtype.kind != "f":
        raise ValueError(f"quantize: expected a float array with the head dim last, got {x.dtype} {x.shape}")
    check_head_dim(fmt, "quantize", x.shape[-1])
    xs = x.astype(np.float32).reshape(-1, x.shape[-1])
    storable(xs, fmt, "quantize")
    rows = xs.shape[0]
    if fmt == "int8":
        amax = np.abs(xs).max(axis=1, keepdims=True) if xs.size else np.zeros((rows, 1), np.float32)
        s = _flushed((amax / np.float32(127)).astype(np.float32))
        q = _round_away(xs * _inverse(s)).astype(np.int8)
        words = np.concatenate([s.view(np.uint32), _bytes_to_words(q.view(np.uint8))], axis=1)
        return QuantTensor(fmt, tuple(x.shape), words.reshape(-1))
    blocks = xs.reshape(-1, BLOCK)
    if fmt == "q8_0":
        d = _flushed((np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32))
        q = _round_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
    else:
        idx = np.argmax(np.abs(blocks), axis=1)  # the first value of largest magnitude
        m = blocks[np.arange(blocks.shape[0]), idx][:, None]
        m = np.where(np.abs(m) > 0, m, np.float32(0.0)).astype(np.float32)  # ggml's max starts at +0.0
        d = _flushed((m / np.float32(-8)).astype(np.float32))
        t = (blocks * _inverse(d) + np.float32(8.5)).astype(np.float32)
        qv = np.minimum(15, np.trunc(t).astype(np.int64)).astype(np.uint8)
        q = (qv[:, :16] | (qv[:, 16:] << 4)).astype(np.uint8)
    head = d.astype(np.float16).view(np.uint16).astype(np.uint32)
    words = np.concatenate([head, _bytes_to_words(q)], axis=1)
    return QuantTensor(fmt, tuple(x.shape), words.reshape(-1))


def codes(t: QuantTensor) -> tuple[np.ndarray, np.ndarray]:
    """(scales, integer values) of a quantized tensor: scales [rows, blocks] float32 (the f16 d
    of each block, or the f32 s of each row), values [rows, D] int (q8_0, int8: -128..127;
    q4_0: 0..15, before the -8)."""
    D = t.shape[-1]
    w = t.words.reshape(-1, words_per_row(t.fmt, D))
    if t.fmt == "int8":
        return w[:, :1].view(np.float32).copy(), _words_to_bytes(w[:, 1:]).view(np.int8).astype(np.int64)
    nb = _BLOCK_WORDS[t.fmt]
    blk = w.reshape(w.shape[0], D // BLOCK, nb)
    d = (blk[..., 0] & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    raw = _words_to_bytes(blk[..., 1:].reshape(-1, nb - 1)).reshape(w.shape[0], D // BLOCK, 4 * (nb - 1))
    if t.fmt == "q8_0":
        q = raw.view(np.int8).astype(np.int64)
    else:
        q = np.concatenate([raw & 15, raw >> 4], axis=-1).astype(np.int64)
    return d, q.reshape(w.shape[0], D)


def dequantize(t: QuantTensor) -> np.ndarray:
    """The float32 values a quantized tensor stands for (what the shaders compute in f32)."""
    d, q = codes(t)
    if t.fmt == "int8":
        x = d * q.astype(np.float32)
    else:
        per = np.repeat(d, BLOCK, axis=1)
        x = per * (q - 8 if t.fmt == "q4_0" else q).astype(np.float32)
    return x.astype(np.float32).reshape(t.shape)
