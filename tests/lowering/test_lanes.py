"""The lanes strategy (attnc/lowering/lanes.py) with its knobs forced, on the subgroup adapters.

attention() picks it by heuristic only for large prefill on CPU adapters with 8-lane
subgroups (tests/runtime uses small shapes, which keep the tiled plan), so here hypothesis
draws shapes, knobs and option sets for it, and the subgroup-size check is tested directly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.errors import LoweringError
from attnc.lowering import lower, schedule
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime import api
from attnc.runtime.build import Options, build_kernel
from tests.forced_plan import OPTION_SETS, check_forced_plan, dialect
from tests.textbook import assert_close, attention_ref

ADAPTERS = ["wgpu:vulkan", "dawn:vulkan"]  # the lavapipe adapters with subgroups
RUN = settings(deadline=None, max_examples=5,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def lanes(**kw) -> Plan:
    base = dict(family=Family.SUBGROUPS, rows_per_invocation=1, subgroup_width=8, query_dim=16, value_columns=16,
                vector_width=4)
    return Plan(strategy=Strategy.LANES, **(base | kw))


@pytest.mark.parametrize(("plan", "BM", "msg"), [
    (lanes(family=Family.PORTABLE), 64, "use the subgroups family"),
    (lanes(vector_width=1), 64, "needs VEC=4"),
    (lanes(query_dim=18), 64, "multiples of 4"),
    (lanes(rows_per_invocation=3), 64, "TM=3 must be a power of two"),
    (lanes(subgroup_width=2), 64, "at least 4"),
    (lanes(subgroup_width=32, rows_per_invocation=4), 64, "whole subgroups"),
])
def test_lanes_rejects_what_it_cannot_map(plan, BM, msg) -> None:
    kern = build_kernel(Options(), {"BM": BM, "BN": 64})
    with pytest.raises(LoweringError, match=msg):
        lower(kern, plan)


@st.composite
def problems(draw, sgb: int):
    group = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.integers(1, 2))
    dims = dict(B=draw(st.integers(1, 2)), Hq=group * Hkv, Hkv=Hkv, S=draw(st.integers(1, 90)),
                T=draw(st.integers(1, 200)), D=4 * draw(st.integers(1, 16)), Dv=4 * draw(st.integers(1, 16)))
    tm = draw(st.sampled_from([1, 2]))
    dvc = draw(st.sampled_from([8, 16, 64]))
    plan = lanes(rows_per_invocation=tm, subgroup_width=sgb, query_dim=-(-dims["D"] // 8) * 8, value_columns=dvc)
    tun = {"BM": draw(st.sampled_from([32, 64]).filter(lambda b: b // tm >= sgb)), "BN": 64}
    nsplit = draw(st.sampled_from([1, 1, 3]))
    opts = draw(OPTION_SETS)
    return dims, plan, tun, nsplit, opts, draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(data=st.data())
def test_lanes_matches_reference(spec, data, require_adapters) -> None:
    """Random shapes (D and Dv up to 64, any S and T), knobs, splits and options."""
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = data.draw(problems(dev.subgroup_size))
    op = check_forced_plan(dev, dims, replace(plan, dialect=dialect(dev)), tun, nsplit, opts, seed)
    assert op.plan.strategy is Strategy.LANES


@pytest.mark.gpu
@pytest.mark.subgroup_sizes
@pytest.mark.parametrize("spec", ADAPTERS)
def test_lanes_at_the_device_subgroup_size(spec, require_adapters) -> None:
    """Causal GQA with kv_lens and a NaN past kv_lens, at whatever size this process's
    lavapipe has (scripts/test.sh reruns it with 4 and 16 lanes)."""
    dev = require_adapters(spec)[0]
    dims = dict(B=2, Hq=4, Hkv=2, S=37, T=70, D=16, Dv=12)
    plan = lanes(subgroup_width=dev.subgroup_size, rows_per_invocation=2, query_dim=16, value_columns=12,
                 dialect=dialect(dev))
    check_forced_plan(dev, dims, plan, {"BM": 4 * dev.subgroup_size, "BN": 64}, 1,
                      {"causal": True, "kv_lens": "draw", "return_lse": True}, 11)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
def test_lanes_on_another_subgroup_size_writes_nan(spec, require_adapters) -> None:
    """A shader built for another subgroup size writes NaN (o and lse), never a wrong number."""
    dev = require_adapters(spec)[0]
    other = 16 if dev.subgroup_size == 8 else 8
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(3))
    dims = dict(B=1, Hq=2, Hkv=2, S=40, T=40, D=16, Dv=16)
    op = api.prepare(dims, np.float32, device=dev, plan=lanes(subgroup_width=other, dialect=dialect(dev)),
                     tunables={"BM": 64, "BN": 64}, nsplit=1, return_lse=True)
    op.bind(q, k, v)
    op.run()
    o, lse = op.result()
    assert np.isnan(o).all() and np.isnan(lse).all()
    good = api.prepare(dims, np.float32, device=dev, plan=lanes(subgroup_width=dev.subgroup_size, dialect=dialect(dev)),
                       tunables={"BM": 64, "BN": 64}, nsplit=1)
    good.bind(q, k, v)
    good.run()
    assert_close(good.result()[0], attention_ref(q, k, v), 1e-5, "o")


@pytest.mark.subgroup_sizes
def test_heuristic_picks_lanes_for_large_cpu_prefill_only(require_adapters) -> None:
    """8-lane CPU subgroups (lavapipe's default width, scripts/test.sh's rerun at 256): lanes
    for the ci prefill shapes, tiled below the size threshold, for head dims above
    LANES_MAX_D, and for the portable family."""
    dev = require_adapters("wgpu:vulkan")[0]
    if dev.subgroup_size != 8:
        pytest.skip(f"the heuristic picks lanes with 8-lane subgroups only; this lavapipe has {dev.subgroup_size}")
    big = dict(B=1, Hq=4, Hkv=4, S=256, T=256, D=64, Dv=64)
    plan, tun = schedule.plan_for(dev.capabilities, Family.SUBGROUPS, big, causal=True)
    assert plan.strategy is Strategy.LANES and (plan.rows_per_invocation, plan.subgroup_width, plan.query_dim,
                                                plan.value_columns) == (2, 8, 64, 64)
    assert tun["BM"] // plan.rows_per_invocation >= plan.subgroup_width
    vision = dict(big, S=576, T=576, D=72, Dv=72)
    assert schedule.plan_for(dev.capabilities, Family.SUBGROUPS, vision)[0].query_dim == 72
    for dims, fam in ((dict(big, S=80, T=150), Family.SUBGROUPS), (dict(big, D=128, Dv=128), Family.SUBGROUPS),
                      (big, Family.PORTABLE)):
        assert schedule.plan_for(dev.capabilities, fam, dims)[0].strategy is Strategy.TILED
