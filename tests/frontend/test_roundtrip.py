"""The text form round-trips: parse(print(k)) == k and print(parse(text)) is a fixed point."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import kernels, mask_exprs, score_exprs

from attnc.frontend.parser import parse, parse_file
from attnc.ir.nodes import DType
from attnc.ir.printer import print_float, print_kernel
from attnc.ir.verify import verify

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.attn"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip(path):
    k = parse_file(path)
    text = print_kernel(k)
    assert parse(text) == k
    assert print_kernel(parse(text)) == text


@given(kernels())
@settings(max_examples=150, deadline=None)
def test_generated_kernels_round_trip(k):
    verify(k)
    text = print_kernel(k)
    back = parse(text, "gen.attn")
    assert back == k, text
    assert print_kernel(back) == text


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_split_sink_lse_kernels_round_trip(data):
    k = data.draw(kernels(split=True, sink=True, lse=True, max_depth=4))
    assert verify(k).split is not None
    assert parse(print_kernel(k)) == k


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_kernels_reading_tables_round_trip(data):
    """Tables of every dtype (f32/f16, i32/u32/u8, bool) over a dim of their own, read at any
    index expression (gathers too), with the new math: printed, parsed back, equal."""
    k = data.draw(kernels(tables=True, max_depth=4))
    dtypes = {p.type.dtype for p in k.params}
    assert DType.BOOL in dtypes and dtypes & {DType.I32, DType.U32, DType.U8}
    assert parse(print_kernel(k)) == k


@given(score_exprs(), mask_exprs())
@settings(max_examples=100, deadline=None)
def test_expression_strategies_are_well_typed(score, mask):
    assert score.dtype == DType.F32 and mask.dtype == DType.BOOL


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_literals_reparse_identically(x):
    text = print_float(x)
    assert any(c in text for c in ".ein"), text
    if math.isnan(x):
        assert text == "nan"
    else:
        assert float(text) == x and math.copysign(1, float(text)) == math.copysign(1, x)
