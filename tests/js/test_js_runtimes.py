"""The JS loader (js/attnc.js) on real WebGPU: Node + Dawn (lavapipe: subgroups of 8, f16) and
headless Chromium (SwiftShader: subgroups of 4, no shader-f16), every case checked with numpy."""

from __future__ import annotations

import math

import js_cases
import numpy as np
import pytest

RUNTIMES = ["node", "chromium"]
CASES = {c["name"]: c for c in js_cases.case_list()}


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> tuple[str, dict]:
    fixture = "node_results" if request.param == "node" else "browser_results"
    return request.param, request.getfixturevalue(fixture)


def _result(res: dict, name: str) -> dict:
    found = [r for r in res["results"] if r["name"] == name]
    assert len(found) == 1, f"runner has no result for {name}"
    return found[0]


def test_adapter(runtime):
    """The adapters of the issue: lavapipe (Node) and SwiftShader (Chromium), with subgroups."""
    name, res = runtime
    feats = set(res["device_features"])
    assert "subgroups" in feats, res["adapter"]
    if name == "node":
        assert "shader-f16" in feats, res["adapter"]
    else:
        assert res["adapter"]["architecture"] == "swiftshader", res["adapter"]
        assert res["adapter"]["subgroupMinSize"] == 4, res["adapter"]


@pytest.mark.parametrize("case", list(CASES))
def test_case(runtime, cases_dir, case):
    name, res = runtime
    c = CASES[case]
    r = _result(res, case)
    if r["status"] == "unsupported":
        # the one refusal allowed: an f16 case on an adapter without shader-f16 (SwiftShader),
        # refused by selectVariant with the missing feature named
        needs_f16 = isinstance(c["variant"], dict) and c["variant"].get("dtype") == "f16"
        assert needs_f16 and "shader-f16" not in res["device_features"], r["error"]
        assert "feature shader-f16 missing" in r["error"], r["error"]
        return
    assert r["status"] == "ok", r.get("error") or r.get("metrics")
    if "expect_error" in c:
        assert c["expect_error"] in r["error"]
        return
    if "expect_variant" in c:
        assert r["variant"] == c["expect_variant"]
    check_outputs(name, c, r, cases_dir)


def check_outputs(runtime_name: str, c: dict, r: dict, cases_dir) -> None:
    """Each output within the case's tolerance (relative Frobenius) of numpy's; NaN and ±inf
    (e.g. lse of a fully masked row) must appear at the same places."""
    for out_name, want_entry in c["expected"].items():
        got = js_cases.decode_output(r["outputs"][out_name]).astype(np.float64)
        want = js_cases.read_bin(cases_dir, want_entry).astype(np.float64)
        assert got.shape == want.shape
        assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ"
        inf = np.isinf(want)
        assert np.array_equal(got[inf], want[inf]), "infinities differ"
        ok = np.isfinite(want)
        den = np.linalg.norm(want[ok])
        err = np.linalg.norm(got[ok] - want[ok]) / (den if den > 0 else 1.0)
        tol = c["tol"]
        assert err <= tol, f"{c['name']}.{out_name} on {runtime_name}: relative error {err:.3g} > {tol}"


def test_compiled_attention(runtime, cases_dir):
    """Real `attnc compile` kernels (js_cases.attention_configs() x variants x shapes), once the
    compiler exists. A variant may be skipped only where the adapter lacks a feature its
    manifest `requires` (attnc's f16 variants pack halves in u32, reading and writing, and need
    no shader-f16, so they run on SwiftShader too); every (family, dtype) the adapter can run
    must have run. f16 variants return o as f16 (Uint16Array half bits), odd Dv included."""
    name, res = runtime
    results = [r for r in res["results"] if r["name"].startswith("attn.")]
    if not results:
        assert not js_cases.compiler_available(), "attnc compile exists but made no cases"
        pytest.skip("`python -m attnc compile` is not available yet")
    spec = {c["name"]: c for c in js_cases.load_cases(cases_dir)}
    have = set(res["device_features"])
    failures, ran, runnable = [], set(), set()
    for r in results:
        c = spec[r["name"]]
        key = (c["variant"]["family"], c["variant"]["dtype"], c["variant"].get("tiles", "f32"))
        missing = set(c["requires_features"]) - have
        if missing:
            if r["status"] != "unsupported":
                failures.append(f"{r['name']}: ran ({r['status']}) though the adapter lacks {sorted(missing)}")
            continue
        runnable.add(key)
        try:
            assert r["status"] == "ok", r.get("error") or r.get("metrics")
            storage = "f16a" if key[2] == "f16" else key[1]  # f16 tiles: the .f16a variant
            assert r["variant"] == f"flash_attention.{key[0]}.{storage}", r["variant"]
            # an f16 variant's o is the kernel's f16 output (padded rows of odd Dv stripped by
            # the loader), checked against the f32 reference as it is
            assert r["outputs"]["o"]["dtype"] == key[1], r["outputs"]["o"]["dtype"]
            check_outputs(name, c, r, cases_dir)
            check_stored(c, r)
            ran.add(key)
        except AssertionError as e:
            failures.append(f"{r['name']}: {e}")
    assert not failures, f"{len(failures)} of {len(results)} failed on {name}:\n" + "\n".join(failures)
    assert ran and ran == runnable, (sorted(ran), sorted(runnable))
    if name == "chromium":  # SwiftShader: subgroups of 4 and no shader-f16, yet every variant runs but f16 tiles
        assert ran == {(f, d, "f32") for f in ("subgroups", "portable") for d in ("f32", "f16")}, sorted(ran)
    else:  # f16 tiles on Node's Dawn (lavapipe offers shader-f16)
        assert {(f, "f16", "f16") for f in ("subgroups", "portable")} <= ran, sorted(ran)


def test_compiled_flex_kernel(runtime, cases_dir):
    """A kernel whose mods capture arrays (f32 and i32 gathers, u8, bool) and numbers, compiled
    with `attnc compile`, runs from the manifest alone on every variant the adapter can run,
    matching numpy (f16 variants: q, k, v in f16, the captured table in f32): the variants with
    the block map (9 storage buffers) where the device grants them, else a refusal naming the
    limit, and those without it (WebGPU's default 8) everywhere."""
    name, res = runtime
    results = [r for r in res["results"] if r["name"].startswith("flex.")]
    if not results:
        assert not js_cases.compiler_available(), "attnc compile exists but made no flex cases"
        pytest.skip("`python -m attnc compile` is not available yet")
    spec = {c["name"]: c for c in js_cases.load_cases(cases_dir)}
    have = set(res["device_features"])
    ran, failures = set(), []
    for r in results:
        c = spec[r["name"]]
        if set(c["requires_features"]) - have:
            continue
        try:
            if r["status"] == "unsupported" and res["device_limits"]["maxStorageBuffersPerShaderStage"] < 9:
                assert c["variant"]["name"].endswith(".block-map"), r.get("error")
                assert "maxStorageBuffersPerShaderStage" in r.get("error", ""), r.get("error")
                continue
            assert r["status"] == "ok", r.get("error") or r.get("metrics")
            check_outputs(name, c, r, cases_dir)
            ran.add((c["variant"]["family"], c["variant"]["dtype"], c["variant"]["name"].endswith(".block-map")))
        except AssertionError as e:
            failures.append(f"{r['name']}: {e}")
    assert not failures, "\n".join(failures)
    assert ("portable", "f32", False) in ran and ("portable", "f16", False) in ran, sorted(ran)
    if res["device_limits"]["maxStorageBuffersPerShaderStage"] >= 9:
        assert ("portable", "f32", True) in ran, sorted(ran)


def check_stored(c: dict, r: dict) -> None:
    """Each output's buffer as the kernel wrote it (`run(..., {output: 'buffer'})`): rows at the
    plan's rowStride, which is 2*ceil(Dv/2) for an f16 o (halves stored in pairs) and the last
    dim otherwise; the dense output `run` returned is those rows without their padding, bit for
    bit, and the padding holds 0."""
    dv = c["shapes"]["Dv"]
    assert set(r["stored"]) == set(r["outputs"]), (sorted(r["stored"]), sorted(r["outputs"]))
    for out_name, entry in r["stored"].items():
        width, stride = entry["width"], entry["row_stride"]
        f16_o = out_name == "o" and entry["dtype"] == "f16"
        assert stride == (2 * -(-width // 2) if f16_o else width), (out_name, entry["dtype"], width, stride)
        if out_name == "o":
            assert width == dv, (width, dv)
        dense = js_cases.decode_output(r["outputs"][out_name])
        raw = js_cases.decode_output(entry)
        assert dense.size == entry["count"] and raw.size == entry["count"] // width * stride, (dense.size, raw.size)
        bits = {2: np.uint16, 4: np.uint32}[raw.itemsize]
        rows = raw.view(bits).reshape(-1, stride)
        assert np.array_equal(rows[:, :width], dense.view(bits).reshape(-1, width)), f"{out_name}: rows differ"
        assert not rows[:, width:].any(), f"{out_name}: nonzero row padding"


def test_formulas_match_python(runtime):
    """js/attnc.js evaluates manifest formulas exactly like the Python reading of the spec."""
    _, res = runtime
    py = js_cases.formula_checks()
    js = res["checks"]["formulas"]
    assert [j["formula"] for j in js] == [p["formula"] for p in py]
    for p, j in zip(py, js, strict=True):
        if "error" in p:
            assert "error" in j and j["attnc_error"], (p, j)
        else:
            assert "value" in j, (p, j)
            assert math.isclose(j["value"], p["value"], rel_tol=1e-15, abs_tol=0), (p, j)


def test_f16_conversion_matches_numpy(runtime):
    _, res = runtime
    f16 = res["checks"]["f16"]
    assert f16["count"] > 20000
    assert f16["to_half_mismatches"] == 0 and f16["to_float_mismatches"] == 0, f16


def test_kv_cache(runtime, cases_dir):
    """js/attnc.js KVCache: ragged and whole appends from typed arrays and GPUBuffers (dense and
    strided), in place (the cache buffers hold exactly the appended rows, zeros past each
    prefix; the GPU lengths advanced), and attention over each row's prefix, against numpy; on
    every runtime, f32 and f16 (odd head dims)."""
    name, res = runtime
    results = [r for r in res["results"] if r["name"].startswith("kv.")]
    if not results:
        assert not js_cases.compiler_available(), "attnc compile exists but made no KV-cache cases"
        pytest.skip("`python -m attnc compile` is not available yet")
    spec = {c["name"]: c for c in js_cases.load_cases(cases_dir)}
    assert sorted(r["name"] for r in results) == sorted(n for n in spec if n.startswith("kv."))
    have = set(res["device_features"])
    for r in results:
        c = spec[r["name"]]
        if set(c["requires_features"]) - have:
            assert r["status"] == "unsupported", r
            continue
        assert r["status"] == "ok", r.get("error") or r.get("metrics")
        for out_name in ("cache_k", "cache_v", "kv_lens"):  # written in place: exactly
            got = js_cases.decode_output(r["outputs"][out_name])
            want = js_cases.read_bin(cases_dir, c["expected"][out_name])
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f"{r['name']}.{out_name} differs"
        check_outputs(name, c, r, cases_dir)


def test_js_store_kernels_are_the_python_ones():
    """js/attnc.js embeds attnc's KV store kernels: the same WGSL text, so both write alike."""
    from attnc.runtime import kvcache

    text = (js_cases.ROOT / "js" / "attnc.js").read_text()
    for name, wgsl in (("KV_STORE_WGSL", kvcache.STORE_WGSL), ("KV_STORE_F32", kvcache.STORE_F32),
                       ("KV_STORE_F16", kvcache.STORE_F16), ("KV_ADVANCE_WGSL", kvcache.ADVANCE_WGSL)):
        start = text.index(f"const {name} = String.raw`") + len(f"const {name} = String.raw`")
        assert text[start:text.index("`;", start)] == wgsl, name


def test_refused_calls_name_the_problem(runtime, cases_dir):
    """Calls of compiled kernels that attnc's Python API refuses (GQA non-multiples, Hkv > Hq,
    string/fractional/zero/negative dims, a short input, kv_lens past T) are refused by the
    loader with a message naming the problem, never run into plausible numbers."""
    name, res = runtime
    spec = [c for c in js_cases.load_cases(cases_dir) if c["name"].startswith("refuse.")]
    if not spec:
        assert not js_cases.compiler_available(), "attnc compile exists but made no refusal cases"
        pytest.skip("`python -m attnc compile` is not available yet")
    for c in spec:
        r = _result(res, c["name"])
        assert "error" in r, f"{c['name']} on {name}: ran, status {r['status']}"
        assert c["expect_error"] in r["error"], (c["name"], r["error"])


def test_validation_matches_python(runtime, cases_dir):
    """A fixed sample of tests/js/test_js_validation.py's properties on the real runtimes:
    checkShapes agrees with api.validate_dims, and corrupted manifests are refused by path."""
    import test_js_validation as tv
    import validation_cases

    name, res = runtime
    checks = js_cases.load_checks(cases_dir)
    if "shapes" not in checks:
        assert not js_cases.compiler_available(), "attnc compile exists but made no validation checks"
        pytest.skip("`python -m attnc compile` is not available yet")
    got = res["checks"]["shapes"]
    assert len(got) == len(checks["shapes"]) == len(validation_cases.shape_checks())
    for c, js in zip(validation_cases.shape_checks(), got, strict=True):
        py = tv.python_shapes(c)
        if "ok" in py:
            assert js.get("ok") and js["env"] == py["env"], (c, js)
        else:
            assert js.get("attnc_error") and tv.named(js["error"]) == tv.named(py["error"]), (c, py, js)
    got = res["checks"]["manifests"]
    assert [g["path"] for g in got] == [c["path"] for c in checks["manifests"]]
    for g in got:
        assert g.get("attnc_error") and g["problems"] >= 1, (name, g)
        assert f"  {g['path']}:" in g["error"], (name, g)
