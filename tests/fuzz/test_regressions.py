"""Minimal examples found by test_compiler_fuzz.py, kept as explicit tests.

A BUG is an xfail(strict=True) until the compiler is fixed (then the xfail must go).
"""

from __future__ import annotations

import numpy as np
import pytest

import attnc
from attnc.kernels.flash import flash_attention
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu


def test_where_between_two_bool_masks(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]

    def mask(b, h, q_idx, kv_idx):
        return attnc.where(h == 0, kv_idx <= q_idx, kv_idx >= q_idx)

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    o = attnc.attention(q, k, v, mask_mod=mask, device=dev)
    ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: np.where(h == 0, j <= i, j >= i))
    assert_close(o, ref, 1e-5)


def test_score_mod_ignoring_the_score(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 7, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 7, 8)).astype(np.float32)
    o = attnc.attention(q, k, v, score_mod=lambda s, b, h, i, j: attnc.f32(j) * 0.0, device=dev)
    np.testing.assert_allclose(o[0, 0], np.broadcast_to(v[0, 0].mean(0), (4, 8)), rtol=1e-5, atol=1e-6)


def test_bool_where_as_and_or_works(require_adapters) -> None:
    """The workaround the fuzzer uses for the bool where: (c & a) | (~c & b)."""
    dev = require_adapters("wgpu:vulkan")[0]

    def mask(b, h, q_idx, kv_idx):
        c = h == 0
        return (c & (kv_idx <= q_idx)) | (~c & (kv_idx >= q_idx))

    kern = flash_attention.trace(mask_mod=mask)
    assert kern.name == "flash_attention"
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    o = attnc.attention(q, k, v, mask_mod=mask, device=dev)
    ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: np.where(h == 0, j <= i, j >= i))
    assert_close(o, ref, 1e-5)
