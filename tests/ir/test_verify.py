"""The verifier: typing rules (call_dtype), the Analysis, and one hand-built violation per rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from attnc.errors import Span, VerifyError
from attnc.ir.nodes import (
    LOWERING_NAMES,
    Call,
    Const,
    Dim,
    DimExtent,
    Dot,
    DType,
    Grid,
    GridAxis,
    Kernel,
    Let,
    Load,
    Loop,
    Op,
    Param,
    Return,
    Sink,
    Slice,
    Softmax,
    SplitExtent,
    TensorType,
    TileExtent,
    Update,
    Var,
)
from attnc.ir.verify import Analysis, TypeRuleError, call_dtype, verify

F32, F16, I32, BOOL = DType.F32, DType.F16, DType.I32, DType.BOOL
SPAN = Span("hand.attn", 7, 3, "  bad line", 9)


def v(name: str, dtype: DType = I32) -> Var:
    return Var(name, dtype)


def call(op: Op, *args, dtype: DType | None = None) -> Call:
    return Call(op, tuple(args), dtype or call_dtype(op, [a.dtype for a in args]))


def sl(tensor: str, *index) -> Slice:
    return Slice(tensor, tuple(index))


def kernel(split: bool = False, sink: bool = False, lse: bool = False, score=None,
           loop_body=None, pre=(), post=(), output=None, tunables=(("BM", 32), ("BN", 32)),
           params=None, grid=None) -> Kernel:
    """flash_attention (optionally split, with sink/lse) with pieces replaceable by tests."""
    ps = params or (
        Param("q", TensorType(F32, ("B", "Hq", "S", "D"))),
        Param("k", TensorType(F16, ("B", "Hkv", "T", "D"))),
        Param("v", TensorType(F32, ("B", "Hkv", "T", "Dv"))),
        Param("sinks", TensorType(F32, ("Hq",))),
        Param("scale", TensorType(F32)),
        Param("NSPLIT", TensorType(I32)),
    )
    axes = [GridAxis("b", DimExtent("B")), GridAxis("h", DimExtent("Hq")),
            GridAxis("qi", TileExtent("S", "BM"))]
    if split:
        axes.append(GridAxis("ks", SplitExtent("T", "NSPLIT")))
    hk = call(Op.IDIV, v("h"), call(Op.IDIV, Dim("Hq"), Dim("Hkv")))
    dot = Dot(sl("q", v("b"), v("h"), v("qi"), None), sl("k", v("b"), v("hk"), v("kj"), None))
    s = Let("s", call(Op.MUL, dot, v("scale", F32)))
    upd = Update("acc", score or v("s", F32), sl("v", v("b"), v("hk"), v("kj"), None))
    body = (
        grid or Grid(tuple(axes)),
        Let("hk", hk),
        *pre,
        Softmax("acc", "qi", "Dv"),
        Loop("kj", "T", "BN", "ks" if split else None,
             tuple(loop_body) if loop_body is not None else (s, upd)),
        *((Sink("acc", Load("sinks", (v("h"),), F32)),) if sink else ()),
        *post,
        Return("acc", lse, "ks" if split else None),
    )
    out = output or TensorType(F32, ("B", "Hq", "S", "Dv"))
    return Kernel("fa", ps, out, tunables, body)


def fails(k: Kernel, text: str, span: Span | None = None) -> VerifyError:
    with pytest.raises(VerifyError) as info:
        verify(k)
    assert text in info.value.message, info.value.message
    if span is not None:
        assert info.value.span == span
    return info.value


# ----------------------------------------------------------------------------- call_dtype

@pytest.mark.parametrize("op, args, out", [
    (Op.ADD, (I32, I32), I32), (Op.MUL, (F32, F32), F32), (Op.MAX, (I32, I32), I32),
    (Op.IDIV, (I32, I32), I32), (Op.MOD, (I32, I32), I32), (Op.DIV, (F32, F32), F32),
    (Op.NEG, (I32,), I32), (Op.ABS, (F32,), F32), (Op.EXP, (F32,), F32),
    (Op.RSQRT, (F32,), F32), (Op.LT, (I32, I32), BOOL), (Op.EQ, (F32, F32), BOOL),
    (Op.AND, (BOOL, BOOL), BOOL), (Op.NOT, (BOOL,), BOOL), (Op.WHERE, (BOOL, F32, F32), F32),
    (Op.WHERE, (BOOL, BOOL, BOOL), BOOL), (Op.F32, (I32,), F32), (Op.I32, (F32,), I32),
    (Op.F32, (F32,), F32),
])
def test_call_dtype_accepts(op, args, out):
    assert call_dtype(op, args) == out


@pytest.mark.parametrize("op, args, text", [
    (Op.ADD, (I32, F32), "same dtype"), (Op.ADD, (BOOL, BOOL), "same dtype"),
    (Op.IDIV, (F32, F32), "i32 operands"), (Op.DIV, (I32, I32), "use idiv"),
    (Op.NEG, (BOOL,), "i32 or f32"), (Op.EXP, (I32,), "cast with f32"),
    (Op.LT, (I32, F32), "compares"), (Op.AND, (BOOL, I32), "bool operands"),
    (Op.NOT, (I32,), "bool operands"), (Op.WHERE, (I32, F32, F32), "(bool, X, X)"),
    (Op.WHERE, (BOOL, I32, F32), "(bool, X, X)"), (Op.I32, (BOOL,), "converts"),
    (Op.ADD, (I32,), "takes 2 arguments, got 1"), (Op.EXP, (F32, F32), "takes 1 argument,"),
])
def test_call_dtype_rejects(op, args, text):
    with pytest.raises(TypeRuleError, match=None) as info:
        call_dtype(op, args)
    assert text in str(info.value)


# ----------------------------------------------------------------------------- analysis

def test_analysis_plain():
    a = verify(kernel())
    assert a == Analysis(
        softmax="acc", rows="qi", rows_dim="S", rows_size="BM", width="Dv", loop_var="kj",
        loop_dim="T", loop_size="BN", split=None, split_count=None, uses_sink=False,
        returns_lse=False, tensors_read=frozenset("qkv"), scalars_used=frozenset({"scale"}))
    assert a.needs == frozenset()


def test_analysis_split_sink_lse():
    a = verify(kernel(split=True, sink=True, lse=True,
                      output=TensorType(F16, ("B", "Hq", "S", "Dv"))))
    assert (a.split, a.split_count, a.uses_sink, a.returns_lse) == ("ks", "NSPLIT", True, True)
    assert a.tensors_read == {"q", "k", "v", "sinks"}
    assert a.scalars_used == {"scale", "NSPLIT"}


# ----------------------------------------------------------------------------- phase 1

def test_unknown_var_names_known_ones():
    bad = Var("zz", I32, span=SPAN)
    e = fails(kernel(pre=(Let("x", bad),)), "unknown value 'zz'; known here: ", SPAN)
    assert "b, h, qi" in e.message and e.message.startswith("'zz'")


def test_unknown_dim_tensor_and_acc():
    fails(kernel(pre=(Let("x", Dim("Q")),)), "unknown dim 'Q'")
    fails(kernel(pre=(Let("x", Load("nope", (v("b"),), F32)),)), "unknown tensor 'nope'")
    fails(kernel(post=(Sink("acc2", Const(0.0, F32)),)), "unknown online_softmax 'acc2'")


def test_use_before_definition():
    fails(kernel(pre=(Let("x", v("y")), Let("y", v("b")))), "unknown value 'y'")


def test_duplicate_names():
    fails(kernel(pre=(Let("h", v("b")),)), "'h' is already defined (as a grid)")
    fails(kernel(pre=(Let("B", v("b")),)), "'B' is already defined (as a dim)")
    fails(kernel(pre=(Let("BM", v("b")),)), "already defined (as a tunable)")
    fails(kernel(tunables=(("B", 3), ("BN", 4))), "'B' is already defined")


def test_loop_names_do_not_escape():
    fails(kernel(post=(Let("x", v("kj")),)), "unknown value 'kj'")
    fails(kernel(post=(Let("x", v("s", F32)),)), "unknown value 's'")


def test_wrong_kind_of_name():
    fails(kernel(pre=(Let("x", v("BM")),)), "'BM' is a tunable, not a value")
    fails(kernel(pre=(Let("x", v("acc")),)), "unknown value 'acc'")


def test_invalid_and_reserved_names():
    fails(kernel(pre=(Let("for", v("b")),)), "'for' is not a valid name")
    fails(replace(kernel(), name="1x"), "not a valid kernel name")


@pytest.mark.parametrize("name", sorted(LOWERING_NAMES))
def test_params_cannot_take_the_lowerings_buffer_names(name):
    """A param named like a buffer the lowering adds (o, lse, part, blocks) would share its WGSL
    binding, loader and stride uniforms: refused at the param (a captured table named so gave
    wrong numbers through a u32 binding, or a redefinition error)."""
    base = kernel()
    params = base.params + (Param(name, TensorType(F32, ("Hq",)), span=SPAN),)
    fails(replace(base, params=params), f"param '{name}': the names blocks, lse, o, part are attnc's", SPAN)


def test_update_outside_loop():
    u = Update("acc", Const(0.0, F32), sl("v", v("b"), v("b"), v("b"), None), span=SPAN)
    fails(kernel(post=(u,)), "'update' is only allowed inside a for loop", SPAN)


def test_sink_and_return_placement():
    k = kernel()
    body = k.body
    fails(replace(k, body=body[:-2] + (body[-1], body[-2])), "'return' must be the last")
    fails(replace(k, body=body[:3] + (Sink("acc", Const(0.0, F32)),) + body[3:]),
          "one 'sink', after the loop")
    fails(replace(k, body=body[:-1]), "the last statement must be 'return'")


def test_grid_first_and_single():
    k = kernel()
    fails(replace(k, body=(k.body[1], k.body[0]) + k.body[2:]), "starts with its grid")
    fails(replace(k, body=k.body[:1] + k.body), "only one grid")


def test_loop_body_rules():
    s = kernel().body[3].body[0]
    fails(kernel(loop_body=(s,)), "the loop has no 'update'")
    u = kernel().body[3].body[1]
    fails(kernel(loop_body=(s, u, u)), "one 'update' per loop")
    fails(kernel(loop_body=(s, Softmax("a2", "qi", "Dv"), u)), "only lets and one 'update'")


# ----------------------------------------------------------------------------- phase 2

def test_call_dtype_mismatch_at_call():
    bad = Call(Op.ADD, (v("b"), Const(1.0, F32)), I32, span=SPAN)
    fails(kernel(pre=(Let("x", bad),)), "'add(b, 1.0)': 'add' needs two operands", SPAN)
    fails(kernel(pre=(Let("x", Call(Op.ADD, (v("b"), v("b")), F32)),)), "gives i32, not f32")


def test_bad_consts_and_var_dtypes():
    fails(kernel(pre=(Let("x", Const(1.5, I32)),)), "1.5 is not a valid i32 constant")
    fails(kernel(pre=(Let("x", Const(2**31, I32)),)), "is not a valid i32 constant")
    fails(kernel(pre=(Let("x", Const(1, BOOL)),)), "1 is not a valid bool constant")
    fails(kernel(pre=(Let("x", v("scale", I32)),)), "'scale' has dtype f32, not i32")


def test_load_rank_index_and_dtype():
    fails(kernel(pre=(Let("x", Load("sinks", (v("h"), v("b")), F32)),)), "rank 1 but 2")
    fails(kernel(pre=(Let("x", Load("sinks", (Const(1.0, F32),), F32)),)), "indices are i32")
    fails(kernel(pre=(Let("x", Load("k", (v("b"),) * 4, F16)),)), "is f32, not f16")


def test_slice_colons_and_dot_dims():
    two = Slice("q", (v("b"), v("h"), None, None), span=SPAN)
    dot = Dot(two, sl("k", v("b"), v("hk"), v("kj"), None))
    fails(kernel(loop_body=(Let("s", dot), kernel().body[3].body[1])),
          "exactly one ':'", SPAN)
    dot = Dot(sl("q", v("b"), v("h"), v("qi"), None), sl("k", v("b"), v("hk"), None, v("b")))
    fails(kernel(loop_body=(Let("s", dot), kernel().body[3].body[1])),
          "dot over different dims 'D' and 'T'")


def test_update_value_width_and_score_dtype():
    u = Update("acc", v("s", F32), sl("q", v("b"), v("h"), v("qi"), None))
    fails(kernel(loop_body=(kernel().body[3].body[0], u)), "softmax width is 'Dv'")
    fails(kernel(score=Const(True, BOOL)), "the update score must be f32")


def test_grid_tile_axis_rules():
    axes = (GridAxis("b", DimExtent("B")), GridAxis("h", DimExtent("Hq")),
            GridAxis("qi", DimExtent("S")))
    fails(kernel(grid=Grid(axes, span=SPAN)), "exactly one tile(...) axis, has 0", SPAN)
    tile = TileExtent("S", "BM")
    axes2 = axes[:2] + (GridAxis("qi", tile), GridAxis("q2", tile))
    fails(kernel(grid=Grid(axes2)), "has 2")
    fails(kernel(grid=Grid(axes[:2] + (GridAxis("qi", TileExtent("S", "QQ")),))),
          "unknown tunable 'QQ'")


def test_rows_must_be_tile_axis():
    k = kernel()
    body = list(k.body)
    body[2] = Softmax("acc", "h", "Dv", span=SPAN)
    fails(replace(k, body=tuple(body)), "must be the grid's tile axis 'qi'", SPAN)


def test_split_rules():
    k = kernel(split=True)
    ax = k.body[0].axes
    fails(replace(k, body=(Grid(ax + (GridAxis("k2", SplitExtent("T", "NSPLIT")),)),)
                  + k.body[1:]), "at most one split")
    fails(replace(k, body=(Grid(ax[:3] + (GridAxis("ks", SplitExtent("T", "scale")),)),)
                  + k.body[1:]), "must be an i32 param")
    fails(replace(k, body=(Grid(ax[:3] + (GridAxis("ks", SplitExtent("S", "NSPLIT")),)),)
                  + k.body[1:]), "must split the loop's dim 'T'")
    fails(replace(k, body=(Grid(ax[:3] + (GridAxis("ks", SplitExtent("T", "BM")),)),)
                  + k.body[1:]), "'BM' is a tunable, not a scalar param")
    loop = k.body[3]
    fails(replace(k, body=k.body[:3] + (replace(loop, split=None),) + k.body[4:]),
          "the loop must have split(ks)")
    fails(replace(k, body=k.body[:-1] + (Return("acc"),)), "return combine(%acc, ks)")
    plain = kernel()
    fails(replace(plain, body=plain.body[:-1] + (Return("acc", combine="h"),)),
          "return result(%acc)")


def test_loop_size_is_tunable():
    k = kernel()
    fails(replace(k, body=k.body[:3] + (replace(k.body[3], size="D"),) + k.body[4:]),
          "'D' is a dim, not a tunable")


def test_sink_logit_f32():
    fails(kernel(post=(Sink("acc", v("b")),)), "the sink logit must be f32")


def test_output_dims_and_dtype():
    fails(kernel(output=TensorType(F32, ("B", "S", "Hq", "Dv"))), "must be [B,Hq,S,Dv]")
    fails(kernel(split=True, output=TensorType(F32, ("B", "Hq", "S", "T", "Dv"))),
          "must be [B,Hq,S,Dv]")
    fails(kernel(output=TensorType(I32, ("B", "Hq", "S", "Dv"))), "output is f32 or f16")
    fails(kernel(output=TensorType(F32, ("B", "Hq", "S", "X"))), "must be [B,Hq,S,Dv]")


def test_tunables_positive_ints():
    fails(kernel(tunables=(("BM", 0), ("BN", 32))), "BM=0 must be a positive integer")
    fails(kernel(tunables=(("BM", True), ("BN", 32))), "positive integer")
    fails(kernel(tunables=(("BM", 2.0), ("BN", 32))), "positive integer")


def test_param_dtypes():
    ps = kernel().params
    fails(kernel(params=ps[:4] + (Param("scale", TensorType(BOOL)),) + ps[5:]),
          "a scalar param cannot be bool")
    fails(kernel(params=ps[:4] + (Param("scale", TensorType(DType.U8)),) + ps[5:]),
          "a scalar param cannot be u8")
    # every tensor dtype is a valid param; a load has the dtype of its storage's values
    for dt in (BOOL, DType.U8, DType.U32, I32):
        bad = kernel(sink=True, params=ps[:3] + (Param("sinks", TensorType(dt, ("Hq",))),) + ps[4:])
        load = BOOL if dt is BOOL else I32
        fails(bad, f"a load of 'sinks' is {load.value}, not f32")
    verify(kernel(sink=True, params=ps[:3] + (Param("sinks", TensorType(F16, ("Hq",))),) + ps[4:]))


def test_slices_read_float_tensors():
    ps = kernel().params
    ps = ps[:2] + (Param("v", TensorType(I32, ("B", "Hkv", "T", "Dv"))),) + ps[3:]
    fails(kernel(params=ps), "slices read float tensors")


def test_f32_constants_past_f32_are_refused_at_their_span():
    """A constant that f32 rounds to inf (1e39 in .attn text) is a VerifyError at the constant
    (it passed `attnc check` and failed in Naga or Tint at the WGSL); f32's largest value, the
    constants that round to it and inf are constants."""
    for bad in (1e39, -3.5e38, 3.4028235677973366e38):
        fails(kernel(pre=(Let("x", Const(bad, F32, span=SPAN)),)), "is outside f32's range", SPAN)
    for good in (3.4028234663852886e38, -3.40282356e38, float("inf"), float("-inf")):
        verify(kernel(pre=(Let("x", Const(good, F32)),)))


SCALAR_DTYPES = (DType.I32, DType.F32, DType.BOOL)


@pytest.mark.parametrize("op", ["lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "where"])
def test_comparison_and_logic_dtype_rules_are_wgsls(op) -> None:
    """Every operand dtype combination of the comparisons and logic ops against WGSL's rules,
    written out here: ordering (< <= > >=) of two i32 or two f32, never of bools (WGSL has no
    bool ordering); == and != of two of one dtype, bools included; and, or, not of bools; where
    of a bool and two of one dtype. Anything else is a TypeRuleError."""
    from itertools import product

    o = Op(op)
    n = {"not": 1, "where": 3}.get(op, 2)
    for ts in product(SCALAR_DTYPES, repeat=n):
        if op in ("lt", "le", "gt", "ge"):
            want = DType.BOOL if ts[0] == ts[1] and ts[0] is not DType.BOOL else None
        elif op in ("eq", "ne"):
            want = DType.BOOL if ts[0] == ts[1] else None
        elif op == "where":
            want = ts[1] if ts[0] is DType.BOOL and ts[1] == ts[2] else None
        else:
            want = DType.BOOL if all(t is DType.BOOL for t in ts) else None
        if want is None:
            with pytest.raises(TypeRuleError):
                call_dtype(o, ts)
        else:
            assert call_dtype(o, ts) is want, (op, ts)
