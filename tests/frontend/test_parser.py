"""The .attn parser: spans, literals, complete rendered diagnostics, and fuzzing for leaks."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark
from lark.lexer import PatternStr

from attnc.errors import AttncError, ParseError, VerifyError
from attnc.frontend.parser import MAX_DEPTH, _lark, parse, parse_file
from attnc.ir.nodes import Const, DType, Let, Loop, Var
from attnc.ir.printer import print_kernel

BASE = """\
kernel fa(q: f32[B,H,S,D], k: f32[B,H,T,D], v: f32[B,H,T,Dv], scale: f32) -> f32[B,H,S,Dv]
    tunables(BM=32, BN=32) {
  grid b: B, h: H, qi: tile(S, BM)
  %acc = online_softmax rows(qi) width(Dv)
  for kj in tile(T, BN) {
    %s = mul(dot(q[b, h, qi, :], k[b, h, kj, :]), scale)
    update %acc, %s, v[b, h, kj, :]
  }
  return result(%acc)
}
"""
EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.attn"))

# (case, text to replace in BASE, replacement, the complete rendered diagnostic)
CASES = [
    ('missing_paren', 'scale)\n', 'scale\n', (
        "fa.attn:7:5: parse error: unexpected 'update'; expected ')' or ','\n"
        '        update %acc, %s, v[b, h, kj, :]\n'
        '        ^^^^^^')),
    ('unknown_op', 'mul(dot', 'mult(dot', (
        "fa.attn:6:10: parse error: unknown operator 'mult'; did you mean 'mul'? known: "
        'abs, add, and, ceil, cos, div, dot, eq, exp, exp2, f32, floor, ge, gt, i32, idiv, le,'
        ' log, log2, lt, max, min, mod, mul, ne, neg, not, or, rsqrt, sigmoid, sin, sqrt, sub, tan,'
        ' tanh, where\n'
        '        %s = mult(dot(q[b, h, qi, :], k[b, h, kj, :]), scale)\n'
        '             ^^^^')),
    ('unknown_name', 'k[b, h, kj, :]', 'k[b, hh, kj, :]', (
        "fa.attn:6:39: parse error: unknown name 'hh'; did you mean 'h'? known here: B, "
        'H, S, D, T, Dv, scale, b, h, qi, kj\n'
        '        %s = mul(dot(q[b, h, qi, :], k[b, hh, kj, :]), scale)\n'
        '                                          ^^')),
    ('wrong_arity', 'scale)\n', 'scale, scale)\n', (
        "fa.attn:6:10: parse error: 'mul' takes 2 arguments, got 3\n"
        '        %s = mul(dot(q[b, h, qi, :], k[b, h, kj, :]), scale, scale)\n'
        '             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^')),
    ('type_error', '%s = mul(dot(q[b, h, qi, :], k[b, h, kj, :]), scale)', '%s = add(kj, scale)', (
        "fa.attn:6:10: verify error: 'add' needs two operands of the same dtype, i32 or "
        'f32; got i32, f32\n'
        '        %s = add(kj, scale)\n'
        '             ^^^^^^^^^^^^^^')),
    ('update_outside_loop', '  }\n', '  }\n  update %acc, 0.0, v[b, h, 0, :]\n', (
        "fa.attn:9:3: verify error: 'update %acc, 0.0, v[b, h, 0, :]': 'update' is only "
        'allowed inside a for loop\n'
        '      update %acc, 0.0, v[b, h, 0, :]\n'
        '      ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^')),
    ('two_colons', 'q[b, h, qi, :]', 'q[b, h, :, :]', (
        "fa.attn:6:18: verify error: 'q[b, h, :, :]': a slice has exactly one ':'\n"
        '        %s = mul(dot(q[b, h, :, :], k[b, h, kj, :]), scale)\n'
        '                     ^^^^^^^^^^^^^')),
    ('unexpected_char', 'grid b: B', 'grid b: B$', (
        "fa.attn:3:12: parse error: unexpected character '$'; expected one of ',', 'for',"
        " 'grid', 'return', 'sink', 'update', '}' or a %name\n"
        '      grid b: B$, h: H, qi: tile(S, BM)\n'
        '               ^')),
    ('eof', '  return result(%acc)\n}\n', '  return result(%acc)\n', (
        "fa.attn:9:22: parse error: unexpected end of input; expected one of ',', 'for', "
        "'grid', 'return', 'sink', 'update', '}' or a %name\n"
        '      return result(%acc)\n'
        '                         ^')),
    ('let_without_percent', 'update %acc, %s,', 'update %acc, s,', (
        "fa.attn:7:18: parse error: unknown name 's'; did you mean '%s'? known here: B, "
        'H, S, D, T, Dv, scale, b, h, qi, kj\n'
        '        update %acc, s, v[b, h, kj, :]\n'
        '                     ^')),
    ('misspelled_let', 'update %acc, %s,', 'update %acc, %ss,', (
        "fa.attn:7:18: parse error: unknown name '%ss'; did you mean '%s'? known here: %s\n"
        '        update %acc, %ss, v[b, h, kj, :]\n'
        '                     ^^^')),
    ('tensor_as_value', 'scale)\n', 'q)\n', (
        "fa.attn:6:51: parse error: 'q' is a tensor; index it, as in q[...]\n"
        '        %s = mul(dot(q[b, h, qi, :], k[b, h, kj, :]), q)\n'
        '                                                      ^')),
    # a grid axis named twice: said at the second (it was "unknown name 'h'" at a later use)
    ('grid_axis_twice', 'grid b: B, h: H', 'grid b: B, b: H', (
        "fa.attn:3:14: parse error: 'b' is already defined (as a grid); names are unique in a kernel\n"
        '      grid b: B, b: H, qi: tile(S, BM)\n'
        '                 ^^^^')),
    ('bad_dtype', 'scale: f32)', 'scale: f64)', (
        "fa.attn:1:70: parse error: unknown dtype 'f64'; expected one of f32, f16, i32, u32, u8, bool, q8_0, q4_0, "
        "int8\n"
        '    kernel fa(q: f32[B,H,S,D], k: f32[B,H,T,D], v: f32[B,H,T,Dv], scale: f64) ->'
        ' f32[B,H,S,Dv]\n'
        '                                                                         ^^^')),
]


@pytest.mark.parametrize("case, old, new, rendered", CASES, ids=[c[0] for c in CASES])
def test_error_renders_completely(case, old, new, rendered):
    assert old in BASE
    with pytest.raises(AttncError) as info:
        parse(BASE.replace(old, new, 1), "fa.attn")
    assert info.value.render() == rendered
    assert str(info.value) == rendered


ONE_LINE = "kernel k(q: f32[B,H,S,D], k: f32[B,H,T,D], v: f32[B,H,T,Dv]) -> f32[B,H,S,Dv] tunables(BM=32) { }"
LAST_LINE = BASE.replace("  return result(%acc)\n}\n", "  return result(%acc) }")  # the body closes on the last line

# (case, text with the span the caret should mark between '⟨' and '⟩' (empty: one caret there), its line)
WHERE = [
    ("one_line_tunable", ONE_LINE.replace("BM=32", "BM=⟨0⟩"), 1),
    ("one_line_dtype", ONE_LINE.replace("v: f32", "v: ⟨f64⟩"), 1),
    ("one_line_char", ONE_LINE.replace("{ }", "{ ⟨$⟩ }"), 1),
    ("one_line_verify", ONE_LINE.replace("{ }", "{ ⟨return result(%a)⟩ }"), 1),
    ("first_line_dtype", BASE.replace("scale: f32)", "scale: ⟨f64⟩)"), 1),
    ("first_line_char", BASE.replace("kernel fa(", "kernel fa(⟨$⟩"), 1),
    ("middle_tunable", BASE.replace("tunables(BM=32", "tunables(BM=⟨0⟩"), 2),
    ("middle_char", BASE.replace("grid b: B", "grid b: B⟨$⟩"), 3),
    ("middle_name", BASE.replace("k[b, h, kj, :]", "k[b, ⟨hh⟩, kj, :]"), 6),
    ("last_verify", LAST_LINE.replace("return result(%acc)", "⟨return result(%accc)⟩"), 9),
    ("last_char", LAST_LINE.replace("%acc) }", "%acc) ⟨$⟩ }"), 9),
    ("last_token", LAST_LINE.replace("%acc) }", "%acc) } ⟨}⟩"), 9),
    ("last_number", LAST_LINE.replace("%acc) }", "%acc) }\n  ⟨99999999999⟩"), 10),
    ("last_end_of_input", LAST_LINE.replace("%acc) }", "%acc)⟨⟩"), 9),
]


@pytest.mark.parametrize("final_newline", [False, True], ids=["no_final_newline", "final_newline"])
@pytest.mark.parametrize("case, marked, line", WHERE, ids=[c[0] for c in WHERE])
def test_errors_show_their_line_and_caret_on_any_line(case, marked, line, final_newline):
    """Every diagnostic shows its source line and carets under the offending text, whether
    the error is on the first line, a middle one or the last, and whether the text ends in a
    newline or not: the last line of a text without one printed no source line and no caret
    (its index was taken for one past the end); grammar errors, the parser's own checks and
    the verifier's take that line alike."""
    assert marked.count("⟨") == marked.count("⟩") == 1, case
    text = marked.rstrip("\n").replace("⟨", "").replace("⟩", "") + ("\n" if final_newline else "")
    src = marked.split("\n")[line - 1]
    column = src.index("⟨") + 1
    width = max(1, src.index("⟩") - column)
    src = src.replace("⟨", "").replace("⟩", "")
    with pytest.raises(AttncError) as info:
        parse(text, "k.attn")
    err = info.value
    assert (err.span.line, err.span.column) == (line, column), err.render()
    head, shown, carets = err.render().split("\n")[:3]
    assert head.startswith(f"k.attn:{line}:{column}: {err.kind}: "), head
    assert shown == "    " + src
    assert carets == "    " + " " * (column - 1) + "^" * width, err.render()


def test_error_kinds():
    with pytest.raises(ParseError):
        parse(BASE.replace("scale)\n", "scale\n"))
    with pytest.raises(VerifyError, match="'D' is already defined"):
        parse(BASE.replace("tunables(BM=32", "tunables(D=4, BM=32"))


@pytest.mark.parametrize(("tunables", "message", "column"), [
    ("tunables(BM=0", "tunable BM=0 must be a positive integer", 17),
    ("tunables(BM=-4", "tunable BM=-4 must be a positive integer", 17),
    ("tunables(BN=8, BM=32", "tunable BN is given twice (BN=8 before)", 27),
])
def test_tunable_values_are_checked_where_the_text_gives_them(tunables, message, column):
    """A tile size of 0 or below, or one given twice, is a ParseError at it (the verifier's
    check pointed at the kernel line)."""
    with pytest.raises(ParseError, match=re.escape(message)) as e:
        parse(BASE.replace("tunables(BM=32", tunables))
    assert (e.value.span.line, e.value.span.column) == (2, column)


def test_spans_point_at_source():
    k = parse(BASE, "fa.attn")
    loop = k.body[2]
    assert isinstance(loop, Loop)
    let = loop.body[0]
    assert isinstance(let, Let)
    assert (let.span.file, let.span.line, let.span.column) == ("fa.attn", 6, 5)
    assert let.span.source_line == "    %s = mul(dot(q[b, h, qi, :], k[b, h, kj, :]), scale)"
    scale = let.value.args[1]
    assert scale == Var("scale", DType.F32) and scale.span.column == 51
    assert scale.span.end_column == 56


@pytest.mark.parametrize("text, value, dtype", [
    ("1.5", 1.5, DType.F32), ("-2.0", -2.0, DType.F32), ("1e-05", 1e-05, DType.F32),
    ("3e+38", 3e38, DType.F32), ("inf", math.inf, DType.F32), ("-inf", -math.inf, DType.F32),
    ("nan", math.nan, DType.F32), ("7", 7, DType.I32), ("-7", -7, DType.I32),
])
def test_literals(text, value, dtype):
    src = BASE.replace("update %acc, %s,", f"%c = {text}\n    update %acc, %s,")
    c = parse(src).body[2].body[1].value
    assert c == Const(value, dtype)
    assert type(c.value) is type(value)


def test_bool_literals_and_comments():
    src = BASE.replace("update %acc, %s,", "%c = where(true, %s, -inf)  # comment\n"
                       "    # a whole-line comment\n    update %acc, %c,")
    c = parse(src).body[2].body[1].value
    assert c.args[0] == Const(True, DType.BOOL)


def test_out_of_range_int_is_an_error():
    with pytest.raises(ParseError, match="does not fit in i32"):
        parse(BASE.replace("tunables(BM=32", "tunables(BM=99999999999"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse(path):
    k = parse(path.read_text(), str(path))
    assert k.body and k.span.file == str(path)


# ----------------------------------------------------------------------------- fuzzing

SOURCES = [BASE] + [p.read_text() for p in EXAMPLES]
VOCAB = ["(", ")", "[", "]", "{", "}", ",", ":", "=", "->", "%", "%acc", "%s", "kernel", "for",
         "\x0c", "\r", "\x1b[2J", "\u2028", "\x85", "\ufeff",
         "in", "tile", "split", "grid", "update", "sink", "return", "result", "combine", "lse",
         "online_softmax", "rows", "width", "dot", "add", "where", "f32", "i32", "f16", "-inf",
         "nan", "1.5", "-3", "1e400", "99999999999", "true", "#", "\n", " ", "q", "b", "kj",
         "@", "\x00", "\u00e9", "tanh(", "dot(q[b, h, qi, :], ", "k[b, h, kj, :]"]
TOKEN = re.compile(r"%?\w+|-?\d+(?:\.\d*)?(?:e[+-]?\d+)?|->|\S")


def _parse_or_attnc_error(text: str) -> None:
    """Parse; an AttncError is fine, any other exception fails the test. Its diagnostic shows
    the line its span names (lines as the parser counts them: at '\n'), without control
    characters a terminal would act on."""
    try:
        parse(text, "fuzz.attn")
    except AttncError as e:
        assert e.render()  # renders without crashing
        _check_shown_line(e, text)


def _check_shown_line(e: AttncError, text: str) -> None:
    """The source line of `e`'s diagnostic is line `span.line` of `text`, controls shown as '?'."""
    if e.span is None or not e.span.source_line:
        return
    shown = e.span.source_line
    assert not any(ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 for c in shown), repr(shown)
    raw = text.removeprefix("\ufeff").split("\n")[e.span.line - 1].removesuffix("\r")
    assert len(shown) == len(raw)
    assert all(a == b or b == "?" for a, b in zip(raw, shown, strict=True)), (raw, shown)


@st.composite
def mutated(draw) -> str:
    """A valid source with 1-4 character, token or line edits."""
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "swap", "line", "char"]))
        if kind in ("delete", "insert", "char"):
            i = draw(st.integers(0, len(text)))
            if kind == "delete":
                text = text[:i] + text[i + draw(st.integers(1, 8)):]
            else:
                piece = draw(st.sampled_from(VOCAB) if kind == "insert" else st.characters())
                text = text[:i] + piece + text[i:]
        elif kind == "swap":
            toks = [m.span() for m in TOKEN.finditer(text)]
            if len(toks) < 2:
                continue
            a, b = sorted(draw(st.lists(st.sampled_from(toks), min_size=2, max_size=2,
                                        unique=True)))
            text = (text[:a[0]] + text[b[0]:b[1]] + text[a[1]:b[0]] + text[a[0]:a[1]]
                    + text[b[1]:])
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines.insert(j, lines[i]) if draw(st.booleans()) else lines.pop(i)
            text = "\n".join(lines)
    return text


@given(mutated())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_text_raises_only_attnc_errors(text):
    _parse_or_attnc_error(text)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_text_raises_only_attnc_errors(text):
    _parse_or_attnc_error(text)


def _spaced_terminals() -> dict:
    """from_lark joins tokens without spaces; pad each terminal so keywords stay words."""
    out = {}
    for t in _lark().terminals:
        p = t.pattern
        base = st.just(p.value) if isinstance(p, PatternStr) else st.from_regex(
            p.to_regexp(), fullmatch=True)
        out[t.name] = base.map(lambda s: f" {s} ")
    out["COMMENT"] = st.just(" # a comment\n")
    # a few names, so that generated text gets past the dtype and scope checks sometimes
    names = ["f32", "i32", "f16", "B", "S", "T", "D", "b", "q", "k", "kj", "qi", "BM", "add",
             "mul", "dot", "where", "exp", "x"]
    out["NAME"] = st.sampled_from(names).map(lambda s: f" {s} ")
    out["LETNAME"] = st.sampled_from(["%acc", "%s", "%x"]).map(lambda s: f" {s} ")
    return out


@given(st.data())
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_grammar_generated_text_raises_only_attnc_errors(data):
    text = data.draw(from_lark(_lark(), explicit=_spaced_terminals()))
    _parse_or_attnc_error(text)


def test_deep_nesting_is_an_attnc_error():
    deep = "neg(" * 3000 + "%s" + ")" * 3000
    _parse_or_attnc_error(BASE.replace("update %acc, %s,", f"update %acc, {deep},"))


# ----------------------------------------------------------------------------- files as editors write them

def _flip_line_endings(text: str, crlf: bool) -> str:
    return text.replace("\n", "\r\n") if crlf else text


@given(st.sampled_from([BASE] + [p.read_text() for p in EXAMPLES]), st.booleans(), st.booleans())
@settings(max_examples=30, deadline=None)
def test_bom_and_crlf_files_read_as_the_plain_text(text, bom, crlf):
    """A UTF-8 byte-order mark (some editors write one) and CRLF line endings change nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.attn"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + _flip_line_endings(text, crlf).encode())
        assert print_kernel(parse_file(path)) == print_kernel(parse(text))


@given(st.sampled_from(["update %acc, %s,", "%s = mul("]), st.booleans())
@settings(max_examples=10, deadline=None)
def test_errors_in_bom_files_are_located_as_the_editor_shows_them(where, bom):
    """The byte-order mark takes no column: an error on line 1 or later is where the editor says."""
    text = ("\ufeff" if bom else "") + BASE.replace(where, where.replace(",", " ,,", 1).replace("(", "((", 1))
    with pytest.raises(AttncError) as e:
        parse(text, "b.attn")
    with pytest.raises(AttncError) as plain:
        parse(text.removeprefix("\ufeff"), "b.attn")
    assert e.value.render() == plain.value.render()


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_files_that_are_not_utf8_are_a_parse_error_at_the_first_bad_byte(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bin.attn"
        path.write_bytes(data)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            with pytest.raises(ParseError) as e:
                parse_file(path)
            assert e.value.span.file == str(path)
            assert e.value.span.line == data[: exc.start].count(b"\n") + 1
            assert "not UTF-8" in e.value.message and "\n" not in e.value.render()
        else:
            _parse_or_attnc_error(data.decode("utf-8"))


# ----------------------------------------------------------------------------- nesting limits

NESTERS = {"neg": ("neg(", ")"), "exp": ("exp(", ")"), "max": ("max(scale, ", ")")}


def _nested(depth: int, nester: str) -> str:
    """`depth` calls around `scale`."""
    head, tail = NESTERS[nester]
    return head * depth + "scale" + tail * depth


@given(depth=st.integers(1, 4000), nester=st.sampled_from(["neg", "exp", "max"]),
       line=st.sampled_from(["let", "update"]))
@settings(max_examples=40, deadline=None)
def test_deep_nesting_is_reported_at_its_line_or_compiles(depth, nester, line):
    """Nesting past MAX_DEPTH is a one-line ParseError at the file, line and column where the
    brackets are deepest; nesting the parser accepts also lowers (no RecursionError)."""
    from attnc.lowering.manifest import compile_kernel
    from attnc.lowering.plan import Dialect, Family, Plan, Storage

    deep = _nested(depth, nester)
    if line == "let":  # %deep on line 7, the let using it on line 8 and the update using that on
        # line 9 (each one level deeper: the first of them past MAX_DEPTH is where it is reported)
        text = BASE.replace("    update %acc, %s,", f"    %deep = {deep}\n    %s2 = add(%s, %deep)\n"
                                                  "    update %acc, %s2,")
        lines = (7, 8, 9)
    else:
        text = BASE.replace("update %acc, %s,", f"update %acc, add(%s, {deep}),")
        lines = (7,)
    try:
        k = parse(text, "deep.attn")
    except AttncError as e:
        assert depth > MAX_DEPTH - 8, e.render()
        assert e.span is not None and e.span.file == "deep.attn" and e.span.line in lines, e.render()
        assert "nested" in e.message and e.render().count("\n") <= 2
        return
    assert depth <= MAX_DEPTH
    with tempfile.TemporaryDirectory() as tmp:
        compile_kernel(k, [Plan(Family.PORTABLE, Storage.F32, Dialect.TINT)], Path(tmp))


@given(n=st.integers(1, 400),
       body=st.sampled_from(["neg(%p)", "add(%p, scale)", "%p", "max(%p, neg(%p))", "add(mul(%p, %p), %p)"]))
@settings(max_examples=40, deadline=None)
def test_let_chains_compile_or_are_rejected_at_the_let(n, body):
    """A chain of lets, each using the previous (some twice or three times), nests through them:
    a chain past MAX_DEPTH levels is a VerifyError at its first let too deep; a chain accepted
    lowers without a RecursionError to WGSL of bounded size (a let used more than once is a WGSL
    let, so reuse does not double the shader per level)."""
    from attnc.lowering.manifest import compile_kernel
    from attnc.lowering.plan import Dialect, Family, Plan, Storage

    lets = ["    %c0 = neg(scale)"] + [f"    %c{i} = {body.replace('%p', f'%c{i - 1}')}" for i in range(1, n)]
    text = BASE.replace("    update %acc, %s,",
                        "\n".join(lets) + f"\n    %s2 = add(%s, %c{n - 1})\n    update %acc, %s2,")
    try:
        k = parse(text, "chain.attn")
    except VerifyError as e:
        assert "nested" in e.message and e.span.file == "chain.attn"
        assert e.span.source_line.strip().startswith(("%c", "%s2", "update"))
        assert n >= 10  # a short chain is neither deep nor large
        return
    with tempfile.TemporaryDirectory() as tmp:
        plans = [Plan(family, Storage.F32, Dialect.TINT) for family in (Family.PORTABLE, Family.SUBGROUPS)]
        compile_kernel(k, plans, Path(tmp))
        assert all(f.stat().st_size < 1 << 20 for f in Path(tmp).glob("*.wgsl"))
