"""Values a score_mod or mask_mod reuses stay shared: the traced kernel, its text, the passes
and the WGSL grow linearly with what the user wrote, not exponentially with the depth of reuse
(`x = f(x, x)` n times was 2^n nodes in every form), and the results do not change."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.frontend import parser
from attnc.ir.interp import interpret
from attnc.ir.printer import print_kernel
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime.build import Options, build_kernel, programs_for
from tests.textbook import assert_close, attention_ref

# each step combines the previous value with itself through a different operator; every one
# keeps x equal to s (so the reference is plain attention) while reading x twice
STEPS = {
    "halves": lambda x: x * 0.5 + x * 0.5,
    "max": lambda x: attnc.maximum(x, x),
    "where": lambda x: attnc.where(x > x, x * 2.0, x),
    "minus": lambda x: x + (x - x),
}
PLANS = [Plan(Family.PORTABLE), Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=64,
                                      lanes_per_key=2, keys_per_step=4, query_dim=64, value_columns=64,
                                      vector_width=4)]


def deep_mod(steps: list[str]):
    def mod(s, b, h, q_idx, kv_idx):
        x = s
        for name in steps:
            x = STEPS[name](x)
        return x
    return mod


def deep_mask(depth: int):
    def mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        for _ in range(depth):
            d = attnc.maximum(d, d)
        return d >= 0
    return mask


def sizes(steps: list[str]) -> tuple[int, list[int]]:
    kern = build_kernel(Options(score_mod=deep_mod(steps)), {"BM": 16, "BN": 16})
    return len(print_kernel(kern)), [len(p.wgsl) for plan in PLANS for p in programs_for(kern, plan)]


@settings(max_examples=20, deadline=None)
@given(steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=12))
def test_reuse_grows_the_kernel_linearly(steps: list[str]) -> None:
    """Doubling the depth of reuse adds at most a few hundred characters of text and of WGSL
    per step (tree-expanded, 12 more steps would multiply them by 4096)."""
    text1, wgsl1 = sizes(steps)
    text2, wgsl2 = sizes(steps * 2)
    assert text2 - text1 <= 200 * len(steps), (text1, text2)
    for w1, w2 in zip(wgsl1, wgsl2, strict=True):
        assert w2 - w1 <= 400 * len(steps), (w1, w2)


def test_deep_reuse_traces_prints_parses_and_interprets() -> None:
    """40 levels of x = f(x, x): what was 2^40 nodes traces, round-trips through the text form
    and interprets to plain attention."""
    steps = [sorted(STEPS)[i % len(STEPS)] for i in range(40)]
    kern = build_kernel(Options(score_mod=deep_mod(steps), mask_mod=deep_mask(40)), {"BM": 16, "BN": 16})
    text = print_kernel(kern)
    assert len(text) < 20_000
    assert print_kernel(parser.parse(text)) == text
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 7, 8)).astype(np.float32) for _ in range(3))
    o, _ = interpret(kern, dict(q=q, k=k, v=v, scale=0.35))
    ref = attention_ref(q, k, v, scale=0.35, causal=True)
    assert_close(o.astype(np.float32), ref, 1e-6)


@pytest.mark.gpu
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=20, max_size=30),
       depth=st.integers(10, 30))
def test_deep_reuse_runs_and_matches(device, steps: list[str], depth: int) -> None:
    """On a device: a score_mod and a mask_mod 10-30 levels deep compile and match the reference."""
    rng = np.random.default_rng(depth)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for n in (9, 9, 9))
    o = attnc.attention(q, k, v, score_mod=deep_mod(steps), mask_mod=deep_mask(depth), device=device)
    assert_close(o, attention_ref(q, k, v, causal=True), 1e-5)
