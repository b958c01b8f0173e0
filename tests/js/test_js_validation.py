"""js/attnc.js validates what callers and manifests give it like attnc's Python side does.

Shapes: hypothesis draws dims (valid ones, and non-multiples, Hkv > Hq, zeros, negatives,
non-integers, strings, missing and unknown names); `attnc.runtime.api.validate_dims` and the
loader's `checkShapes` must agree on accept/reject and on the dim the message names. Manifests:
a valid `attnc compile` manifest (and a hand-made one without `dialect_files`) with one field
deleted or given a value of the wrong kind at a random path; the loader must reject it with an
AttncError naming that path (never a raw TypeError), and tests/js/manifest_schema.py must
report it too. Also: params, the file each dialect's runtime compiles.

All of it runs in one Node process (tests/js/check_node.mjs) without a GPU; a small fixed
sample of the shapes and manifests also runs in Node + Dawn and in Chromium through the
example page (tests/js/test_js_runtimes.py::test_validation_matches_python).
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
from pathlib import Path

import manifest_schema
import numpy as np
import pytest
import validation_cases as vc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.runtime import api

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"


def examples(n: int) -> settings:
    """n examples, no deadline (a Node round trip), module-scoped fixtures shared."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class NodeChecker:
    """One `node check_node.mjs` process: a JSON request per line in, a JSON answer per line out."""

    def __init__(self, node: str) -> None:
        self.proc = subprocess.Popen([node, str(HERE / "check_node.mjs")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)

    def ask(self, request: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(vc.encode_numbers(request), allow_nan=False) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"check_node.mjs exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checker(node: str):
    c = NodeChecker(node)
    yield c
    c.close()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict]:
    """An `attnc compile` output with scratch, two programs and params of every kind."""
    d = tmp_path_factory.mktemp("validation")
    return d, vc.compile_validation_manifest(d)


def wgsl_files(d: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in d.glob("*.wgsl")}


# --------------------------------------------------------------------------- shapes
def any_value(small: bool) -> st.SearchStrategy:
    """A dim's value: mostly integers (from 0 and negatives up), else anything JSON carries
    that is not an integer. Integral floats are left out: a JS number cannot tell 4.0 from 4."""
    ints = st.integers(-3, 6) if small else st.integers(-3, 12) | st.integers(-(2**40), 2**40)
    non_integers = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not x.is_integer())
    others = (st.sampled_from(vc.BAD_VALUES) | st.text(max_size=3) | non_integers
              | st.lists(st.integers(0, 3), max_size=2))
    return st.one_of(ints, ints, others) if not small else ints


@st.composite
def drawn_dims(draw, small: bool = False) -> dict:
    """Dims: valid GQA shapes, then up to 3 dims replaced by any value (Hq and Hkv included:
    non-multiples, Hkv > Hq), sometimes one left out or an unknown name added."""
    hkv = draw(st.integers(1, 4))
    dims = {d: draw(st.integers(1, 9)) for d in vc.DIMS} | {"Hkv": hkv, "Hq": hkv * draw(st.integers(1, 4))}
    for d in draw(st.lists(st.sampled_from(vc.DIMS), max_size=3, unique=True)):
        dims[d] = draw(any_value(small))
    if not small and draw(st.integers(0, 9)) == 0:
        del dims[draw(st.sampled_from(vc.DIMS))]
    if not small and draw(st.integers(0, 9)) == 0:
        dims[draw(st.sampled_from(["H", "Hk", "R", "d"]))] = draw(st.integers(1, 3))
    return dims


def python_shapes(dims: dict) -> dict:
    """Python's answer in the shape of the Node helper's."""
    try:
        return {"ok": True, "env": api.validate_dims(dims)}
    except ValueError as e:
        return {"error": str(e)}


def named(message: str) -> str:
    """The argument an error message names first (both sides start with it)."""
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
    return m.group(0) if m else message


def test_manifest_dims_are_pythons_order(compiled):
    """checkShapes goes through the manifest's dims in order, validate_dims through DIMS: the
    same order, so that both name the same first problem."""
    assert compiled[1]["dims"] == list(api.DIMS)


@examples(400)
@given(dims=drawn_dims())
def test_shapes_rules_match_python(dims, checker, compiled):
    py = python_shapes(dims)
    js = checker.ask({"op": "shapes", "dims": compiled[1]["dims"], "shapes": dims})
    if "ok" in py:
        assert js.get("ok"), (dims, js)
        assert js["env"] == py["env"]
    else:
        assert "error" in js, (dims, py)
        assert js["attnc_error"], js
        assert named(js["error"]) == named(py["error"]), (dims, py["error"], js["error"])


def test_work_webgpu_rejects_is_an_error_not_zeros(checker, compiled):
    """run() encodes and submits inside a validation error scope: what WebGPU rejects (a destroyed
    input buffer, a uniform block smaller than the shader's) is an AttncError naming the variant,
    not a result of zeros (the loader returned the zeros its outputs were created with)."""
    d, manifest = compiled
    js = checker.ask({"op": "rejected", "manifest": manifest, "files": wgsl_files(d),
                      "variant": {"family": "portable", "dtype": "f32"},
                      "shapes": {"B": 1, "Hq": 2, "S": 3, "D": 8, "Hkv": 1, "T": 5, "Dv": 8},
                      "params": {"softcap": 30.0}})
    assert js.get("attnc_error") and "WebGPU rejected the work: Buffer 'q' is destroyed." in js["error"], js


@pytest.mark.parametrize(("given", "want"), [
    ({}, {"R": 12}), ({"R": 12}, {"R": 12}),
    ({"R": 3}, "R=3: this variant packs"), ({"R": 20}, "R=20: this variant packs")])
def test_packed_rows_are_derived_and_checked(checker, given, want):
    """A pack_gqa variant's dim R is (Hq/Hkv)·S, as attnc's Python API sets it: left out, the
    loader derives it; given otherwise, it is refused naming R (any R once ran, returning as many
    rows as it said: 48 or 320 values where 192 were due)."""
    dims = [*api.DIMS, "R"]
    shapes = {"B": 1, "Hq": 4, "Hkv": 1, "S": 3, "T": 5, "D": 8, "Dv": 16, **given}
    js = checker.ask({"op": "shapes", "dims": dims, "shapes": shapes})
    if isinstance(want, dict):
        assert js.get("ok") and js["env"]["R"] == want["R"], js
    else:
        assert js["attnc_error"] and js["error"].startswith(want), js


@examples(150)
@given(dims=drawn_dims(small=True))
def test_validate_dims_is_the_rule_validate_applies(dims):
    """api.validate on zero arrays of these shapes accepts exactly what validate_dims accepts
    (a zero dim: an empty q, k or v), so the JS loader follows attention()'s own rule."""
    if set(dims) != set(api.DIMS) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                             for x in dims.values()):
        return  # no arrays of these shapes
    d = dims
    q = np.zeros((d["B"], d["Hq"], d["S"], d["D"]), np.float32)
    k = np.zeros((d["B"], d["Hkv"], d["T"], d["D"]), np.float32)
    v = np.zeros((d["B"], d["Hkv"], d["T"], d["Dv"]), np.float32)
    try:
        api.validate(q, k, v)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == ("ok" in python_shapes(dims)), dims


# --------------------------------------------------------------------------- manifests
def hand_made() -> tuple[Path, dict]:
    """A hand-made manifest without `dialect_files` (the format before it)."""
    return FIXTURES / "rowsum", json.loads((FIXTURES / "rowsum" / "manifest.json").read_text())


@st.composite
def corruptions(draw, m: dict) -> tuple[list, bool, object]:
    """A position in m (a field or a list element), whether to delete it (a field the format
    requires) and otherwise the value of another kind it gets."""
    keys, deletable = draw(st.sampled_from(list(vc.manifest_paths(m))))
    if deletable and draw(st.booleans()):
        return keys, True, None
    obj = m
    for k in keys:
        obj = obj[k]
    return keys, False, draw(st.sampled_from(vc.wrong_values(obj)))


def test_valid_manifests_load(checker, compiled):
    for d, m in (compiled, hand_made()):
        assert manifest_schema.validate(m, d) == []
        assert checker.ask({"op": "manifest", "manifest": m}) == {"ok": True}


@examples(300)
@given(data=st.data())
def test_corrupted_manifest_is_rejected_naming_the_path(data, checker, compiled, quant_compiled):
    """(The quantized compile's manifest has store kernels: `stores` went unchecked by the
    loader, and a store without tensors was a TypeError in createKVCache.)"""
    which = data.draw(st.sampled_from(["compiled", "hand-made", "quantized"]), label="manifest")
    m = {"compiled": compiled[1], "quantized": quant_compiled[1]}.get(which) or hand_made()[1]
    keys, delete, value = data.draw(corruptions(m), label="position, delete, value")
    bad, path = vc.corrupt(m, keys, value, delete), vc.path_text(keys)
    js = checker.ask({"op": "manifest", "manifest": bad})
    assert "error" in js, f"{path}: accepted"
    assert js["attnc_error"], f"{path}: {js['type']}: {js['error']}"
    assert re.search(r"(^|\s)" + re.escape(path) + ":", js["error"]), (path, js["error"])
    problems = manifest_schema.validate(bad)  # the schema validator: reports it, never crashes
    assert problems, f"{path}: the schema accepts it"


def test_a_manifest_that_is_not_an_object_is_rejected(checker):
    for m in (None, [], "manifest", 3, {"format": "attnc.manifest"}):
        js = checker.ask({"op": "manifest", "manifest": m})
        assert js.get("attnc_error"), (m, js)
        assert manifest_schema.validate(m), m


# --------------------------------------------------------------------------- params, dialects
GOOD_SHAPES = {"B": 2, "Hq": 4, "S": 3, "D": 8, "Hkv": 2, "T": 9, "Dv": 8}


@pytest.mark.parametrize(("params", "needle"), [
    ({"NSPLIT": 0}, "param NSPLIT: 0 must be at least 1"),
    ({"NSPLIT": 2.5}, "param NSPLIT"),
    ({"softcap": 0}, "param softcap: 0 must be greater than 0"),
    ({"softcap": -3}, "param softcap"),
    ({"window_left": -1}, "param window_left: -1 must be at least 0"),
    ({"scale": "0.5"}, 'param scale: expected a finite number, got "0.5"'),
    ({"scale": math.nan}, "param scale: expected a finite number, got NaN"),
    ({"scale": math.inf}, "param scale"),
    ({"scale": 1e39}, "param scale: 1e+39 is past f32's range"),
    ({"softcap": None}, "param softcap (f32) has no default"),
    ({"nsplit": 2}, "unknown param nsplit"),
])
def test_bad_params_are_named(checker, compiled, params, needle):
    d, m = compiled
    base = {"softcap": 20.0, "window_left": 4}
    js = checker.ask({"op": "plan", "manifest": m, "files": wgsl_files(d), "variant": {"family": "portable"},
                      "shapes": GOOD_SHAPES, "params": {**base, **params}})
    assert js.get("attnc_error") and needle in js["error"], js


def test_good_params_plan(checker, compiled):
    d, m = compiled
    js = checker.ask({"op": "plan", "manifest": m, "files": wgsl_files(d), "variant": {"family": "portable"},
                      "shapes": GOOD_SHAPES, "params": {"softcap": 20.0, "window_left": 0, "NSPLIT": 3}})
    assert js.get("ok"), js
    assert js["env"]["NSPLIT"] == 3 and math.isclose(js["env"]["scale"], 8 ** -0.5)
    assert all(n > 0 for n in js["dispatches"])


@pytest.mark.parametrize("lanes", [0, 1, 2, 4, 32])
def test_subgroups_variants_need_four_lanes_together(checker, compiled, lanes):
    """createAttention takes a subgroups variant only where the device's subgroups keep 4
    consecutive invocations together (the probe, as attnc's Python runtime runs it): else the
    portable variant, and a subgroups variant asked for is refused saying why."""
    d, m = compiled
    ask = {"op": "plan", "manifest": m, "files": wgsl_files(d), "shapes": GOOD_SHAPES, "subgroupLanes": lanes,
           "params": {"softcap": 20.0, "window_left": 0, "NSPLIT": 3}}
    js = checker.ask(ask)
    assert js.get("ok"), js
    assert (".subgroups." in js["variant"]) == (lanes >= 4), js["variant"]
    forced = checker.ask(ask | {"variant": {"family": "subgroups"}})
    if lanes >= 4:
        assert forced.get("ok") and ".subgroups." in forced["variant"], forced
    else:
        why = "probe could not run" if lanes == 0 else f"keep {lanes} consecutive"
        assert forced.get("attnc_error") and why in forced["error"], forced


def test_js_subgroup_probe_is_the_python_one():
    """js/attnc.js runs attnc's subgroup probe: the same WGSL text, so both decide alike."""
    from attnc.runtime.devices import PROBE_WGSL

    text = (HERE.parents[1] / "js" / "attnc.js").read_text()
    start = text.index("const SUBGROUP_PROBE_WGSL = String.raw`") + len("const SUBGROUP_PROBE_WGSL = String.raw`")
    assert text[start:text.index("`;", start)] == PROBE_WGSL


@examples(40)
@given(family=st.sampled_from(["subgroups", "portable"]), dtype=st.sampled_from(["f32", "f16"]),
       b=st.integers(1, 3), s=st.integers(1, 9), dv=st.integers(1, 40))
def test_output_buffers_hold_the_rows_the_kernel_writes(checker, compiled, family, dtype, b, s, dv):
    """plan() sizes each output as attnc's Python runtime does: an f16 o holds rows of
    2*ceil(Dv/2) halves (odd Dv: one padding half a row), an f32 o and lse are dense; count is
    the dense element count run() returns."""
    d, m = compiled
    shapes = {**GOOD_SHAPES, "B": b, "S": s, "Dv": dv}
    js = checker.ask({"op": "plan", "manifest": m, "files": wgsl_files(d), "shapes": shapes,
                      "variant": {"family": family, "dtype": dtype}, "params": {"softcap": 20.0, "window_left": 4}})
    assert js.get("ok"), js
    rows = b * shapes["Hq"] * s
    stride = dv + dv % 2 if dtype == "f16" else dv
    o = js["tensors"]["o"]
    assert (o["dtype"], o["width"], o["rowStride"], o["count"]) == (dtype, dv, stride, rows * dv), o
    assert o["bytes"] == rows * stride * (2 if dtype == "f16" else 4), o
    assert o["size"] == max(4, -(-o["bytes"] // 4) * 4), o
    lse = js["tensors"]["lse"]
    assert (lse["dtype"], lse["rowStride"], lse["width"], lse["bytes"]) == ("f32", s, s, 4 * rows), lse


def _with_row_stride(m: dict, tensor: str, value: str) -> tuple[dict, str]:
    """A copy of m whose first variant's `tensor` has row_stride `value`, and that field's path."""
    bad = copy.deepcopy(m)
    j = next(j for j, t in enumerate(bad["variants"][0]["tensors"]) if t["name"] == tensor)
    bad["variants"][0]["tensors"][j]["row_stride"] = value
    return bad, f"manifest.variants[0].tensors[{j}].row_stride"


@pytest.mark.parametrize(("tensor", "value", "needle"), [
    ("q", "2*ceil_div(D,2)", "only an output with dims"),
    ("part", "2", "only an output with dims"),
    ("o", "2*ceil_div(Dv,2)+NSPLIT", "unknown name"),
    ("o", "2*ceil_div(Dv,", "formula"),
])
def test_bad_row_stride_is_rejected_naming_the_path(checker, compiled, tensor, value, needle):
    bad, path = _with_row_stride(compiled[1], tensor, value)
    js = checker.ask({"op": "manifest", "manifest": bad})
    assert js.get("attnc_error") and f"{path}:" in js["error"] and needle in js["error"], js
    problems = manifest_schema.validate(bad)
    assert any("row_stride" in p for p in problems), problems


def test_row_stride_below_the_last_dim_is_a_plan_error(checker, compiled):
    d, m = compiled
    bad, _ = _with_row_stride(m, "o", "Dv-1")
    variant = {"family": bad["variants"][0]["family"], "dtype": bad["variants"][0]["dtype"]}
    js = checker.ask({"op": "plan", "manifest": bad, "files": wgsl_files(d), "variant": variant,
                      "shapes": GOOD_SHAPES, "params": {"softcap": 20.0, "window_left": 4}})
    assert js.get("attnc_error") and "o: row_stride 7 is less than its last dim 8" in js["error"], js


@pytest.mark.parametrize("family", ["subgroups", "portable"])
def test_each_dialect_gets_its_own_file(checker, compiled, family):
    """createAttention compiles `dialect_files[dialect]` (Tint's by default); for a manifest
    without `dialect_files` it compiles `file`, for Naga less `enable subgroups;`, which is
    what the Naga file of a newer manifest holds."""
    d, m = compiled
    files = wgsl_files(d)
    var = next(v for v in m["variants"] if v["family"] == family)
    tint = [files[p["dialect_files"]["tint"]] for p in var["programs"]]
    naga = [files[p["dialect_files"]["naga"]] for p in var["programs"]]
    assert (tint == naga) == (family == "portable")
    old = copy.deepcopy(m)
    for v in old["variants"]:
        for p in v["programs"]:
            del p["dialect_files"]
    for manifest in (m, old):
        for dialect, want in ((None, tint), ("tint", tint), ("naga", naga)):
            js = checker.ask({"op": "sources", "manifest": manifest, "files": files, "variant": var["name"],
                              **({"dialect": dialect} if dialect else {})})
            assert js.get("ok"), js
            assert js["codes"] == want, (dialect, "dialect_files" in manifest["variants"][0]["programs"][0])
    js = checker.ask({"op": "sources", "manifest": m, "files": files, "variant": var["name"], "dialect": "spirv"})
    assert js.get("attnc_error") and "dialect must be one of 'tint', 'naga'" in js["error"], js


@pytest.fixture(scope="module")
def quant_compiled(tmp_path_factory) -> tuple[Path, dict]:
    """An `attnc compile` output with q8_0 K and q4_0 V: single and pair store kernels."""
    from attnc.cli import main

    d = tmp_path_factory.mktemp("kvquant")
    assert main(["compile", "attnc.kernels.flash:flash_attention", "-o", str(d), "--set", "k_dtype=q8_0",
                 "--set", "v_dtype=q4_0", "--set", "kv_lens=true"]) == 0
    return d, json.loads((d / "manifest.json").read_text())


def test_kv_cache_store_kernels_need_counts(checker, quant_compiled):
    """createKVCache takes the manifest's store kernels that bind each row's count; one compiled
    without it (before ragged appends wrote exactly their rows) is refused naming the fix, and
    a pair kernel without it is passed over for the single ones."""
    d, m = quant_compiled
    files = wgsl_files(d)
    cache = {"batch": 2, "kvHeads": 2, "capacity": 64, "headDim": 64, "kFormat": "q8_0", "vFormat": "q4_0"}
    ok = checker.ask({"op": "kvcache", "manifest": m, "files": files, "cache": cache})
    assert ok.get("ok") and ok["singles"] == ["q4_0", "q8_0"] and ok["pair"], ok

    def without_counts(pick) -> dict:
        old = copy.deepcopy(m)
        for entry in old["stores"]:
            if pick(entry):
                entry["tensors"] = [t for t in entry["tensors"] if t["name"] != "counts"]
                entry["bindings"] = [b for b in entry["bindings"] if b["name"] != "counts"]
        return old

    pairless = checker.ask({"op": "kvcache", "manifest": without_counts(lambda e: "formats" in e), "files": files,
                            "cache": cache})
    assert pairless.get("ok") and pairless["pair"] is None, pairless
    refused = checker.ask({"op": "kvcache", "manifest": without_counts(lambda e: True), "files": files,
                           "cache": cache})
    assert refused.get("attnc_error") and "kFormat: the manifest's q8_0 store kernel has no counts binding" in \
        refused["error"] and "compile it again" in refused["error"], refused


def _variant_of(m: dict, family: str = "portable", dtype: str = "f32") -> dict:
    return {"family": family, "dtype": dtype}


def test_kv_cache_calls_refuse_what_would_reach_the_gpu_unchecked(checker, quant_compiled):
    """A GPUBuffer source without STORAGE usage and malformed strides are AttncErrors naming
    them, before anything is recorded (they were WebGPU's errors at the submit, or rows read
    from the wrong elements, with the host lengths advanced anyway); attend takes only Hq and S
    (T: 8 over a cache of capacity 64 read K/V with another head stride)."""
    d, m = quant_compiled
    cache = {"batch": 2, "kvHeads": 2, "capacity": 64, "headDim": 64, "kFormat": "q8_0", "vFormat": "q4_0"}
    storage = 0x80 | 0x8
    calls = [{"append": {"rows": 2, "usage": 0x8}},
             {"append": {"rows": 2, "usage": storage, "strides": {"k": [1, 2]}}},
             {"append": {"rows": 2, "usage": storage, "strides": {"v": [0, 0, 0, -1]}}},
             {"append": {"rows": 2, "usage": storage}},
             {"attend": {"shapes": {"Hq": 4, "S": 1, "T": 8}}},
             {"attend": {"shapes": {"Hq": 4, "S": 1, "Hkv": 1, "D": 32}}},
             {"attend": {"shapes": {"Hq": 4, "S": 1}}}]
    js = checker.ask({"op": "kvcalls", "manifest": m, "files": wgsl_files(d), "cache": cache,
                      "variant": _variant_of(m), "calls": calls})
    assert js.get("ok"), js
    errors = js["errors"]
    assert all(e is None or e["attnc_error"] for e in errors), json.dumps(errors)
    assert errors[0]["error"].startswith("kNew: the GPUBuffer lacks STORAGE usage"), errors[0]
    assert errors[1]["error"].startswith("strides.k: expected 4 non-negative integers"), errors[1]
    assert errors[2]["error"].startswith("strides.v: expected 4 non-negative integers"), errors[2]
    assert errors[3] is None and errors[6] is None, errors
    assert errors[4]["error"].startswith("shapes: T is the cache's (B=2, Hkv=2, T=64, D=64, Dv=64)"), errors[4]
    assert errors[5]["error"].startswith("shapes: Hkv, D are the cache's"), errors[5]
    assert js["lengths"] == [2, 2]


def test_kv_cache_attend_names_the_compile_option_a_variant_lacks(checker, tmp_path):
    """attend over a variant compiled without kv_lens says which option to compile with (it said
    "unknown input kv_lens")."""
    from attnc.cli import main

    assert main(["compile", "attnc.kernels.flash:flash_attention", "-o", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    js = checker.ask({"op": "kvcalls", "manifest": m, "files": wgsl_files(tmp_path),
                      "cache": {"batch": 1, "kvHeads": 1, "capacity": 8, "headDim": 8}, "variant": _variant_of(m),
                      "calls": [{"attend": {"shapes": {"Hq": 1, "S": 1}}}]})
    assert js["errors"][0]["attnc_error"] and "has no kv_lens input" in js["errors"][0]["error"] and \
        "--set kv_lens=true" in js["errors"][0]["error"], js


@pytest.fixture(scope="module")
def paged_compiled(tmp_path_factory) -> tuple[Path, dict]:
    from attnc.cli import main

    d = tmp_path_factory.mktemp("paged")
    assert main(["compile", "attnc.kernels.flash:paged_flash_attention", "-o", str(d), "--set", "kv_lens=true"]) == 0
    return d, json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize(("table", "lens", "T", "needle"), [
    ([[0, 1, 2], [3, 4, 5]], [12, 9], 12, None),
    ([[0, 1, 99], [3, 4, 5]], [12, 9], 12, "input block_table[0, 2] = 99 is outside the page pool: k and v hold NP=6"),
    ([[0, 1, 2], [-1, 4, 5]], [12, 9], 12, "input block_table[1, 0] = -1 is outside the page pool"),
    ([[0, 1, 2], [3, 4, 99]], [12, 8], 12, None),  # (row 1 reads 2 pages: its third entry is never used)
    ([[0, 1, 2], [3, 4, 5]], [13, 9], 16, "input kv_lens[0] = 13 needs 4 pages of P=4 keys, but block_table has NB=3"),
])
def test_paged_runs_check_the_block_table_as_python_does(checker, paged_compiled, table, lens, T, needle):
    """Host block tables of a paged variant are checked as attnc.paged_attention checks them: a
    used entry outside the pool, or a row longer than its pages, is an AttncError naming it (it
    ran and returned numbers read from clamped pages)."""
    d, m = paged_compiled
    B, Hq, Hkv, S, D, NP, P, NB = 2, 2, 1, 1, 8, 6, 4, 3
    shapes = {"B": B, "Hq": Hq, "S": S, "D": D, "Hkv": Hkv, "Dv": D, "NP": NP, "P": P, "NB": NB, "T": T}
    inputs = {"q": ["Float32Array", [0.5] * (B * Hq * S * D)], "k": ["Float32Array", [0.25] * (NP * Hkv * P * D)],
              "v": ["Float32Array", [1.0] * (NP * Hkv * P * D)], "kv_lens": ["Int32Array", lens],
              "block_table": ["Int32Array", [x for row in table for x in row]]}
    js = checker.ask({"op": "run", "manifest": m, "files": wgsl_files(d), "variant": _variant_of(m),
                      "shapes": shapes, "inputs": inputs})
    if needle is None:
        assert js.get("ok"), js
    else:
        assert js.get("attnc_error") and js["error"].startswith(needle), js
