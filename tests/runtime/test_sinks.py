"""Attention sinks of any value on every adapter x family, through each decoding strategy and
the tiled prefill, split-KV and not, against the float64 textbook and the rule of
attnc.attention's docstring:

    sinks[h] = +inf: o = 0 and lse = +inf on all of head h's rows, fully masked rows too;
    sinks[h] = -inf: as without a sink (a fully masked row: o = 0, lse = -inf);
    sinks[h] = NaN: o and lse NaN on head h's rows;
    finite sinks, however large (1e30, +-3.4e38), beside logits of ~1e4: finite results.

A +inf sink gave NaN everywhere (exp(inf - inf) in the sink's term of the softmax sum). Each
strategy merges the sink itself when it runs unsplit (tiled, rows, lanes: Shader.merge_sink;
stream: its key-group merge), the combine when split, so decode shapes draw the split count;
the host merge of over-large problems has its own test. The strategy is forced through
ATTNC_STRATEGY (rows: the heuristic's own choice for decoding from 8 rows without GQA and without a
target). Values and sizes are run-time inputs, drawn so that each case compiles one kernel
per (split, lse); the forced-plan tests of tests/lowering (tiled, stream, lanes, combine, with
random knobs) draw special sinks too (tests/forced_plan.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime import api
from tests.runtime.test_attention_options import RUN
from tests.strategies import sink_values
from tests.targets import TARGETS
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

D = 32  # one head dim: the lanes and stream plans derive their knobs from it (fewer kernels)


def _cases() -> list:
    out = []
    for spec, fam in TARGETS:
        kinds = [("prefill", "tiled"), ("decode", "stream")]
        kinds += [("decode", "rows")] if fam == "portable" else [("decode", "lanes")]
        out += [pytest.param((spec, fam), kind, strategy, id=f"{spec}-{fam}-{kind}-{strategy}")
                for kind, strategy in kinds]
    return out


@st.composite
def problems(draw, kind: str, strategy: str):
    """dims, the split count (decode: 1 or 3), q, k, v and the options: sinks, kv_lens (with
    causal: fully masked rows), scale (1 for integer logits of ~1e4), return_lse."""
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 2))
    if kind == "prefill":
        Hq = Hkv * draw(st.sampled_from([1, 2]))
        S, T, nsplit = draw(st.integers(17, 40)), draw(st.integers(1, 80)), None
    else:  # GQA packs 10..16 rows (rows: no GQA), which keeps the heuristic's row tile fixed
        Hq = Hkv * (1 if strategy == "rows" else 2)
        S, T, nsplit = draw(st.integers(5, 8)), draw(st.integers(1, 300)), draw(st.sampled_from([1, 3]))
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=D)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    large = draw(st.booleans())  # |s| ~ 1e4: integer q, k and scale 1 keep every score exact in f32
    if large:
        q = rng.integers(-25, 26, (B, Hq, S, D)).astype(np.float32)
        k = rng.integers(-25, 26, (B, Hkv, T, D)).astype(np.float32)
    else:
        q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
        k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    sinks = np.array([draw(sink_values(1.5e4 if large else 3.0)) for _ in range(Hq)], np.float32)
    # kv_lens 0 masks a batch's rows; causal with fewer keys than rows masks the first rows
    lens = np.array([draw(st.sampled_from([0, T]) | st.integers(0, T)) for _ in range(B)], np.int32)
    opts = dict(causal=True, kv_lens=lens, sinks=sinks, scale=1.0 if large else None,
                return_lse=draw(st.booleans()))
    return dims, nsplit, (q, k, v), opts


def check_rule(o, lse, sinks, masked) -> None:
    """The rule, independent of the reference: per head by its sink value."""
    top, nan, none = sinks == np.inf, np.isnan(sinks), sinks == -np.inf
    assert np.all(o[:, top] == 0.0), "sink +inf: o must be 0"
    assert np.all(np.isnan(o[:, nan])), "sink NaN: o must be NaN"
    assert not np.isnan(o[:, ~nan]).any(), "NaN where the sink is not NaN"
    assert np.all(o[:, none][masked[:, none]] == 0.0)
    if lse is not None:
        assert np.all(lse[:, top] == np.inf) and np.all(np.isnan(lse[:, nan]))
        assert not np.isnan(lse[:, ~nan]).any()
        assert np.all(np.isfinite(lse[:, np.isfinite(sinks)]))
        assert np.all(np.isneginf(lse[:, none][masked[:, none]]))


def masked_rows(dims, lens) -> np.ndarray:
    """[B, Hq, S]: rows with no key left by kv_lens and causal (i + L - S < 0, or L = 0)."""
    i = np.arange(dims["S"])[None, :]
    rows = (i + lens[:, None] - dims["S"] < 0) | (lens[:, None] == 0)
    return np.broadcast_to(rows[:, None, :], (dims["B"], dims["Hq"], dims["S"]))


@pytest.mark.parametrize(("target", "kind", "strategy"), _cases(), indirect=["target"])
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_sinks_of_every_value(target, kind, strategy, data, monkeypatch) -> None:
    dev, family = target
    dims, nsplit, (q, k, v), opts = data.draw(problems(kind, strategy))
    monkeypatch.setenv("ATTNC_STRATEGY", strategy)
    prep = api.prepare(dims, np.float32, device=dev, target=None if strategy == "rows" else family,
                       nsplit=nsplit, **opts)
    assert prep.plan.strategy.value == strategy
    assert (len(prep.progs) > 1) == bool(nsplit and nsplit > 1)  # the combine runs exactly when split
    prep.bind(q, k, v).run()
    o, lse = prep.result()
    ref = attention_ref(q, k, v, **opts)
    o_ref, lse_ref = ref if opts["return_lse"] else (ref, None)
    assert_close(o, o_ref, 1e-5, "o")
    if lse_ref is not None:
        assert_close(lse, lse_ref, 1e-5, "lse")
    check_rule(o, lse, opts["sinks"], masked_rows(dims, opts["kv_lens"]))


@settings(RUN, max_examples=4)
@given(sinks=st.lists(sink_values(), min_size=4, max_size=4))
@example(sinks=[np.inf, -np.inf, np.nan, 1e30])
@example(sinks=[-3.4e38, 3.4e38, 0.5, -1e30])
def test_sinks_of_every_value_through_the_host_merge(require_adapters, monkeypatch, sinks) -> None:
    """One (batch, KV head) beyond a forced 8 KiB binding limit: blocks of rows x keys merged
    on the host by log-sum-exp, the sinks there (runtime/chunking.py); rows 0..19 fully masked."""
    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", 8192)
    rng = np.random.default_rng(12)
    q = rng.standard_normal((1, 4, 50, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 300, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 300, 16)).astype(np.float32)
    z = np.array(sinks, np.float32)
    opts = dict(causal=True, kv_lens=np.array([30], np.int32), sinks=z, return_lse=True)
    o, lse = attnc.attention(q, k, v, device=dev, **opts)
    o_ref, lse_ref = attention_ref(q, k, v, **opts)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")
    check_rule(o, lse, z, masked_rows(dict(B=1, Hq=4, S=50), np.array([30])))


@pytest.mark.parametrize("S", [3, 20])  # decoding rows, prefill tiled (the heuristic's choices)
def test_inf_sink_beside_an_inf_score_is_nan(device, S) -> None:
    """A +inf score makes its row NaN (inf - inf, tests/runtime/test_limits.py::test_inf_in_bias),
    with a +inf sink too: the weight between them is undefined. The other rows keep the rule."""
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, 2, S, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 12, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 12, 16)).astype(np.float32)
    bias = np.zeros((S, 12), np.float32)
    bias[S - 1, 4] = np.inf
    bias[0] = -np.inf  # row 0: every key masked
    opts = dict(bias=bias, sinks=np.array([np.inf, 0.5], np.float32), return_lse=True)
    o, lse = attnc.attention(q, k, v, device=device, **opts)
    o_ref, lse_ref = attention_ref(q, k, v, **opts)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")
    assert np.isnan(o[0, :, S - 1]).all() and np.isnan(lse[0, :, S - 1]).all()
    assert np.all(o[0, 0, : S - 1] == 0.0) and np.all(lse[0, 0, : S - 1] == np.inf)
    assert np.isfinite(o[0, 1, : S - 1]).all() and np.isfinite(lse[0, 1, : S - 1]).all()
