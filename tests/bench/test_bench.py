"""The benchmark harness: counts, shapes.json, reference, timing, naive kernel, CLI output.

GPU tests run on the test machine's CPU adapters with tiny sizes; nothing asserts speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from attnc.bench import cases as bc
from attnc.bench.baselines import onnx_proto, ort
from attnc.bench.cases import Case
from attnc.bench.wgsl import Shader, f32
from attnc.runtime.timing import rotation_count

# --- counts, shapes, reference (no GPU) ------------------------------------------------


def test_flops_non_causal_is_4_b_hq_s_t_d() -> None:
    c = Case("x", 2, 8, 2, 16, 40, 64, 64)
    assert c.flops() == 4 * 2 * 8 * 16 * 40 * 64


def test_flops_causal_square_is_halved() -> None:
    c = Case("x", 1, 4, 4, 256, 256, 64, 64, causal=True)
    assert c.flops() == 4 * 4 * 256 * 256 * 64 / 2


def test_flops_causal_rectangular_counts_unmasked_pairs() -> None:
    c = Case("x", 1, 1, 1, 2, 4, 8, 8, causal=True)  # rows see 3 and 4 keys
    assert c.pairs() == 7
    assert c.flops() == 2 * 7 * (8 + 8)
    more_queries = Case("y", 1, 1, 1, 4, 2, 8, 8, causal=True)  # rows see 0, 0, 1, 2
    assert list(more_queries.key_limits()) == [0, 0, 1, 2]
    assert more_queries.pairs() == 3


def test_bytes_count_qkvo_once() -> None:
    c = Case("x", 1, 8, 2, 4, 100, 64, 32)
    q, k, v, o = 8 * 4 * 64, 2 * 100 * 64, 2 * 100 * 32, 8 * 4 * 32
    assert c.nbytes() == 4 * (q + k + v + o)
    assert c.nbytes(2) == 2 * (q + k + v + o)


def test_case_rejects_bad_gqa() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Case("x", 1, 6, 4, 1, 1, 8, 8)


def test_parse_shape() -> None:
    c = bc.parse_shape("1,16,4,1,2048,64,64")
    assert (c.B, c.Hq, c.Hkv, c.S, c.T, c.D, c.Dv, c.causal) == (1, 16, 4, 1, 2048, 64, 64, False)
    assert bc.parse_shape("1,2,2,8,8,16,16,causal").causal
    for bad in ("1,2,3", "1,2,2,8,8,16,16,maybe", "a,2,2,8,8,16,16"):
        with pytest.raises(ValueError):
            bc.parse_shape(bad)


def test_shapes_json_loader_and_packaged_copy() -> None:
    suites = bc.load_suites()
    assert {"seeds", "ci"} <= set(suites)
    names = [c.name for c in suites["seeds"]]
    assert "vit_s4096_h64" in names and "gemma_gqa4_h256_s512" in names
    gemma = next(c for c in suites["seeds"] if c.name == "gemma_gqa4_h256_s512")
    assert (gemma.Hq, gemma.Hkv, gemma.D, gemma.causal) == (4, 1, 256, True)
    assert bc.load_suites(bc.PACKAGED_SHAPES) == suites
    with pytest.raises(ValueError, match="unknown suite"):
        bc.load_suite("nope")


def _dense_reference(c: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Textbook attention in float64 (fully masked rows -> 0)."""
    kk = np.repeat(k, c.group, axis=1).astype(np.float64)
    vv = np.repeat(v, c.group, axis=1).astype(np.float64)
    s = np.einsum("bhsd,bhtd->bhst", q.astype(np.float64), kk) / np.sqrt(c.D)
    keep = np.arange(c.T)[None, :] < c.key_limits()[:, None]
    s = np.where(keep, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(keep, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    return np.einsum("bhst,bhtd->bhsd", p / np.where(den > 0, den, 1), vv)


@pytest.mark.parametrize(
    "case",
    [
        Case("gqa", 2, 4, 2, 5, 7, 8, 6),
        Case("causal", 1, 2, 1, 3, 9, 4, 4, causal=True),
        Case("masked_rows", 1, 2, 2, 6, 3, 4, 4, causal=True),
    ],
    ids=lambda c: c.name,
)
def test_reference_matches_dense(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bc, "REFERENCE_BLOCK", 2 * case.T)  # force several row blocks
    q, k, v = bc.make_inputs(case, seed=3)
    np.testing.assert_allclose(bc.reference(case, q, k, v), _dense_reference(case, q, k, v))


def test_relerr() -> None:
    ref = np.ones((2, 2))
    assert bc.relerr(ref, ref) == 0
    assert bc.relerr(ref * 1.1, ref) == pytest.approx(0.1)
    assert bc.relerr(np.ones(3), ref) == float("inf")


def test_relerr_of_non_finite_results_and_against_an_all_zero_reference() -> None:
    """A NaN in the result is a NaN error and an inf an infinite one (never a small number);
    against an all-zero reference (a relative error has no scale) the error is the result's
    absolute error, so a result that is not zero there is not read as exact (it read 0.0)."""
    ref = np.ones((2, 3))
    assert np.isnan(bc.relerr(np.where(np.eye(2, 3) > 0, np.nan, ref), ref))
    assert bc.relerr(np.where(np.eye(2, 3) > 0, np.inf, ref), ref) == float("inf")
    zero = np.zeros((2, 2))
    assert bc.relerr(zero, zero) == 0
    assert bc.relerr(np.ones((2, 2)), zero) == pytest.approx(2.0)  # ||out - 0|| = 2
    assert bc.relerr(np.full((2, 2), 1e-3), zero) == pytest.approx(2e-3)
    assert np.isnan(bc.relerr(np.full((2, 2), np.nan), zero))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_a_result_is_correct_only_when_its_error_is_a_number_within_the_tolerance(dtype: str) -> None:
    """The verdict of a result row, its table's ok column and the exit status (attnc's rows only)
    for errors at, just over, far over the tolerance and not numbers at all: NaN (an output with
    a NaN) and inf are WRONG, exactly the tolerance is right, no error (--no-check) is no verdict
    (a NaN error read as correct, "yes", exit status 0)."""
    from attnc.bench import cli
    from attnc.bench.impls import Measured
    from attnc.bench.timing import Timing

    tol = cli.TOLERANCE[dtype]
    case = Case("c", B=1, Hq=2, Hkv=2, S=4, T=8, D=8, Dv=8)
    measured = Measured(Timing(ms=1.0, samples=(1.0,)), np.zeros(1))
    for err, verdict in ((0.0, True), (tol / 2, True), (tol, True), (float(np.nextafter(tol, 1.0)), False),
                         (10 * tol, False), (float("nan"), False), (float("inf"), False), (None, None)):
        rows = [cli.result_row(case, impl, measured, err, {}, dtype) for impl in ("attnc", "attnc-q8_0", "naive")]
        assert [r["correct"] for r in rows] == [verdict] * 3, err
        ok = {True: "yes", False: "WRONG", None: "-"}[verdict]
        assert [line.split()[6] for line in cli.format_table(rows, {}).splitlines()[1:]] == [ok] * 3, err
        assert [cli.failed_attnc_row(r) for r in rows] == [verdict is False, verdict is False, False], err
    out = np.ones((1, 2, 4, 8))
    out[0, 1, 2, 3] = np.nan  # one NaN in the output: relerr's NaN reaches the verdict
    row = cli.result_row(case, "attnc", measured, bc.relerr(out, np.ones(out.shape)), {}, dtype)
    assert row["correct"] is False and cli.failed_attnc_row(row)


def test_rotation_count() -> None:
    mib = 1 << 20
    assert rotation_count(200 * mib, 64 * mib) == 1
    assert rotation_count(64 * mib, 64 * mib) == 3
    assert rotation_count(1, 64 * mib) == 32
    assert rotation_count(1, 64 * mib, max_copies=4) == 4


def test_wgsl_writer_layout() -> None:
    sh = Shader(workgroup_size=(8, 1, 1))
    sh.const("N", "4u")
    assert sh.storage("a", "f32") == 0
    assert sh.uniform("u", [("n", "u32")]) == 1
    sh.builtin("global_invocation_id", "gid")
    with sh.block("if (gid.x < N)"):
        sh.line("let x = a[gid.x];")
    text = sh.render()
    assert "@group(0) @binding(1) var<uniform> u: UParams;" in text
    assert "@compute @workgroup_size(8, 1, 1)" in text
    assert "        let x = a[gid.x];" in text
    assert f32(1.0) == "1.0" and f32(np.float32(0.125)) == "0.125"


# --- ORT model and profile parsing (no GPU) --------------------------------------------


def test_onnx_model_is_valid() -> None:
    """The ORT baseline's model, written as protobuf by hand, passes onnx's own checker (onnx is
    in the test extra, so this runs wherever the tests do)."""
    import onnx
    m = onnx.load_from_string(onnx_proto.mha_model(1, 4, 8, 2, 16, 16, causal=True))
    onnx.checker.check_model(m)
    (node,) = m.graph.node
    assert node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft"
    assert {a.name: a.i for a in node.attribute} == {"num_heads": 2, "unidirectional": 1}
    dims = [d.dim_value for d in m.graph.input[1].type.tensor_type.shape.dim]
    assert dims == [1, 2, 8, 16]


def test_ort_profile_split_into_runs() -> None:
    def ev(name: str, dur: int) -> dict[str, Any]:
        return {"cat": "Api", "name": name, "dur": dur, "args": {"cache_key": "k"}}

    trace = [{"cat": "Session", "name": "model_run", "dur": 5}]
    for _ in range(3):
        trace += [ev("&MHA&CopyKVCache", 2), ev("&MHA&FlashAttention", 10)]
    trace.append({"cat": "Node", "args": {"provider": "WebGpuExecutionProvider"}})
    events = ort.program_events(trace)
    assert len(events) == 6
    runs = ort.split_runs(events, 3)
    assert runs is not None and [sum(d for _, d in r) for r in runs] == [12, 12, 12]
    assert ort.split_runs(events, 4) is None
    assert ort.providers_used(trace) == ["WebGpuExecutionProvider"]


# --- on the adapters -------------------------------------------------------------------


@pytest.mark.gpu
def test_timing_returns_positive_gpu_times(device: Any) -> None:
    from attnc.bench.ceilings import measure_copy, measure_fma

    copy = measure_copy(device, nbytes=1 << 20, runs=3, warmup=1)
    assert copy.ms > 0 and copy.value > 0 and copy.timing == "gpu-timestamps"
    fma = measure_fma(device, workgroups=4, iters=4, runs=3, warmup=1)
    assert fma.ms > 0 and fma.value > 0 and fma.unit == "TFLOP/s"


@pytest.mark.gpu
def test_timing_rotates_and_reports_each_dispatch(device: Any) -> None:
    from attnc.bench.naive import NaiveAttention
    from attnc.bench.timing import time_dispatches

    case = Case("t", 1, 2, 1, 4, 16, 8, 8)
    op = NaiveAttention(device, case)
    copies = [op.bind(*bc.make_inputs(case, seed=s)) for s in range(2)]
    t = time_dispatches(device, [op.dispatches(i) for i in copies], runs=4, warmup=1)
    assert t.rotations == 2 and len(t.samples) == 4 and len(t.per_dispatch_ms) == 3
    assert all(s > 0 for s in t.samples) and t.ms >= max(t.per_dispatch_ms)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        Case("mha", 1, 2, 2, 5, 33, 16, 16),
        Case("gqa_causal", 2, 4, 2, 3, 70, 8, 72, causal=True),
        Case("causal_square", 1, 2, 2, 17, 17, 32, 32, causal=True),
        Case("masked_rows", 1, 1, 1, 5, 3, 8, 8, causal=True),
    ],
    ids=lambda c: c.name,
)
def test_naive_matches_reference(device: Any, case: Case) -> None:
    from attnc.bench.naive import NaiveAttention
    from attnc.bench.timing import time_dispatches

    q, k, v = bc.make_inputs(case, seed=1)
    op = NaiveAttention(device, case, max_scores_bytes=4 * case.T * 3)  # chunks of 3 rows
    assert len(op.chunks) > 1
    index = op.bind(q, k, v)
    time_dispatches(device, [op.dispatches(index)], runs=1, warmup=0)
    assert bc.relerr(op.result(index), bc.reference(case, q, k, v)) < 1e-5


@pytest.mark.gpu
def test_cli_json_and_plot(require_adapters: Any, tmp_path: Path) -> None:
    from attnc.bench.cli import main

    (dev,) = require_adapters("wgpu:vulkan")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--device", dev.spec, "--compare", "naive", "--shape", "1,2,1,3,40,16,16,1",
            "--ceilings", "small", "--runs", "2", "--warmup", "1", "--json", str(out)]  # fmt: skip
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl = False
    assert main(argv + (["--plot", str(png)] if has_mpl else [])) == 0
    doc = json.loads(out.read_text())
    assert {"device", "ceilings", "results"} <= set(doc)
    assert {"name", "backend", "api", "versions"} <= set(doc["device"])
    assert doc["device"]["backend"] == "wgpu" and "wgpu" in doc["device"]["versions"]
    assert {"fma_f32", "copy"} <= set(doc["ceilings"])
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == {"attnc", "naive"}
    naive = rows["naive"]
    for key in ("case", "impl", "ms", "tflops", "gbps", "relerr"):
        assert key in naive
    assert naive["ms"] > 0 and naive["tflops"] > 0 and naive["relerr"] < 1e-5
    assert naive["correct"] is True and naive["timing"] == "gpu-timestamps"
    assert has_mpl is False or png.stat().st_size > 0


def _row(case: str, impl: str, ms: float | None, **extra: Any) -> dict[str, Any]:
    row = {"case": case, "impl": impl, "ms": ms, "relerr": 1e-7, "correct": True}
    return row | extra


def test_rounds_merge_into_the_fastest_round_of_each_result() -> None:
    """--rounds: each (case, impl) is its fastest round's row with every round in ms_rounds,
    the worst error of any round, speed-ups over attnc taken again between the fastest rounds,
    and a round that failed or was wrong is never hidden behind one that ran right."""
    from attnc.bench.cli import merge_rounds

    rounds = [
        [_row("a", "attnc", 2.0), _row("a", "attnc[q8_0]", 1.0, speedup_vs_attnc=2.0, append_ms=0.1),
         _row("b", "attnc", 1.0), _row("b", "ort", 3.0), _row("c", "attnc", 1.0)],
        [_row("a", "attnc", 1.0), _row("a", "attnc[q8_0]", 0.8, speedup_vs_attnc=1.25, append_ms=0.2),
         _row("b", "attnc", 1.5, relerr=3e-5, correct=False), _row("b", "ort", 2.0),
         _row("c", "attnc", None, error="RuntimeError: lost")],
        [_row("a", "attnc", 1.5), _row("a", "attnc[q8_0]", 0.9, speedup_vs_attnc=1.6, append_ms=0.3),
         _row("b", "attnc", 0.9), _row("b", "ort", 2.5), _row("c", "attnc", 0.5)],
    ]  # fmt: skip
    merged = {(r["case"], r["impl"]): r for r in merge_rounds([r for rnd in rounds for r in rnd])}
    assert list(merged) == [("a", "attnc"), ("a", "attnc[q8_0]"), ("b", "attnc"), ("b", "ort"), ("c", "attnc")]
    a, q8 = merged["a", "attnc"], merged["a", "attnc[q8_0]"]
    assert a["ms"] == 1.0 and a["ms_rounds"] == [2.0, 1.0, 1.5] and a["correct"] is True
    assert q8["ms"] == 0.8 and q8["append_ms"] == 0.2  # the fastest round's own fields
    assert q8["speedup_vs_attnc"] == pytest.approx(1.0 / 0.8)
    b = merged["b", "attnc"]
    assert b["ms"] == 0.9 and b["relerr"] == 3e-5 and b["correct"] is False  # round 2 was wrong
    assert merged["b", "ort"]["ms"] == 2.0
    c = merged["c", "attnc"]
    assert c["error"] == "RuntimeError: lost" and c["ms"] is None and c["ms_rounds"] == [1.0, None, 0.5]
    one = [_row("a", "attnc", 2.0)]
    assert merge_rounds(one)[0]["ms_rounds"] == [2.0]
    nan = merge_rounds([_row("a", "attnc", 1.0), _row("a", "attnc", 2.0, relerr=float("nan"), correct=False)])[0]
    assert np.isnan(nan["relerr"]) and nan["correct"] is False and nan["ms"] == 1.0  # max() passed over NaN


@pytest.mark.gpu
def test_cli_rounds_interleave_the_cases(require_adapters: Any, tmp_path: Path) -> None:
    """`attnc bench --rounds 2`: every case measured in each round, cases interleaved, one row each."""
    from attnc.bench.cli import main

    (dev,) = require_adapters("wgpu:vulkan")
    out = tmp_path / "r.json"
    argv = ["--device", dev.spec, "--compare", "naive", "--shape", "1,2,1,3,40,16,16,1", "--shape", "1,2,2,1,64,16,16",
            "--ceilings", "off", "--runs", "2", "--warmup", "1", "--rounds", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["rounds"] == 2
    rows = doc["results"]
    assert len(rows) == 4 and len({(r["case"], r["impl"]) for r in rows}) == 4
    for r in rows:
        assert len(r["ms_rounds"]) == 2 and r["ms"] == min(r["ms_rounds"]) and r["correct"] is True
    assert main([*argv[:-2], "--rounds", "0"]) == 2


def test_cli_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from attnc.bench.cli import main

    assert main(["--case", "nope"]) == 2
    assert main(["--compare", "pytorch"]) == 2
    assert "unknown" in capsys.readouterr().err


@pytest.mark.gpu
def test_cli_kv_formats_against_f16_kv(require_adapters: Any, tmp_path: Path) -> None:
    """--kv: attnc over quantized K/V beside attnc's f16 KV run, the contract on the dequantized
    K/V, the quantization error and the speed-up reported."""
    from attnc.bench.cli import main

    (dev,) = require_adapters("wgpu:vulkan")
    out = tmp_path / "kv.json"
    argv = ["--device", dev.spec, "--kv", "q4_0", "--dtype", "f16", "--shape", "1,4,2,1,96,32,32",
            "--ceilings", "off", "--runs", "2", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"attnc", "attnc-q4_0"}
    q4 = rows["attnc-q4_0"]
    assert q4["correct"] is True and q4["relerr"] < 2e-3 < q4["relerr_unquantized"]
    assert q4["kv_format"] == "q4_0" and q4["kv_bytes"] == 2 * (2 * 96) * 5 * 4 < rows["attnc"]["kv_bytes"]
    assert q4["speedup_vs_attnc"] == pytest.approx(rows["attnc"]["ms"] / q4["ms"])
    assert q4["variant"].endswith(",K=q4_0,V=q4_0]")
    assert q4["append_alone_ms"] > 0 and q4["append_step_attention_ms"] > 0
    assert q4["append_fraction"] == pytest.approx(q4["append_ms"] / q4["append_step_attention_ms"])
    assert np.isfinite([q4["append_ms"], q4["append_one_pass_ms"]]).all()
    from attnc.bench.cli import summary

    line = summary(q4)  # the log line names the append's cost (a difference of two medians: on a
    # busy CPU adapter it can come out below 0, which the line calls noise)
    cost = q4["append_ms"] * 1e3
    assert (f"append {cost:.1f} us ({q4['append_fraction']:.0%} of the step's attention)" if cost >= 0 else
            f"append not measurable ({cost:.1f} us: within the spread of the two medians)") in line
    for fake in (0.25, -0.25):  # both forms of each cost, whatever this run measured
        for one in (0.1, -0.1):
            row = {**q4, "append_ms": fake, "append_fraction": fake / q4["append_step_attention_ms"],
                   "append_one_pass_ms": one}
            line = summary(row)
            assert ("append not measurable" in line) == (fake < 0), line
            assert ("not measurable in the attention's pass" in line) == (one < 0), line


@pytest.mark.gpu
def test_cli_documents_against_the_dense_run(require_adapters: Any, tmp_path: Path) -> None:
    """--documents N: attnc with a document mask beside its dense run, checked against float64
    with the same mask (the documents' keys only), the speed-up over dense reported; the
    reference's mask is the one the runner builds (documents of unequal query offset: S < T)."""
    from attnc.bench.cli import main

    (dev,) = require_adapters("wgpu:vulkan")
    out = tmp_path / "docs.json"
    argv = ["--device", dev.spec, "--documents", "3", "--shape", "1,2,2,40,100,32,32", "--target", "portable",
            "--ceilings", "off", "--runs", "2", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"attnc", "attnc+documents"}
    docs = rows["attnc+documents"]
    assert docs["correct"] is True and docs["relerr"] < 1e-5 and docs["documents"] == 3
    assert docs["speedup_vs_attnc"] == pytest.approx(rows["attnc"]["ms"] / docs["ms"])
    case = bc.parse_shape("1,2,2,40,100,32,32")
    q, k, v = bc.make_inputs(case, "f32", 0)
    assert bc.relerr(bc.reference(case, q, k, v, documents=3), bc.reference(case, q, k, v)) > 1e-2
    assert main(["--documents", "-1"]) == 2


def test_kv_suites_and_bad_formats(capsys: pytest.CaptureFixture[str]) -> None:
    from attnc.bench.cli import main

    suites = bc.load_suites()
    big = {(c.S, c.T, c.Hq, c.Hkv, c.D) for c in suites["kvquant"]}
    assert big == {(s, t, hq, hkv, d) for s in (1, 4) for t in (16384, 32768)
                   for hq, hkv, d in ((8, 8, 128), (64, 8, 64))}
    assert all(c.T <= 2048 for c in suites["kvquant_ci"])
    assert main(["--kv", "q5_0"]) == 2
    assert "unknown KV format(s) ['q5_0']" in capsys.readouterr().err


def test_attnc_f16_result_is_the_kernels_f16_output(require_adapters: Any) -> None:
    """`attnc bench --dtype f16` measures relerr on the float16 o the kernel wrote (odd Dv:
    its padded rows stripped), not on a float32 copy."""
    from attnc.bench.impls import RunOptions, run_attnc

    (dev,) = require_adapters("wgpu:vulkan")
    case = bc.parse_shape("1,2,1,5,40,16,15")
    q, k, v = bc.make_inputs(case, "f16", seed=2)
    m = run_attnc(dev, case, [(q, k, v)], RunOptions(runs=1, warmup=0, dtype="f16"))
    assert m.out.dtype == np.float16 and m.out.shape == (1, 2, 5, 15)
    err = bc.relerr(m.out, bc.reference(case, q, k, v))
    assert 0 < err < 2e-3  # an f16 output: nonzero rounding error, within the contract


def test_bench_table_renders_every_kind_of_result(tmp_path) -> None:
    """tools/bench_table.py over what `attnc bench --json` writes: a baseline that did not run
    (no ms: its reason), ceilings off, an unchecked result (--no-check: not WRONG), a wrong one,
    a --repeat-processes file (a table a process), small ceilings shown as measured (it crashed,
    judged unchecked results WRONG and printed lavapipe's 0.029 TFLOP/s as 0.0)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[2] / "tools" / "bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    dev = {"name": "llvmpipe", "backend": "wgpu", "api": "Vulkan"}
    shape = {"S": 1}
    results = [
        {"case": "a", "impl": "attnc", "ms": 2.0, "correct": None, "shape": shape, "copy_fraction": 0.25},
        {"case": "a", "impl": "ort", "ms": None, "error": "unavailable: onnxruntime is not installed"},
        {"case": "a", "impl": "naive", "ms": 8.0, "correct": False},
    ]
    ceilings = {"fma_f32": {"value": 0.0293, "unit": "TFLOP/s"}, "copy": {"value": 6.67, "unit": "GB/s"}}
    one = {"device": dev, "ceilings": {}, "results": results}
    for name, doc in (("plain", {**one, "ceilings": ceilings}), ("off", one),
                      ("repeat", {"processes": [one, one], "spread": []})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        text = bench_table.table(str(path))
        assert "| a | 2 | — (unavailable: onnxruntime is not installed) | 8 WRONG (4.00×) | 25.0 % BW |" in text, text
        assert text.count("| a |") == (2 if name == "repeat" else 1)
        assert ("fma_f32 0.0293 TFLOP/s" in text) == (name == "plain")
    # the bench's flags; attnc's own variants read as their speed-up over attnc (the JSON's
    # speedup_vs_attnc: a q8_0 row twice as fast is 2.00x, it read 0.50x); the dtype is named
    flagged = [
        {"case": "b", "impl": "attnc", "ms": 2.0, "correct": True, "shape": shape, "clock": 0.5},
        {"case": "b", "impl": "attnc-q8_0", "ms": 1.0, "correct": True, "timestamps_quantized": True},
        {"case": "b", "impl": "naive", "ms": 8.0, "correct": True, "clock": 0.99},
    ]
    path = tmp_path / "flags.json"
    path.write_text(json.dumps({"device": dev, "ceilings": {}, "results": flagged, "config": {"dtype": "f16"}}))
    text = bench_table.table(str(path))
    assert "| b | 2 CLOCKS AT 50 % | 1 QUANTIZED (2.00×) | 8 (4.00×) |" in text, text
    assert "attnc-q8_0 ms (over attnc ×)" in text and "naive ms (attnc ×)" in text and "Vulkan), f16**" in text


def test_each_row_is_measured_against_the_ceiling_of_its_arithmetic() -> None:
    """%FMA of a float16 run: attnc's rows against the f32 FMA ceiling (f16 storage computes in
    f32; the f16 ceiling, 4x lower on lavapipe, gave 199 %), its f16-tile targets and the
    baselines against the inputs' dtype."""
    from attnc.bench.cli import math_dtype
    from attnc.bench.impls import RunOptions

    f16 = RunOptions(dtype="f16")
    assert [math_dtype(i, f16) for i in ("attnc", "attnc-q8_0", "attnc+documents", "ort")] == ["f32"] * 3 + ["f16"]
    assert math_dtype("attnc", RunOptions(dtype="f16", target="subgroups-f16")) == "f16"
    assert math_dtype("attnc", RunOptions()) == "f32"


def test_cases_and_options_that_would_mix_up_results_are_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Results are keyed by case name: a shapes file with one name twice in a suite (a causal and
    a plain case of one name read as relerr 1.13, WRONG, through the rounds' reference cache),
    a name standing for two shapes in one run, a --shape with an empty field (a dimension
    silently dropped), --documents that a case cannot hold (S > T: 0.69 WRONG; more documents
    than keys: an IndexError row), --warmup 0 (the baselines' compiles timed, attnc's not) and
    --no-attnc with attnc's --kv rows are status 2 with the reason, before any device."""
    from attnc.bench.cli import main

    shapes = tmp_path / "shapes.json"
    case = {"name": "x", "B": 1, "Hq": 2, "Hkv": 2, "S": 3, "T": 16, "D": 16, "Dv": 16}
    shapes.write_text(json.dumps({"suites": {"s": [case, {**case, "causal": True}]}}))
    cases = [(["--shapes", str(shapes), "--suite", "s"], "case name(s) ['x'] used more than once"),
             (["--shape", "1,4,4,,256,64,64,1"], "--shape wants B,Hq,Hkv,S,T,D,Dv"),
             (["--shape", "1,2,2,20,16,16,16", "--documents", "2"], "needs S <= T"),
             (["--shape", "1,2,1,8,16,16,16,causal", "--documents", "100"], "at most T documents"),
             (["--shape", "1,2,2,2,16,16,16", "--warmup", "0"], "--warmup"),
             (["--shape", "1,2,2,2,32,32,32", "--no-attnc", "--compare", "naive", "--kv", "q8_0"], "--no-attnc")]
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"suites": {"a": [case], "b": [{**case, "T": 32}]}}))
    cases.append((["--shapes", str(two), "--case", "x"], "are different shapes in different suites"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)


@pytest.mark.gpu
def test_exit_status_says_whether_attncs_rows_are_right(require_adapters: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One process exits 1 when a row of attnc's is wrong or failed (it exited 0), 0 when only a
    row that cannot be measured is missing (q8_0 at D = 24: 'unavailable', not a traceback)."""
    from attnc.bench import cli

    (dev,) = require_adapters("wgpu:vulkan")
    argv = ["--device", dev.spec, "--shape", "1,2,2,2,24,24,24", "--ceilings", "off", "--runs", "1",
            "--warmup", "1", "--kv", "q8_0", "--dtype", "f16", "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rows["attnc-q8_0"]["error"].startswith("unavailable: k: head dim 24 cannot be stored as q8_0")
    monkeypatch.setattr(cli, "relerr", lambda out, ref: 1.0)  # every result off the reference
    assert cli.main(argv) == 1
