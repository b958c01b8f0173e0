"""DSL misuse is a TraceError located at the user's own Python line (file and line asserted).

tests/frontend/test_dsl.py covers `if` on a traced value, a wrong index count, an f32 value as
an index, `**` and unknown options; tests/frontend/test_parser.py covers the .attn text
(unknown names, fuzzed text). This file adds the rest of the misuse catalogue.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

import attnc
from attnc.errors import AttncError, TraceError
from attnc.frontend.dsl import dim, dot, f32, grid, kernel, online_softmax, tiles, tunable
from attnc.kernels.flash import flash_attention

Q = f32["B", "H", "S", "D"]
K = f32["B", "H", "T", "D"]
V = f32["B", "H", "T", "Dv"]


def _line(fn, offset: int) -> int:
    return inspect.getsourcelines(fn)[1] + offset


def _at(err: TraceError, fn, offset: int) -> None:
    assert err.span is not None, err.render()
    assert err.span.file == __file__, err.render()
    assert err.span.line == _line(fn, offset), err.render()
    assert f"{__file__}:{err.span.line}:" in err.render()


def test_dot_over_different_dims_points_at_the_dot():
    bad = _dot_over_d_and_dv  # (defined below, with the other kernels whose errors are placed)
    with pytest.raises(TraceError, match="different dims: D and Dv") as e:
        bad.trace()
    _at(e.value, bad.fn, 5)


def test_slice_with_two_colons_points_at_the_index():
    bad = _slice_with_two_colons
    with pytest.raises(TraceError, match="2 ':' slices") as e:
        bad.trace()
    _at(e.value, bad.fn, 5)


def test_three_indices_into_a_2d_input():
    table = attnc.input("table", f32["S", "T"])

    def mod(s, b, h, q_idx, kv_idx):
        return s + table[b, q_idx, kv_idx]

    with pytest.raises(TraceError, match=r"table has 2 dims \['S', 'T'\], indexed with 3") as e:
        flash_attention.trace(score_mod=mod)
    _at(e.value, mod, 1)


def test_python_float_as_an_index():
    slopes = attnc.input("slopes", f32["Hq"])

    def mod(s, b, h, q_idx, kv_idx):
        return s + slopes[1.5]

    with pytest.raises(TraceError, match="indices must be i32") as e:
        flash_attention.trace(score_mod=mod)
    _at(e.value, mod, 1)


@pytest.mark.parametrize("construct", ["and", "or", "not", "while", "ternary", "int", "float",
                                       "math_exp", "range"])
def test_python_constructs_on_traced_values(construct):
    def mod(s, b, h, q_idx, kv_idx):
        if construct == "and":
            return (kv_idx <= q_idx) and (kv_idx >= 0)
        if construct == "or":
            return (kv_idx <= q_idx) or (kv_idx >= 0)
        if construct == "not":
            return not (kv_idx <= q_idx)
        if construct == "while":
            while kv_idx > q_idx:
                kv_idx = kv_idx - 1
            return kv_idx == q_idx
        if construct == "ternary":
            return True if kv_idx > q_idx else False
        if construct == "int":
            return kv_idx < int(q_idx)
        if construct == "float":
            return kv_idx < float(q_idx)
        if construct == "math_exp":
            return math.exp(kv_idx) > 1
        return kv_idx < len(range(q_idx))

    with pytest.raises(TraceError) as e:
        flash_attention.trace(mask_mod=lambda b, h, q, kv: mod(None, b, h, q, kv))
    assert e.value.span is not None and e.value.span.file == __file__, e.value.render()
    src, first = inspect.getsourcelines(mod)
    assert first < e.value.span.line < first + len(src)
    word = {"ternary": " if ", "math_exp": "math.exp"}.get(construct, construct)
    assert word in src[e.value.span.line - first]


def test_a_constant_of_another_kind_points_at_the_user_line():
    def mod(s, b, h, q_idx, kv_idx):
        return s * complex(2.0)

    with pytest.raises(TraceError, match="cannot use a complex in a kernel expression") as e:
        flash_attention.trace(score_mod=mod)
    _at(e.value, mod, 1)


def test_numpy_scalars_are_constants_on_either_side() -> None:
    """np.float32(2.0) * s, s * np.float32(2.0), s > np.int32(0): constants as 2.0 and 0 (numpy's
    scalars were refused, and on the left numpy's ufunc met the traced value first)."""
    def plain(s, b, h, q_idx, kv_idx):
        return attnc.where(q_idx > 0, 2.0 * s - s * 0.5, s)

    def numpy_scalars(s, b, h, q_idx, kv_idx):
        return attnc.where(q_idx > np.int32(0), np.float32(2.0) * s - s * np.float64(0.5), s)

    assert flash_attention.trace(score_mod=numpy_scalars) == flash_attention.trace(score_mod=plain)


def test_xor_of_masks_is_their_difference() -> None:
    """`a ^ b` of two masks traces to a != b, on either side of a Python bool (it was a plain
    TypeError from Python)."""
    def xor(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) ^ (kv_idx > 2)

    def ne(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) != (kv_idx > 2)

    assert flash_attention.trace(mask_mod=xor) == flash_attention.trace(mask_mod=ne)
    assert flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: True ^ (kv_idx > 2)) == \
        flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: True != (kv_idx > 2))  # noqa: E712 (a traced comparison)


@pytest.mark.parametrize(("op", "message"), [("xor_int", "'\\^' takes two bools"), ("and_int", "'&' takes bools"),
                                             ("rand_int", "'&' takes bools"), ("or_int", "'\\|' takes bools"),
                                             ("invert_int", "'~' takes bools"), ("lshift", "'<<' and '>>'"),
                                             ("rshift", "'<<' and '>>'"), ("rrshift", "'<<' and '>>'"),
                                             ("round", "round\\(\\) of a traced value")])
def test_operators_the_dsl_lacks_point_at_the_user_line(op: str, message: str) -> None:
    """Bitwise integer operators and round() on traced values: a TraceError at the user's line
    naming the operator written, with what to write instead (they were plain TypeErrors from
    Python; `kv_idx & 3` said "'and' needs bool operands (rule 5)")."""
    def mask(b, h, q_idx, kv_idx):
        return {"xor_int": lambda: (kv_idx ^ 1) == 0, "and_int": lambda: (kv_idx & 3) == 0,
                "rand_int": lambda: (3 & kv_idx) == 0, "or_int": lambda: (kv_idx | 1) == 0,
                "invert_int": lambda: (~kv_idx) == 0, "lshift": lambda: (kv_idx << 1) == 0,
                "rshift": lambda: (kv_idx >> 1) == 0, "rrshift": lambda: (8 >> kv_idx) == 0,
                "round": lambda: round(attnc.f32(kv_idx)) == 0}[op]()

    with pytest.raises(TraceError, match=message) as e:
        flash_attention.trace(mask_mod=mask)
    assert e.value.span is not None and e.value.span.file == __file__, e.value.render()
    assert _line(mask, 1) <= e.value.span.line <= _line(mask, 5), e.value.render()


def test_a_mod_returning_a_captured_array_names_the_variable() -> None:
    """A mod returning a whole captured array (not an element of it) says which variable, by
    its name and shape (it said `captured0: f32['captured0_d0']`, the trace's internal name)."""
    slopes = np.zeros(4, np.float32)
    with pytest.raises(TraceError, match=r"returned the captured tensor 'slopes' of shape \(4,\) \(index it"):
        flash_attention.trace(score_mod=lambda s, b, h, q_idx, kv_idx: slopes)


def test_integer_ops_on_floats_point_at_the_user_line():
    def mod(s, b, h, q_idx, kv_idx):
        return s // 2

    with pytest.raises(TraceError, match="needs i32 operands") as e:
        flash_attention.trace(score_mod=mod)
    _at(e.value, mod, 1)


def test_logic_on_numbers_points_at_the_user_line():
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx) & (kv_idx > 0)

    with pytest.raises(TraceError, match="'&' takes bools") as e:
        flash_attention.trace(mask_mod=mask)
    _at(e.value, mask, 1)


def test_dim_of_an_unknown_name_is_reported():
    def mod(s, b, h, q_idx, kv_idx):
        return s + attnc.f32(dim("Nope"))

    with pytest.raises(AttncError, match="Nope"):
        flash_attention.trace(score_mod=mod)


def test_numpy_function_on_a_traced_value_is_a_trace_error():
    def mod(s, b, h, q_idx, kv_idx):
        return np.exp(s)

    with pytest.raises(TraceError, match="attnc.exp") as e:
        flash_attention.trace(score_mod=mod)
    _at(e.value, mod, 1)


def test_score_mod_returning_a_bool_points_at_the_user_function():
    def mod(s, b, h, q_idx, kv_idx):
        return kv_idx < q_idx

    with pytest.raises(TraceError, match="score_mod") as e:
        flash_attention.trace(score_mod=mod)
    assert e.value.span is not None and e.value.span.file == __file__, e.value.render()


def _mod_of_arity(n: int):
    """A plain function of n parameters (never called: refused before)."""
    scope: dict = {}
    exec(f"def mod({', '.join(f'a{i}' for i in range(n))}):\n    return None\n", scope)
    return scope["mod"]


@pytest.mark.parametrize(("kind", "n"), [("score", 4), ("score", 6), ("mask", 3), ("mask", 5), ("mask", 0)])
def test_a_mod_of_the_wrong_arity_names_the_signature(kind: str, n: int) -> None:
    """A score_mod / mask_mod that cannot take its 5 / 4 arguments: a TraceError at its def line
    giving the parameters it is called with and its own signature (a bare TypeError from inside
    the trace said only how many arguments it got)."""
    def four(b, h, q_idx):
        return q_idx >= 0

    mod = four if n == 3 else _mod_of_arity(n)
    want = "(score, b, h, q_idx, kv_idx)" if kind == "score" else "(b, h, q_idx, kv_idx)"
    with pytest.raises(TraceError, match=rf"a {kind}_mod is called with {5 if kind == 'score' else 4} arguments "
                                         rf"{re.escape(want)}; .*cannot take them") as e:
        flash_attention.trace(**{f"{kind}_mod": mod})
    if mod is four:
        _at(e.value, four, 0)


def test_kernel_signature_and_return_mistakes_point_at_the_kernel() -> None:
    """A parameter without an annotation and a kernel returning its accumulator instead of
    acc.result() are reported at the kernel's definition, naming the kernel (they pointed at
    the line that called trace(), or inside attnc when attnc.build traced); online_softmax given
    a number names what it takes."""
    @kernel
    def no_annotation(q, k: K, v: K, *, BM=tunable(8), BN=tunable(8)):
        return None

    @kernel
    def returns_acc(q: Q, k: K, v: K, *, BM=tunable(8), BN=tunable(8)):
        b, h, qi = grid(b="B", h="H", qi=tiles("S", BM))
        acc = online_softmax(rows=qi, width="D")
        for kj in tiles("T", BN):
            acc.update(dot(q[b, h, qi, :], k[b, h, kj, :]), v[b, h, kj, :])
        return acc

    @kernel
    def rows_number(q: Q, k: K, v: K, *, BM=tunable(8), BN=tunable(8)):
        online_softmax(rows=0, width="D")

    for kern, message in ((no_annotation, "parameter 'q' of kernel no_annotation needs a type annotation"),
                          (returns_acc, "kernel returns_acc returned Acc; a kernel must return acc.result()")):
        with pytest.raises(TraceError, match=re.escape(message)) as e:
            kern.trace()
        _at(e.value, kern.fn, 0)  # where the definition starts (its decorator)
        with pytest.raises(TraceError, match=re.escape(message)) as e:
            attnc.build(kern, device=None)(q=np.zeros((1, 1, 2, 4), np.float32))
        assert e.value.span is not None and e.value.span.file == __file__
    with pytest.raises(TraceError, match=r"online_softmax\(rows=...\) takes the query tile grid variable .*got a int"):
        rows_number.trace()


def test_a_mod_may_return_a_numpy_scalar_constant() -> None:
    """np.True_ from a mask_mod and a numpy float from a score_mod are constants like Python's
    True and 0.5 (np.True_ was refused as not a bool)."""
    assert flash_attention.trace(mask_mod=lambda b, h, i, j: np.True_) == flash_attention.trace(
        mask_mod=lambda b, h, i, j: True)
    assert flash_attention.trace(score_mod=lambda s, b, h, i, j: np.float32(0.5)) == flash_attention.trace(
        score_mod=lambda s, b, h, i, j: 0.5)


# the kernel's own inputs by option (flash_attention's keywords that add them), and always
OWN_INPUTS = {"q": {}, "k": {}, "v": {}, "scale": {}, "bias": {"bias": True}, "sinks": {"sinks": True},
              "kv_lens": {"kv_lens": True}, "alibi_slopes": {"alibi": True}, "softcap": {"softcap": True}}


@pytest.mark.parametrize("name", sorted(OWN_INPUTS))
@pytest.mark.parametrize("how", ["scalar", "input"])
def test_a_mod_input_named_like_the_kernels_own_points_at_the_mod(name: str, how: str) -> None:
    """attnc.scalar("scale") in a mod read the kernel's softmax scale (1/sqrt(D)) without a word,
    attnc.input("k", ...) attention's k; now a TraceError at the declaration, either way round
    (the mod traced before the kernel reads the input or after)."""
    def mod(s, b, h, qi, kj):
        if how == "scalar":
            return s * attnc.scalar(name)
        return s + attnc.input(name, attnc.f32["NX"])[kj]

    with pytest.raises(TraceError, match=f"attnc.input/attnc.scalar '{name}' in a mod names the kernel's own "
                                         f"input '{name}'") as e:
        flash_attention.trace(score_mod=mod, **OWN_INPUTS[name])
    _at(e.value, mod, 2 if how == "scalar" else 3)


def test_a_mod_input_of_its_own_name_may_be_declared_twice() -> None:
    """The same declared input read twice, by the score and the mask mod: one input."""
    kern = flash_attention.trace(score_mod=lambda s, b, h, qi, kj: s * attnc.scalar("temp"),
                                 mask_mod=lambda b, h, qi, kj: attnc.scalar("temp") > 0.0)
    assert [p.name for p in kern.params].count("temp") == 1


PAST_F32 = {  # literals in the mod (a number it closes over is a runtime input, not a constant)
    "1e39": lambda s, b, h, qi, kj: attnc.where(kj > qi, -1e39, s),
    "-3.5e38": lambda s, b, h, qi, kj: s + -3.5e38,
    "halfway": lambda s, b, h, qi, kj: attnc.minimum(s, 3.4028235677973366e38),
    "1e300": lambda s, b, h, qi, kj: s * 1e300,
}
WITHIN_F32 = [lambda s, b, h, qi, kj: attnc.minimum(s, 3.4028234663852886e38),
              lambda s, b, h, qi, kj: s - 3.40282356e38, lambda s, b, h, qi, kj: attnc.where(kj > qi, -math.inf, s)]


@pytest.mark.parametrize("case", sorted(PAST_F32))
def test_a_float_constant_past_f32_points_at_the_user_line(case: str) -> None:
    """A float constant that f32 rounds to inf (WGSL's compilers refused the literal, pointing
    at the WGSL); f32's largest value, constants that round to it, and inf stay constants."""
    with pytest.raises(TraceError, match="is outside f32's range") as e:
        flash_attention.trace(score_mod=PAST_F32[case])
    _at(e.value, PAST_F32[case], 0)
    for fine in WITHIN_F32:
        flash_attention.trace(score_mod=fine)


def test_iterating_over_captured_arrays_unrolls_and_over_inputs_is_an_error() -> None:
    """`for row in table` over a captured array (no __iter__: Python indexed it forever, the
    trace never ended) unrolls over its rows, as numpy iterates; over a kernel input, whose
    size is a runtime value, it is a TraceError at the loop."""
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    kern = flash_attention.trace(score_mod=lambda s, b, h, qi, kj: s + sum(x[kj % 4] for x in table)
                                 + sum(e for e in table[1]))
    assert kern is not None

    def bad(s, b, h, qi, kj):
        return s + sum(x for x in attnc.input("rel", attnc.f32["NR"]))

    with pytest.raises(TraceError, match="iterating over rel: the size of a kernel input is a runtime value") as e:
        flash_attention.trace(score_mod=bad)
    _at(e.value, bad, 1)


ARITY = {  # a DSL function called with arguments it does not take: its signature and what is wrong
    "where": (lambda s, b, h, qi, kj: attnc.where(qi > kj, s), "attnc.where(cond, a, b): missing a required"),
    "maximum": (lambda s, b, h, qi, kj: attnc.maximum(s), "attnc.maximum(a, b): missing a required"),
    "exp": (lambda s, b, h, qi, kj: attnc.exp(s, 2), "attnc.exp(x): too many positional arguments"),
    "log": (lambda s, b, h, qi, kj: s + attnc.log(), "attnc.log(x): missing a required"),
}


@pytest.mark.parametrize("case", sorted(ARITY))
def test_dsl_functions_with_wrong_arguments_point_at_the_user_line(case: str) -> None:
    """Python's TypeError named attnc's internals (`_unary.<locals>.f() takes 1 positional
    argument but 2 were given`); now a TraceError at the call naming the DSL signature."""
    fn, message = ARITY[case]
    with pytest.raises(TraceError, match=re.escape(message)) as e:
        flash_attention.trace(score_mod=fn)
    _at(e.value, fn, 0)


def test_a_positive_number_to_a_traced_power_is_exp2_and_python_max_hints_maximum() -> None:
    """`2 ** x` (ALiBi's slopes) had no __rpow__: Python's TypeError. It is exp2(x * log2(2)),
    against numpy in tests/runtime; a base that is not a positive number is a TraceError, and
    Python's max() of a traced value points at attnc.maximum."""
    kern = flash_attention.trace(score_mod=lambda s, b, h, qi, kj: s * 2 ** (-(h + 1) / 8) + 0.5 ** kj)
    from attnc.ir.printer import print_kernel

    assert print_kernel(kern).count("exp2(") == 2
    neg = lambda s, b, h, qi, kj: (-2) ** s  # noqa: E731
    with pytest.raises(TraceError, match="the base of a traced power must be a positive number") as e:
        flash_attention.trace(score_mod=neg)
    _at(e.value, neg, 0)
    with pytest.raises(TraceError, match="control flow") as e:
        flash_attention.trace(score_mod=lambda s, b, h, qi, kj: max(s, 0.1))
    assert any("attnc.maximum" in n for n in e.value.notes)


def test_a_traced_integer_power_of_a_base_not_a_power_of_two_points_at_the_user_line() -> None:
    """`3 ** kv_idx` and `10 ** kv_idx` were exp2(kv_idx * log2(b)) in f32 (attnc.i32(10 ** kj)
    gave 99, 999, ...; 3 ** 1 != 3), though the docs allow only a constant integer exponent: a
    TraceError at the user's line naming the rule and what to write. A power of 2 stays exact
    (2 ** kv_idx, 0.5 ** kv_idx), a float exponent is the documented f32 power, a captured int
    exponent is traced as a constant, and an integer to the power 0 is the i32 1 ((kj ** 0) % 2
    was "'mod' needs i32 operands")."""
    def ten(b, h, q_idx, kv_idx):
        return attnc.i32(10 ** kv_idx) == 100

    for mask in (ten, lambda b, h, q_idx, kv_idx: 3 ** (kv_idx - q_idx) > 9):
        with pytest.raises(TraceError, match=r"\*\* a traced integer: '\*\*' takes a constant integer exponent "
                                             r"from -8 to 8; .* exact only for a base that is a power of 2") as e:
            flash_attention.trace(mask_mod=mask)
        _at(e.value, mask, 1 if mask is ten else 0)
        assert any("capture a table" in n for n in e.value.notes) and any("attnc.f32(x)" in n for n in e.value.notes)
    flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: 2 ** kv_idx + 0.25 ** q_idx > 9)
    flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: 3.0 ** attnc.f32(kv_idx) > 9)
    p = 3
    kern = flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: 3 ** p + kv_idx ** p > 9)
    from attnc.ir.printer import print_kernel

    assert "exp2" not in print_kernel(kern) and "27" in print_kernel(kern)  # 3 ** 3, x * x * x
    flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx ** 0) % 2 == 1)
    flash_attention.trace(score_mod=lambda s, b, h, q_idx, kv_idx: s + s ** 0)


WHOLE_TABLE = np.arange(4, dtype=np.float32)
WHOLE_GRID = np.zeros((2, 3), np.int32)


def _divmod_mask(b, h, q_idx, kv_idx):
    return divmod(kv_idx, 64)[1] == 0


def _rdivmod_mask(b, h, q_idx, kv_idx):
    return divmod(100, kv_idx)[0] == 0


def _table_times_two(s, b, h, q_idx, kv_idx):
    return s + WHOLE_TABLE * 2


def _two_times_table(s, b, h, q_idx, kv_idx):
    return s + 2 * WHOLE_TABLE


def _table_equals(b, h, q_idx, kv_idx):
    return WHOLE_TABLE == 2  # was Python's identity test: the constant False, every key masked


def _row_of_grid(s, b, h, q_idx, kv_idx):
    return s + WHOLE_GRID[h] * 2


def _declared_whole(s, b, h, q_idx, kv_idx):
    return attnc.input("rel", attnc.f32["T"]) * 0.5 + s


@pytest.mark.parametrize(("kind", "fn", "message", "note"), [
    ("mask", _divmod_mask, "divmod() of a traced value is not in the DSL", "x // y and x % y"),
    ("mask", _rdivmod_mask, "divmod() of a traced value is not in the DSL", "x // y and x % y"),
    ("score", _table_times_two, "captured tensor 'WHOLE_TABLE' of shape (4,): arithmetic and comparisons take one "
     "element, not a whole tensor", "WHOLE_TABLE[kv_idx]"),
    ("score", _two_times_table, "captured tensor 'WHOLE_TABLE' of shape (4,): arithmetic", "WHOLE_TABLE[kv_idx]"),
    ("mask", _table_equals, "captured tensor 'WHOLE_TABLE' of shape (4,): arithmetic", "WHOLE_TABLE[kv_idx]"),
    ("score", _row_of_grid, "WHOLE_GRID[...] with 1 of the 2 axes of captured tensor 'WHOLE_GRID' of shape (2, 3) "
     "indexed: arithmetic", "WHOLE_GRID[q_idx, kv_idx]"),
    ("score", _declared_whole, "input 'rel' of dims ['T']: arithmetic", "rel[kv_idx]"),
])
def test_divmod_and_arithmetic_on_a_whole_table_point_at_the_user_line(kind, fn, message, note) -> None:
    """`divmod(kv_idx, 64)` and `table * 2` (a captured or declared tensor used as a value)
    were Python's TypeErrors naming attnc's classes, with no line (`table == 2` was silently
    False); now TraceErrors at the user's line saying what to write."""
    with pytest.raises(TraceError, match=re.escape(message)) as e:
        flash_attention.trace(**{f"{kind}_mod": fn})
    _at(e.value, fn, 1)
    assert any(note in n for n in e.value.notes), e.value.render()


def _bool_plus_score(s, b, h, q_idx, kv_idx):
    return s + (q_idx < kv_idx)


def _floor_division_of_a_score(s, b, h, q_idx, kv_idx):
    scaled = s * 2.0
    return scaled + s // 2


def _and_of_a_number(b, h, q_idx, kv_idx):
    return (kv_idx > 0) & (kv_idx - q_idx)


def _numpy_exp_of_a_score(s, b, h, q_idx, kv_idx):
    return 0.5 * np.exp(s)


@kernel
def _dot_over_d_and_dv(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, qi = grid(b="B", h="H", qi=tiles("S", BM))
    acc = online_softmax(rows=qi, width="Dv")
    for kj in tiles("T", BN):
        s = dot(q[b, h, qi, :], v[b, h, kj, :])
        acc.update(s, v[b, h, kj, :])
    return acc.result()


@kernel
def _slice_with_two_colons(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, qi = grid(b="B", h="H", qi=tiles("S", BM))
    acc = online_softmax(rows=qi, width="Dv")
    for kj in tiles("T", BN):
        s = dot(q[b, h, :, :], k[b, h, kj, :])
        acc.update(s, v[b, h, kj, :])
    return acc.result()


@pytest.mark.parametrize(("trace", "fn", "offset", "expr"), [
    (lambda: flash_attention.trace(score_mod=_bool_plus_score), _bool_plus_score, 1, "s + (q_idx < kv_idx)"),
    (lambda: flash_attention.trace(score_mod=_floor_division_of_a_score), _floor_division_of_a_score, 2, "s // 2"),
    (lambda: flash_attention.trace(mask_mod=_and_of_a_number), _and_of_a_number, 1,
     "(kv_idx > 0) & (kv_idx - q_idx)"),
    (lambda: flash_attention.trace(score_mod=_numpy_exp_of_a_score), _numpy_exp_of_a_score, 1, "np.exp(s)"),
    (_dot_over_d_and_dv.trace, _dot_over_d_and_dv.fn, 5, "dot(q[b, h, qi, :], v[b, h, kj, :])"),
    (_slice_with_two_colons.trace, _slice_with_two_colons.fn, 5, "q[b, h, :, :]"),
], ids=["bool_in_score_mod", "floor_division_in_score_mod", "and_in_mask_mod", "numpy_in_score_mod",
        "dot_in_kernel", "slice_in_kernel"])
def test_trace_errors_give_the_column_and_caret_of_the_expression(trace, fn, offset, expr) -> None:
    """A TraceError from a mod or from DSL kernel code gives the 1-based line and column of the
    Python expression that failed (Span's convention, as the .attn parser's), and the rendered
    message repeats the source line with carets under exactly that expression (a 0-based
    column put the caret one to the left and the location one column early)."""
    with pytest.raises(TraceError) as e:
        trace()
    src = inspect.getsourcelines(fn)[0][offset].rstrip("\n")
    column = src.index(expr) + 1
    span = e.value.span
    assert span is not None and span.file == __file__, e.value.render()
    assert (span.line, span.column, span.end_column) == (_line(fn, offset), column, column + len(expr)), \
        e.value.render()
    head, shown, carets = e.value.render().splitlines()[:3]
    assert head.startswith(f"{__file__}:{_line(fn, offset)}:{column}: trace error: "), head
    assert shown == "    " + src
    assert carets == "    " + " " * (column - 1) + "^" * len(expr), e.value.render()


def test_a_chained_comparison_says_to_write_the_links_with_and() -> None:
    """`a < kv_idx < b` gave the generic "cannot drive Python control flow" error; it names the
    chained comparison and writes the `&` of its links from the user's own expression, also
    across lines; other control flow keeps the generic message."""
    def between(b, h, q_idx, kv_idx):
        return 3 < kv_idx <= q_idx

    def across_lines(b, h, q_idx, kv_idx):
        lo = 2
        return (lo <= kv_idx + 1
                < q_idx != 7)

    for fn, offset, want in ((between, 1, "(3 < kv_idx) & (kv_idx <= q_idx)"),
                             (across_lines, 2, "(lo <= kv_idx + 1) & (kv_idx + 1 < q_idx) & (q_idx != 7)")):
        with pytest.raises(TraceError, match="a chained comparison of traced values") as e:
            flash_attention.trace(mask_mod=fn)
        _at(e.value, fn, offset)
        assert e.value.notes == (f"write {want}",), e.value.render()
    with pytest.raises(TraceError, match="cannot drive Python control flow"):
        flash_attention.trace(mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx > 2) and (kv_idx < q_idx))


def test_a_kernel_param_the_verifier_refuses_points_at_the_kernel():
    """A param named like attnc's own tensors (o, lse, part, blocks) is refused at the kernel's
    definition (it pointed at the caller's trace() line, and `attnc compile` blamed --set)."""
    from attnc.errors import VerifyError

    @kernel
    def named_o(q: Q, k: K, v: V, o: K, scale: f32, *, BM=tunable(16), BN=tunable(16)):
        b, h, qi = grid(b="B", h="H", qi=tiles("S", BM))
        acc = online_softmax(rows=qi, width="Dv")
        for kj in tiles("T", BN):
            acc.update(dot(q[b, h, qi, :], k[b, h, kj, :]) * scale + o[b, h, kj, 0], v[b, h, kj, :])
        return acc.result()

    with pytest.raises(VerifyError, match="param 'o': the names blocks, lse, o, part are attnc's") as e:
        named_o.trace()
    assert e.value.span is not None and e.value.span.file == __file__, e.value.render()
    assert e.value.span.line in (_line(named_o.fn, 0), _line(named_o.fn, 1)), e.value.render()
