"""Every .wgsl that `attnc compile` writes is accepted by Naga (wgpu-native) and Tint (Dawn).

The programs are rebuilt from manifest.json alone (bindings, uniform layout), so this also
checks that the manifest carries what a runtime without attnc needs to create pipelines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnc.cli import main as cli
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField

ROOT = Path(__file__).resolve().parents[2]
# the .attn examples, and kernels whose mods read data of their own (a gather through an i32
# table into an f32 one, a bool mask four to a word, paged keys found through a page table)
EXAMPLES = sorted((ROOT / "examples").glob("*.attn")) + [
    ROOT / "examples" / "flex" / "attn" / f"{name}.attn" for name in ("t5_buckets", "bool_mask", "paged_kv")]
# DSL kernel option sets compiled through `module:kernel --set ...`
DSL_SETS = [
    [],
    ["causal=true", "kv_lens=true", "lse=true"],
    ["split=true", "sinks=true", "window=[4, null]", "softcap=true"],
    ["alibi=true", "bias=true", "BM=16", "BN=64"],
]


def _program(entry: dict, outdir: Path, naga: bool) -> Program:
    """A Program built from a manifest program entry; Naga gets the `enable subgroups;` line removed."""
    wgsl = (outdir / entry["file"]).read_text()
    if naga:
        wgsl = wgsl.replace("enable subgroups;\n", "")
    binds = tuple(Binding(b["name"], b["binding"], Access.UNIFORM if b["kind"] == "uniform"
                          else Access(b["access"]), Scalar.U32) for b in entry["bindings"])
    fields = tuple(UniformField(f["name"], f["offset"], Scalar(f["type"])) for f in entry["uniforms"]["fields"])
    return Program(entry["name"], wgsl, entry["entry_point"], entry["workgroup_size"][0], binds, fields,
                   (entry["workgroups"],), frozenset(), entry["workgroup_storage_bytes"],
                   entry.get("in_bounds", False))


def _compiled(tmp_path_factory) -> list[tuple[str, Path, dict]]:
    out = []
    for i, f in enumerate(EXAMPLES):
        d = tmp_path_factory.mktemp(f"ex{i}")
        assert cli(["compile", str(f), "-o", str(d)]) == 0
        out.append((f.name, d, json.loads((d / "manifest.json").read_text())))
    for i, sets in enumerate(DSL_SETS):
        d = tmp_path_factory.mktemp(f"dsl{i}")
        args = ["compile", "attnc.kernels.flash:flash_attention", "-o", str(d)]
        for s in sets:
            args += ["--set", s]
        assert cli(args) == 0
        out.append((" ".join(sets) or "flash_attention", d, json.loads((d / "manifest.json").read_text())))
    d = tmp_path_factory.mktemp("unrolled")  # the GPU loop shapes (lavapipe compiles UN=4 quickly enough)
    assert cli(["compile", "attnc.kernels.flash:flash_attention", "--set", "causal=true", "--unroll", "4",
                "--prefetch", "-o", str(d)]) == 0
    out.append(("unrolled, prefetched", d, json.loads((d / "manifest.json").read_text())))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compiled(tmp_path_factory)


def test_manifests_list_every_file(compiled):
    for _name, d, m in compiled:
        assert m["format"] == "attnc.manifest" and m["version"] == 1
        files = {p["file"] for v in m["variants"] for p in v["programs"]}
        assert files == {f.name for f in d.glob("*.wgsl")}
        # attnc's kernels say their shaders stay in bounds (tests/runtime/test_bounds.py)
        assert all(p["in_bounds"] is True for v in m["variants"] for p in v["programs"])
        for v in m["variants"]:
            lim = v["requires"]["limits"]
            if v["family"] == "portable":
                assert v["requires"]["features"] == []
                assert lim["maxComputeWorkgroupStorageSize"] <= 16384
                assert lim["maxComputeInvocationsPerWorkgroup"] <= 256


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_naga_and_tint_accept_every_wgsl(spec, compiled, require_adapters):
    from attnc.runtime.dispatch import compile_program

    (dev,) = require_adapters(spec)
    naga = dev.dialect == "naga"
    n = 0
    for _name, d, m in compiled:
        for v in m["variants"]:
            for entry in v["programs"]:
                compile_program(dev, _program(entry, d, naga))
                n += 1
    assert n >= 4 * (len(EXAMPLES) + len(DSL_SETS) + 1)
