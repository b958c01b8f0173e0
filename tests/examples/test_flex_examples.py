"""Every examples/flex program against a float64 numpy reference written from its docstring,
on every CI adapter; each new value of its captured data runs the same kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import attnc
from attnc.frontend.parser import parse
from attnc.ir.printer import print_kernel
from attnc.kernels.flash import flash_attention
from attnc.runtime import build
from tests.textbook import assert_close, attention_ref

FLEX = Path(__file__).resolve().parents[2] / "examples" / "flex"
sys.path.insert(0, str(FLEX))

import alibi  # noqa: E402
import bool_mask  # noqa: E402
import document_mask  # noqa: E402
import head_temperature  # noqa: E402
import paged_kv  # noqa: E402
import prefix_lm  # noqa: E402
import t5_buckets  # noqa: E402

TOL = 1e-5


def qkv(rng, B, Hq, Hkv, S, T, D=32, Dv=32):
    return (rng.standard_normal((B, Hq, S, D)).astype(np.float32),
            rng.standard_normal((B, Hkv, T, D)).astype(np.float32),
            rng.standard_normal((B, Hkv, T, Dv)).astype(np.float32))


def flex_kernels() -> dict:
    """The kernels the examples trace (the .attn text of examples/flex/attn/ is theirs)."""
    doc_ids = np.zeros((2, 8), np.int64)
    table = np.zeros((32, 4), np.float32)
    return {
        "document_mask": flash_attention.trace(mask_mod=document_mask.document_mask(doc_ids)),
        "prefix_lm": flash_attention.trace(mask_mod=prefix_lm.prefix_lm(np.zeros(2, np.int32))),
        "t5_buckets": flash_attention.trace(score_mod=t5_buckets.t5_bias(table, 8, 8)),
        "head_temperature": flash_attention.trace(score_mod=head_temperature.tempered(np.ones(4, np.float32), 0.5)),
        "alibi": flash_attention.trace(score_mod=alibi.alibi(np.ones(4, np.float32)), mask_mod=alibi.causal),
        "bool_mask": flash_attention.trace(mask_mod=bool_mask.from_bool(np.ones((2, 8, 8), bool))),
        "paged_kv": paged_kv.paged_attention.trace(),
    }


@pytest.mark.parametrize("name", ["document_mask", "prefix_lm", "t5_buckets", "head_temperature", "alibi",
                                  "bool_mask", "paged_kv"])
def test_text_form_of_each_example_is_current_and_round_trips(name: str) -> None:
    """examples/flex/attn/NAME.attn is the printed kernel of the example: its captured arrays and
    numbers are params (dims of their own), and the text parses back to the same kernel."""
    kern = flex_kernels()[name]
    text = print_kernel(kern)
    assert (FLEX / "attn" / f"{name}.attn").read_text() == text
    assert parse(text) == kern


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["wgpu:vulkan"], indirect=True)  # one adapter each, in turn
def test_document_mask(device) -> None:
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 2, 4, 2, 70, 70)
    for lengths in ([30, 25, 15], [5, 60, 5]):  # new documents: the same kernel
        doc_ids = np.stack([np.repeat(np.arange(3), lengths), np.repeat(np.arange(2), [35, 35])])
        traces = build._CACHE.traces
        o = document_mask.packed_attention(q, k, v, doc_ids, device=device)
        assert build._CACHE.traces - traces <= 1
        ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j, d=doc_ids: (d[b, i] == d[b, j]) & (j <= i))
        assert_close(o, ref, TOL)
    assert build._CACHE.traces - traces == 0  # the second call reused the traced kernel


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["wgpu:opengl"], indirect=True)  # one adapter each, in turn
def test_prefix_lm(device) -> None:
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 3, 2, 2, 40, 40)
    prefix = np.array([0, 17, 40], np.int32)
    o = prefix_lm.prefix_lm_attention(q, k, v, prefix, device=device)
    ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: (j <= i) | (j < prefix[b]))
    assert_close(o, ref, TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["dawn:vulkan"], indirect=True)  # one adapter each, in turn
def test_t5_buckets(device) -> None:
    rng = np.random.default_rng(3)
    S, T = 50, 200  # distances up to 199: every bucket, exact and logarithmic
    q, k, v = qkv(rng, 1, 4, 4, S, T)
    table = rng.standard_normal((32, 4)).astype(np.float32)
    o = attnc.attention(q, k, v, score_mod=t5_buckets.t5_bias(table, S, T), device=device)
    bucket = t5_buckets.t5_bucket(np.arange(T)[None, :] - np.arange(S)[:, None])  # [S, T]
    assert bucket.min() == 0 and bucket.max() == 31
    bias = table[bucket].transpose(2, 0, 1)[None]  # [1, Hq, S, T]
    assert_close(o, attention_ref(q, k, v, bias=bias), TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["wgpu:vulkan"], indirect=True)  # one adapter each, in turn
def test_head_temperature(device) -> None:
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 4, 2, 33, 47)
    temperature = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    traces = build._CACHE.traces
    for alpha in (0.5, 3.0):
        o = attnc.attention(q, k, v, score_mod=head_temperature.tempered(temperature, alpha), device=device)
        ref = attention_ref(q, k, v, score_mod=lambda s, b, h, i, j, a=alpha: s * a / temperature[h])
        assert_close(o, ref, TOL)
    assert build._CACHE.traces - traces <= 1  # alpha is a uniform, not a new kernel


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["wgpu:opengl"], indirect=True)  # one adapter each, in turn
def test_alibi(device) -> None:
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 8, 2, 45, 45)
    slopes = (2.0 ** (-8.0 * np.arange(1, 9) / 8)).astype(np.float32)
    o = attnc.attention(q, k, v, score_mod=alibi.alibi(slopes), mask_mod=alibi.causal, device=device)
    ref = attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i),
                        mask_mod=lambda b, h, i, j: j <= i)
    assert_close(o, ref, TOL)
    # the built-in option with the same slopes and positions agrees
    assert_close(o, attnc.attention(q, k, v, alibi_slopes=slopes, causal=True, device=device).astype(np.float64), TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["dawn:vulkan"], indirect=True)  # one adapter each, in turn
def test_bool_mask(device) -> None:
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 2, 2, 1, 31, 29)
    mask = rng.random((2, 31, 29)) < 0.4
    mask[1, 3] = False  # a query that sees no key: o = 0
    o = attnc.attention(q, k, v, mask_mod=bool_mask.from_bool(mask), device=device)
    assert np.all(o[1, :, 3] == 0)
    assert_close(o, attention_ref(q, k, v, mask_mod=lambda b, h, i, j: mask[b, i, j]), TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["dawn:vulkan"], indirect=True)  # one adapter each, in turn
def test_paged_kv(device) -> None:
    rng = np.random.default_rng(7)
    B, Hq, Hkv, S, D, P, pages, per = 3, 4, 2, 3, 32, 8, 20, 5
    pool_k, pool_v = (rng.standard_normal((pages, Hkv, P, D)).astype(np.float32) for _ in range(2))
    table = rng.permutation(pages)[:B * per].reshape(B, per).astype(np.int32)
    lens = np.array([40, 17, 3], np.int32)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    op = attnc.build(paged_kv.paged_attention, device=device)
    o = op(q=q, k_pages=pool_k, v_pages=pool_v, scale=0.2, seq_lens=lens, page_table=table, dims={"T": per * P})
    # the same sequences laid out densely, through the textbook reference
    k = pool_k[table].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, per * P, D)
    v = pool_v[table].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, per * P, D)
    ref = attention_ref(q, k, v, scale=0.2, kv_lens=lens, causal=True)
    assert_close(o, ref, TOL)
    # the shipped kernel over the same pages; entries past a sequence's pages may hold anything
    table[2, 1:] = -7
    assert_close(paged_kv.paged_decode(q, pool_k, pool_v, table, lens, scale=0.2, device=device), ref, TOL)
