"""The manifest validator (tests/js/manifest_schema.py) against docs/MANIFEST.md: the fixtures
are valid, each way of breaking a manifest is caught, and the formula grammar behaves."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import manifest_schema as ms
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFESTS = sorted(FIXTURES.glob("*/manifest.json"))


def load(name: str) -> dict:
    return json.loads((FIXTURES / name / "manifest.json").read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.parent.name)
def test_fixture_is_valid(path):
    assert ms.validate(json.loads(path.read_text()), path.parent) == []


def _set(path: str, value):
    def mutate(m):
        keys = path.split("/")
        obj = m
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if value is DELETE:
            del obj[int(last) if isinstance(obj, list) else last]
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value

    return mutate


DELETE = object()
V0 = "variants/0"
P0 = "variants/0/programs/0"
BREAKAGES = {
    "format": (_set("format", "attnc"), "format"),
    "version": (_set("version", 2), "version"),
    "hash": (_set("kernel/hash", "0" * 64), "sha256"),
    "extra key": (_set("kernel/extra", 1), "unknown key"),
    "dims dup": (_set("dims", ["B", "B", "S", "D"]), "dims"),
    "family": (_set(f"{V0}/family", "fast"), "family"),
    "enables without feature": (_set(f"{V0}/requires/features", []), "enables"),
    "unknown limit": (_set(f"{V0}/requires/limits", {"maxWarpDrive": 1}), "unknown limit"),
    "tensor dims": (_set(f"{V0}/tensors/0/dims", ["B", "X"]), "dims"),
    "tensor dtype": (_set(f"{V0}/tensors/0/dtype", "bf16"), "dtype"),
    "row_stride on an input": (_set(f"{V0}/tensors/0/row_stride", "2*ceil_div(D,2)"), "only an output"),
    "row_stride unknown name": (_set(f"{V0}/tensors/2/row_stride", "2*ceil_div(Dv,2)"), "unknown name"),
    "scratch without count": (_set(f"{V0}/tensors/3/count", DELETE), "missing"),
    "param clash": (_set(f"{V0}/params/0/name", "D"), "clashes"),
    "param uses later param": (_set(f"{V0}/params/0/default", "NSPLIT"), "unknown name"),
    "bad formula": (_set(f"{P0}/workgroups", "B*S*"), "formula"),
    "unknown name": (_set(f"{P0}/workgroups", "B*S*Q"), "unknown name"),
    "file escapes": (_set(f"{P0}/file", "../x.wgsl"), "relative"),
    "missing file": (_set(f"{P0}/file", "nope.wgsl"), "does not exist"),
    "entry point": (_set(f"{P0}/entry_point", "other"), "@compute fn other"),
    "workgroup size vs WGSL": (_set(f"{P0}/workgroup_size", [32, 2, 1]), "declares"),
    "too many invocations": (
        _set(f"{P0}/workgroup_size", [512, 1, 1]),
        "maxComputeInvocationsPerWorkgroup",
    ),
    "workgroup storage": (
        _set(f"{P0}/workgroup_storage_bytes", 20000),
        "maxComputeWorkgroupStorageSize",
    ),
    "input written": (_set(f"{P0}/bindings/0/access", "read_write"), "read_write"),
    "binding slot vs WGSL": (_set(f"{P0}/bindings/0/binding", 9), "@binding(9)"),
    "binding unknown tensor": (_set(f"{P0}/bindings/1/name", "nope"), "not a tensor"),
    "uniform misaligned": (_set(f"{P0}/uniforms/fields/2/offset", 6), "multiple of 4"),
    "uniform overlap": (_set(f"{P0}/uniforms/fields/2/offset", 0), "also used"),
    "uniform past size": (_set(f"{P0}/uniforms/fields/2/offset", 32), "past size"),
    "uniform size": (_set(f"{P0}/uniforms/size", 24), "multiple of 16"),
    "no grid_total": (_set(f"{P0}/uniforms/fields/0/value", "B"), "grid_total"),
    "field type": (_set(f"{P0}/uniforms/fields/2/type", "f64"), "type"),
    "no uniform binding": (_set(f"{P0}/bindings/3", DELETE), "uniform binding"),
    "scratch never written": (_set(f"{P0}/bindings/2/access", "read"), "never bound read_write"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_breakage_is_caught(name):
    mutate, needle = BREAKAGES[name]
    m = load("rowsum")
    m["variants"] = [v for v in m["variants"] if v["name"] == "rowsum.subgroups.f32"]
    assert ms.validate(m, FIXTURES / "rowsum") == []
    broken = copy.deepcopy(m)
    mutate(broken)
    problems = ms.validate(broken, FIXTURES / "rowsum")
    assert any(needle in p for p in problems), problems


def test_check_raises_with_every_problem():
    m = load("scale")
    m["format"] = "x"
    m["version"] = 3
    with pytest.raises(ms.ManifestError) as e:
        ms.check(m)
    assert len(e.value.problems) == 2


@pytest.mark.parametrize(
    ("src", "env", "want"),
    [
        ("B*Hq*ceil_div(S,32)*NSPLIT", {"B": 2, "Hq": 3, "S": 33, "NSPLIT": 4}, 48),
        ("rsqrt(D)", {"D": 64}, 0.125),
        ("1 + 2 * 3", {}, 7),
        ("(1 + 2) * 3", {}, 9),
        ("7 / 2", {}, 3.5),
        ("2 - 3 - 4", {}, -5),
        ("-x + +3", {"x": 1}, 2),
        ("floor_div(7, 2) + min(3, 4) + max(3, 4) + sqrt(16)", {}, 14),
        ("  1.5*2 ", {}, 3),
    ],
)
def test_formula_values(src, env, want):
    assert math.isclose(ms.evaluate(src, env), want)


@pytest.mark.parametrize("src", ["", "1 +", "(1", "1)", "f(1)", "min(1)", "1 $ 2", "1e5", "a b", "ceil_div(1, 0)"])
def test_formula_errors(src):
    with pytest.raises(ms.FormulaError):
        ms.evaluate(src, {"a": 1, "b": 2})


def test_formula_names():
    assert ms.parse_formula("B*Hq*ceil_div(S, BM) + grid_total").names == {
        "B",
        "Hq",
        "S",
        "BM",
        "grid_total",
    }


def test_compiled_manifests_are_valid(cases_dir):
    """Every manifest `attnc compile` emitted for the JS tests follows the spec."""
    import js_cases

    found = sorted((cases_dir / "compiled").glob("*/manifest.json"))
    if not found:
        assert not js_cases.compiler_available(), "attnc compile exists but emitted no manifest"
        pytest.skip("`python -m attnc compile` is not available yet")
    problems = [
        f"{path.parent.name}: {p}" for path in found for p in ms.validate(json.loads(path.read_text()), path.parent)
    ]
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


def test_the_program_example_is_what_attnc_compile_writes(tmp_path):
    """docs/MANIFEST.md's Program example (the fields it shows, "..." for the rest) is the first
    program of examples/flash_attention.attn as `attnc compile` writes it: a runtime author
    copies its names and offsets."""
    import re
    import subprocess
    import sys

    root = FIXTURES.parents[2]
    text = (root / "docs" / "MANIFEST.md").read_text()
    example = text[text.index("## Program"):]
    example = example[example.index("```json\n") + 8:]
    example = example[:example.index("```")]
    subprocess.run([sys.executable, "-m", "attnc", "compile", str(root / "examples" / "flash_attention.attn"), "-o",
                    str(tmp_path)], check=True, capture_output=True, cwd=root)
    compiled = json.loads((tmp_path / "manifest.json").read_text())
    programs = {p["file"]: p for v in compiled["variants"] for p in v["programs"]}
    shown = json.loads(re.sub(r",?\s*\.\.\.", "", example))
    prog = programs[shown["file"]]
    for key in ("name", "dialect_files", "entry_point", "workgroup_size", "workgroups", "workgroup_storage_bytes",
                "in_bounds"):
        assert shown[key] == prog[key], key
    for b in shown["bindings"]:
        assert b in prog["bindings"], b
    assert shown["uniforms"]["size"] == prog["uniforms"]["size"]
    for f in shown["uniforms"]["fields"]:
        assert f in prog["uniforms"]["fields"], f
