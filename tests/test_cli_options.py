"""`attnc compile --set KEY=VALUE`: every value is read as the type the kernel declares for the
option, or rejected with a one-line message naming it (a non-JSON value used to become a
truthy string, so `--set causal=False` compiled the causal kernel)."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc import f32, tunable
from attnc.cli import convert, main, parse_sets
from attnc.errors import UsageError
from attnc.frontend.dsl import Tunable, kernel
from attnc.ir.printer import print_kernel
from attnc.kernels.flash import flash_attention

FLASH = "attnc.kernels.flash:flash_attention"
BOOLS = ["split", "causal", "softcap", "alibi", "bias", "sinks", "kv_lens", "lse", "pack_gqa", "offsets"]
TUNABLES = ["BM", "BN"]
FUNCTIONS = ["score_mod", "mask_mod"]
INPUTS = ["q", "k", "v", "scale"]


# ----------------------------------------------------------------------------- the spec, restated


def _int_word(text: str) -> int | None:
    """An optional sign and ASCII digits, surrounding blanks allowed."""
    w = text.strip()
    body = w[1:] if w[:1] in "+-" and w[:1] else w
    return int(w) if body and all(c in "0123456789" for c in body) else None


def expected(name: str, text: str) -> tuple[bool, Any]:
    """(accepted, value) for `--set name=text` on flash_attention, as the docs state it."""
    w = text.strip().lower()
    if name in BOOLS:
        table = {"true": True, "1": True, "false": False, "0": False}
        return (w in table, table.get(w))
    if name in TUNABLES:
        n = _int_word(text)
        return (n is not None and n >= 1, n)
    if name in FUNCTIONS:
        return (w in ("none", "null"), None)
    if name == "window":
        if w in ("none", "null"):
            return True, None
        if len(w) >= 2 and (w[0], w[-1]) in (("[", "]"), ("(", ")")):
            w = w[1:-1]
        parts = [p.strip() for p in w.split(",")] if w.strip() else []
        if len(parts) != 2:
            return False, None
        vals = [None if p in ("none", "null") else _int_word(p) for p in parts]
        ok = all(v is not None or p in ("none", "null") for v, p in zip(vals, parts, strict=True))
        return ok, tuple(vals) if ok else None
    raise AssertionError(name)


def _spellings(name: str) -> st.SearchStrategy[str]:
    """Values a user might type for an option: its valid spellings, near misses, and anything."""
    words = ["true", "false", "True", "FALSE", "1", "0", "yes", "no", "on", "maybe", "none", "null",
             "None", "", " ", "2", "-1", "+3", "16", "32", "1.5", "1e3", "0x10", "[4, null]", "(4,None)",
             "[null,2]", "4,0", "[1,2,3]", "[]", "[4]", '"true"', "tru", "١", "nan", "inf", "[true,false]"]
    cased = st.sampled_from(words).flatmap(lambda w: st.sampled_from([w, w.upper(), w.capitalize(), f" {w} "]))
    pair = st.tuples(st.one_of(st.integers(-5, 99), st.none()), st.one_of(st.integers(-5, 99), st.none()))
    window = pair.map(lambda p: st.sampled_from([json.dumps(list(p)), ",".join("none" if x is None else str(x)
                                                                             for x in p)])).flatmap(lambda s: s)
    return st.one_of(cased, st.integers(-3, 300).map(str), window, st.text(max_size=12))


# ----------------------------------------------------------------------------- properties


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_set_values_are_read_as_the_declared_type(data: Any) -> None:
    """Accepted exactly when the value spells the option's type; then it has that type and
    value, and traces to the same kernel as the Python value (causal=False is the default kernel)."""
    name = data.draw(st.sampled_from(BOOLS + TUNABLES + FUNCTIONS + ["window"]))
    text = data.draw(_spellings(name))
    ok, value = expected(name, text)
    item = f"{name}={text}"
    if not ok:
        with pytest.raises(UsageError) as e:
            parse_sets(flash_attention, [item])
        shown = item if item.isprintable() else repr(item)
        assert f"--set {shown}:" in e.value.message and repr(name) in e.value.message
        assert "\n" not in e.value.render()
        return
    got = parse_sets(flash_attention, [item])
    assert got == {name: value} and type(got[name]) is type(value)
    if name in TUNABLES and value > 512:
        return  # a legal int; only the lowering knows which tile sizes fit
    assert print_kernel(flash_attention.trace(**got)) == print_kernel(flash_attention.trace(**{name: value}))
    if value is False or value is None:
        assert print_kernel(flash_attention.trace(**got)) == print_kernel(flash_attention.trace())


@given(st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s))
@settings(max_examples=100, deadline=None)
def test_unknown_options_and_inputs_are_named(name: str) -> None:
    known = set(BOOLS + TUNABLES + FUNCTIONS + ["window"])
    if name.strip() in known:
        return
    with pytest.raises(UsageError) as e:
        parse_sets(flash_attention, [f"{name}=1"])
    msg = e.value.render()
    item = f"{name}=1"
    assert "\n" not in msg and msg.startswith(f"error: --set {item if item.isprintable() else repr(item)}:")
    if name.strip() in INPUTS:
        assert "is an input" in msg
    else:
        assert f"no option {name.strip()!r}" in msg and "causal" in msg  # lists the options


def test_a_set_without_equals_sign_is_an_error() -> None:
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_sets(flash_attention, ["causal"])


def test_the_last_of_repeated_sets_wins() -> None:
    assert parse_sets(flash_attention, ["causal=true", "causal=0"]) == {"causal": False}


# the generic reader: every annotation a kernel option may carry

TYPES: list[Any] = [bool, int, float, str, type(None), int | None, tuple[int, int], tuple[int, ...],
                    tuple[bool, float | None] | None, Any, Tunable]


def _oracle(text: str, t: Any) -> tuple[bool, Any]:
    """The reading the docstring of attnc.cli.convert states, restated."""
    w = text.strip()
    if t is Tunable:
        n = _int_word(text)
        return (n is not None and n >= 1, n)
    if t is bool:
        table = {"true": True, "1": True, "false": False, "0": False}
        return w.lower() in table, table.get(w.lower())
    if t is int:
        n = _int_word(text)
        return n is not None, n
    if t is float:
        try:
            x = float(w)
        except ValueError:
            return False, None
        return not math.isnan(x), x
    if t is str:
        return True, text
    if t is type(None):
        return w.lower() in ("none", "null"), None
    if t == int | None:
        ok, v = _oracle(text, type(None))
        return (ok, v) if ok else _oracle(text, int)
    if t is Any:
        try:
            v = json.loads(w)
        except ValueError:
            return False, None
        return True, tuple(v) if isinstance(v, list) else v
    # tuples
    if t == tuple[bool, float | None] | None and w.lower() in ("none", "null"):
        return True, None
    if len(w) >= 2 and (w[0], w[-1]) in (("[", "]"), ("(", ")")):
        w = w[1:-1]
    parts = [p.strip() for p in w.split(",")] if w.strip() else []
    elems: list[Any]
    if t == tuple[int, int]:
        elems = [int, int]
    elif t == tuple[int, ...]:
        elems = [int] * len(parts)
    else:
        elems = [bool, float | None]
    if len(parts) != len(elems):
        return False, None
    out = []
    for p, e in zip(parts, elems, strict=True):
        if e == float | None:
            ok, v = _oracle(p, type(None))
            if not ok:
                ok, v = _oracle(p, float)
        else:
            ok, v = _oracle(p, e)
        if not ok:
            return False, None
        out.append(v)
    return True, tuple(out)


@given(st.sampled_from(range(len(TYPES))), st.one_of(
    st.text(max_size=10),
    st.sampled_from(["true", "0", "None", "null", "[1, 2]", "(3,4)", "1,2,3", "[true, 0.5]", "[0, none]",
                     "1.5", "-7", "+8", "nan", "inf", '"x"', "{}", "[]", "()", "0"])))
@settings(max_examples=400, deadline=None)
def test_convert_reads_each_annotation_as_documented(i: int, text: str) -> None:
    from attnc.cli import _BadValue

    t = TYPES[i]
    ok, value = _oracle(text, t)
    if not ok:
        with pytest.raises(_BadValue):
            convert(text, t)
        return
    got = convert(text, t)
    assert repr(got) == repr(value) and type(got) is type(value)  # repr: a NaN (JSON's NaN, for Any) equals itself


def test_function_options_say_the_command_line_cannot_give_them() -> None:
    with pytest.raises(UsageError, match="takes a Python function"):
        parse_sets(flash_attention, ["score_mod=lambda s: s"])


QT, KT, VT = f32["B", "H", "S", "D"], f32["B", "H", "T", "D"], f32["B", "H", "T", "Dv"]


@kernel
def typed_options(q: QT, k: KT, v: VT, scale: f32, *, BM=tunable(16), ratio: float = 0.5, label: str = "a",
                  raw=None, count=3):
    """Options of every kind the CLI reads (the kernel body is never traced here)."""
    raise AssertionError("not traced")


def test_options_without_annotation_take_the_default_type_or_json() -> None:
    got = parse_sets(typed_options, ["ratio=2", "label=hello world", "raw=[1, [2, 3]]", "count=-4", "BM=64"])
    assert got == {"ratio": 2.0, "label": "hello world", "raw": (1, (2, 3)), "count": -4, "BM": 64}
    for bad in ("ratio=x", "raw=not json", "count=1.5", "BM=0"):
        with pytest.raises(UsageError, match=re.escape(bad)):
            parse_sets(typed_options, [bad])


# ----------------------------------------------------------------------------- through the command


def _compile(sets: list[str], out: Path) -> dict[str, str]:
    argv = ["compile", FLASH, "--target", "portable", "--dtype", "f32", "-o", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return {p.name: p.read_text() for p in sorted(out.iterdir())}


@given(st.sampled_from(["False", "false", "FALSE", "0", " false "]), st.sampled_from(["True", "true", "1", "TRUE"]))
@settings(max_examples=8, deadline=None)
def test_compiled_causal_false_is_the_default_kernel(false: str, true: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        default = _compile([], Path(tmp) / "default")
        off = _compile([f"causal={false}"], Path(tmp) / "off")
        on = _compile([f"causal={true}"], Path(tmp) / "on")
        reference = _compile(["causal=true"], Path(tmp) / "ref")
    assert off == default
    assert on == reference and on != default


@pytest.mark.parametrize("value", ["maybe", "yes", "2", "", "truee", "[true]"])
def test_compile_rejects_a_non_boolean_causal(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        assert main(["compile", FLASH, "--set", f"causal={value}", "-o", str(out)]) == 2
        assert not out.exists()  # nothing written for a rejected command
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--set causal={value}:" in err and "true or false" in err


@st.composite
def well_typed_command(draw: Any) -> list[str]:
    """A compile command line whose every --set value is of its option's type (any values)."""
    argv = ["compile", FLASH, *draw(st.sampled_from([[], ["--target", "portable"], ["--dtype", "f16"]]))]
    for name in draw(st.lists(st.sampled_from(BOOLS + TUNABLES + ["window"]), unique=True, max_size=6)):
        if name in BOOLS:
            value = draw(st.sampled_from(["true", "false", "1", "0", "TRUE"]))
        elif name in TUNABLES:
            value = str(draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 3, 24, 1000])))
        else:
            value = draw(st.sampled_from(["[4, null]", "[null, 0]", "[0, 0]", "null", "(2,3)"]))
        argv += ["--set", f"{name}={value}"]
    argv += draw(st.sampled_from([[], ["--prefetch"], ["--unroll", "4"], ["--wg", "64"], ["--wg", "256"],
                                  ["--dvc", "32"], ["--dvc", "12"], ["--wg", "3"], ["--dvc", "2048"]]))
    return argv


@given(argv=well_typed_command())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_well_typed_options_compile_or_give_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Any combination of well-typed options and plan flags either compiles (a manifest listing
    every file written) or is an attnc message: never an exception from inside the compiler."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        rc = main([*argv, "-o", str(out)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if rc == 0:
            manifest = json.loads((out / "manifest.json").read_text())
            files = {f for v in manifest["variants"] for p in v["programs"] for f in p["dialect_files"].values()}
            assert files | {"manifest.json"} == {p.name for p in out.iterdir()}
        else:
            assert rc in (1, 2) and err.startswith(("lowering error", "verify error", "trace error", "error:")), err
            assert not out.exists()


@pytest.mark.parametrize("setting", ["k_dtype=q5_1", "k_dtype=F16", "k_dtype=", "v_dtype=bf16", "q_dtype=q8_0",
                                     "q_dtype=int8", "k_dtype=q4_0", "v_dtype=int8"])
def test_storage_dtypes_compile_or_name_the_set(setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--set k_dtype=...` (and v_, q_): a storage the kernel takes compiles; one it refuses is a
    one-line error naming the --set, not an excerpt of attnc's own source where the trace was
    called (the refusal once pointed at attnc/cli.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        rc = main(["compile", FLASH, "--set", setting, "-o", str(out)])
        err = capsys.readouterr().err
    if rc == 0:
        return
    assert rc == 2 and err.startswith("error: --set") and err.count("\n") == 1, err
    assert "cli.py" not in err and setting.split("=")[0] in err


@pytest.mark.parametrize(("window", "defaults"), [
    ("[4,null]", {"window_left": "4"}), ("[null,0]", {"window_right": "0"}),
    ("(2,3)", {"window_left": "2", "window_right": "3"}), ("null", {}),
    ("[99999999999,null]", {"window_left": str(2**30)}), ("[3,2147483648]", {"window_left": "3",
                                                                            "window_right": str(2**30)})])
def test_window_sides_become_the_params_defaults(window: str, defaults: dict[str, str]) -> None:
    """`--set window=[4,null]` bounds the left side (the kernel's option) and makes 4 the default
    of its runtime param window_left in every variant (the number was dropped: the caller had to
    pass window_left anyway); a side without a number stays a param without a default. A side
    past 2^30 (past every query-key distance, as attention() reads it) is 2^30: an i32 default
    (99999999999 was written as it is, which the JS loader refuses). The manifest validates."""
    from tests.js.manifest_schema import validate

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        assert main(["compile", FLASH, "--set", f"window={window}", "-o", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert validate(manifest, out) == []
    for variant in manifest["variants"]:
        params = {p["name"]: p.get("default") for p in variant["params"]}
        assert {n: d for n, d in params.items() if n.startswith("window_")} == {
            n: defaults.get(n) for n in params if n.startswith("window_")}
        assert set(defaults) <= set(params) and params["scale"] == "rsqrt(D)"


@pytest.mark.parametrize("window", ["[-1,null]", "[3,-2]"])
def test_a_negative_window_side_is_refused(window: str, capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        assert main(["compile", FLASH, "--set", f"window={window}", "-o", str(out)]) == 2
        assert not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "side is -" in err and "a number of keys >= 0" in err


def test_every_set_example_in_the_help_compiles(capsys: pytest.CaptureFixture[str]) -> None:
    """The `--set` examples `attnc compile --help` and its error hints give run as written from
    the repository root (the hint once named a module attribute that does not exist)."""
    import argparse
    import os

    from attnc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compile"]
    with tempfile.TemporaryDirectory() as tmp:  # the hint for a function option given a value
        assert main(["compile", FLASH, "--set", "score_mod=1", "-o", str(Path(tmp) / "o")]) == 2
    text = sub.format_help() + capsys.readouterr().err.split("e.g.", 1)[1]
    examples = sorted(set(re.findall(r"--set\s+([A-Za-z_]+=[^\s;)\"']+)", text)) - {"KEY=VALUE", "KEY=VALUE]"})
    assert any("mod=" in e for e in examples) and any(e.startswith("window=") for e in examples)
    cwd = os.getcwd()
    os.chdir(Path(__file__).parents[1])
    try:
        for example in examples:
            with tempfile.TemporaryDirectory() as tmp:
                assert main(["compile", FLASH, "--set", example, "-o", str(Path(tmp) / "o")]) == 0, (
                    example, capsys.readouterr().err)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(("sets", "wg"), [(["BM=1"], 32), (["BM=1", "BN=64"], 64), (["BM=2", "BN=16"], 32), ([], 128)])
def test_the_default_workgroup_fits_the_tiles(sets: list[str], wg: int) -> None:
    """Without --wg a compile takes 128 invocations, or the tile's rows x keys where fewer: a
    one-row decode tile compiles as it runs through attnc.build (it failed with "WG=128
    invocations over BM=1 rows leaves 128 per row"); a --wg given is kept as given."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        argv = ["compile", FLASH, *(x for s in sets for x in ("--set", s))]
        assert main([*argv, "-o", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert {v["programs"][0]["workgroup_size"][0] for v in manifest["variants"]} == {wg}
        if sets:
            assert main([*argv, "--wg", "128", "-o", str(Path(tmp) / "p")]) == 1  # lowering error: no fit
