"""The DSL tracer: shipped kernels trace to verified IR, misuse points at the user's Python line."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import attnc
from attnc.errors import TraceError
from attnc.frontend.parser import parse
from attnc.ir import nodes as ir
from attnc.ir.interp import interpret
from attnc.ir.printer import print_kernel
from attnc.kernels.flash import flash_attention

OPTION_SETS = [
    {},
    {"causal": True, "kv_lens": True, "lse": True},
    {"split": True, "sinks": True, "window": (3, None), "softcap": True},
    {"alibi": True, "bias": True, "BM": 16, "BN": 64},
    {"score_mod": lambda s, b, h, q, kv: s * 0.5, "mask_mod": lambda b, h, q, kv: (kv % 2) == 0},
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=range(len(OPTION_SETS)))
def test_shipped_kernel_traces_and_round_trips(opts):
    k = flash_attention.trace(**opts)
    assert parse(print_kernel(k)) == k


def _line_of(fn) -> int:
    return inspect.getsourcelines(fn)[1]


def test_python_control_flow_in_a_mod_points_at_the_user_line():
    def bad_mask(b, h, q, kv):
        if kv > q:  # the offending line
            return kv < q
        return kv >= q

    with pytest.raises(TraceError) as e:
        flash_attention.trace(mask_mod=bad_mask)
    assert e.value.span is not None
    assert e.value.span.file == __file__
    assert e.value.span.line == _line_of(bad_mask) + 1
    assert "control flow" in e.value.message and "where(" in e.value.render()


def test_wrong_index_count_names_the_tensor_and_line():
    bias = attnc.input("mybias", attnc.f32["S", "T"])

    def mod(s, b, h, q, kv):
        return s + bias[q]

    with pytest.raises(TraceError) as e:
        flash_attention.trace(score_mod=mod)
    assert "mybias has 2 dims" in e.value.message
    assert e.value.span.line == _line_of(mod) + 1


def test_float_index_is_rejected_with_a_hint():
    slopes = attnc.input("slopes", attnc.f32["Hq"])

    def mod(s, b, h, q, kv):
        return s + slopes[s]

    with pytest.raises(TraceError, match="indices must be i32"):
        flash_attention.trace(score_mod=mod)


def test_unknown_option_is_reported():
    with pytest.raises(TraceError, match="unknown options"):
        flash_attention.trace(causl=True)


def test_pow_takes_small_integer_exponents_and_rejects_others_with_an_alternative():
    k = flash_attention.trace(score_mod=lambda s, b, h, q, kv: s ** 3 + s ** -1)
    mod = next(x.value for x in ir.walk_stmts(k.body) if isinstance(x, ir.Let) and x.var == "mod")
    s = ir.Var("s", ir.DType.F32)
    cube = ir.Call(ir.Op.MUL, (ir.Call(ir.Op.MUL, (s, s), ir.DType.F32), s), ir.DType.F32)
    inv = ir.Call(ir.Op.DIV, (ir.Const(1.0, ir.DType.F32), s), ir.DType.F32)
    assert mod == ir.Call(ir.Op.ADD, (cube, inv), ir.DType.F32)
    with pytest.raises(TraceError, match=r"'\*\*' takes a constant integer exponent"):
        flash_attention.trace(score_mod=lambda s, b, h, q, kv: s ** 0.5)


def test_captured_input_becomes_a_parameter_and_runs_in_the_reference():
    rel = attnc.input("rel", attnc.f32["Hq"])
    k = flash_attention.trace(score_mod=lambda s, b, h, q, kv: s - rel[h] * attnc.f32(abs(q - kv)))
    assert "rel" in [p.name for p in k.params]
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 5, 4))
    kk = rng.standard_normal((1, 2, 7, 4))
    v = rng.standard_normal((1, 2, 7, 3))
    r = np.array([0.1, 0.3])
    o, _ = interpret(k, {"q": q, "k": kk, "v": v, "scale": 0.5, "rel": r})
    s = np.einsum("bhsd,bhtd->bhst", q, kk) * 0.5
    s = s - r[None, :, None, None] * np.abs(np.arange(5)[:, None] - np.arange(7)[None, :])
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhst,bhtd->bhsd", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(o, ref, rtol=1e-12, atol=1e-12)


def test_dsl_ops_outside_a_trace_say_how_to_trace():
    with pytest.raises(TraceError, match="only valid while a kernel is traced"):
        attnc.let("x", 1)
