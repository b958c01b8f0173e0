"""The tiled strategy's loop shapes (attnc/lowering/tiled.py): unrolled tile loops (UN) and
registers that prefetch the next staged block (PF), on every adapter.

The heuristics turn both on for GPUs only (lavapipe compiles fully unrolled tiles for
minutes), so the option suites on the CPU adapters run the plain loops; here hypothesis draws
UN, PF and the other tiled knobs with random option sets, including a non-finite value in a
masked key, and the unrolled, prefetched kernel is checked to give the same bits as the
plain one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnc.errors import LoweringError
from attnc.lowering.candidates import fits_default_limits
from attnc.lowering.plan import Family, Plan, Storage, Strategy, layout
from attnc.lowering.tiled import owned
from attnc.lowering.wgsl import Writer
from attnc.runtime import api
from tests.forced_plan import check_forced_plan
from tests.textbook import assert_close, attention_ref

ADAPTERS = ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]
RUN = settings(deadline=None, max_examples=2,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------- emission rules
def _counted(n: int, unroll: int) -> str:
    w = Writer()
    w.counted("j", n, unroll, lambda: w.line("f(j);"))
    return w.text()


def test_counted_unrolls_by_the_largest_divisor() -> None:
    assert "for (var j = 0u; j < 16u" in _counted(16, 1)
    whole = _counted(4, 64)  # every copy, no loop left
    assert "for" not in whole and [f"let j = {i}u;" in whole for i in range(4)] == [True] * 4
    part = _counted(24, 16)  # 24 has no divisor 16: 12 copies per iteration
    assert "for (var j_0 = 0u; j_0 < 24u; j_0 = j_0 + 12u)" in part
    assert part.count("f(j);") == 12 and "let j = j_0 + 11u;" in part


@pytest.mark.parametrize(("kw", "msg"), [(dict(unroll=0), "UN=0 must be at least 1"),
                                         (dict(prefetch=2), "PF=2 must be 0 or 1"),
                                         (dict(value_block_keys=64),
                                          "VK=64 must be 0 or a power of two no larger than BN=32"),
                                         (dict(value_block_keys=12), "VK=12 must be 0 or a power of two"),
                                         (dict(p_chunk_keys=16, value_block_keys=8), "PC=16 must be a multiple of 32"),
                                         (dict(p_chunk_keys=16, value_block_keys=32),
                                          "PC=16 must be 0 or a power of two from VK=32"),
                                         (dict(p_chunk_keys=24), "PC=24 must be 0 or a power of two")])
def test_layout_rejects_bad_loop_knobs(kw, msg) -> None:
    with pytest.raises(LoweringError, match=msg):
        layout(Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=4, **kw), 32, 32)


# --------------------------------------------------------------------------- against the reference
@st.composite
def problems(draw):
    group = draw(st.sampled_from([1, 2]))
    vec = draw(st.sampled_from([1, 4]))
    dims = dict(B=1, Hq=group * 2, Hkv=2, S=draw(st.integers(1, 140)), T=draw(st.integers(1, 200)),
                D=vec * draw(st.integers(1, 80 // vec)), Dv=vec * draw(st.integers(1, 80 // vec)))
    bm, bn = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))
    plan = Plan(Family.PORTABLE, workgroup_size=draw(st.sampled_from([32, 64, 128])),
                rows_per_invocation=draw(st.sampled_from([1, 2, 4])),
                head_chunk=draw(st.sampled_from([8, 16, 24])), value_columns=draw(st.sampled_from([16, 32, 64])),
                value_stage_columns=draw(st.sampled_from([8, 16, 32])),
                value_block_keys=draw(st.sampled_from([0, 0, 8, 16])), vector_width=vec,
                unroll=draw(st.sampled_from([1, 2])), prefetch=draw(st.sampled_from([0, 1, 1])),
                p_chunk_keys=draw(st.sampled_from([0, 16, 32])), last_tile_first=draw(st.sampled_from([0, 1])))
    if draw(st.booleans()):
        plan = Plan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__}, "resident_query": True,
                       "query_dim": -(-dims["D"] // plan.head_chunk) * plan.head_chunk})
    try:
        assume(fits_default_limits(plan, {"BM": bm, "BN": bn}))
        # at most 32 scores and 32 output columns per invocation (the GPU heuristic's 128x64
        # tiles have 32 of each) and at most 4 value blocks: the emitted structure is the same
        # beyond, and lavapipe compiles such shaders for a minute or more (128 + 128 with UN=2:
        # 61 s; 8 value stages of 8 columns with UN=2, PF=1: 80 s; every barrier costs)
        lay = layout(plan, bm, bn)
        assume(lay.TM * lay.TN <= 32 and lay.TM * lay.TD <= 32 and lay.DVC // lay.DVS * (lay.BN // lay.VK) <= 4)
    except LoweringError:
        assume(False)
    opts = draw(st.fixed_dictionaries({}, optional={
        "causal": st.just(True), "softcap": st.just(20.0), "return_lse": st.just(True),
        "window": st.tuples(st.integers(0, 50), st.none() | st.integers(0, 8)), "kv_lens": st.just("draw"),
        "bias": st.sampled_from(["draw", "full"]), "sinks": st.just("draw")}))
    return dims, plan, {"BM": bm, "BN": bn}, draw(st.sampled_from([None, 1, 3])), opts, draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=problems())
def test_tiled_loop_shapes_match_reference(spec, problem, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = problem
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed)
    assert op.plan.strategy is Strategy.TILED and (op.plan.unroll, op.plan.prefetch) == (plan.unroll, plan.prefetch)


# (UN, PF, PC, VK, QO) against the plain kernel (1, 0, 0, 0, 0), each on one adapter: 64-key tiles
# over 8 invocations per row, so PC=32 writes p in two chunks of one (VK=32) or two (VK=16) value
# blocks, PC=64 in one chunk of four, and QO=1 takes the query tiles in another order. 16-key
# value blocks go to the Vulkan adapters: lavapipe compiles them in 20-50 s (with 16-column value
# stages 110-200 s), llvmpipe's GL path slower still.
SAME_BITS = [("wgpu:vulkan", (1, 0, 32, 16, 0)), ("dawn:vulkan", (1, 1, 64, 16, 0)),
             ("wgpu:opengl", (4, 1, 0, 0, 0)), ("wgpu:opengl", (1, 0, 0, 0, 1)), ("dawn:vulkan", (4, 1, 32, 32, 0))]


@pytest.mark.gpu
@pytest.mark.parametrize("spec,variant", SAME_BITS, ids=[f"{s}-{v}" for s, v in SAME_BITS])
def test_unrolled_prefetched_kernel_gives_the_same_bits(spec, variant, require_adapters) -> None:
    """Unrolling and prefetching change when loads happen, PC when p is written and QO which
    workgroup takes which query tile, not the arithmetic: same bits, also with a NaN value at a
    visible key (its rows only) and an inf one at a masked key."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(6)
    dims = dict(B=1, Hq=2, Hkv=1, S=90, T=150, D=24, Dv=20)
    q = rng.standard_normal((1, 2, 90, 24)).astype(np.float32)
    k = rng.standard_normal((1, 1, 150, 24)).astype(np.float32)
    v = rng.standard_normal((1, 1, 150, 20)).astype(np.float32)
    v[0, 0, 149, 7] = np.inf  # visible to the last row only (causal)
    v[0, 0, 70, 3] = np.nan
    outs = []
    for un, pf, pc, vk, qo in ((1, 0, 0, 0, 0), variant):
        plan = Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=4, head_chunk=8, value_columns=32,
                    value_stage_columns=32, vector_width=4, unroll=un, prefetch=pf, p_chunk_keys=pc,
                    value_block_keys=vk, last_tile_first=qo)
        op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 32, "BN": 64}, nsplit=2,
                         causal=True)
        op.bind(q, k, v)
        op.run()
        outs.append(op.result()[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    o = outs[1]
    nan_rows = np.arange(90) + 60 >= 70  # rows that see key 70
    assert np.isnan(o[0, :, nan_rows, 3]).all() and not np.isnan(o[0, :, ~nan_rows]).any()
    assert np.isnan(o[0, :, -1, 7]).all() or np.isinf(o[0, :, -1, 7]).all()
    ref = attention_ref(q, k, np.nan_to_num(v, nan=0.0, posinf=0.0), causal=True)
    keep = np.ones(20, bool)
    keep[[3, 7]] = False
    assert_close(o[..., keep], ref[..., keep], 1e-5, "o")


def test_f16_prefetch_registers_hold_packed_words() -> None:
    """Under f16 storage (packed words, f32 math) the prefetch registers keep the loaded words
    and unpack them where they are stored to workgroup memory, so the loads stay in flight
    behind the tile's math; f32 plans keep vec4<f32> registers."""
    from attnc.lowering import lower
    from attnc.runtime.build import Options, build_kernel

    for f16 in (False, True):
        kern = build_kernel(Options(f16=f16), {"BM": 32, "BN": 32})
        plan = Plan(Family.PORTABLE, Storage.F16 if f16 else Storage.F32, workgroup_size=64, rows_per_invocation=2,
                    head_chunk=8, value_columns=32, value_stage_columns=16, vector_width=4, unroll=2, prefetch=1)
        main = lower(kern, plan)[0].wgsl
        regs = [line.split(":")[1].strip() for line in main.splitlines() if line.strip().startswith("var pk")]
        assert regs and set(regs) == {"vec2<u32>;" if f16 else "vec4<f32>;"}
        assert ("unpack2x16float(pk0.x)" in main) == f16


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("target", ["portable", "portable-f16"])
def test_prefetch_with_float16_inputs(spec, target, require_adapters, missing_adapter) -> None:
    """f16 inputs (packed storage with f32 math, or shader-f16 tiles and products): the
    prefetched, unrolled kernel gives the same bits as the plain one."""
    dev = require_adapters(spec)[0]
    if target == "portable-f16" and "f16" not in dev.features:
        missing_adapter(f"{spec} offers no shader-f16 (lavapipe does)")
    rng = np.random.default_rng(7)
    dims = dict(B=1, Hq=2, Hkv=2, S=70, T=100, D=32, Dv=24)
    q = rng.standard_normal((1, 2, 70, 32)).astype(np.float16)
    k = rng.standard_normal((1, 2, 100, 32)).astype(np.float16)
    v = rng.standard_normal((1, 2, 100, 24)).astype(np.float16)
    outs = []
    for un, pf in ((1, 0), (2, 1)):
        storage = Storage.F16A if target == "portable-f16" else Storage.F16
        plan = Plan(Family.PORTABLE, storage, workgroup_size=64, rows_per_invocation=2, head_chunk=8, value_columns=32,
                    value_stage_columns=16, vector_width=4, unroll=un, prefetch=pf)
        op = api.prepare(dims, np.float16, device=dev, plan=plan, tunables={"BM": 32, "BN": 32}, target=target)
        assert (op.plan.unroll, op.plan.prefetch) == (un, pf)
        op.bind(q, k, v)
        op.run()
        outs.append(op.result()[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[1], attention_ref(q, k, v), 2e-3, "o")


@pytest.mark.parametrize(("ct", "n"), [(1, 8), (2, 6), (4, 3), (8, 8), (8, 12), (16, 2), (32, 1)])
def test_owned_elements_cover_a_line_once_in_contiguous_runs(ct, n) -> None:
    """The keys (or value columns) the CT invocations of a row group own partition the line, and
    every vec4-sized run an invocation owns sits next to its neighbour's (one contiguous span per
    run: the bank-conflict-free order)."""
    index = [[a * c + b for a, b in (owned(ct, n, x) for x in range(n))] for c in range(ct)]
    assert sorted(i for row in index for i in row) == list(range(ct * n))
    run = 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1
    for x in range(0, n, run):
        starts = [index[c][x] for c in range(ct)]
        assert starts == [starts[0] + c * run for c in range(ct)]
        assert all(index[c][x:x + run] == list(range(starts[c], starts[c] + run)) for c in range(ct))


# --------------------------------------------------------------------------- shuffle-only reductions
@pytest.mark.gpu
@pytest.mark.subgroup_sizes
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize(("wg", "bm", "tm"), [(64, 16, 2), (64, 8, 2)], ids=["ct8", "ct16"])
def test_row_reductions_at_the_device_subgroup_size(spec, wg, bm, tm, require_adapters) -> None:
    """Row groups of CT = 8 or 16 lanes wider than SGMIN = 4, with SGFAST = 16: the shader reduces
    by shuffles alone when its subgroups are at least CT lanes, through workgroup memory
    otherwise (scripts/test.sh reruns this with 4 and 16 lanes, so each branch runs)."""
    from attnc.lowering.plan import Dialect, fast_reduce

    dev = require_adapters(spec)[0]
    dialect = Dialect.TINT if dev.dialect == "tint" else Dialect.NAGA
    plan = Plan(Family.SUBGROUPS, dialect=dialect, workgroup_size=wg, rows_per_invocation=tm, head_chunk=16,
                value_columns=32, value_stage_columns=32, min_subgroup=4, shuffle_only_lanes=16, vector_width=4)
    assert fast_reduce(plan, layout(plan, bm, 64))
    dims = dict(B=2, Hq=4, Hkv=2, S=45, T=150, D=40, Dv=28)
    op = check_forced_plan(dev, dims, plan, {"BM": bm, "BN": 64}, 2,
                           {"causal": True, "kv_lens": "draw", "return_lse": True, "softcap": 20.0}, 12)
    assert "sg_wide" in op.progs[0].wgsl and "SGFAST=16" in op.variant
