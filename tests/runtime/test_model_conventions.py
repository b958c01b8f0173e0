"""The mappings docs/API.md gives from model conventions to attnc's options ("How common model
conventions map onto these options") compute what the models compute: each against the
model's formula written out here in float64 (a keep-mask and an additive score term), not
against attnc's own reference."""

from __future__ import annotations

import numpy as np
import pytest

import attnc
from tests.textbook import assert_close

pytestmark = pytest.mark.gpu

B, H, S, T, D = 2, 4, 12, 20, 16


def model(q, k, v, keep, add=0.0, scale=None):
    """softmax(q·k * scale + add, masked by keep) · v in float64; keep [B or 1, H or 1, S, T]."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = np.einsum("bhid,bhjd->bhij", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5) + add
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), v)


@pytest.fixture
def data():
    rng = np.random.default_rng(31)
    q = rng.standard_normal((B, H, S, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(2))
    return rng, q, k, v


def test_causal_masks(require_adapters, data) -> None:
    """Bottom-right causal (the built-in, S < T), PyTorch SDPA's top-left one (a mask_mod), and a
    right-padded causal prefill (S = T, lengths as a key mask, not kv_lens)."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng, q, k, v = data
    i, j = np.arange(S)[:, None], np.arange(T)[None, :]
    assert_close(attnc.attention(q, k, v, causal=True, device=dev), model(q, k, v, j <= i + T - S), 1e-5, "built-in")
    assert_close(attnc.attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i, device=dev),
                 model(q, k, v, j <= i), 1e-5, "top-left")
    qp = rng.standard_normal((B, H, T, D)).astype(np.float32)
    lens = np.array([T, 13], np.int32)
    ii, jj = np.arange(T)[:, None], np.arange(T)[None, :]
    keep = (jj <= ii)[None, None] & (jj[None, None] < lens[:, None, None, None])
    got = attnc.attention(qp, k, v, causal=True, mask_mod=lambda b, h, i, j: j < lens[b], device=dev)
    assert_close(got, model(qp, k, v, keep), 1e-5, "right-padded causal prefill")


def test_sliding_window_and_alibi(require_adapters, data) -> None:
    """Hugging Face's sliding_window=W as window=(W - 1, 0); causal ALiBi by alibi_slopes (BLOOM's
    slope · j, equal up to a constant per row); the symmetric -slope · |i - j| as a score_mod."""
    dev = require_adapters("wgpu:vulkan")[0]
    _, q, k, v = data
    i_abs, j = np.arange(S)[:, None] + T - S, np.arange(T)[None, :]
    for W in (1, 5, T + 3):
        assert_close(attnc.attention(q, k, v, window=(W - 1, 0), device=dev),
                     model(q, k, v, (j <= i_abs) & (j > i_abs - W)), 1e-5, f"sliding_window={W}")
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    slope = slopes.astype(np.float32)[None, :, None, None]
    assert_close(attnc.attention(q, k, v, causal=True, alibi_slopes=slopes.astype(np.float32), device=dev),
                 model(q, k, v, j <= i_abs, slope * j), 1e-5, "BLOOM")
    qs = q[:, :, :S]
    ks, vs = k[:, :, :S], v[:, :, :S]
    ii, jj = np.arange(S)[:, None], np.arange(S)[None, :]
    sym = slopes.astype(np.float32)
    assert_close(attnc.attention(qs, ks, vs, score_mod=lambda s, b, h, i, j: s - sym[h] * abs(i - j), device=dev),
                 model(qs, ks, vs, True, -slope * np.abs(ii - jj)), 1e-5, "symmetric ALiBi")
