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
]
DIALECT_SPECS = {"tint": "dawn:vulkan", "naga": "wgpu:vulkan"}  # a device whose compiler is each dialect's


def _program(entry: dict, outdir: Path, file: str) -> Program:
    """The Program of a manifest program entry with the WGSL of `file`."""
    binds = tuple(Binding(b["name"], b["binding"], Access.UNIFORM if b["kind"] == "uniform"
                          else Access(b["access"]), Scalar.U32) for b in entry["bindings"])
    fields = tuple(UniformField(f["name"], f["offset"], Scalar(f["type"])) for f in entry["uniforms"]["fields"])
    return Program(entry["name"], (outdir / file).read_text(), entry["entry_point"], entry["workgroup_size"][0],
                   binds, fields, (entry["workgroups"],), frozenset(), entry["workgroup_storage_bytes"],
                   entry.get("in_bounds", False))


def check_dialect_files(manifest: dict, outdir: Path, devices: dict) -> int:
    """Create every file of every program as a compute pipeline on the device of the dialect
    its `dialect_files` entry names (`devices`: dialect -> Device); a rejected file raises
    LoweringError (dispatch.compile_program). Returns the number of pipelines created."""
    from attnc.runtime.dispatch import compile_program

    n = 0
    for v in manifest["variants"]:
        for entry in v["programs"]:
            for dialect, file in entry["dialect_files"].items():
                compile_program(devices[dialect], _program(entry, outdir, file))
                n += 1
    return n


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
def test_every_file_is_accepted_by_the_compiler_its_entry_names(compiled, dialect_devices):
    n = sum(check_dialect_files(m, d, dialect_devices) for _name, d, m in compiled)
    # every example/option set: 4 variants of at least one program, the portable ones' shared
    # file created on both compilers, the subgroups ones' two files each on its own
    assert n >= 8 * (len(EXAMPLES) + len(DSL_SETS) + 1)


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
