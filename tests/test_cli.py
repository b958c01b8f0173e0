"""The `attnc` command as a new user meets it: every input it cannot use (a binary, missing or
deeply nested file, an unknown suite, case or shape, a bad option value, an output place it
cannot write) is a message naming the file or argument and a non-zero exit status, never a
Python traceback; good inputs still work, and `-o` never mixes two compiles' files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.cli import main
from attnc.lowering.plan import COMPACT_KEYS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
EXAMPLE = ROOT / "examples" / "flash_attention.attn"
FLASH = "attnc.kernels.flash:flash_attention"
FAST = ["--target", "portable", "--dtype", "f32"]  # one variant: the compile takes milliseconds


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """attnc.cli.main in this process: (status, stdout, stderr). argparse's own usage errors
    exit through SystemExit(2), as they do from the shell."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_message(rc: int, err: str, *needles: str, one_line: bool = True) -> None:
    """A failure as attnc reports it: a non-zero status; no traceback; the first stderr line is
    the message and holds every needle; at most a source excerpt (indented) and notes follow."""
    assert rc != 0, err
    assert "Traceback" not in err and err.strip(), err
    lines = err.rstrip("\n").split("\n")
    for n in needles:
        assert n in lines[0], (n, err)
    if one_line:
        assert len(lines) == 1, err
    else:
        assert all(ln.startswith(("    ", "  note: ")) for ln in lines[1:]), err


# ----------------------------------------------------------------------------- bad input, drawn


def _binary(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    data = draw(st.binary(min_size=1, max_size=200))
    path = tmp / draw(st.sampled_from(["k.attn", "k.bin", "weights.safetensors.attn"]))
    path.write_bytes(data)
    cmd = draw(st.sampled_from(["check", "print", "compile"]))
    argv = [cmd, str(path)] + (["-o", str(tmp / "out")] if cmd == "compile" else [])
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return argv, (f"{path}:", "not UTF-8"), True
    return argv, (f"{path}:",), False  # text after all: some parse error, with its excerpt


def _missing(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    name = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10))
    path = tmp / "nowhere" / f"{name}.attn"
    cmd = draw(st.sampled_from(["check", "print", "compile"]))
    argv = [cmd, str(path)] + (["-o", str(tmp / "out")] if cmd == "compile" else [])
    return argv, (str(path), "No such file"), True


def _directory_as_kernel(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    path = tmp / "dir.attn"
    path.mkdir()
    cmd = draw(st.sampled_from(["check", "print", "compile"]))
    argv = [cmd, str(path)] + (["-o", str(tmp / "out")] if cmd == "compile" else [])
    return argv, (str(path), "directory"), True


def _deep(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    depth = draw(st.integers(210, 5000))
    head = draw(st.sampled_from(["neg(", "exp(", "max(scale, "]))
    deep = head * depth + "scale" + ")" * depth
    text = EXAMPLE.read_text().replace("scale)\n    update", f"{deep})\n    update")
    path = tmp / "deep.attn"
    path.write_text(text)
    line = 1 + text[: text.index(deep)].count("\n")
    cmd = draw(st.sampled_from(["check", "print", "compile"]))
    argv = [cmd, str(path)] + (["-o", str(tmp / "out")] if cmd == "compile" else [])
    return argv, (f"{path}:{line}:", "nested"), True


def _output_place(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    kind = draw(st.sampled_from(["file", "under_file", "nonempty", "proc"]))
    if kind == "file":
        out = tmp / "out.json"
        out.write_text("{}")
        needles: tuple[str, ...] = (str(out), "not a directory")
    elif kind == "under_file":
        (tmp / "plain").write_text("x")
        out = tmp / "plain" / "sub"
        needles = (str(out), "cannot create")
    elif kind == "nonempty":
        out = tmp / "out"
        out.mkdir()
        for name in draw(st.lists(st.sampled_from(["a.wgsl", "notes.txt", "manifest.json", "x"]), min_size=1,
                                  unique=True)):
            (out / name).write_text("keep")
        needles = (str(out), "holds", "--force")
    else:
        out = Path("/proc/attnc-cannot-write-here")
        needles = (str(out), "cannot create")
    kernel = draw(st.sampled_from([str(EXAMPLE), FLASH]))
    return ["compile", kernel, "-o", str(out), *FAST], needles, True


def _bad_set(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    name, value = draw(st.one_of(
        st.tuples(st.sampled_from(["causal", "split", "lse", "sinks"]),
                  st.sampled_from(["maybe", "yes", "no", "2", "", "truth", "[true]", "null"])),
        st.tuples(st.sampled_from(["BM", "BN"]), st.sampled_from(["0", "-4", "abc", "1.5", "true", "", "0x20"])),
        st.tuples(st.just("window"), st.sampled_from(["3", "[1]", "[1,2,3]", "[a,b]", "true", "{}", "[1.5, 2]"])),
        st.tuples(st.sampled_from(["score_mod", "mask_mod"]), st.sampled_from(["1", "abs", "lambda s: s"])),
        st.tuples(st.sampled_from(["casual", "nosuch", "q", "scale", "Causal", ""]), st.just("true")),
    ))
    out = tmp / "out"
    return ["compile", FLASH, "--set", f"{name}={value}", "-o", str(out), *FAST], (f"--set {name}={value}:",), True


def _bad_suite_case_shape(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    kind = draw(st.sampled_from(["suite", "case", "shape"]))
    if kind == "suite":
        name = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8))
        if name in ("ci", "seeds"):
            name += "x"
        args, needles = ["--suite", name], (repr(name), "suite")
    elif kind == "case":
        name = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8))
        args, needles = ["--case", "nocase_" + name], ("nocase_" + name,)
    else:
        shape = draw(st.one_of(
            st.lists(st.integers(1, 64), min_size=0, max_size=6).map(lambda xs: ",".join(map(str, xs))),
            st.lists(st.integers(1, 64), min_size=9, max_size=12).map(lambda xs: ",".join(map(str, xs))),
            st.tuples(st.integers(-3, 0), st.integers(1, 8)).map(lambda t: f"{t[0]},2,1,4,4,8,8"),
            st.sampled_from(["1,3,2,4,4,8,8", "1,2,1,4,4,8,8,maybe", "a,b,c,d,e,f,g", "1.5,2,1,4,4,8,8",
                             "1,2,1,4,4,8,8,1,1"]),
        ))
        args, needles = ["--shape", shape], ("shape",)
    tool = draw(st.sampled_from(["tune", "bench"]))
    return [tool, *args], needles, True


def _bad_numbers(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    tool, flag, value = draw(st.one_of(
        st.tuples(st.just("tune"), st.sampled_from(["--runs", "--max"]), st.integers(-5, 0)),
        st.tuples(st.just("bench"), st.sampled_from(["--runs"]), st.integers(-5, 0)),
        st.tuples(st.just("bench"), st.sampled_from(["--warmup", "--seed", "--cache-mib"]), st.integers(-9, -1)),
    ))
    if draw(st.booleans()):  # compile's --dvc: a million columns once wrote 139 MB shaders
        dvc = draw(st.one_of(st.integers(-8, 3), st.integers(1025, 10**7)))
        return ["compile", str(EXAMPLE), "--dvc", str(dvc), "-o", str(tmp / "out")], (f"--dvc {dvc}",), True
    return [tool, flag, str(value), "--shape", "1,1,1,2,2,4,4"], (flag,), True


def _bad_outputs_of_tools(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    (tmp / "plain").write_text("x")
    tool, flag = draw(st.sampled_from([("tune", "--json"), ("bench", "--json"), ("bench", "--plot")]))
    where = draw(st.sampled_from([str(tmp), str(tmp / "plain" / "r.out")]))  # a directory; under a file
    return [tool, flag, where, "--shape", "1,1,1,2,2,4,4"], (flag, where), True


def _bad_shapes_file(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    path = tmp / "shapes.json"
    content = draw(st.one_of(
        st.binary(max_size=50),
        st.sampled_from([b"[]", b"{}", b'{"suites": 3}', b'{"suites": {"a": [1]}}',
                         b'{"suites": {"a": [{"name": "x", "B": 1}]}}',
                         b'{"suites": {"a": [{"name": "x", "B": "1", "Hq": 1, "Hkv": 1, "S": 1, "T": 1, "D": 1, '
                         b'"Dv": 1}]}}',
                         b'{"suites": {"a": [{"name": "x", "B": 1, "Hq": 3, "Hkv": 2, "S": 1, "T": 1, "D": 1, '
                         b'"Dv": 1}]}}',
                         # a string for causal ("false" ran causal: any non-empty string was true)
                         b'{"suites": {"a": [{"name": "x", "B": 1, "Hq": 2, "Hkv": 2, "S": 1, "T": 1, "D": 1, '
                         b'"Dv": 1, "causal": "false"}]}}']),
    ))
    try:
        doc = json.loads(content)
        if isinstance(doc, dict) and doc.get("suites") == {}:
            return ["bench", "--list", "--shapes", str(tmp / "absent.json")], (str(tmp / "absent.json"),), True
    except ValueError:
        pass
    if draw(st.booleans()):
        path.write_bytes(content)
    return ["bench", "--list", "--shapes", str(path)], (str(path),), True


def _bad_compile_requests(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    """What compile cannot make: a store kernel on its own (it is a manifest's "stores" entry),
    f16 tiles with only f32 asked for, f16 tiles over a quantized K or V (they would round d*q)."""
    out = str(tmp / "out")
    tiles = draw(st.sampled_from(["portable-f16", "subgroups-f16"]))
    odd = draw(st.sampled_from([3, 7, 24, 48]))
    # a tile size the lowering cannot take: said of the --set, or at the .attn file's tile (it
    # was "lowering error: tunable BM=7 must be a power of two" with no place, after `check` said ok)
    odd_file = tmp / "odd.attn"
    odd_file.write_text(EXAMPLE.read_text().replace("tunables(BM=32", f"tunables(BM={odd}", 1))
    half_out = tmp / "half_out.attn"  # a kernel declaring an f16 output, asked for f32 variants
    half_out.write_text(EXAMPLE.read_text().replace("-> f32[", "-> f16[", 1))
    return draw(st.sampled_from([
        (["compile", str(half_out), "--dtype", "f32", "-o", out], ("--dtype f32", "declares a float16 output"), True),
        (["compile", FLASH, "--set", f"BN={odd}", "-o", out], (f"--set: tunable BN={odd} sizes the key tiles",), True),
        (["compile", str(odd_file), "-o", out], (f"{odd_file}:", f"tunable BM={odd} sizes the query-row tiles"),
         False),
        (["compile", "attnc.kernels.store:kv_store", "-o", out], ("is a store kernel", '"stores"'), True),
        (["compile", "attnc.kernels.store:kv_store_pair", "-o", out], ("is a store kernel",), True),
        (["compile", FLASH, "--target", tiles, "--dtype", "f32", "-o", out], (f"--target {tiles}", "--dtype f32"),
         True),
        (["compile", FLASH, "--target", tiles, "--set", "v_dtype=int8", "-o", out],
         (f"--target {tiles}", "values of v", "f16 storage, f32 tiles"), True),
    ]))


def _long_options() -> dict[str, list[str]]:
    """Every command's long options (`attnc bench` has a parser of its own)."""
    import argparse

    from attnc.bench.cli import build_parser as bench_parser
    from attnc.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name != "bench"} | {"bench": bench_parser()}
    return {name: sorted(o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help")
            for name, p in parsers.items()}


def _abbreviated_option(draw: Callable[..., Any], tmp: Path) -> tuple[list[str], tuple[str, ...], bool]:
    """A long option cut short (`--repeat` for --repeat-processes: argparse took it, and the bench
    handed it on to the child processes it starts, each of which started more)."""
    options = _long_options()
    cmd = draw(st.sampled_from(sorted(c for c in options if options[c])))
    opt = draw(st.sampled_from(options[cmd]))
    short = opt[:draw(st.integers(3, len(opt) - 1))]
    if short in options[cmd]:  # a whole option name of its own
        short = short + "_"
    required = {"compile": [str(EXAMPLE), "-o", str(tmp / "out")], "check": [str(EXAMPLE)], "print": [str(EXAMPLE)]}
    return [cmd, *required.get(cmd, []), short, "2"], ("unrecognized arguments", short, f"attnc {cmd} --help"), True


SCENARIOS = [_binary, _missing, _directory_as_kernel, _deep, _output_place, _bad_set, _bad_suite_case_shape,
             _bad_numbers, _bad_outputs_of_tools, _bad_shapes_file, _bad_compile_requests, _abbreviated_option]


@given(data=st.data())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bad_input_is_a_message_and_a_nonzero_status(data: Any, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = data.draw(st.sampled_from(SCENARIOS))
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        argv, needles, one_line = scenario(data.draw, tmp)
        before = sorted(p.name for p in tmp.iterdir())
        rc, out, err = run_cli(argv, capsys)
        assert_message(rc, err, *needles, one_line=one_line)
        # a rejected command writes nothing: no output directory, no stray files
        assert sorted(p.name for p in tmp.iterdir()) == before, (argv, err)


# ----------------------------------------------------------------------------- -o and --force


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_force_replaces_only_the_previous_compile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli(["compile", str(EXAMPLE), "-o", str(out)], capsys)[0] == 0  # four variants
    first = json.loads((out / "manifest.json").read_text())
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["compile", str(EXAMPLE), "-o", str(out), *FAST], capsys)
    assert_message(rc, err, str(out), "holds", "--force")
    rc, stdout, err = run_cli(["compile", str(EXAMPLE), "-o", str(out), *FAST, "--force"], capsys)
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {p["file"] for v in manifest["variants"] for p in v["programs"]}
    assert set(_tree(out)) == listed | {"manifest.json", "notes.txt"}  # nothing stale is left
    assert (out / "notes.txt").read_text() == "mine"
    old = {p["file"] for v in first["variants"] for p in v["programs"]}
    for name in old - listed:
        assert f"removed {out / name}" in stdout
    for name in listed | {"manifest.json"}:
        assert f"overwrote {out / name}" in stdout


def test_force_replaces_a_link_in_the_output_never_its_target(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink in -o named like an output file is replaced by the file, and what it pointed
    to (outside -o) is left alone (--force wrote through it)."""
    out = tmp_path / "out"
    assert run_cli(["compile", str(EXAMPLE), "-o", str(out), *FAST], capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name in [p.name for p in out.iterdir()]:
        (out / name).unlink()
        (out / name).symlink_to(victim)
    rc, stdout, err = run_cli(["compile", str(EXAMPLE), "-o", str(out), *FAST, "--force"], capsys)
    assert rc == 0, err
    assert victim.read_text() == "mine"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert json.loads((out / "manifest.json").read_text())["variants"]
    assert f"replaced the link {out / 'manifest.json'}" in stdout


@given(st.lists(st.sampled_from(["a.wgsl", "b.wgsl", "../outside.txt", "sub/inner.wgsl", "/etc/hostname", ".",
                                 "..", "", "manifest.json", "c\\d.wgsl", "notes.txt"]), max_size=8),
       st.sampled_from(["list", "nested", "junk"]))
@settings(max_examples=40, deadline=None)
def test_force_removes_only_plain_names_the_manifest_lists(names: list[str], shape: str) -> None:
    """Whatever a manifest.json in -o names (paths outside, subfolders, junk), --force deletes
    only the plain file names it lists inside -o, and never an unlisted file."""
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        out = tmp / "out"
        (out / "sub").mkdir(parents=True)
        for rel in ("sub/inner.wgsl", "a.wgsl", "b.wgsl", "notes.txt", "c\\d.wgsl"):
            (out / rel).write_text("old")
        (tmp / "outside.txt").write_text("outside")
        if shape == "list":
            doc: Any = {"variants": [{"programs": [{"file": n} for n in names]}]}
        elif shape == "nested":
            doc = {"a": [{"b": {"file": n}} for n in names], "file": 3}
        else:
            doc = None
        (out / "manifest.json").write_text("not json {" if doc is None else json.dumps(doc))
        before = _tree(tmp)
        assert main(["compile", str(EXAMPLE), "-o", str(out), *FAST, "--force"]) == 0
        after = _tree(tmp)
        listed = set() if doc is None else set(names)
        new = {p["file"] for v in json.loads((out / "manifest.json").read_text())["variants"] for p in v["programs"]}
        for rel, text in before.items():
            name = rel.removeprefix("out/")
            if rel.startswith("out/") and name in listed and "/" not in name and "\\" not in name \
                    and name not in new and name != "manifest.json":
                assert rel not in after, rel
            elif rel.startswith("out/") and (name in new or name == "manifest.json"):
                assert rel in after
            else:
                assert after.get(rel) == text, rel  # untouched


def test_compile_into_an_empty_existing_directory_needs_no_force(tmp_path: Path) -> None:
    assert main(["compile", str(EXAMPLE), "-o", str(tmp_path), *FAST]) == 0
    assert (tmp_path / "manifest.json").is_file()


# ----------------------------------------------------------------------------- good input still works


def test_good_inputs_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(["check", *map(str, EXAMPLES)], capsys)
    assert rc == 0 and err == "" and out.count(": ok") == len(EXAMPLES)
    for ex in EXAMPLES:
        rc, printed, err = run_cli(["print", str(ex)], capsys)
        assert rc == 0 and err == ""
        again = tmp_path / ex.name
        again.write_text(printed)
        assert run_cli(["print", str(again)], capsys)[1] == printed  # canonical form is a fixed point
    bom = tmp_path / "bom.attn"
    bom.write_bytes(b"\xef\xbb\xbf" + EXAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    assert run_cli(["print", str(bom)], capsys)[1] == run_cli(["print", str(EXAMPLE)], capsys)[1]
    rc, out, err = run_cli(["compile", str(bom), "-o", str(tmp_path / "c")], capsys)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    listed = {f for v in manifest["variants"] for p in v["programs"] for f in p["dialect_files"].values()}
    assert rc == 0 and "wrote" in out and {f.name for f in (tmp_path / "c").glob("*.wgsl")} == listed
    assert len(listed) == 6  # 4 variants, the 2 subgroup ones in both dialects
    rc, out, _ = run_cli(["compile", FLASH, "--set", "window=[4,null]", "--set", "BN=64", "--set", "lse=1",
                          "-o", str(tmp_path / "w"), *FAST], capsys)
    assert rc == 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    params = {p["name"] for p in manifest["variants"][0]["params"]}
    assert "window_left" in params and "window_right" not in params
    assert manifest["variants"][0]["tunables"]["BN"] == 64
    # every plan key is in the manifest, as in variant strings (UN and PF were missing)
    rc, out, _ = run_cli(["compile", str(EXAMPLE), "--unroll", "64", "--prefetch", "-o", str(tmp_path / "u")],
                         capsys)
    manifest = json.loads((tmp_path / "u" / "manifest.json").read_text())
    for v in manifest["variants"]:
        assert set(v["tunables"]) >= set(COMPACT_KEYS.values()) | {"BM", "BN"}, v["name"]
        assert (v["tunables"]["UN"], v["tunables"]["PF"]) == (64, 1), v["name"]
    rc, out, _ = run_cli(["bench", "--list"], capsys)
    assert rc == 0 and out.startswith(("seeds:", "ci:"))


# ----------------------------------------------------------------------------- tools before any device


def test_tune_and_bench_check_their_arguments_before_a_device(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import attnc.runtime.devices as devices

    def no_device(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a device was requested before the arguments were checked")

    monkeypatch.setattr(devices, "get_device", no_device)
    for argv in (["tune", "--suite", "nosuch"], ["tune", "--shape", "1,2,3"], ["tune", "--case", "nosuch"],
                 ["bench", "--suite", "nosuch"], ["bench", "--shape", "1,2,3"], ["bench", "--case", "nosuch"]):
        rc, _, err = run_cli(argv, capsys)
        assert_message(rc, err, argv[-1] if argv[-1] != "1,2,3" else "--shape")


def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import attnc.runtime.devices as devices

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(devices, "get_device", lambda *_a, **_k: pytest.fail("measured before checking --plot"))
    for argv in (["bench", "--plot", str(tmp_path / "p.png"), "--shape", "1,1,1,2,2,4,4"],
                 ["bench", "--plot", str(tmp_path / "p.png"), "--suite", "ci", "--compare", "naive"]):
        rc, _, err = run_cli(argv, capsys)
        assert_message(rc, err, "--plot", "matplotlib", 'pip install "attnc[bench]"')
    assert not (tmp_path / "p.png").exists()


def test_a_device_error_in_bench_is_a_message(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import attnc.runtime.devices as devices

    monkeypatch.setattr(devices, "devices", lambda: [])
    rc, _, err = run_cli(["bench", "--device", "nosuch", "--shape", "1,1,1,2,2,4,4", "--ceilings", "off"], capsys)
    assert_message(rc, err, "device error", "nosuch", one_line=False)


# ----------------------------------------------------------------------------- through the shell


def _attnc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "attnc", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


def test_the_shell_command_reports_without_a_traceback(tmp_path: Path) -> None:
    binary = tmp_path / "model.attn"
    binary.write_bytes(bytes(range(128, 256)))
    (tmp_path / "taken").write_text("x")
    cases = [
        (["check", str(binary)], 1, f"{binary}:1:1: parse error: not UTF-8"),
        (["compile", str(EXAMPLE), "-o", str(tmp_path / "taken")], 2, "not a directory"),
        (["compile", FLASH, "--set", "causal=False", "-o", str(tmp_path / "o"), *FAST], 0, ""),
        (["compile", FLASH, "--set", "causal=maybe", "-o", str(tmp_path / "o2")], 2, "takes true or false"),
        (["tune", "--shape", "1,2,3"], 2, "--shape"),
        (["print", str(tmp_path / "missing.attn")], 2, "No such file"),
    ]
    for argv, status, text in cases:
        proc = _attnc(*argv)
        assert proc.returncode == status, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        if status:
            assert proc.stderr.count("\n") == 1 and text in proc.stderr, (argv, proc.stderr)


# ----------------------------------------------------------------------------- the user's own kernel modules

USER_MODULES = {
    "syntax": ("import attnc\ndef broken(:\n", "SyntaxError", 2),
    "import_time": ("import attnc\n\nraise RuntimeError('no GPU config here')\n", "RuntimeError: no GPU config", 3),
    "trace_time": (
        "import attnc\nfrom attnc import f32, tunable\nfrom attnc.kernels.flash import Q, K, V\n\n\n"
        "@attnc.kernel\ndef kern(q: Q, k: K, v: V, scale: f32, *, BM=tunable(32), flag=False):\n"
        "    return 1 // 0\n", "ZeroDivisionError", 8),
    "not_a_kernel": ("kern = 3\n", "is a int, not an @attnc.kernel", None),
    "no_attribute": ("x = 1\n", "has no attribute 'kern'", None),
}


@pytest.mark.parametrize("case", sorted(USER_MODULES))
def test_a_broken_user_kernel_module_is_one_line_with_its_location(case: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source, needle, line = USER_MODULES[case]
    name = f"attnc_user_{case}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)  # `module:kernel` is imported with the current directory on sys.path
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc, _, err = run_cli(["compile", f"{name}:kern", "-o", str(tmp_path / "out")], capsys)
    where = (f"{tmp_path / (name + '.py')}:{line}",) if line else ()
    assert_message(rc, err, f"{name}:kern", needle, *where)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under_file", "is_file", "proc", "cache_file_is_a_folder"])
def test_tune_checks_its_cache_folder_before_tuning(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A cache folder tune cannot write, or a tune.json it cannot replace (a folder: the whole run
    was tuned, then lost in a traceback), is one message before any tuning."""
    import attnc.runtime.devices as devices

    (tmp_path / "plain").write_text("x")
    (tmp_path / "cache" / "tune.json").mkdir(parents=True)
    folder = {"under_file": tmp_path / "plain" / "cache", "is_file": tmp_path / "plain",
              "proc": Path("/proc/attnc-cache"), "cache_file_is_a_folder": tmp_path / "cache"}[where]
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(folder))
    monkeypatch.setattr(devices, "get_device", lambda *_a, **_k: pytest.fail("tuned before checking the cache"))
    rc, _, err = run_cli(["tune", "--shape", "1,1,1,2,2,4,4"], capsys)
    assert_message(rc, err, "tuning cache", str(folder), "ATTNC_CACHE_DIR")


def test_a_repeated_target_is_one_variant(tmp_path: Path) -> None:
    assert main(["compile", str(EXAMPLE), "-o", str(tmp_path), "--target", "portable", "--target", "portable",
                 "--dtype", "f32", "--dtype", "f32"]) == 0
    assert len(json.loads((tmp_path / "manifest.json").read_text())["variants"]) == 1


def test_f16_tile_targets_add_their_variants_after_the_others(tmp_path: Path) -> None:
    """--target portable-f16 / subgroups-f16: float16 variants with f16 workgroup tiles, named .f16a,
    dtype f16 (what they read and write) with "tiles": "f16", needing shader-f16 and `enable f16;`,
    listed after each family's f32 and f16-storage variants (a loader takes the first that fits)."""
    assert main(["compile", FLASH, "-o", str(tmp_path), "--target", "subgroups-f16", "--target", "portable",
                 "--target", "subgroups", "--target", "portable-f16"]) == 0
    variants = json.loads((tmp_path / "manifest.json").read_text())["variants"]
    assert [v["name"].split(".", 1)[1] for v in variants] == [
        "subgroups.f32", "subgroups.f16", "subgroups.f16a", "portable.f32", "portable.f16", "portable.f16a"]
    for v in variants:
        tiles = v["name"].endswith(".f16a")
        assert ("tiles" in v) == tiles and v.get("tiles", "f16") == "f16"
        assert ("shader-f16" in v["requires"]["features"]) == tiles and ("f16" in v["enables"]) == tiles
        if tiles:
            assert v["dtype"] == "f16" and {t["dtype"] for t in v["tensors"] if t["name"] in "qkvo"} == {"f16"}
            for prog in v["programs"]:
                for f in {prog["file"], *prog["dialect_files"].values()}:
                    assert "enable f16;" in (tmp_path / f).read_text().split("// generated by attnc")[0]


def test_tune_case_takes_names_as_bench_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`tune --case A B` names two cases, looked for in every suite without --suite (as `bench
    --case`); it said "unrecognized arguments", and looked in the ci suite only."""
    import attnc.cli as cli

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    args = cli.build_parser().parse_args(["tune", "--case", "ci_dec_gqa4_kv2048", "vit_s4096_h64"])
    assert [c.name for c in cli._tune_cases(args)] == ["ci_dec_gqa4_kv2048", "vit_s4096_h64"]
    rc, _, err = run_cli(["tune", "--case", "nosuch"], capsys)
    assert_message(rc, err, "--case: no case named 'nosuch' in any suite")


def test_a_kernel_declaring_an_f16_output_compiles_its_f16_variants(tmp_path: Path) -> None:
    """Without --dtype, a kernel whose output is f16 gets the f16-storage variants (it was a
    lowering error with no place: the f32 ones cannot write it)."""
    src = tmp_path / "half_out.attn"
    src.write_text(EXAMPLE.read_text().replace("-> f32[", "-> f16[", 1))
    assert main(["compile", str(src), "-o", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [v["dtype"] for v in manifest["variants"]] == ["f16", "f16"]


@pytest.mark.parametrize(("flag", "value"), [("--wg", "0"), ("--wg", "-1"), ("--wg", "3"), ("--wg", "2048"),
                                             ("--dvc", "5"), ("--dvc", "3"), ("--unroll", "0"),
                                             ("--unroll", "100000")])
def test_compile_tunables_out_of_range_are_command_line_errors(flag: str, value: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`attnc compile --wg 0` (3, --dvc 5, --unroll 0) is a bad command line: status 2 and a
    message naming the option, not a lowering error about tunable WG with status 1; --unroll
    100000 was written into the manifest as it was."""
    rc, _, err = run_cli(["compile", str(EXAMPLE), "-o", str(tmp_path / "o"), *FAST, flag, value], capsys)
    assert rc == 2, err
    assert_message(rc, err, f"{flag} {value}:")
    assert not (tmp_path / "o").exists()


def test_check_says_which_files_it_could_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`attnc check` of a missing file or a directory: status 2 (a command line it cannot use),
    as compile and print give, after checking the other files."""
    rc, out, err = run_cli(["check", str(tmp_path / "missing.attn"), str(EXAMPLE), str(tmp_path)], capsys)
    assert rc == 2 and f"{EXAMPLE}: ok" in out
    assert err.count("cannot read") == 2, err


def test_contradictory_or_empty_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`attnc tune --shape ... --suite nosuch` ignored the suite; `-o ""` wrote into the current directory."""
    rc, _, err = run_cli(["tune", "--shape", "1,2,1,3,40,16,16", "--suite", "nosuch"], capsys)
    assert_message(rc, err, "--suite nosuch and --shape")
    assert rc == 2
    rc, _, err = run_cli(["compile", str(EXAMPLE), "-o", "", *FAST], capsys)
    assert_message(rc, err, "-o: an empty name")
    assert rc == 2
