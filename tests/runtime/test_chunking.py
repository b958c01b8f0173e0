"""Problems larger than a storage binding (runtime/chunking.py) against the textbook reference.

The binding limit is forced small (the runtime reads `max-storage-buffer-binding-size` from
the GPUDevice's limits on every call), so a few hundred keys of one head exceed it: the call
is split over the batch, then the KV heads, then blocks of query rows x keys that run with
absolute positions (the kernel's `offsets`) and are merged by log-sum-exp on the host. The
pieces take whatever plan the heuristic gives their shape: packed GQA rows for S <= 16 (the
decode plans), prefill plans above, split-KV where the keys are many. Every option can be on,
positions and heads matter to each of them (causal, window, kv_lens, ALiBi, bias broadcasts,
score_mod/mask_mod of the absolute row and key and of the query head), and every buffer bound
must fit the forced limit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime import dispatch as rt
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])
BIAS_SHAPES = {"T": lambda B, H, S, T: (T,), "ST": lambda B, H, S, T: (S, T),
               "1H1T": lambda B, H, S, T: (1, H, 1, T), "B1S1": lambda B, H, S, T: (B, 1, S, 1),
               "BH11": lambda B, H, S, T: (B, H, 1, 1), "full": lambda B, H, S, T: (B, H, S, T)}


def head_and_position_dsl(s, b, h, q_idx, kv_idx):
    return s + 0.25 * attnc.f32(h) - 0.02 * attnc.f32(abs(q_idx - kv_idx))


def head_and_position_np(s, b, h, i, j):
    return s + 0.25 * h - 0.02 * np.abs(i - j)


def stripes_dsl(b, h, q_idx, kv_idx):
    return (kv_idx % 3 != 1) | (h % 2 == 1) | (q_idx % 2 == 0)


def stripes_np(b, h, i, j):
    return (j % 3 != 1) | (h % 2 == 1) | (i % 2 == 0)


# S from 1 to past 16 (packed decode plans up to 16 rows, prefill plans above)
ROWS = st.sampled_from([1, 2, 4, 16, 17]) | st.integers(1, 40)


@st.composite
def problems(draw):
    """(forced limit, shape, options, seed): one head's K/V beyond the limit, options drawn.
    Array-valued options are named by what makes them (built in `arrays`), so that a failing
    example prints short."""
    limit = draw(st.sampled_from([2048, 4096, 8192]))
    D = draw(st.sampled_from([8, 16, 12, 7]))
    Dv = draw(st.sampled_from([D, 8, 16, 5]))
    Hkv = draw(st.integers(1, 2))
    sh = dict(B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 3, 4])), S=draw(ROWS),
              D=D, Dv=Dv)
    keys_over = limit // (4 * min(D, Dv)) + 1  # one head of k and of v beyond the limit
    sh["T"] = draw(st.integers(keys_over, keys_over + 120))
    B, T = sh["B"], sh["T"]
    opts: dict = {"return_lse": draw(st.booleans())}
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (draw(st.none() | st.integers(0, 60)), draw(st.none() | st.integers(0, 60)))
    if draw(st.booleans()):
        opts["kv_lens"] = tuple(draw(st.sampled_from([0, T]) | st.integers(0, T)) for _ in range(B))
    if draw(st.booleans()):
        opts["bias"] = draw(st.sampled_from(sorted(BIAS_SHAPES)))
    if draw(st.booleans()):
        opts["alibi_slopes"] = draw(st.sampled_from([1.0, -0.5]))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.booleans()):
        opts["sinks"] = True
    if draw(st.booleans()):
        opts["score_mod"] = head_and_position_dsl
    if draw(st.booleans()):
        opts["mask_mod"] = stripes_dsl
    return limit, sh, opts, draw(st.integers(0, 2**32 - 1))


MODS = {head_and_position_dsl: head_and_position_np, stripes_dsl: stripes_np}


def arrays(sh: dict, drawn: dict, seed: int):
    """q, k, v, the options for attnc.attention and the mods' numpy twins for the reference."""
    B, Hq, Hkv, S, T, D, Dv = (sh[n] for n in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, Dv)).astype(np.float32)
    opts, mods = dict(drawn), {}
    if "kv_lens" in opts:
        opts["kv_lens"] = np.array(opts["kv_lens"], np.int32)
    if "bias" in opts:
        opts["bias"] = rng.standard_normal(BIAS_SHAPES[opts["bias"]](B, Hq, S, T)).astype(np.float32)
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = (2.0 ** -np.arange(1, Hq + 1) * opts["alibi_slopes"]).astype(np.float32)
    if "sinks" in opts:
        opts["sinks"] = rng.uniform(-2, 2, Hq).astype(np.float32)
    for name in ("score_mod", "mask_mod"):
        if name in opts:
            mods[name] = MODS[opts[name]]
    return (q, k, v), opts, mods


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"])
@settings(RUN, max_examples=6)
@given(problem=problems())
def test_chunked_problems_match_the_reference(require_adapters, monkeypatch, spec, problem) -> None:
    """Any GQA ratio, S, options and bias broadcast, with one head's K/V beyond the forced
    limit: the pieces agree with the whole problem's reference (every query head of each KV
    group, not only the first), and no buffer bound exceeds the limit."""
    dev = require_adapters(spec)[0]
    limit, sh, drawn, seed = problem
    (q, k, v), opts, mods = arrays(sh, drawn, seed)
    sizes: list[int] = []
    real_bg = rt._bind_group

    def spy(device, d, compiled, grid):
        sizes.extend(int(b.size) for b in d.buffers.values())
        return real_bg(device, d, compiled, grid)

    with monkeypatch.context() as mp:
        mp.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", limit)
        mp.setattr(rt, "_bind_group", spy)
        out = attnc.attention(q, k, v, device=dev, **opts)
    assert sizes and max(sizes) <= limit, f"bound {max(sizes)} bytes > forced limit {limit}"
    ref_opts = {n: x for n, x in opts.items() if n not in ("score_mod", "mask_mod")}
    ref = attention_ref(q, k, v, **ref_opts, **mods)
    if opts["return_lse"]:
        assert_close(out[0], ref[0], 1e-5, "o")
        assert_close(out[1], ref[1], 1e-5, "lse")
    else:
        assert_close(out, ref, 1e-5, "o")


@pytest.mark.parametrize("keys", [100, 600], ids=["whole", "in-pieces"])
def test_arrays_bound_whole_past_the_limit_are_named_on_every_path(require_adapters, monkeypatch, keys) -> None:
    """A table a mod reads is bound whole, also in the pieces of a problem split past the
    binding limit: one ValueError naming it, whether or not the call is split (the pieces bind
    fresh buffers, which had no check: WebGPU's raw validation error from the bind group); a
    paged pool past the limit is named as the caller passed it (`k_pages`)."""
    (dev,) = require_adapters("wgpu:vulkan")
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", 4096)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, keys, 4)).astype(np.float32)  # 600 keys: 9600 bytes, split
    doc = np.repeat((np.arange(600) // 97).astype(np.int32)[None], 2, 0)  # [2, 600] int32: 4800 bytes
    tab = rng.standard_normal((2, 600)).astype(np.float32)
    mods = {"mask_mod": lambda b, h, i, j: doc[b, j] == doc[b, i], "score_mod": lambda s, b, h, i, j: s + tab[b, j]}
    for (kind, mod), name in zip(mods.items(), ("doc", "tab"), strict=True):
        with pytest.raises(ValueError, match=rf"^{name}: 4800 bytes, more than the device's "
                                             r"max-storage-buffer-binding-size \(4096\).*mod reads is bound whole"):
            attnc.attention(q, k, k, device=dev, **{kind: mod})
    pool = rng.standard_normal((80, 1, 4, 32)).astype(np.float32)  # 40960 bytes
    table = np.arange(80, dtype=np.int32).reshape(1, 80)
    with pytest.raises(ValueError, match=r"^k_pages: 40960 bytes, .*a page pool is bound whole"):
        attnc.paged_attention(rng.standard_normal((1, 1, 1, 32)).astype(np.float32), pool, pool, table, device=dev)


def test_a_refusal_of_the_pieces_says_what_splitting_added(require_adapters, monkeypatch) -> None:
    """Options that fill the device's storage buffers exactly run whole; past the binding limit
    the blocks of keys each write lse for the merge, one buffer more: the refusal says so
    rather than naming an lse the caller never asked for without a reason."""
    from attnc.errors import DeviceError

    (dev,) = require_adapters("wgpu:vulkan")
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffers-per-shader-stage", 8)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 8, 16)).astype(np.float32)
    tab = rng.standard_normal(2).astype(np.float32)
    opts = dict(kv_lens=np.array([140]), alibi_slopes=np.array([0.1, 0.2], np.float32),
                bias=rng.standard_normal(150).astype(np.float32), score_mod=lambda s, b, h, i, j: s + tab[h])
    k = rng.standard_normal((1, 1, 150, 16)).astype(np.float32)  # 9600 bytes
    attnc.attention(q, k, k, device=dev, **opts)  # q, k, v, o and four option tensors: 8
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", 4096)
    with pytest.raises(DeviceError, match="9 storage buffers") as err:
        attnc.attention(q, k, k, device=dev, **opts)
    assert any("runs in blocks of keys merged on the host by their lse" in n for n in err.value.notes)
