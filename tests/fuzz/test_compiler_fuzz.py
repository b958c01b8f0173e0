"""Fuzzing the compiler end to end: hypothesis generates kernels, attnc compiles and runs them.

A generated kernel is the shipped flash kernel with random options (causal, window, softcap,
ALiBi, bias, sinks, kv_lens, lse) plus a random `score_mod` and `mask_mod`: plain Python
functions built from the well-typed, numerically tame expression trees of tests/strategies.py
over (score, b, h, q_idx, kv_idx, S, T) and reads of the arrays they close over (f32 and f16
tables, i32 and u8 tables read as indices of other reads, a bool table; any index, clamped).
The functions go through the public API exactly as a user's would
(`attnc.attention(..., score_mod=f, mask_mod=g)`: traced by the DSL, their arrays captured as
bindings, verified, lowered, dispatched), and the result is compared with the float64
reference interpreter run on the very kernel the runtime traced (1e-5 relative for f32, 2e-3
for f16 storage).

A second test lowers each generated kernel for every variant family and strategy (tiled
portable, tiled subgroups, rows; f32 and f16 storage; with and without split-KV) with random
plan tunables, and checks that Naga (wgpu:vulkan) and Tint (dawn:vulkan) both accept the WGSL
as full compute pipelines, and that the two dialects differ only by `enable subgroups;`.

Every example is a new kernel (a pipeline compile), so max_examples stays small; runs are
derandomized (hypothesis derives the examples from the test's name), so CI is reproducible.
Minimal failing examples found here live on as explicit tests in test_regressions.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import Scope, Table, call, mask_exprs, score_exprs

import attnc
from attnc.errors import LoweringError
from attnc.frontend.dsl import Value
from attnc.ir import nodes as ir
from attnc.ir.interp import interpret
from attnc.lowering import Family, Plan, Storage, Strategy, lower
from attnc.lowering.candidates import fits_default_limits
from attnc.lowering.plan import DEFAULT_LIMITS, Dialect
from attnc.lowering.retype import retype
from attnc.runtime import api
from attnc.runtime.dispatch import compile_program

pytestmark = pytest.mark.gpu

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
E2E_EXAMPLES = 15
WGSL_EXAMPLES = 6
TOL = {np.float32: 1e-5, np.float16: 2e-3}

# --------------------------------------------------------------------------- IR trees -> Python mods
I32, F32 = ir.DType.I32, ir.DType.F32
POS = {n: ir.Var(n, I32) for n in ("b", "h", "qi", "kj")}
DIMS = (ir.Dim("S"), ir.Dim("T"))
# arrays the generated mods close over: name, numpy dtype, shape (values drawn per example)
TABLES = {"ftab": (np.float32, (7, 5)), "htab": (np.float16, (9,)), "itab": (np.int32, (11,)),
          "utab": (np.uint8, (6,)), "btab": (np.bool_, (5, 4))}
SCOPE_TABLES = tuple(Table(n, {np.float32: F32, np.float16: ir.DType.F16, np.int32: I32, np.uint8: ir.DType.U8,
                               np.bool_: ir.DType.BOOL}[dt], len(shape)) for n, (dt, shape) in TABLES.items())
# score_mod(s, b, h, q_idx, kv_idx): the score and every position; dims of the shipped kernel
SCORE_SCOPE = Scope(score=ir.Var("s", F32), ints=(*POS.values(), *DIMS), tables=SCOPE_TABLES)
# mask_mod(b, h, q_idx, kv_idx) has no score: its "f32 leaf" is a position distance
MASK_SCOPE = Scope(score=call(ir.Op.MUL, call(ir.Op.F32, call(ir.Op.SUB, POS["qi"], POS["kj"])),
                              ir.Const(0.125, F32)),
                   ints=(*POS.values(), *DIMS), tables=SCOPE_TABLES)

_BINARY: dict[ir.Op, Callable] = {
    ir.Op.ADD: lambda a, b: a + b, ir.Op.SUB: lambda a, b: a - b, ir.Op.MUL: lambda a, b: a * b,
    ir.Op.DIV: lambda a, b: a / b, ir.Op.IDIV: lambda a, b: a // b, ir.Op.MOD: lambda a, b: a % b,
    ir.Op.MAX: attnc.maximum, ir.Op.MIN: attnc.minimum,
    ir.Op.LT: lambda a, b: a < b, ir.Op.LE: lambda a, b: a <= b, ir.Op.GT: lambda a, b: a > b,
    ir.Op.GE: lambda a, b: a >= b, ir.Op.EQ: lambda a, b: a == b, ir.Op.NE: lambda a, b: a != b,
    ir.Op.AND: lambda a, b: a & b, ir.Op.OR: lambda a, b: a | b,
}
_UNARY: dict[ir.Op, Callable] = {
    ir.Op.NEG: lambda a: -a, ir.Op.ABS: abs, ir.Op.NOT: lambda a: ~a, ir.Op.EXP: attnc.exp,
    ir.Op.LOG: attnc.log, ir.Op.TANH: attnc.tanh, ir.Op.SQRT: attnc.sqrt, ir.Op.RSQRT: attnc.rsqrt,
    ir.Op.F32: attnc.f32, ir.Op.I32: attnc.i32, ir.Op.SIN: attnc.sin, ir.Op.COS: attnc.cos,
    ir.Op.TAN: attnc.tan, ir.Op.EXP2: attnc.exp2, ir.Op.LOG2: attnc.log2, ir.Op.FLOOR: attnc.floor,
    ir.Op.CEIL: attnc.ceil, ir.Op.SIGMOID: attnc.sigmoid,
}


def to_dsl(e: ir.Expr, env: dict[str, object]):
    """Evaluate an IR expression with the DSL's operators on traced values (as user code would)."""
    if isinstance(e, ir.Const):
        return Value(ir.Const(e.value, e.dtype))  # a traced constant: no Python-side folding
    if isinstance(e, ir.Var):
        return env[e.name]
    if isinstance(e, ir.Dim):
        return attnc.dim(e.name)
    if isinstance(e, ir.Load):  # a read of an array the mod closes over (env["tables"])
        return env["tables"][e.tensor][tuple(to_dsl(i, env) for i in e.index)]
    assert isinstance(e, ir.Call), e
    args = [to_dsl(a, env) for a in e.args]
    if e.op is ir.Op.WHERE:
        return attnc.where(*args)
    return (_BINARY.get(e.op) or _UNARY[e.op])(*args)


def to_numpy_src(e: ir.Expr) -> str:
    """A readable Python rendering of a tree, for failure messages and regression tests."""
    if isinstance(e, ir.Const):
        return repr(e.value)
    if isinstance(e, ir.Var | ir.Dim):
        return {"qi": "q_idx", "kj": "kv_idx"}.get(e.name, e.name) if isinstance(e, ir.Var) \
            else f"dim({e.name!r})"
    if isinstance(e, ir.Load):
        return f"{e.tensor}[{', '.join(to_numpy_src(i) for i in e.index)}]"
    args = [to_numpy_src(a) for a in e.args]
    return f"{e.op.value}({', '.join(args)})"


def score_mod_of(e: ir.Expr, tables: dict[str, np.ndarray] | None = None) -> Callable:
    """A Python score_mod computing `e`; it closes over `tables` (captured by attnc)."""
    def score_mod(s, b, h, q_idx, kv_idx):
        return to_dsl(e, {"s": s, "b": b, "h": h, "qi": q_idx, "kj": kv_idx, "tables": tables})
    score_mod.__doc__ = to_numpy_src(e)
    return score_mod


def mask_mod_of(e: ir.Expr, tables: dict[str, np.ndarray] | None = None) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return to_dsl(e, {"b": b, "h": h, "qi": q_idx, "kj": kv_idx, "tables": tables})
    mask_mod.__doc__ = to_numpy_src(e)
    return mask_mod


def random_tables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values for TABLES: floats in [-1, 1], integers in [-40, 40] (u8: 0..255), bools."""
    out = {}
    for name, (dt, shape) in TABLES.items():
        if dt in (np.float32, np.float16):
            out[name] = rng.uniform(-1, 1, shape).astype(dt)
        elif dt is np.bool_:
            out[name] = rng.random(shape) < 0.5
        else:
            out[name] = rng.integers(0, 256, shape).astype(dt) if dt is np.uint8 else \
                rng.integers(-40, 41, shape).astype(dt)
    return out


def uses_score(e: ir.Expr) -> bool:
    return any(isinstance(x, ir.Var) and x.name == "s" for x in ir.walk_expr(e))


# --------------------------------------------------------------------------- problems
TARGETS = [("wgpu:vulkan", None), ("wgpu:vulkan", "portable"), ("wgpu:vulkan", "subgroups"),
           ("wgpu:opengl", None), ("wgpu:opengl", "portable"),
           ("dawn:vulkan", None), ("dawn:vulkan", "portable"), ("dawn:vulkan", "subgroups")]


@st.composite
def problems(draw):
    """Shape, dtype, option values, mods and (device, target) of one attention call."""
    Hkv = draw(st.integers(1, 2))
    sh = dict(B=draw(st.integers(1, 2)), Hq=Hkv * draw(st.integers(1, 2)), Hkv=Hkv,
              S=draw(st.integers(1, 8) | st.integers(17, 40)), T=draw(st.integers(1, 80)),
              D=draw(st.sampled_from([7, 16, 32, 64])), Dv=draw(st.sampled_from([5, 16, 32, 64])))
    B, Hq, S, T = sh["B"], sh["Hq"], sh["S"], sh["T"]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    opts: dict = {}
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        side = st.none() | st.integers(0, 30)
        opts["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    if draw(st.booleans()):
        opts["alibi_slopes"] = rng.uniform(-0.5, 0.5, Hq).astype(np.float32)
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(T,), (S, T), (B, 1, S, T), (1, Hq, 1, 1), (B, Hq, S, T)]))
        opts["bias"] = rng.uniform(-1, 1, shape).astype(np.float32)
    if draw(st.booleans()):
        opts["sinks"] = rng.uniform(-2, 2, Hq).astype(np.float32)
    if draw(st.booleans()):
        opts["kv_lens"] = np.array([draw(st.integers(0, T)) for _ in range(B)], np.int32)
    if draw(st.booleans()):
        opts["return_lse"] = True
    if draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from([0.05, 0.5]))
    score = draw(st.none() | score_exprs(SCORE_SCOPE, max_depth=4))
    mask = draw(st.none() | mask_exprs(MASK_SCOPE, max_depth=3))
    tables = random_tables(rng)
    if score is not None:
        opts["score_mod"] = score_mod_of(score, tables)
    if mask is not None:
        opts["mask_mod"] = mask_mod_of(mask, tables)
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16]))
    spec, target = draw(st.sampled_from(TARGETS))
    # |q|, |k|, |v| <= 1 as strategies.py assumes (so |s| <= 8 for D <= 64)
    q = rng.uniform(-1, 1, (B, Hq, S, sh["D"])).astype(dtype)
    k = rng.uniform(-1, 1, (B, Hkv, T, sh["D"])).astype(dtype)
    v = rng.uniform(-1, 1, (B, Hkv, T, sh["Dv"])).astype(dtype)
    return spec, target, q, k, v, opts, tables


def reference(prep: api.Prepared, q, k, v, captured: dict | None = None):
    """The float64 interpreter on the kernel the runtime traced, with the runtime's own values
    (and the arrays the mods captured, as the user gave them)."""
    dims = prep.dims
    args: dict = {"q": q, "k": k, "v": v, **prep.scalars}
    for name, arr in prep.extra.items():
        full = prep.kern.param(name).type.dims
        args[name] = np.broadcast_to(arr, tuple(dims[d] for d in full)) if name == "bias" else arr
    args.update({n: a for n, a in (captured or {}).items() if n in args})
    o, lse = interpret(prep.kern, args, dims=dims)
    # a GQA-packed kernel's [B, Hkv, R, Dv] output is the same memory as [B, Hq, S, Dv]
    rows = (dims["B"], dims["Hq"], dims["S"])
    return o.reshape(*rows, dims["Dv"]), None if lse is None else lse.reshape(rows)


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(x), finite), "inf/NaN pattern differs from the reference"
    num = np.linalg.norm(np.where(finite, x, 0.0) - np.where(finite, ref, 0.0))  # (inf - inf never computed)
    return float(num / max(np.linalg.norm(np.where(finite, ref, 0.0)), 1e-30))


def describe(opts: dict) -> str:
    return ", ".join(f"{n}={f.__doc__}" if callable(f) else f"{n}={getattr(f, 'shape', f)}"
                     for n, f in opts.items())


@pytest.mark.sanitize
@settings(FUZZ, max_examples=E2E_EXAMPLES)
@given(problem=problems())
def test_generated_kernels_match_the_reference(problem, require_adapters) -> None:
    spec, target, q, k, v, opts, tables = problem
    dev = require_adapters(spec)[0]
    dims = api.validate(q, k, v)
    prep = api.prepare(dims, q.dtype, device=dev, target=target, **opts)
    prep.bind(q, k, v).run()
    o, lse = prep.result()
    o_ref, lse_ref = reference(prep, q, k, v, tables)
    tol = TOL[q.dtype.type]
    what = f"{spec} target={target} {prep.variant} dims={dims} {describe(opts)}"
    err = rel_err(o, o_ref)
    assert err <= tol, f"o: rel.err {err:.2e} > {tol:g}: {what}"
    if opts.get("return_lse"):
        err = rel_err(lse, lse_ref)
        assert err <= tol, f"lse: rel.err {err:.2e} > {tol:g}: {what}"
    # the public API gives the same numbers (and casts o to the input dtype)
    out = attnc.attention(q, k, v, device=dev, target=target, **opts)
    o2 = out[0] if isinstance(out, tuple) else out
    assert o2.dtype == q.dtype
    np.testing.assert_array_equal(o2, o.astype(q.dtype))


# --------------------------------------------------------------------------- Naga and Tint
@st.composite
def kernels_and_plans(draw):
    """A traced kernel (random options, mods and tile sizes) and random plan tunables."""
    score = draw(st.none() | score_exprs(SCORE_SCOPE, max_depth=4))
    mask = draw(st.none() | mask_exprs(MASK_SCOPE, max_depth=3))
    flags = {n: draw(st.booleans()) for n in ("causal", "softcap", "alibi", "bias", "sinks",
                                              "kv_lens", "lse", "split")}
    side = st.none() | st.just(0)
    window = draw(st.none() | st.tuples(side, side))
    tiled = dict(workgroup_size=draw(st.sampled_from([32, 64, 128, 256])), rows_per_invocation=draw(st.sampled_from([1,
                                                                                                                     2,
                                                                                                                     4])),
                 head_chunk=draw(st.sampled_from([8, 16, 32])), value_columns=draw(st.sampled_from([32, 64, 128])),
                 value_stage_columns=draw(st.sampled_from([16, 32])), min_subgroup=draw(st.sampled_from([4, 8, 32])),
                 shuffle_only_lanes=draw(st.sampled_from([0, 8, 32])),
                 vector_width=draw(st.sampled_from([1, 4])), unroll=draw(st.sampled_from([1, 2])),
                 prefetch=draw(st.sampled_from([0, 1])), value_block_keys=draw(st.sampled_from([0, 8, 16])),
                 p_chunk_keys=draw(st.sampled_from([0, 16, 32])), last_tile_first=draw(st.sampled_from([0, 1])))
    rows = dict(keys_per_step=draw(st.sampled_from([1, 2, 4, 8])), query_dim=draw(st.sampled_from([8, 64, 128])),
                value_columns=draw(st.sampled_from([32, 64, 256])), vector_width=draw(st.sampled_from([1, 4])))
    BM, BN = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))
    RBM = draw(st.sampled_from([1, 8, 32]))
    return score, mask, flags, window, tiled, rows, (BM, BN, RBM)


WGSL_TABLES = random_tables(np.random.default_rng(0))  # the WGSL depends on their dtypes and ranks only


def _trace(score, mask, flags, window, BM, BN, f16: bool) -> ir.Kernel:
    from attnc.kernels.flash import flash_attention

    kern = flash_attention.trace(
        **flags, window=window, BM=BM, BN=BN,
        score_mod=None if score is None else score_mod_of(score, WGSL_TABLES),
        mask_mod=None if mask is None else mask_mod_of(mask, WGSL_TABLES))
    return retype(kern, Storage.F16 if f16 else Storage.F32)


@settings(FUZZ, max_examples=WGSL_EXAMPLES)
@given(case=kernels_and_plans())
def test_generated_wgsl_is_accepted_by_naga_and_tint(case, require_adapters) -> None:
    naga_dev, tint_dev = require_adapters("wgpu:vulkan", "dawn:vulkan")
    score, mask, flags, window, tiled, rows, (BM, BN, RBM) = case
    checked, refused = 0, []
    for f16 in (False, True):
        storage = Storage.F16 if f16 else Storage.F32
        variants = []
        kern = _trace(score, mask, flags, window, BM, BN, f16)
        for fam in (Family.PORTABLE, Family.SUBGROUPS):
            variants.append((kern, Plan(fam, storage, **tiled)))
        variants.append((_trace(score, mask, flags, window, RBM, 64, f16),
                         Plan(Family.PORTABLE, storage, strategy=Strategy.ROWS, **rows)))
        for k, plan in variants:
            try:
                if plan.strategy is Strategy.TILED and not fits_default_limits(plan, {"BM": BM, "BN": BN}):
                    continue
                progs = {d: lower(k, dataclasses.replace(plan, dialect=d)) for d in Dialect}
            except LoweringError as e:  # a plan that does not fit is refused clearly, never emitted
                refused.append(e.message)
                continue
            for pn, pt in zip(progs[Dialect.NAGA], progs[Dialect.TINT], strict=True):
                assert pn.wgsl == pt.wgsl.replace("enable subgroups;\n", ""), pn.name
                assert pn.workgroup_storage_bytes <= DEFAULT_LIMITS["max-compute-workgroup-storage-size"]
                assert pn.workgroup_size <= DEFAULT_LIMITS["max-compute-invocations-per-workgroup"]
                compile_program(naga_dev, pn)
                compile_program(tint_dev, pt)
                checked += 1
    assert checked >= 1, refused


def test_mod_generation_round_trips_through_the_tracer() -> None:
    """The generator's Python functions trace to the IR tree they were built from."""
    from attnc.kernels.flash import flash_attention

    tree = call(ir.Op.SUB, ir.Var("s", F32),
                call(ir.Op.MUL, call(ir.Op.F32, call(ir.Op.ABS, call(ir.Op.SUB, POS["qi"], POS["kj"]))),
                     ir.Const(0.25, F32)))
    kern = flash_attention.trace(score_mod=score_mod_of(tree))
    mod = next(s for s in ir.walk_stmts(kern.body) if isinstance(s, ir.Let) and s.var == "mod")
    expect = call(ir.Op.SUB, ir.Var("s", F32), call(ir.Op.MUL, call(ir.Op.F32, call(
        ir.Op.ABS, call(ir.Op.SUB, ir.Var("qi", I32), ir.Var("kj", I32)))), ir.Const(0.25, F32)))
    assert mod.value == expect


def test_the_generators_draw_captured_reads_gathers_and_the_new_ops() -> None:
    """The trees reach every table dtype, a read indexed by another read, and the new math."""
    from hypothesis import find

    def loads(e):
        return [x for x in ir.walk_expr(e) if isinstance(x, ir.Load)]

    gather = find(score_exprs(SCORE_SCOPE, max_depth=4),
                  lambda e: any(loads(i) for x in loads(e) for i in x.index), settings=settings(max_examples=2000))
    assert any(loads(i) for x in loads(gather) for i in x.index)
    for name in TABLES:
        strategy = mask_exprs(MASK_SCOPE, max_depth=3) if name == "btab" else score_exprs(SCORE_SCOPE, max_depth=4)
        find(strategy, lambda e, n=name: any(x.tensor == n for x in loads(e)), settings=settings(max_examples=2000))
    for op in (ir.Op.SIN, ir.Op.TAN, ir.Op.SIGMOID, ir.Op.FLOOR, ir.Op.EXP2):
        find(score_exprs(SCORE_SCOPE, max_depth=4),
             lambda e, op=op: any(isinstance(x, ir.Call) and x.op is op for x in ir.walk_expr(e)),
             settings=settings(max_examples=2000))
    find(mask_exprs(MASK_SCOPE, max_depth=3),
         lambda e: any(isinstance(x, ir.Call) and x.op is ir.Op.EQ and x.args[0].dtype is ir.DType.BOOL
                       for x in ir.walk_expr(e)), settings=settings(max_examples=2000))
