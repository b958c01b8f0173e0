"""The bounds sanitizer on the real adapters (ATTNC_SANITIZE=bounds, runtime/dispatch.py), and
attnc's own kernels under it: in bounds by construction, tails and score tensors included."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import attnc
from attnc.lowering import schedule
from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy, layout, stream_layout
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.runtime.dispatch import BoundsError, Dispatch, empty, readback, run, upload
from tests.forced_plan import check_forced_plan
from tests.forced_plan import dialect as compiler_dialect
from tests.gpu_facts import h200_like

pytestmark = pytest.mark.gpu

SHIFT_WGSL = """\
struct Params { n: u32, shift: i32, grid_total: u32, grid_stride_x: u32 }
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
  if (lid >= P.n) {
    return;
  }
  let j = i32(lid) + P.shift;
  out[lid] = select(0.0, a[j], j >= 0 && u32(j) < P.n);
}
"""


def shift_program() -> Program:
    """out[i] = a[i + shift] where that is in range, else 0: the read itself is not guarded
    (both operands of a select are evaluated), the pattern the sanitizer must catch."""
    fields = (UniformField("n", 0, Scalar.U32), UniformField("shift", 4, Scalar.I32),
              UniformField("grid_total", 8, Scalar.U32), UniformField("grid_stride_x", 12, Scalar.U32))
    binds = (Binding("a", 0, Access.READ, Scalar.F32), Binding("out", 1, Access.READ_WRITE, Scalar.F32),
             Binding("params", 2, Access.UNIFORM, Scalar.U32))
    return Program(name="shift", wgsl=SHIFT_WGSL, entry_point="main", workgroup_size=64, bindings=binds,
                   uniforms=fields, grid=(), features=frozenset(), workgroup_storage_bytes=0)


def run_shift(dev, shift: int) -> np.ndarray:
    a = np.arange(1, 41, dtype=np.float32)
    out = empty(dev, 4 * 40)
    run(dev, [Dispatch(shift_program(), {"a": upload(dev, a), "out": out}, {"n": 40, "shift": shift}, 1)])
    return readback(dev, out, Scalar.F32, (40,))


def test_a_read_past_either_end_is_reported_at_its_line_even_when_discarded(device, monkeypatch) -> None:
    """Past the end (index 44 of 40) and before the start (a negative i32, as a huge u32), in
    the arm of a select that throws the value away; the report points at the WGSL line."""
    expected = np.where(np.arange(40) + 4 < 40, np.arange(1, 41) + 4, 0).astype(np.float32)
    np.testing.assert_array_equal(run_shift(device, 4), expected)  # unchecked: the right values
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    with pytest.raises(BoundsError) as info:
        run_shift(device, 4)
    err = info.value
    assert "4 out-of-bounds accesses at 1 site(s)" in err.message and "reached index 43 of 40" in err.message
    assert err.span is not None and err.span.line == 12 and err.span.source_line.lstrip().startswith("out[lid]")
    with pytest.raises(BoundsError, match="reached index 4294967295 of 40"):
        run_shift(device, -3)
    np.testing.assert_array_equal(run_shift(device, 0), np.arange(1, 41, dtype=np.float32))


def test_unknown_sanitizer_is_refused(require_adapters, monkeypatch) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setenv("ATTNC_SANITIZE", "memory")
    with pytest.raises(ValueError, match="ATTNC_SANITIZE='memory'"):
        run_shift(dev, 0)


@pytest.mark.parametrize("causal", [False, True])
def test_score_tensors_are_read_in_bounds_on_the_tail_tiles(device, monkeypatch, causal: bool) -> None:
    """A bias read for the keys and rows past the ends of the last tiles (the select discards
    them) stays inside the buffer: `Shader.load` clamps each index to its dim. Same bits as
    without the sanitizer."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 37, 24)).astype(np.float32)
    k = rng.standard_normal((1, 2, 53, 24)).astype(np.float32)
    v = rng.standard_normal((1, 2, 53, 24)).astype(np.float32)
    bias = rng.standard_normal((4, 1, 53)).astype(np.float32)
    sinks = rng.uniform(-1, 1, 4).astype(np.float32)
    ref = attnc.attention(q, k, v, causal=causal, bias=bias, sinks=sinks, device=device)
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    np.testing.assert_array_equal(attnc.attention(q, k, v, causal=causal, bias=bias, sinks=sinks, device=device), ref)


# --------------------------------------------------------------------------- the GPU plans
def _seeds_plans() -> list[tuple[str, str, dict, dict, object, dict, int]]:
    """(case, dialect, dims, options, plan, tunables, splits) of the heuristic's H200 choice for
    every seeds case, the Tint plan only where it differs from Naga's."""
    from attnc.bench.cases import load_suite

    out, seen = [], set()
    for dialect in ("naga", "tint"):
        for case in load_suite("seeds"):
            gpu = h200_like(dialect=dialect)
            dims = {x: getattr(case, x) for x in ("B", "Hq", "Hkv", "S", "T", "D", "Dv")}
            plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dims, causal=case.causal)
            packed = dims["S"] <= 16 and dims["Hq"] > dims["Hkv"]
            nsplit = (schedule.split_count(gpu, dims, tun["BM"], tun["BN"], packed, plan.strategy is Strategy.STREAM)
                      if dims["S"] <= 16 else schedule.prefill_split_count(gpu, dims, tun["BM"], tun["BN"]))
            key = (case.name, dataclasses.replace(plan, dialect=Dialect.NAGA), nsplit)
            if key not in seen:
                seen.add(key)
                out.append((case.name, dialect, dims, {"causal": case.causal}, plan, tun, nsplit))
    return out


SEEDS_PLANS = _seeds_plans()
LAVAPIPE_SMEM = 32768  # what lavapipe grants (the GPU bench also runs under the sanitizer there)


def _smem(plan, tun) -> int:
    return 4 * (stream_layout(plan, tun["BM"], tun["BN"]) if plan.strategy is Strategy.STREAM
                else layout(plan, tun["BM"], tun["BN"])).smem_words


def test_the_h200_plans_are_the_ten_expected() -> None:
    """9 cases, and vision_h72's Tint plan (p in chunks without the prefetch registers)."""
    assert len(SEEDS_PLANS) == 10
    assert [(c, d) for c, d, *_ in SEEDS_PLANS if d == "tint"] == [("vision_h72_s5776", "tint")]


@pytest.mark.parametrize(("case", "dialect", "dims", "opts", "plan", "tun", "nsplit"),
                         [pytest.param(*p, id=f"{p[0]}-{p[1]}") for p in SEEDS_PLANS])
def test_gpu_heuristic_plans_stay_in_bounds(case, dialect, dims, opts, plan, tun, nsplit, require_adapters,
                                            monkeypatch) -> None:
    """The plan attention() takes on the H200 for each seeds case (the one that runs there
    without Naga's index clamps), under the sanitizer on lavapipe through the same compiler, on
    a smaller problem with tails in every tiled axis and every score tensor: a [B, Hq, S, T]
    bias, sinks, kv_lens (NaN values past them) and lse. The loops are not unrolled here
    (UN=1: lavapipe compiles fully unrolled tiles for minutes; unrolling repeats the same
    index expressions with the loop counter folded in)."""
    dev = require_adapters("wgpu:vulkan" if dialect == "naga" else "dawn:vulkan")[0]
    assert _smem(plan, tun) <= LAVAPIPE_SMEM, "a plan lavapipe cannot run: sanitize it on the GPU"
    group = dims["Hq"] // dims["Hkv"]
    small = dict(dims, B=1, Hkv=min(dims["Hkv"], 2), S=dims["S"] if dims["S"] <= 16 else 77, T=150)
    small["Hq"] = group * small["Hkv"]
    options = {**opts, "bias": "full", "sinks": "draw", "kv_lens": "draw", "return_lse": True}
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    op = check_forced_plan(dev, small, dataclasses.replace(plan, unroll=1), tun, nsplit, options, seed=11)
    assert op.plan.strategy is plan.strategy and op.plan.dialect is plan.dialect


def _quantized_plans() -> list[tuple[str, str, str, dict, object, dict, int]]:
    """(case, dialect, K/V format, dims, plan, tunables, splits) of the heuristic's H200 choice
    for one-row decoding over a quantized cache: lane groups over q8_0, q4_0 and int8 (at D = 64
    and 128); Tint's for q8_0 only (the same rule)."""
    from attnc.bench.cases import load_suites

    cases = {c.name: c for s in load_suites().values() for c in s}
    out = []
    for name, dialect, fmt in (("kv_dec1_h128_t16384", "naga", "q8_0"), ("kv_dec1_h128_t16384", "naga", "q4_0"),
                               ("kv_dec1_h128_t16384", "naga", "int8"), ("kv_dec1_h64_t32768", "naga", "q8_0"),
                               ("kv_dec1_h64_t32768", "naga", "int8"),
                               ("kv_dec1_h128_t16384", "tint", "q8_0")):
        case, gpu = cases[name], h200_like(dialect=dialect)
        dims = {x: getattr(case, x) for x in ("B", "Hq", "Hkv", "S", "T", "D", "Dv")}
        plan, tun = schedule.plan_for(gpu, Family.SUBGROUPS, dims, f16=True, k_format=fmt)
        nsplit = schedule.split_count(gpu, dims, tun["BM"], tun["BN"], False, True)
        out.append((name, dialect, fmt, dims, plan, tun, nsplit))
    return out


@pytest.mark.parametrize(("case", "dialect", "fmt", "dims", "plan", "tun", "nsplit"),
                         [pytest.param(*p, id=f"{p[0]}-{p[1]}-{p[2]}") for p in _quantized_plans()])
def test_gpu_quantized_decode_plans_stay_in_bounds(case, dialect, fmt, dims, plan, tun, nsplit, require_adapters,
                                                   monkeypatch) -> None:
    """The plans attention() takes on the H200 for one-row decoding over q8_0, q4_0 and int8 K/V
    (f16 q), under the sanitizer on lavapipe through the same compiler, on a smaller problem
    with a tail in every axis, a [B, Hq, S, T] bias, sinks, kv_lens and lse, against float64
    on the dequantized K/V."""
    dev = require_adapters("wgpu:vulkan" if dialect == "naga" else "dawn:vulkan")[0]
    assert plan.softmax_phase == 3
    small = dict(dims, B=2, Hq=2, Hkv=2, T=301)
    options = {"bias": "full", "sinks": "draw", "kv_lens": "draw", "return_lse": True}
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    op = check_forced_plan(dev, small, plan, tun, nsplit, options, seed=12, dtype=np.float16, kv_formats=(fmt, fmt))
    assert op.plan.softmax_phase == plan.softmax_phase


F16_TILE_PLANS = [  # (target, plan, BM, BN): p chunks and value blocks smaller than the key tile,
    # p stored one row at a time (TM = 2) and four at once (TM = 4), a resident query tile
    ("portable-f16", Plan(Family.PORTABLE, Storage.F16A, workgroup_size=64, rows_per_invocation=2, head_chunk=8,
                          value_columns=32, value_stage_columns=16, vector_width=4, value_block_keys=8,
                          p_chunk_keys=16), 32, 32),
    ("subgroups-f16", Plan(Family.SUBGROUPS, Storage.F16A, workgroup_size=128, rows_per_invocation=4, head_chunk=16,
                           value_columns=64, value_stage_columns=32, vector_width=4, value_block_keys=16,
                           p_chunk_keys=32, resident_query=True, query_dim=64, prefetch=1), 64, 64),
]


@pytest.mark.parametrize(("spec", "target", "plan", "bm", "bn"),
                         [pytest.param(spec, *p, id=f"{p[0]}-{spec}")
                          for spec, p in zip(("wgpu:vulkan", "dawn:vulkan"), F16_TILE_PLANS, strict=True)])
def test_f16_tile_plans_stay_in_bounds(spec, target, plan, bm, bn, require_adapters, monkeypatch) -> None:
    """f16 tiles (q/k/v staged in halves, p in an f32 tile of its own) under the sanitizer, with
    tails in every tiled axis, a [B, Hq, S, T] bias, sinks, kv_lens, causal and lse, within 2e-3;
    each plan through one of the two WGSL compilers."""
    dev = require_adapters(spec)[0]
    plan = dataclasses.replace(plan, dialect=compiler_dialect(dev))
    assert 4 * layout(plan, bm, bn).smem_words <= LAVAPIPE_SMEM
    dims = dict(B=2, Hq=4, Hkv=2, S=77, T=150, D=60, Dv=36)
    options = {"causal": True, "bias": "full", "sinks": "draw", "kv_lens": "draw", "return_lse": True}
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    op = check_forced_plan(dev, dims, plan, {"BM": bm, "BN": bn}, None, options, seed=13, dtype=np.float16,
                           target=target)
    assert op.plan.storage is Storage.F16A
