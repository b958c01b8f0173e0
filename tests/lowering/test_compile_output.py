"""Every .wgsl that `attnc compile` writes is accepted by the compiler its manifest entry names.

A program's `dialect_files` (docs/MANIFEST.md) names a file per WGSL dialect: `tint` (Dawn,
browsers) and `naga` (wgpu-native). Each file is created as a compute pipeline on a device of
that compiler, Tint on dawn:vulkan and Naga on wgpu:vulkan, for every example kernel
(examples/*.attn, examples/variants/attn/*.attn), the shipped flash kernel with option sets and
loop shapes (fixed ones, and a property test drawing them), and every family and storage the
compile emits. The programs are rebuilt from manifest.json alone (bindings, uniform layout), so
this also checks that the manifest carries what a runtime without attnc needs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.cli import main as cli
from attnc.errors import LoweringError
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from tests.js import manifest_schema

ROOT = Path(__file__).resolve().parents[2]
# the .attn examples and variants, and kernels whose mods read data of their own (a gather
# through an i32 table into an f32 one, a bool mask four to a word, paged keys found through a
# page table)
EXAMPLES = sorted((ROOT / "examples").glob("*.attn")) \
    + sorted((ROOT / "examples" / "variants" / "attn").glob("*.attn")) \
    + [ROOT / "examples" / "flex" / "attn" / f"{name}.attn" for name in ("t5_buckets", "bool_mask", "paged_kv")]
# DSL kernel option sets compiled through `module:kernel --set ...`: every option of the
# shipped kernel at least once
DSL_SETS = [
    [],
    ["causal=true", "kv_lens=true", "lse=true"],
    ["split=true", "sinks=true", "window=[4, null]", "softcap=true"],
    ["alibi=true", "bias=true", "BM=16", "BN=64"],
    ["pack_gqa=true", "causal=true", "window=[null, 0]"],
    ["offsets=true", "split=true", "lse=true", "kv_lens=true"],
    # quantized caches (their store kernels too), split with a sink the combine applies
    ["k_dtype=q8_0", "v_dtype=q4_0", "split=true", "sinks=true", "pack_gqa=true"],
    ["k_dtype=int8", "v_dtype=f16", "causal=true", "kv_lens=true"],
]
DIALECT_SPECS = {"tint": "dawn:vulkan", "naga": "wgpu:vulkan"}  # a device whose compiler is each dialect's


def _program(entry: dict, outdir: Path, file: str) -> Program:
    """The Program of a manifest program entry with the WGSL of `file`."""
    binds = tuple(Binding(b["name"], b["binding"], Access.UNIFORM if b["kind"] == "uniform"
                          else Access(b["access"]), Scalar.U32) for b in entry["bindings"])
    fields = tuple(UniformField(f["name"], f["offset"], Scalar(f["type"])) for f in entry["uniforms"]["fields"])
    return Program(entry["name"], (outdir / file).read_text(), entry["entry_point"], entry["workgroup_size"][0],
                   binds, fields, (entry["workgroups"],), frozenset(), entry.get("workgroup_storage_bytes", 0),
                   entry.get("in_bounds", False))


def check_dialect_files(manifest: dict, outdir: Path, devices: dict) -> int:
    """Create every file of every program as a compute pipeline on the device of the dialect
    its `dialect_files` entry names (`devices`: dialect -> Device); a rejected file raises
    LoweringError. Naga's files get attnc's explicit layout (dispatch.compile_program), Tint's
    the automatic one a runtime without attnc may use, with every binding the entry lists bound
    in a bind group of that layout (each file compiled once per compiler; a portable program's
    one file gets both). Returns the number of pipelines created."""
    from attnc.runtime.dispatch import compile_program

    n = 0
    for v in manifest["variants"]:
        for entry in v["programs"]:
            for dialect, file in entry["dialect_files"].items():
                program = _program(entry, outdir, file)
                if dialect == "naga":
                    compile_program(devices[dialect], program)
                else:
                    check_auto_layout(devices[dialect], entry, program)
                n += 1
    for entry in manifest.get("stores", []):  # one file for both compilers
        program = _program(entry, outdir, entry["file"])
        for device in devices.values():
            check_auto_layout(device, entry, program)
    return n


def _auto_pipeline(device, entry: dict, program: Program):
    """The entry's compute pipeline with an automatic layout (what the shader uses); a
    rejected shader is a LoweringError, as compile_program makes it."""
    from attnc.runtime.dispatch import shader_error

    try:
        module = device.gpu.create_shader_module(code=program.wgsl)
        return device.gpu.create_compute_pipeline(layout="auto",
                                                  compute={"module": module, "entry_point": entry["entry_point"]})
    except (device.wgpu.GPUError, device.wgpu.GPUPipelineError) as exc:
        raise shader_error(device, program, str(exc)) from None


def check_auto_layout(device, entry: dict, program: Program) -> None:
    """The program's pipeline created with an automatic layout takes a bind group of exactly
    the bindings its manifest entry lists: an automatic layout holds only the bindings the
    entry point uses, so a listed binding the shader never reads fails here (as it does in a
    runtime that builds its layouts from the shader)."""
    gpu, usage = device.gpu, device.wgpu.BufferUsage
    pipeline = _auto_pipeline(device, entry, program)
    uniform_size = entry["uniforms"]["size"]
    entries = []
    for b in entry["bindings"]:
        size = max(256, uniform_size) if b["kind"] == "uniform" else 256
        buf = gpu.create_buffer(size=size, usage=usage.UNIFORM if b["kind"] == "uniform" else usage.STORAGE)
        entries.append({"binding": b["binding"], "resource": {"buffer": buf, "offset": 0, "size": size}})
    try:
        gpu.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
    except device.wgpu.GPUError as exc:
        raise AssertionError(f"{entry['name']}: the bindings listed {[b['name'] for b in entry['bindings']]} "
                             f"do not match the shader's automatic layout: {exc}") from None


def _compile(outdir: Path, kernel: str, *args: str) -> dict:
    assert cli(["compile", kernel, "-o", str(outdir), *args]) == 0
    return json.loads((outdir / "manifest.json").read_text())


def _compiled(tmp_path_factory) -> list[tuple[str, Path, dict]]:
    out = []
    for i, f in enumerate(EXAMPLES):
        d = tmp_path_factory.mktemp(f"ex{i}")
        out.append((f.name, d, _compile(d, str(f))))
    for i, sets in enumerate(DSL_SETS):
        d = tmp_path_factory.mktemp(f"dsl{i}")
        args = [a for s in sets for a in ("--set", s)]
        out.append((" ".join(sets) or "flash_attention", d, _compile(d, "attnc.kernels.flash:flash_attention", *args)))
    d = tmp_path_factory.mktemp("paged")  # the shipped paged kernel over quantized pages, split, a sink
    out.append(("paged", d, _compile(d, "attnc.kernels.flash:paged_flash_attention", "--set", "k_dtype=q4_0",
                                     "--set", "split=true", "--set", "sinks=true", "--set", "kv_lens=true")))
    d = tmp_path_factory.mktemp("unrolled")  # the GPU loop shapes (lavapipe compiles UN=4 quickly enough)
    out.append(("unrolled, prefetched", d, _compile(d, "attnc.kernels.flash:flash_attention", "--set", "causal=true",
                                                   "--unroll", "4", "--prefetch")))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compiled(tmp_path_factory)


@pytest.fixture
def dialect_devices(require_adapters):
    return dict(zip(DIALECT_SPECS, require_adapters(*DIALECT_SPECS.values()), strict=True))


def check_files(m: dict, d: Path) -> None:
    """The manifest follows the schema and names every file written, each program a file per
    dialect: one shared file for the portable family, for subgroups a Naga file that is the
    Tint file without `enable subgroups;` (so a runtime that removes that line from a manifest
    without `dialect_files`, as MANIFEST.md says, gets the same WGSL)."""
    assert manifest_schema.validate(m, d) == []
    assert m["format"] == "attnc.manifest" and m["version"] == 1
    files = {f for v in m["variants"] for p in v["programs"] for f in (p["file"], *p["dialect_files"].values())}
    files |= {s["file"] for s in m.get("stores", [])}
    for store in m.get("stores", []):  # no `requires`: a store fits WebGPU's default limits
        assert sum(b["kind"] == "storage" for b in store["bindings"]) <= 8, store["name"]
        assert store["workgroup_size"][0] <= 256, store["name"]
    assert files == {f.name for f in d.glob("*.wgsl")}
    for v in m["variants"]:
        for p in v["programs"]:
            df = p["dialect_files"]
            assert set(df) == {"tint", "naga"} and df["tint"] == p["file"], p
            tint, naga = (d / df["tint"]).read_text(), (d / df["naga"]).read_text()
            if v["family"] == "portable":
                assert df["naga"] == df["tint"], p
            else:
                assert tint.startswith("enable subgroups;\n") and df["naga"] != df["tint"], p
                assert naga == tint.replace("enable subgroups;\n", "", 1), p
                assert "enable subgroups" not in naga


def test_manifests_list_every_file(compiled):
    for _name, d, m in compiled:
        check_files(m, d)
        # attnc's kernels say their shaders stay in bounds (tests/runtime/test_bounds.py)
        assert all(p["in_bounds"] is True for v in m["variants"] for p in v["programs"])
        assert {(v["family"], v["dtype"]) for v in m["variants"]} == {
            (f, s) for f in ("portable", "subgroups") for s in ("f32", "f16")}
        for v in m["variants"]:
            lim = v["requires"]["limits"]
            if v["family"] == "portable":
                assert v["requires"]["features"] == []
                assert lim["maxComputeWorkgroupStorageSize"] <= 16384
                assert lim["maxComputeInvocationsPerWorkgroup"] <= 256


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [dict(B=1, Hq=2, Hkv=2, S=1, T=256, D=16, Dv=16),
                                  dict(B=2, Hq=8, Hkv=2, S=5, T=300, D=32, Dv=24, NP=4, P=16, NB=32)])
def test_the_split_scratch_a_manifest_asks_for_is_what_attnc_binds(compiled, dims, require_adapters):
    """A runtime sizes the split-KV partial states (`part`) by the manifest's count: for every
    split variant it must be what attnc's own runtime binds for the same splits (the size its
    bounds-sanitized tests run the kernels with), or that runtime's buffer is too small."""
    import numpy as np

    from attnc.runtime import api

    dev = require_adapters("wgpu:vulkan")[0]
    seen = 0
    for nsplit in (2, 3, 4):
        op = api.prepare({k: dims[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv")}, np.float32, device=dev,
                         nsplit=nsplit)
        assert op.nsplit == nsplit
        binds = op._scratch_bytes()["part"] // 4
        env = {**dims, "NSPLIT": nsplit, "R": dims["Hq"] // dims["Hkv"] * dims["S"]}
        for name, _d, m in compiled:
            for v in m["variants"]:
                for t in v["tensors"]:
                    if t["name"] == "part":
                        assert manifest_schema.evaluate(t["count"], env) == binds, (name, v["name"], t["count"])
                        seen += 1
    assert seen >= 3 * 4 * 3  # the split option sets and the paged kernel, each family and dtype


@pytest.mark.gpu
def test_every_file_is_accepted_by_the_compiler_its_entry_names(compiled, dialect_devices):
    n = sum(check_dialect_files(m, d, dialect_devices) for _name, d, m in compiled)
    # every example/option set: 4 variants of at least one program, the portable ones' shared
    # file created on both compilers, the subgroups ones' two files each on its own
    assert n >= 8 * (len(EXAMPLES) + len(DSL_SETS) + 2)


@pytest.mark.gpu
@pytest.mark.parametrize("wrong", ["naga file marked tint", "tint file marked naga"])
def test_a_file_marked_with_the_wrong_dialect_fails(compiled, dialect_devices, wrong):
    """The check above fails when a manifest names the wrong dialect for a file: Tint rejects
    the Naga file (subgroup builtins without `enable subgroups;`), Naga the Tint file."""
    name, d, m = compiled[0]
    bad = copy.deepcopy(m)
    sub = [v for v in bad["variants"] if v["family"] == "subgroups"]
    assert sub, name
    for v in bad["variants"]:
        for p in v["programs"]:
            df = p["dialect_files"]
            df["tint"], df["naga"] = (df["naga"], df["naga"]) if wrong.startswith("naga") else (df["tint"], df["tint"])
    with pytest.raises(LoweringError, match="tint rejected" if wrong.startswith("naga") else "naga rejected"):
        check_dialect_files(bad, d, dialect_devices)


OPTION_FLAGS = ("causal", "softcap", "alibi", "bias", "sinks", "kv_lens", "lse", "split", "pack_gqa", "offsets")


@st.composite
def compile_args(draw) -> list[str]:
    """`attnc compile attnc.kernels.flash:flash_attention` arguments: options, tile sizes, loop shapes."""
    args = [a for f in OPTION_FLAGS if draw(st.booleans()) for a in ("--set", f"{f}=true")]
    side = st.sampled_from(["null", "0", "7"])
    if draw(st.booleans()):
        args += ["--set", f"window=[{draw(side)}, {draw(side)}]"]
    for t in ("BM", "BN"):
        args += ["--set", f"{t}={draw(st.sampled_from([16, 32, 64]))}"]
    args += ["--unroll", str(draw(st.sampled_from([1, 2, 4])))]
    if draw(st.booleans()):
        args.append("--prefetch")
    return args


@pytest.mark.gpu
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=compile_args())
def test_compiled_options_are_accepted_by_the_compilers_their_entries_name(args, dialect_devices, tmp_path_factory):
    d = tmp_path_factory.mktemp("drawn")
    m = _compile(d, "attnc.kernels.flash:flash_attention", *args)
    check_files(m, d)
    assert check_dialect_files(m, d, dialect_devices) >= 8


def run_store_entry(device, entry: dict, program: Program, arrays: dict, dims: dict) -> dict:
    """Run a manifest's store entry as a runtime without attnc does: one buffer per binding
    (the arrays' bytes, by name), the uniform fields from their formulas, `layout: "auto"`,
    workgroups from the formula (one dispatch row: the test's sizes stay under the limit);
    returns the read_write tensors' bytes."""
    import struct

    import numpy as np

    gpu, usage = device.gpu, device.wgpu.BufferUsage
    groups = int(manifest_schema.evaluate(entry["workgroups"], dims))
    env = {**dims, "grid_total": groups, "grid_stride_x": groups}
    block = bytearray(entry["uniforms"]["size"])
    for f in entry["uniforms"]["fields"]:
        value = manifest_schema.evaluate(f["value"], env)
        struct.pack_into({"u32": "<I", "i32": "<i", "f32": "<f"}[f["type"]], block, f["offset"],
                         int(value) if f["type"] != "f32" else value)
    pipeline = _auto_pipeline(device, entry, program)
    bufs, entries = {}, []
    for b in entry["bindings"]:
        data = bytes(block) if b["kind"] == "uniform" else np.ascontiguousarray(arrays[b["name"]]).tobytes()
        flags = usage.UNIFORM if b["kind"] == "uniform" else usage.STORAGE | usage.COPY_SRC
        bufs[b["name"]] = gpu.create_buffer_with_data(data=data, usage=flags)
        entries.append({"binding": b["binding"], "resource": {"buffer": bufs[b["name"]]}})
    group = gpu.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
    enc = gpu.create_command_encoder()
    cpass = enc.begin_compute_pass()
    cpass.set_pipeline(pipeline)
    cpass.set_bind_group(0, group)
    cpass.dispatch_workgroups(groups, 1, 1)
    cpass.end()
    gpu.queue.submit([enc.finish()])
    return {b["name"]: bytes(gpu.queue.read_buffer(bufs[b["name"]])) for b in entry["bindings"]
            if b.get("access") == "read_write"}


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_the_paged_kernels_manifest_stores_write_its_pools(spec, tmp_path, require_adapters):
    """`attnc compile` of the paged kernel over quantized pools lists the paged store kernels
    (single and pair), and a runtime that knows only the manifest appends rows through the block
    table with them: every word of the pools as attnc.quant quantizes each row, positions the
    table row does not hold left alone."""
    import numpy as np

    from attnc import quant
    from tests.runtime.test_store import _paged_by_hand

    (dev,) = require_adapters(spec)
    m = _compile(tmp_path, "attnc.kernels.flash:paged_flash_attention", "--set", "k_dtype=q8_0",
                 "--set", "v_dtype=int8", "--set", "kv_lens=true")
    stores = {(s["name"], s.get("format") or (s["formats"]["k"], s["formats"]["v"])): s for s in m["stores"]}
    assert set(stores) == {("kv_store_paged", "q8_0"), ("kv_store_paged", "int8"),
                           ("kv_store_pair_paged", ("q8_0", "int8"))}
    rng = np.random.default_rng(5)
    B, H, N, P, NB, NP, D, DV = 2, 2, 3, 4, 3, 7, 32, 64
    table = rng.permutation(NP)[:B * NB].reshape(B, NB).astype(np.int32)
    pos, counts = np.array([2, NB * P - 2], np.int32), np.array([3, 3], np.int32)  # entry 1: one row past the table
    k, v = (rng.standard_normal((B, H, N, w)).astype(np.float32) for w in (D, DV))
    k_pool, v_pool = (quant.quantize(rng.standard_normal((NP, H, P, w)).astype(np.float32), f)
                      for w, f in ((D, "q8_0"), (DV, "int8")))
    held = np.array([3, 2], np.int32)
    dims = dict(B=B, H=H, N=N, P=P, NB=NB, NP=NP, D=D, DV=DV)
    rows = dict(pos=pos, counts=counts, table=table)
    for (name, fmt), entry in stores.items():
        program = _program(entry, tmp_path, entry["file"])
        if name == "kv_store_pair_paged":
            got = run_store_entry(dev, entry, program, {**rows, "k": k, "v": v, "k_cache": k_pool.words,
                                                      "v_cache": v_pool.words}, dims)
            pairs = [("k_cache", k_pool, k), ("v_cache", v_pool, v)]
        else:
            pool, x = (k_pool, k) if fmt == "q8_0" else (v_pool, v)
            got = run_store_entry(dev, entry, program, {**rows, "x": x, "cache": pool.words}, {**dims, "D": x.shape[3]})
            pairs = [("cache", pool, x)]
        for tensor, pool, x in pairs:
            want = _paged_by_hand(pool, x, pos, held, table)
            np.testing.assert_array_equal(np.frombuffer(got[tensor], np.uint32), want.words, err_msg=f"{name} {tensor}")
