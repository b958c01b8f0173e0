"""Calls one argument apart: what attention(), paged_attention(), a KV cache's attend and an
attnc.build op remember of a call (ops by their key, the key by the call's signature) tells
every argument that changes the kernel apart, and option arrays of any memory layout read as
their values. The keys are the runtime's Python, the same for every backend: one adapter."""

from __future__ import annotations

import numpy as np
import pytest

import attnc
from attnc.kernels.flash import flash_attention
from attnc.runtime import api
from tests.runtime.test_repeated_calls import DIMS, qkv
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu


# one argument at a time, two values besides its default: calls alike in everything else
ONE_ARGUMENT_APART = {
    "causal": [True, False],
    "scale": [0.5, 2.0],
    "window": [(5, 0), (2, 3)],
    "softcap": [5.0, 20.0],
    "return_lse": [True, False],
    "bias": ["draw", "draw"],
    "alibi_slopes": ["draw", "draw"],
    "sinks": ["draw", "draw"],
    "kv_lens": [[40, 17], [5, 40]],
    "score_mod": [lambda s, b, h, qi, kj: s * 2.0, lambda s, b, h, qi, kj: s + 0.25 * kj],
    "mask_mod": [lambda b, h, qi, kj: kj < 10, lambda b, h, qi, kj: kj % 2 == 0],
}
HOST_ONLY = {"score_mod", "mask_mod"}  # calls with mods are keyed by their code, tensors or not:
# the tensors' signature path is not theirs
# (a KV cache's attend takes every option but kv_lens: the cache's lengths are its own)
ENTRIES = ("attention", "attention-tensors", "paged_attention", "kvcache")


def _drawn(name: str, value, rng: np.random.Generator):
    """The argument's value for a call: arrays drawn anew at every call ('draw')."""
    B, Hq, S, T = (DIMS[k] for k in ("B", "Hq", "S", "T"))
    if value != "draw":
        return np.array(value, np.int32) if name == "kv_lens" else value
    shape = {"bias": (B, Hq, S, T), "alibi_slopes": (Hq,), "sinks": (Hq,)}[name]
    return rng.standard_normal(shape).astype(np.float32)


def _pages(x: np.ndarray, P: int) -> np.ndarray:
    """[B, H, T, D] as B * T / P pages [NP, H, P, D], row b's pages at b * T / P onwards."""
    B, H, T, D = x.shape
    return x.reshape(B, H, T // P, P, D).transpose(0, 2, 1, 3, 4).reshape(B * (T // P), H, P, D)


@pytest.mark.parametrize("spec", ["wgpu:vulkan"])
@pytest.mark.parametrize(("entry", "name"), [(e, n) for e in ENTRIES for n in sorted(ONE_ARGUMENT_APART)
                                             if not (e == "attention-tensors" and n in HOST_ONLY)
                                             and not (e == "kvcache" and n == "kv_lens")])
def test_calls_one_argument_apart_each_get_their_own_result(require_adapters, spec, name, entry) -> None:
    """Calls alike but for one argument (its default, then two other values, then the default
    again) each give their own result: whatever attention(), paged_attention() and a KV cache's
    attend remember of a call (ops by their key, the key by the call's signature) tells every
    argument that changes the kernel apart (an op cache key without `scale` gave the first
    call's scale to every later call: relerr 0.88; attend's without its option tensors' names
    gave a call without sinks the last call's sinks: 0.80)."""
    dev = require_adapters(spec)[0]
    api._OPS.clear()
    api._CALLS.clear()
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng)
    P = 8
    cache = None
    if entry == "kvcache":
        cache = attnc.KVCache(k.shape[0], k.shape[1], k.shape[2], k.shape[3], v.shape[3], device=dev)
        cache.append(k, v)
    for value in (None, *ONE_ARGUMENT_APART[name], None):
        kw = {} if value is None else {name: _drawn(name, value, rng)}
        ref = attention_ref(q, k, v, **kw)
        if entry == "attention":
            got = attnc.attention(q, k, v, device=dev, **kw)
        elif entry == "kvcache":
            got = cache.attend(q, **kw)
        elif entry == "attention-tensors":
            tq, tk, tv = (attnc.tensor(x, dev) for x in (q, k, v))
            opts = {n: attnc.tensor(x, dev) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
            got = attnc.attention(tq, tk, tv, **opts)
            got = tuple(x.numpy() for x in got) if isinstance(got, tuple) else got.numpy()
        else:
            B, T = k.shape[0], k.shape[2]
            order = rng.permutation(B * (T // P))  # pages of every row, shuffled into one pool
            kp, vp = np.empty_like(_pages(k, P)), np.empty_like(_pages(v, P))
            kp[order], vp[order] = _pages(k, P), _pages(v, P)
            table = order.reshape(B, T // P).astype(np.int32)
            got = attnc.paged_attention(q, kp, vp, table, device=dev, **kw)
        if kw.get("return_lse"):
            assert isinstance(got, tuple), f"{name}={value!r}: lse not returned"
            assert_close(got[0], ref[0], 1e-5, f"o, {name}={value!r}")
            assert_close(got[1], ref[1], 1e-5, f"lse, {name}={value!r}")
        else:
            assert not isinstance(got, tuple), f"{name}={value!r}: an lse returned that was not asked for"
            assert_close(got, ref, 1e-5, f"o, {name}={value!r}")


def _layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as views of other memory layouts: reversed, every other element of a
    longer array, Fortran order, a broadcast of one row (where x's leading dim is 1 long)."""
    out = {"reversed": np.flip(np.flip(x).copy()), "stepped": np.repeat(x, 2, axis=-1)[..., ::2],
           "fortran": np.asfortranarray(x)}
    assert not out["reversed"].flags.c_contiguous or x.size == 1
    if x.ndim and x.shape[0] > 1 and np.all(x == x[:1]):
        out["broadcast"] = np.broadcast_to(x[:1], x.shape)
    return out


@pytest.mark.parametrize("spec", ["wgpu:vulkan"])
@pytest.mark.parametrize("entry", ["attention", "prepared", "paged_attention"])
def test_option_arrays_of_any_layout(require_adapters, spec, entry) -> None:
    """Every host option array (bias, alibi_slopes, sinks, kv_lens) as a reversed, stepped,
    Fortran-order or broadcast view gives the result of its contiguous copy (a reversed
    float32 `sinks` was 'The given data is not contiguous')."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng)
    B, Hq, S, T = (DIMS[x] for x in ("B", "Hq", "S", "T"))
    values = [("bias", rng.standard_normal((B, Hq, S, T)).astype(np.float32)),
              ("alibi_slopes", np.array([0.25, 0.5, 0.125, 1.0], np.float32)),
              ("alibi_slopes", np.full(Hq, 0.25, np.float32)), ("sinks", rng.standard_normal(Hq).astype(np.float32)),
              ("sinks", np.full(Hq, 0.3, np.float32)), ("kv_lens", np.array([T, 17], np.int32)),
              ("kv_lens", np.array([T - 3, T - 3], np.int32))]
    for name, x in values:
        ref = attention_ref(q, k, v, **{name: x})
        for layout, view in _layouts(x).items():
            if entry == "attention":
                got = attnc.attention(q, k, v, device=dev, **{name: view})
            elif entry == "prepared":
                got = attnc.prepare(q, k, v, device=dev, **{name: x})(q, k, v, **{name: view})
                got = got.numpy() if isinstance(got, attnc.Tensor) else got
            else:
                P = 8
                table = np.arange(B * (T // P), dtype=np.int32).reshape(B, T // P)
                got = attnc.paged_attention(q, _pages(k, P), _pages(v, P), table, device=dev, **{name: view})
            assert_close(got, ref, 1e-5, f"o, {name} {layout}")


@pytest.mark.parametrize("spec", ["wgpu:vulkan"])
def test_a_built_kernel_called_with_other_shapes_dims_and_broadcasts(require_adapters, spec) -> None:
    """One attnc.build op called in turn with another key count, another `dims=` (the paged
    kernel's logical T) and bias arrays with size-1 axes (each broadcast over its dim) gives each
    call its own result: what the op keeps per call shape tells them apart (an op key without
    the arrays' shapes raised 'axis 2 is 12, this op takes 8'; without dims= the second T read
    the first's: relerr 0.74; size-1 axes read as strided: 0.60)."""
    from attnc.kernels.flash import paged_flash_attention

    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(17)
    B, H, S, D = 2, 2, 3, 8
    op = attnc.build(flash_attention, device=dev, bias=True)
    for T, shape in ((8, (1, H, 1, 8)), (12, (B, 1, S, 1)), (8, (1, 1, S, 8)), (12, (B, H, S, 12)), (8, (1, H, 1, 8))):
        q = rng.standard_normal((B, H, S, D)).astype(np.float32)
        k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(2))
        bias = (3 * rng.standard_normal(shape)).astype(np.float32)
        got = op(q=q, k=k, v=v, scale=0.35, bias=bias)
        assert_close(got, attention_ref(q, k, v, scale=0.35, bias=np.broadcast_to(bias, (B, H, S, T))), 1e-5,
                     f"o, T={T}, bias {shape}")
    paged = attnc.build(paged_flash_attention, device=dev, kv_lens=True)
    P, NP = 4, 4
    kp, vp = (rng.standard_normal((NP, 1, P, D)).astype(np.float32) for _ in range(2))
    table = np.array([[2, 0, 3, 1]], np.int32)
    k, v = (x[table[0]].transpose(1, 0, 2, 3).reshape(1, 1, NP * P, D) for x in (kp, vp))
    q = rng.standard_normal((1, 1, 2, D)).astype(np.float32)
    for T in (8, 16, 12, 8):
        lens = np.array([T], np.int32)
        got = paged(q=q, k=kp, v=vp, scale=0.35, block_table=table, kv_lens=lens, dims={"T": T})
        assert_close(got, attention_ref(q, k[:, :, :T], v[:, :, :T], scale=0.35), 1e-5, f"paged o, T={T}")
