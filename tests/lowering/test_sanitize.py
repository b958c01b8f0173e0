"""The bounds sanitizer's rewrite (lowering/sanitize.py): which accesses it checks, and how."""

from __future__ import annotations

import re

import pytest

from attnc.errors import LoweringError
from attnc.lowering.program import Access, Binding, Program, Scalar
from attnc.lowering.sanitize import BUFFER, Site, instrument, record_words, violations

WGSL = """\
enable f16;
struct Params { n: u32, t_x: u32 }
@group(0) @binding(0) var<storage, read> t_x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;
var<workgroup> stage: array<array<f32, 3>, 16>;
fn ld(i: u32) -> f32 {
  return t_x[i >> 2u][i & 3u];  // t_x[comment] is not code
}
@compute @workgroup_size(16)
fn main(@builtin(local_invocation_index) lid: u32) {
  if (lid >= P.n) {
    return;
  }
  var acc: array<f32, 4>;
  let my_t_x = P.t_x;
  stage[lid][lid % 3u] = ld(lid) + f32(my_t_x);
  acc[u32(stage[lid][0])] = 1.0;
  out[lid] = acc[lid & 3u];
}
"""


def program(wgsl: str = WGSL) -> Program:
    binds = (Binding("x", 0, Access.READ, Scalar.F32), Binding("out", 1, Access.READ_WRITE, Scalar.F32),
             Binding("P", 2, Access.UNIFORM, Scalar.U32))
    return Program(name="p", wgsl=wgsl, entry_point="main", workgroup_size=16, bindings=binds,
                   uniforms=(), grid=(), features=frozenset(), workgroup_storage_bytes=0)


def test_every_array_and_vector_index_is_checked_with_its_length() -> None:
    """Storage (runtime-sized: arrayLength), workgroup, function-scope arrays and the vectors
    and arrays inside them; not struct fields, names that merely contain an array's name, or
    comments. Sites keep their line and column in the original WGSL."""
    out, sites = instrument(program())
    texts = [s.text for s in sites]
    assert sorted(texts) == sorted([
        "t_x[i >> 2u]", "t_x[i >> 2u][i & 3u]", "stage[lid]", "stage[lid][lid % 3u]",
        "stage[lid]", "stage[lid][0]", "acc[u32(stage[lid][0])]", "out[lid]", "acc[lid & 3u]"])
    assert "arrayLength(&t_x)" in out.wgsl and "16u" in out.wgsl and ", 3u," in out.wgsl
    assert "P.t_x" in out.wgsl and "my_t_x" in out.wgsl and "attnc_chk(u32(P" not in out.wgsl
    lines = WGSL.splitlines()
    for s in sites:
        assert lines[s.line - 1][s.column - 1:].startswith(s.text.split("[")[0] + "[")
    # every index is wrapped: no bare `[` left in the rewritten code outside the support lines
    body = out.wgsl.split("fn ld(", 1)[1]
    assert all(body[m.end():].startswith("attnc_chk(") for m in re.finditer(r"\[", body))


def test_record_binding_follows_the_others_and_the_entry_point_flushes_at_each_exit() -> None:
    out, sites = instrument(program())
    assert out.bindings[-1] == Binding(BUFFER, 3, Access.READ_WRITE, Scalar.U32)
    assert out.wgsl.startswith("enable f16;\n")  # directives stay first
    entry = out.wgsl.split("fn main(", 1)[1]
    assert entry.count("attnc_flush();") == 2  # the early return and the end
    assert "{ attnc_flush(); return; }" in entry
    assert record_words(sites) == 1 + 3 * len(sites)


def test_violations_reads_the_record() -> None:
    sites = (Site(1, 1, "a[i]"), Site(2, 5, "b[j]"))
    record = [7, 0, 0, 0, 1, 40, 32]
    assert violations(record, sites) == [(sites[1], 40, 32)]


def test_unbalanced_code_is_refused() -> None:
    with pytest.raises(LoweringError, match="unbalanced"):
        instrument(program(WGSL.replace("out[lid] =", "out[lid =")))
    with pytest.raises(LoweringError, match="no compute entry point"):
        instrument(program(WGSL.replace("fn main(", "fn other(")))
