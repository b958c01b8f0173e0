"""tanh in the scores, end to end: softcap over caps from 1e-3 to 1e9 and a tanh score_mod over
log-spaced factors, against the float64 textbook reference, on every adapter x family (and the
f16-tile targets), prefill and split-KV decode shapes.

WGSL's builtin tanh lost its relative accuracy near 0 on lavapipe, so large caps (s / cap
small) were wrong: softcap=1e3 gave a relative error of 2e-5, 1e5 1.6e-3, 1e8 0.64, and
tanh(s * 1e-6) * 1e6 1.6e-2. The element-wise test of the emitted tanh is
tests/lowering/test_tanh.py; here the scale and the cap are drawn log-uniformly (run-time
values: one kernel per target and shape kind), keeping the scores within |s| <~ 20, where the
rounding of q.k itself stays within the contract.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from tests.runtime.test_attention_options import RUN, _seed, compare, qkv
from tests.runtime.test_f16_math import F16_TARGETS
from tests.targets import TARGETS

pytestmark = pytest.mark.gpu

ALL_TARGETS = [pytest.param((s, f), id=f"{s}-{f}") for s, f in TARGETS] + F16_TARGETS
KINDS = ["prefill", "decode"]
# per-head factors of the score_mod, log-spaced and exact in f32 (about 1e-10, 1e-6, 8e-3, 64)
FACTORS = (2.0**-33, 2.0**-20, 2.0**-7, 2.0**6)


@pytest.fixture
def target(request, require_adapters, missing_adapter):
    """(device, target) for TARGETS and the f16-tile targets: missing features fail in CI."""
    spec, family = request.param
    dev = require_adapters(spec)[0]
    need = {"f16"} if family.endswith("-f16") else set()
    need |= {"subgroups"} if family.startswith("subgroups") else set()
    if not need <= dev.features:
        missing_adapter(f"{spec} lacks {sorted(need - dev.features)} for {family}")
    return dev, family


def shape(draw, kind: str) -> dict[str, int]:
    """Four query heads; prefill S >= 17 over 1, 2 or 4 KV heads, decode S <= 8 over T >= 1000
    keys (split-KV and the combine) with GQA packing. One head dim: a kernel per case. At least
    two keys: with one, lse is the score itself, whose magnitude a small cap bounds while the
    rounding of q.k does not shrink with it; not tanh's accuracy."""
    if kind == "prefill":
        return dict(B=draw(st.integers(1, 2)), Hq=4, Hkv=draw(st.sampled_from([1, 2, 4])),
                    S=draw(st.integers(17, 70)), T=draw(st.integers(2, 150)), D=64, Dv=64)
    return dict(B=draw(st.integers(1, 2)), Hq=4, Hkv=2, S=draw(st.integers(1, 8)),
                T=draw(st.integers(1000, 1500)), D=64, Dv=64)


def dtype_of(target) -> type:
    return np.float16 if target[1].endswith("-f16") else np.float32


def log_uniform(draw, lo: float, hi: float) -> float:
    return float(10.0 ** draw(st.floats(np.log10(lo), np.log10(hi))))


@pytest.mark.parametrize("target", ALL_TARGETS, indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_softcap_over_log_spaced_caps(target, kind, data) -> None:
    """cap in [1e-3, 1e9]: tanh's argument s / cap from ~1e-13 (tanh(x) = x to f32 precision)
    to saturation (|s| up to ~20 under caps from 1e-3). Larger scales are left out: the
    rounding of q.k times a large scale is what they would test."""
    cap = log_uniform(data.draw, 1e-3, 1e9)
    scale = log_uniform(data.draw, 1e-4, 0.5)
    sh = shape(data.draw, kind)
    rng = _seed(data.draw)
    dtype = dtype_of(target)
    compare(target, dtype, *qkv(rng, **sh, dtype=dtype), dict(softcap=cap, scale=scale, return_lse=True))


def tanh_mod_dsl(s, b, h, q_idx, kv_idx):
    c = attnc.where(h == 0, FACTORS[0], attnc.where(h == 1, FACTORS[1], attnc.where(h == 2, FACTORS[2], FACTORS[3])))
    return attnc.tanh(s * c) / c


def tanh_mod_np(s, b, h, i, j):
    c = np.array(FACTORS)[h]
    return np.tanh(s * c) / c


@pytest.mark.parametrize("target", [p for p in ALL_TARGETS if not p.id.endswith("-f16")], indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@settings(RUN, max_examples=5)
@given(data=st.data())
def test_tanh_score_mod_over_log_spaced_factors(target, kind, data) -> None:
    """tanh(s * c) / c with c per head from 2^-33 to 2^6 and a log-uniform scale: tanh's argument
    from ~1e-14 to ~2e3; with c small the score is s itself, which the reference checks to 1e-5."""
    sh = shape(data.draw, kind)
    rng = _seed(data.draw)
    scale = log_uniform(data.draw, 1e-4, 0.5)
    compare(target, np.float32, *qkv(rng, **sh, dtype=np.float32),
            dict(score_mod=tanh_mod_dsl, scale=scale, return_lse=True), dict(score_mod=tanh_mod_np))
