"""The split-KV combine (attnc/lowering/combine.py) with its split groups forced, on every adapter.

The runtime derives CSG from the split count (combine_groups); here hypothesis draws CSG and
the split count independently, so groups that get no split, a last loop iteration with clamped
indices, and splits that own no KV tile (m = -inf, l = 0) all meet the reference, with the
options the combine handles itself (sinks, lse) and NaN values past kv_lens.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.errors import LoweringError
from attnc.lowering import lower
from attnc.lowering.combine import CU, combine_groups
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime.build import Options, build_kernel
from tests.forced_plan import check_forced_plan

ADAPTERS = ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]
RUN = settings(deadline=None, max_examples=4,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def stream(**kw) -> Plan:
    base = dict(workgroup_size=32, lanes_per_key=1, keys_per_step=1, query_dim=8, value_columns=128, vector_width=4)
    return Plan(Family.PORTABLE, strategy=Strategy.STREAM, **(base | kw))


def test_combine_groups_cover_the_splits() -> None:
    for n in range(2, 300):
        g = combine_groups(n)
        assert g in (1, 2, 4, 8)
        assert g * CU >= n or g == 8  # one loop iteration unless 8 groups cannot cover them
        assert g == 1 or (g // 2) * CU < n  # no more groups than needed


def test_combine_rejects_bad_group_counts() -> None:
    kern = build_kernel(Options(split=True), {"BM": 1, "BN": 32})
    with pytest.raises(LoweringError, match="CSG=3"):
        lower(kern, stream(combine_groups=3))


@st.composite
def problems(draw):
    dims = dict(B=draw(st.integers(1, 2)), Hq=2, Hkv=2, S=draw(st.integers(1, 3)),
                T=draw(st.integers(1, 400)), D=8, Dv=4 * draw(st.integers(1, 20)))
    plan = stream(combine_groups=draw(st.sampled_from([1, 2, 4, 8])))
    nsplit = draw(st.integers(2, 80))
    opts = draw(st.fixed_dictionaries({}, optional={
        "causal": st.just(True), "return_lse": st.just(True), "kv_lens": st.just("draw"),
        "sinks": st.just("draw")}))
    return dims, plan, nsplit, opts, draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=problems())
def test_combine_matches_reference(spec, problem, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, nsplit, opts, seed = problem
    op = check_forced_plan(dev, dims, plan, {"BM": 1, "BN": 32}, nsplit, opts, seed)
    assert op.scalars["NSPLIT"] == nsplit and op.plan.combine_groups == plan.combine_groups
    assert op.progs[-1].workgroup_size == 32 * plan.combine_groups


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
def test_combine_groups_from_the_split_count(spec, require_adapters) -> None:
    """CSG left to the runtime: 70 splits (two loop iterations of 8 groups), most without keys."""
    dev = require_adapters(spec)[0]
    dims = dict(B=1, Hq=2, Hkv=1, S=1, T=300, D=8, Dv=36)
    op = check_forced_plan(dev, dims, stream(), {"BM": 2, "BN": 32}, 70, {"return_lse": True, "sinks": "draw"}, 1)
    assert op.plan.combine_groups == 8


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@pytest.mark.parametrize("groups", [1, 2])
def test_a_maximum_rising_in_later_loop_iterations(spec, groups, require_adapters) -> None:
    """Each split group walks its splits CU at a time: with scores that grow along the keys,
    every later loop iteration holds a larger maximum, so a weight taken against any maximum
    but the one over all splits (or a state not rescaled when it rises) weighs the early splits
    e^(many) too much."""
    import numpy as np

    from attnc.runtime import api
    from tests.textbook import assert_close, attention_ref

    dev = require_adapters(spec)[0]
    nsplit, T = 5 * CU * groups, 5 * CU * groups * 32  # five loop iterations per group, a tile per split
    dims = dict(B=1, Hq=2, Hkv=2, S=1, T=T, D=8, Dv=36)
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, T, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, T, 36)).astype(np.float32)
    bias = np.broadcast_to(np.linspace(0.0, 30.0, T, dtype=np.float32), (2, 1, T)).copy()
    op = api.prepare(dims, np.float32, device=dev, plan=stream(combine_groups=groups), tunables={"BM": 1, "BN": 32},
                     nsplit=nsplit, bias=bias, return_lse=True)
    op.bind(q, k, v)
    op.run()
    o, lse = op.result()
    o_ref, lse_ref = attention_ref(q, k, v, bias=bias, return_lse=True)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("nsplit", [2, 9])
def test_only_the_last_split_holds_keys(groups, nsplit, require_adapters) -> None:
    """A decode row at the last position with a left window of 3 keeps keys T - 4 .. T - 1, all
    in the last split: every other split's state is empty (m = -inf), so a maximum that leaves
    out the last split, or a group's splits walked short of it, loses every key."""
    (dev,) = require_adapters("wgpu:vulkan")
    dims = dict(B=1, Hq=2, Hkv=2, S=1, T=320, D=8, Dv=8)
    check_forced_plan(dev, dims, stream(combine_groups=groups), {"BM": 1, "BN": 32}, nsplit,
                      {"window": (3, 0), "return_lse": True}, seed=1)
