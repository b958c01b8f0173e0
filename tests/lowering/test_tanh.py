"""The tanh attnc emits (`safe_tanh`, wgsl_lib/helpers.wgsl) against float64, element by element,
on every adapter; and no program relies on WGSL's builtin tanh.

The builtin is not accurate near 0 on lavapipe (tanh(1e-30) came out as 2^-25, an absolute
error of about ulp(1)/4), which made softcap and tanh score_mods wrong for large caps. The
expression evaluated here is the op table's (CODE_FOR_OP[TANH]) over the helpers every shader
includes, so it is the code the kernels run. Tanh is always evaluated in f32: scores are f32 in
every strategy, f16-tile variants included.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.ir import nodes as ir
from attnc.lowering import lower
from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.lowering.shader import _helpers
from attnc.lowering.wgsl import CODE_FOR_OP
from attnc.runtime.build import Options, build_kernel
from attnc.runtime.dispatch import Dispatch, empty, readback, run, upload

# The largest relative error accepted: measured 1.14e-7 on lavapipe (all three adapters, a
# dense grid; the exp side just above the switch at |x| = 1, where exp's own error shows),
# 8.8e-8 for the polynomial side; WGSL's builtin reached 5e-7 at x ~ 0.3 and 3e22 at 1e-30.
REL = 1.5e-7
SWITCH = np.float32(1.0)  # the polynomial below, the exp form from here
TINY = np.finfo(np.float32).smallest_normal

TANH_WGSL = """
struct Params {{ n: u32, grid_total: u32, grid_stride_x: u32 }}
@group(0) @binding(0) var<storage, read> xs: array<f32>;
@group(0) @binding(1) var<storage, read_write> ys: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
  let i = (wid.x + wid.y * P.grid_stride_x) * 64u + lid;
  if (i < P.n) {{
    let x = xs[i];
    ys[i] = {expr};
  }}
}}
"""


def tanh_program() -> Program:
    """ys[i] = the emitted tanh of xs[i], over the helpers every attnc shader includes."""
    wgsl = _helpers() + TANH_WGSL.format(expr=CODE_FOR_OP[ir.Op.TANH].format("x"))
    fields = tuple(UniformField(n, 4 * i, Scalar.U32) for i, n in enumerate(("n", "grid_total", "grid_stride_x")))
    binds = (Binding("xs", 0, Access.READ, Scalar.F32), Binding("ys", 1, Access.READ_WRITE, Scalar.F32),
             Binding("params", 2, Access.UNIFORM, Scalar.U32))
    return Program("tanh", wgsl, "main", 64, binds, fields, (), frozenset(), 0, in_bounds=True)


def device_tanh(dev, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = empty(dev, 4 * x.size)
    run(dev, [Dispatch(tanh_program(), {"xs": upload(dev, x), "ys": out}, {"n": x.size}, -(-x.size // 64))])
    return readback(dev, out, Scalar.F32, (x.size,))


def special_inputs() -> np.ndarray:
    """Log-spaced magnitudes 1e-30..1e4 of both signs, +-0, subnormals, +-inf, NaN, the switch
    point and the clamp with their f32 neighbours, the saturation region and a dense [-12, 12]."""
    f = np.float32
    mags = np.logspace(-30, 4, 3401).astype(f)
    edges = []
    for p in (SWITCH, f(9.0), f(9.01), f(10.0), TINY):
        a = p
        b = p
        for _ in range(4):
            a, b = np.nextafter(a, f(0)), np.nextafter(b, f(np.inf))
            edges += [a, b]
        edges.append(p)
    sub = np.array([1e-45, 1e-42, 1e-40, 1e-39, np.nextafter(TINY, f(0))], f)
    specials = np.array([0.0, np.inf, np.nan, 3.4e38, 1e20, 44.0, 89.0], f)
    pos = np.concatenate([mags, np.array(edges, f), sub, specials])
    return np.concatenate([pos, -pos, np.linspace(-12, 12, 24001, dtype=f)])


def check_tanh(x: np.ndarray, got: np.ndarray) -> None:
    """NaN for NaN only; the sign bit of x (so -0 -> -0); |t| <= 1; tanh(+-inf) = +-1; within
    REL of float64 wherever tanh(x) is a normal f32; x itself for subnormal x (tanh(x) = x to
    far below their precision), or +-0 on a device that flushes subnormals."""
    x = np.asarray(x, np.float32)
    got = np.asarray(got, np.float32)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan), f"NaN for {x[np.isnan(got) != nan][:8]}"
    x, got = x[~nan], got[~nan]
    assert np.array_equal(np.signbit(got), np.signbit(x)), f"sign lost at {x[np.signbit(got) != np.signbit(x)][:8]}"
    assert np.all(np.abs(got) <= 1.0)
    inf = np.isinf(x)
    assert np.all(got[inf] == np.sign(x[inf]))
    ref = np.tanh(x.astype(np.float64))
    normal = np.abs(x) >= TINY
    rel = np.abs(got[normal].astype(np.float64) - ref[normal]) / np.abs(ref[normal])
    worst = int(np.argmax(rel)) if rel.size else 0
    assert rel.size == 0 or rel[worst] <= REL, (
        f"relative error {rel[worst]:.3g} > {REL:g} at x = {x[normal][worst]!r}: "
        f"got {got[normal][worst]!r}, float64 {ref[normal][worst]!r}")
    sub = ~normal
    assert np.all((got[sub] == x[sub]) | (got[sub] == 0.0)), f"subnormals: {x[sub]} -> {got[sub]}"


@pytest.mark.gpu
def test_emitted_tanh_matches_float64_over_the_f32_range(device) -> None:
    x = special_inputs()
    got = device_tanh(device, x)
    check_tanh(x, got)
    n = (x.size - 24001) // 2  # the positive block and its negation: exactly odd, bit for bit
    np.testing.assert_array_equal(got[n: 2 * n], -got[:n])
    ix = {float(v): i for i, v in enumerate(x[:n])}
    assert got[ix[np.inf]] == 1.0 and np.signbit(got[n + ix[0.0]]) and got[n + ix[0.0]] == 0.0


F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
# magnitudes spread over the exponents rather than hypothesis' mix of small and huge
LOG_SPREAD = st.builds(lambda m, e, s: np.float32(s * m * 10.0 ** e), st.floats(1.0, 10.0),
                       st.integers(-45, 37), st.sampled_from([-1.0, 1.0]))


@pytest.mark.gpu
@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xs=st.lists(F32 | LOG_SPREAD | st.floats(-12, 12, width=32), min_size=1, max_size=512))
def test_emitted_tanh_property(device, xs) -> None:
    """Any f32 values, tanh within REL of float64 (the rules of check_tanh)."""
    x = np.array(xs, np.float32)
    check_tanh(x, device_tanh(device, x))


def _programs() -> list[tuple[str, Program]]:
    """Every program of a softcap + tanh score_mod kernel under each strategy and storage."""
    import attnc

    def mod(s, b, h, q_idx, kv_idx):
        return attnc.tanh(s * 0.5) * 2.0

    columns = dict(query_dim=64, value_columns=64, vector_width=4)
    plans = [(Plan(Family.PORTABLE), False, 16), (Plan(Family.SUBGROUPS, Storage.F16A, Dialect.TINT), True, 16),
             (Plan(Family.PORTABLE, Storage.F16, strategy=Strategy.ROWS, keys_per_step=4, **columns), True, 8),
             (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=64, lanes_per_key=2, keys_per_step=4,
                   **columns), False, 4),
             (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, subgroup_width=8, **columns),
              False, 8)]
    out = []
    for plan, f16, bm in plans:
        opts = Options(softcap=True, sinks=True, lse=True, split=True, score_mod=mod, f16=f16)
        kern = build_kernel(opts, {"BM": bm, "BN": 64})
        out += [(f"{plan.name}/{p.name}", p) for p in lower(kern, plan)]
    return out


def test_no_program_calls_the_builtin_tanh() -> None:
    builtin = re.compile(r"(?<![\w.])tanh\s*\(")
    progs = _programs()
    assert {n.split("/")[1] for n, _ in progs} == {"main", "combine"}
    for name, p in progs:
        code = re.sub(r"//[^\n]*", "", p.wgsl)
        assert not builtin.search(code), f"{name} calls WGSL's tanh"
        if p.name == "main":
            assert p.wgsl.count("safe_tanh(") >= 3, name  # the definition, softcap, the score_mod
