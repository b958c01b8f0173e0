"""The float16 output (docs/API.md, float16): the kernels write o as f16, halves packed in pairs
into u32 words by the invocation that owns both columns, rows at an even stride.

- the conversion (wgsl_lib/f16_out.wgsl) against numpy's astype(float16), bit for bit, on
  every adapter: ties to even, subnormal halves, the edge of f16's range, inf and NaN;
- the layouts: the tiled strategy's are those of f32; an invocation owns whole pairs of
  columns (runs of 2 or 4) or, with an odd number per staged chunk, pairs with its neighbour
  through a workgroup array counted in the plan's workgroup memory;
- each strategy's f16 kernel with its knobs drawn (the strategies' own property tests' problems,
  f16 q/k/v) against the float64 reference on the f16 output, under the sanitizer in CI;
- exact results: outputs that are midpoints between two halves round to even, subnormal
  outputs stay, fully masked rows are exactly 0 and the padding of an odd Dv holds 0;
- the manifest `attnc compile` writes: o's dtype, row stride and strides.
"""

from __future__ import annotations

import dataclasses
import json
from importlib.resources import files

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnc.errors import LoweringError
from attnc.lowering import lower
from attnc.lowering.plan import Family, Plan, Storage, Strategy, layout, owned_run
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.runtime import api
from attnc.runtime import dispatch as rt
from attnc.runtime.build import Options, build_kernel
from tests.forced_plan import OPTION_SETS, check_forced_plan, fits_default_limits
from tests.lowering import test_combine, test_lanes, test_stream
from tests.textbook import assert_close, attention_ref

RUN = settings(deadline=None, max_examples=3,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ADAPTERS = ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]


# --------------------------------------------------------------------------- the conversion
PACK_WGSL = files("attnc.lowering").joinpath("wgsl_lib/f16_out.wgsl").read_text() + """
struct Params { n: u32, grid_total: u32, grid_stride_x: u32 }
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i < P.n) {
    out[i] = pack_f16(bitcast<f32>(x[2u * i]), bitcast<f32>(x[2u * i + 1u]));
  }
}
"""


def pack_on(dev, values: np.ndarray) -> np.ndarray:
    """pack_f16 over consecutive pairs of f32 `values` on the device: u32 words."""
    n = len(values) // 2
    prog = Program("pack", PACK_WGSL, "main", 64,
                   (Binding("x", 0, Access.READ, Scalar.U32), Binding("out", 1, Access.READ_WRITE, Scalar.U32),
                    Binding("params", 2, Access.UNIFORM, Scalar.U32)),
                   (UniformField("n", 0, Scalar.U32), UniformField("grid_total", 4, Scalar.U32),
                    UniformField("grid_stride_x", 8, Scalar.U32)), (), frozenset(), 0, in_bounds=True)
    out = rt.empty(dev, 4 * n)
    rt.run(dev, [rt.Dispatch(prog, {"x": rt.upload(dev, values.view(np.uint32)), "out": out}, {"n": n},
                             -(-n // 64))])
    return rt.readback(dev, out, Scalar.U32, (n,))


def conversion_cases() -> np.ndarray:
    """f32 values at every boundary of the conversion, exact ties, and random ones of all sizes."""
    h = np.arange(0, 0x7c00, dtype=np.uint32)  # every finite non-negative half
    halves = h.astype(np.uint16).view(np.float16).astype(np.float64)
    nxt = np.append(halves[1:], 65520.0)  # 65520: the midpoint past the largest half
    mid = (halves + nxt) / 2  # exact in f32: every tie between neighbouring halves (and 65520)
    special = np.array([0.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e5, 3.4e38, np.inf, 2.0**-24, 2.0**-25,
                        2.0**-25 * 1.0000001, 3 * 2.0**-26, 2.0**-26, 1e-45, 2.0**-14, 2.0**-14 * (1 - 2**-12),
                        6.1e-5, 5.96e-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 2049.0, 2051.0, 4097.0])
    rng = np.random.default_rng(0)
    rand = np.exp2(rng.uniform(-30, 20, 20000)) * rng.uniform(1, 2, 20000)
    near = halves[rng.integers(0, len(halves), 20000)] * (1 + rng.uniform(-1, 1, 20000) * 2.0**-11)
    pos = np.concatenate([halves, mid, special, rand, near]).astype(np.float32)
    vals = np.concatenate([pos, -pos])
    nans = np.array([0x7fc00000, 0x7f800001, 0xffc00000, 0x7fffffff, 0x7f802000], np.uint32).view(np.float32)
    vals = np.concatenate([vals, nans])
    return vals if len(vals) % 2 == 0 else np.append(vals, np.float32(1.0))


@pytest.mark.gpu
def test_f16_bits_round_like_numpy(device) -> None:
    """Nearest, ties to even (numpy's astype(float16)), bit for bit; subnormal halves kept;
    |x| >= 65520 and inf give inf, 65504 < |x| < 65520 gives 65504; NaN a NaN of its sign."""
    x = conversion_cases()
    words = pack_on(device, x)
    got = np.stack([words & 0xffff, words >> 16], axis=1).reshape(-1).astype(np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, [(float(x[i]), hex(int(got[i])), hex(int(want[i]))) for i in bad[:8]]
    g = got[nan]
    assert np.all((g & 0x7fff) == 0x7e00) and np.array_equal(g >> 15, np.signbit(x[nan]).astype(np.uint16))


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("storage", [Storage.F16, Storage.F16A])
@pytest.mark.parametrize(("wg", "bm", "tm"), [(32, 16, 1), (64, 16, 4), (128, 4, 1), (128, 64, 2), (256, 128, 4)])
@pytest.mark.parametrize("dvs", [4, 8, 12, 16, 24, 32, 96])
def test_tiled_layout_pairs_columns_in_an_invocation_or_with_its_neighbour(storage, wg, bm, tm, dvs) -> None:
    """A float16 output keeps the f32 layout. Where each invocation owns an even number of a
    staged chunk's columns they come in runs of 2 or 4 (whole pairs); where it owns an odd
    number they are dealt one at a time, and the pair-exchange array (CT x BM / 2 words) is
    counted in the workgroup memory the heuristics check."""
    plan = Plan(Family.PORTABLE, storage, workgroup_size=wg, rows_per_invocation=tm, value_stage_columns=dvs,
                value_columns=64)
    refused = []
    for p in (plan, dataclasses.replace(plan, storage=Storage.F32)):
        try:
            layout(p, bm, 64)
        except LoweringError as e:
            refused.append(str(e))
    if refused:  # refused in f32 and f16 alike, for the same reason
        assert len(refused) == 2 and refused[0] == refused[1], refused
        return
    half, single = layout(plan, bm, 64), layout(dataclasses.replace(plan, storage=Storage.F32), bm, 64)
    yps = half.DVS // half.CT
    assert dataclasses.replace(half, XW=0, HALF=False) == single and single.XW == 0
    if yps % 2:
        assert owned_run(yps) == 1 and half.CT % 2 == 0 and half.XW == half.CT * half.BM // 2
    else:
        assert owned_run(yps) in (2, 4) and half.XW == 0
    if storage is Storage.F16:
        assert not half.HALF and half.smem_words == single.smem_words + half.XW
    else:  # f16 tiles: the staging array in halves, the value chunk at its start; p in f32 words beside it
        qk = half.QS * half.DK + half.KS * half.DK
        assert half.HALF and half.value_offset == 0 and half.stage_words == max(qk, half.VK * half.DVS)
        red = single.smem_words - single.stage_words - 4
        assert half.smem_words == half.stage_words // 2 + half.p_words + red + 4 + half.XW


def test_rows_needs_an_even_column_chunk() -> None:
    kern = build_kernel(Options(f16=True), {"BM": 32, "BN": 32})
    plan = Plan(Family.PORTABLE, Storage.F16, strategy=Strategy.ROWS, value_columns=6, query_dim=8)
    lower(kern, plan)
    with pytest.raises(LoweringError, match="DVC=5 must be even"):
        lower(kern, dataclasses.replace(plan, value_columns=5))


def test_an_f16_output_needs_an_f16_storage_plan() -> None:
    kern = build_kernel(Options(f16=True), {"BM": 32, "BN": 32})
    with pytest.raises(LoweringError, match="float16 output"):
        lower(kern, Plan(Family.PORTABLE, Storage.F32))


def test_f32_programs_do_not_change() -> None:
    """An f32 kernel's programs have no trace of the f16 output (f32 WGSL is byte-identical to
    before; tools/plan_snapshot.py compares all of it), an f16 one packs o into u32 words."""
    for opts in (Options(), Options(split=True, lse=True)):
        kern = build_kernel(opts, {"BM": 32, "BN": 32})
        for p in lower(kern, Plan(Family.PORTABLE)):
            assert "pack_f16" not in p.wgsl and "f16" not in p.wgsl.replace(".f16", "")
            assert "t_o" not in p.wgsl or "t_o: array<f32>;" in p.wgsl
        kern16 = build_kernel(dataclasses.replace(opts, f16=True), {"BM": 32, "BN": 32})
        progs = lower(kern16, Plan(Family.PORTABLE, Storage.F16))
        assert "t_o" not in progs[0].wgsl if opts.split else "t_o: array<u32>;" in progs[0].wgsl
        assert "t_o: array<u32>;" in progs[-1].wgsl and "pack_f16(" in progs[-1].wgsl.split("fn main")[-1]


# --------------------------------------------------------------------------- strategies, knobs drawn
@st.composite
def tiled_problems(draw):
    """Tiled plans whose staged value chunks would give an invocation an odd number of columns
    in f32 (DVS 4, 12, 24 over 4-8 invocations per row) as well as even ones, any D and Dv
    (odd ones: padded output rows), TM, UN, PF, QO, splits and option sets."""
    group, vec = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4]))
    dims = dict(B=1, Hq=group * 2, Hkv=2, S=draw(st.integers(1, 100)), T=draw(st.integers(1, 150)),
                D=vec * draw(st.integers(1, 80 // vec)), Dv=vec * draw(st.integers(1, 80 // vec)))
    bm, bn = draw(st.sampled_from([16, 32])), draw(st.sampled_from([32, 64]))
    plan = Plan(Family.PORTABLE, Storage.F16, workgroup_size=draw(st.sampled_from([32, 64, 128])),
                rows_per_invocation=draw(st.sampled_from([1, 2, 4])), head_chunk=draw(st.sampled_from([8, 16])),
                value_columns=draw(st.sampled_from([16, 32, 64])),
                value_stage_columns=draw(st.sampled_from([4, 8, 12, 16, 24, 32])), vector_width=vec,
                unroll=draw(st.sampled_from([1, 2])), prefetch=draw(st.sampled_from([0, 1])),
                last_tile_first=draw(st.sampled_from([0, 1])))
    try:
        lay = layout(plan, bm, bn)
        # the same bounds as test_tiled (lavapipe compiles larger blocks for a minute or more)
        assume(fits_default_limits(plan, bm, bn) and lay.TM * lay.TN <= 32 and lay.TM * lay.TD <= 32
               and lay.DVC // lay.DVS * (lay.BN // lay.VK) <= 4)
    except LoweringError:
        assume(False)
    return dims, plan, {"BM": bm, "BN": bn}, draw(st.sampled_from([None, 1, 3])), draw(OPTION_SETS), \
        draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=tiled_problems())
def test_tiled_f16_output_matches_reference(spec, problem, require_adapters) -> None:
    """The tiled epilogue's pair stores, with f16 storage, or (shader-f16, every other seed) f16
    tiles and products."""
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = problem
    storage, target = Storage.F16, None
    if "f16" in dev.features and seed % 2:
        storage, target = Storage.F16A, "portable-f16"
    op = check_forced_plan(dev, dims, dataclasses.replace(plan, storage=storage), tun, nsplit, opts, seed,
                           np.float16, target)
    assert op.plan.strategy is Strategy.TILED and op.plan.storage is storage


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=test_stream.problems())
def test_stream_f16_output_matches_reference(spec, problem, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = problem
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed, np.float16)
    assert op.plan.strategy is Strategy.STREAM


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@RUN
@given(data=st.data())
def test_lanes_f16_output_matches_reference(spec, data, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = data.draw(test_lanes.problems(dev.subgroup_size))
    op = check_forced_plan(dev, dims, dataclasses.replace(plan, dialect=test_lanes.dialect(dev)), tun, nsplit,
                           opts, seed, np.float16)
    assert op.plan.strategy is Strategy.LANES


@st.composite
def rows_problems(draw):
    """The rows strategy: any D and Dv (odd ones: padded output rows), column chunks of DVC."""
    group = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.integers(1, 2))
    vec = draw(st.sampled_from([1, 4]))
    dims = dict(B=draw(st.integers(1, 2)), Hq=group * Hkv, Hkv=Hkv, S=draw(st.integers(1, 40)),
                T=draw(st.integers(1, 150)), D=vec * draw(st.integers(1, 72 // vec)),
                Dv=vec * draw(st.integers(1, 72 // vec)))
    plan = Plan(Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=draw(st.sampled_from([1, 4])),
                query_dim=-(-dims["D"] // 8) * 8, value_columns=draw(st.sampled_from([8, 16, 64])), vector_width=vec)
    nsplit = draw(st.sampled_from([1, 1, 3]))
    return dims, plan, {"BM": draw(st.sampled_from([16, 32])), "BN": 32}, nsplit, draw(OPTION_SETS), \
        draw(st.integers(0, 2**16))


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=rows_problems())
def test_rows_f16_output_matches_reference(spec, problem, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    dims, plan, tun, nsplit, opts, seed = problem
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed, np.float16)
    assert op.plan.strategy is Strategy.ROWS


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@RUN
@given(problem=test_combine.problems(), odd=st.booleans())
def test_combine_f16_output_matches_reference(spec, problem, odd, require_adapters) -> None:
    """The combine writes the f16 o, two columns per lane (an odd Dv's padding too: through a
    tiled main pass, whose D and Dv need not be multiples of 4); partial states stay f32."""
    dev = require_adapters(spec)[0]
    dims, plan, nsplit, opts, seed = problem
    tun = {"BM": 1, "BN": 32}
    if odd:
        dims = {**dims, "Dv": dims["Dv"] - 1, "D": 7}
        plan = Plan(Family.PORTABLE, workgroup_size=32, head_chunk=8, value_columns=32, value_stage_columns=8,
                    combine_groups=plan.combine_groups)
        tun = {"BM": 16, "BN": 32}
    op = check_forced_plan(dev, dims, plan, tun, nsplit, opts, seed, np.float16)
    assert op.scalars["NSPLIT"] == nsplit and "t_o: array<u32>" in op.progs[-1].wgsl
    assert "t_part: array<f32>" in op.progs[0].wgsl


# --------------------------------------------------------------------------- exact results
# (plan, tunables, split count): 2 or 4 invocations per row, 4-column stages (a pair of
# columns each, or one each: pairs across neighbours), rows and stream with the split-KV combine.
# The tiled plans hold Dv = 7 in two stages (the second partial): each unrolled stage has two
# barriers, and lavapipe's LLVM compile time grows with them (32 columns: 40-70 s a shader).
EXACT_PLANS = {
    "tiled": (Plan(Family.PORTABLE, Storage.F16, workgroup_size=32, head_chunk=8, value_columns=8,
                   value_stage_columns=4), {"BM": 16, "BN": 32}, 1),
    "tiled_exchange": (Plan(Family.PORTABLE, Storage.F16, workgroup_size=64, head_chunk=8, value_columns=8,
                            value_stage_columns=4), {"BM": 16, "BN": 32}, 1),
    "rows_split": (Plan(Family.PORTABLE, Storage.F16, strategy=Strategy.ROWS, keys_per_step=2, query_dim=8,
                        value_columns=16), {"BM": 16, "BN": 32}, 2),
    "stream_split": (Plan(Family.PORTABLE, Storage.F16, strategy=Strategy.STREAM, workgroup_size=32,
                          lanes_per_key=1, keys_per_step=1, query_dim=8, value_columns=16, vector_width=4),
                     {"BM": 2, "BN": 32}, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ADAPTERS)
@pytest.mark.parametrize("case", list(EXACT_PLANS))
def test_midpoints_round_to_even_and_masked_rows_are_zero(spec, case, require_adapters) -> None:
    """q = 0 gives every key the same weight, so with two keys o = (v0 + v1) / 2 exactly in f32:
    v0, v1 neighbouring halves put o on a tie, which must round to the even one (as numpy does);
    tiny v give subnormal outputs, which must stay. Batch 1 sees no key (kv_lens = 0): exactly
    0. An odd Dv's padding element in the buffer holds 0."""
    dev = require_adapters(spec)[0]
    plan, tun, nsplit = EXACT_PLANS[case]
    Dv = 8 if plan.strategy is Strategy.STREAM else 7
    rng = np.random.default_rng(5)
    bits = rng.integers(0x0001, 0x7bff, (2, 2, Dv)).astype(np.uint16)  # [B, Hkv, Dv]: odd and even halves
    bits[..., 0] = np.array([[0x0001, 0x0002], [0x03ff, 0x7bfe]])  # subnormals, into the normals, large
    v0 = bits.view(np.float16) * np.where(rng.random(bits.shape) < 0.5, 1, -1).astype(np.float16)
    v1 = np.nextafter(v0, np.copysign(np.float16(np.inf), v0))  # the neighbour away from zero
    v = np.stack([v0, v1], axis=2)  # [B, Hkv, T=2, Dv]
    q = np.zeros((2, 2, 3, 8), np.float16)
    k = rng.standard_normal((2, 2, 2, 8)).astype(np.float16)
    dims = dict(B=2, Hq=2, Hkv=2, S=3, T=2, D=8, Dv=Dv)
    op = api.prepare(dims, np.float16, device=dev, plan=plan, tunables=tun, nsplit=nsplit,
                     kv_lens=np.array([2, 0], np.int32), return_lse=True)
    assert ("o_x" in op.progs[0].wgsl) == (case == "tiled_exchange")  # which tiled store path
    op.bind(q, k, v).run()
    o, lse = op.result()
    want = ((v[:, :, 0].astype(np.float32) + v[:, :, 1].astype(np.float32)) / 2).astype(np.float16)
    assert o.dtype == np.float16
    np.testing.assert_array_equal(o[0].view(np.uint16), np.broadcast_to(want[0][:, None], o[0].shape).view(np.uint16))
    assert np.all(o[1] == 0) and not np.signbit(o[1]).any() and np.all(np.isneginf(lse[1]))
    if Dv % 2:
        raw = rt.readback(dev, op.bufs["o"], np.float16, (2, 2, 3, Dv + 1))
        assert np.all(raw[..., Dv] == 0) and op.bufs["o"].size == 2 * 2 * 2 * 3 * (Dv + 1)
    assert_close(o, attention_ref(q, k, v, kv_lens=np.array([2, 0], np.int32)), 2e-3)


# --------------------------------------------------------------------------- the manifest
def test_manifest_describes_the_f16_output(tmp_path) -> None:
    """`attnc compile`: an f16 variant's o is f16 with rows at 2*ceil_div(Dv,2) (the strides
    s_o_* follow it), its combine covers 64 columns a workgroup; lse and f32 variants as before."""
    from attnc.cli import main as cli

    assert cli(["compile", "attnc.kernels.flash:flash_attention", "--set", "split=true", "--set", "lse=true",
                "-o", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {v["dtype"] for v in manifest["variants"]} == {"f32", "f16"}
    for v in manifest["variants"]:
        o, lse = ({t["name"]: t for t in v["tensors"]}[n] for n in ("o", "lse"))
        fields = {f["name"]: f["value"] for p in v["programs"] for f in p["uniforms"]["fields"]}
        assert lse["dtype"] == "f32" and fields["s_lse_0"] == "Hq*S"
        combine = v["programs"][-1]
        if v["dtype"] == "f16":
            assert o == {"name": "o", "role": "output", "dtype": "f16", "dims": ["B", "Hq", "S", "Dv"],
                         "row_stride": "2*ceil_div(Dv,2)"}
            assert (fields["s_o_0"], fields["s_o_1"], fields["s_o_2"], fields["s_o_3"]) == (
                "Hq*S*2*ceil_div(Dv,2)", "S*2*ceil_div(Dv,2)", "2*ceil_div(Dv,2)", "1")
            assert combine["workgroups"].endswith("ceil_div(Dv,64)")
            assert "t_o: array<u32>" in (tmp_path / combine["file"]).read_text()
        else:
            assert o == {"name": "o", "role": "output", "dtype": "f32", "dims": ["B", "Hq", "S", "Dv"]}
            assert fields["s_o_2"] == "Dv" and combine["workgroups"].endswith("ceil_div(Dv,32)")
