"""`exact_div` (wgsl_lib/helpers.wgsl), the division without an integer divide that finds an
int8 KV row's first word: against numpy on every adapter, for divisors with and without
trailing zeros, and multiples up to the top of u32."""

from __future__ import annotations

import numpy as np
import pytest

from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.lowering.shader import _helpers
from attnc.runtime.dispatch import Dispatch, empty, readback, run, upload

pytestmark = pytest.mark.gpu

DIV_WGSL = """
struct Params { n: u32, grid_total: u32, grid_stride_x: u32 }
@group(0) @binding(0) var<storage, read> xs: array<vec2<u32>>;
@group(0) @binding(1) var<storage, read_write> qs: array<u32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let i = (wid.x + wid.y * P.grid_stride_x) * 64u + lid;
  if (i < P.n) {
    qs[i] = exact_div(xs[i].x, xs[i].y);
  }
}
"""


def div_program() -> Program:
    """qs[i] = exact_div(x, n) for the pair (x, n) = xs[i], over the helpers every shader includes."""
    fields = tuple(UniformField(n, 4 * i, Scalar.U32) for i, n in enumerate(("n", "grid_total", "grid_stride_x")))
    binds = (Binding("xs", 0, Access.READ, Scalar.U32), Binding("qs", 1, Access.READ_WRITE, Scalar.U32),
             Binding("params", 2, Access.UNIFORM, Scalar.U32))
    return Program("exact_div", _helpers() + DIV_WGSL, "main", 64, binds, fields, (), frozenset(), 0, in_bounds=True)


def pairs() -> tuple[np.ndarray, np.ndarray]:
    """(x, n) with n in 1..1100 and 2^k, 3 * 2^k, odd primes up to 2^31; x = q * n for q from
    0 and 1 to the largest that fits u32, and random ones between."""
    rng = np.random.default_rng(0)
    ns = list(range(1, 1101)) + [2**k for k in range(32)] + [3 * 2**k for k in range(30)] + \
        [65537, 1000003, 2147483647, 4294967295]
    xs, ds = [], []
    for n in ns:
        top = (2**32 - 1) // n
        qs = {0, 1, top, top - 1, top // 2} | set(int(q) for q in rng.integers(0, top + 1, 6))
        for q in qs:
            if 0 <= q <= top:
                xs.append(q * n)
                ds.append(n)
    return np.array(xs, np.uint64), np.array(ds, np.uint64)


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"])
def test_exact_div_is_division_on_multiples(spec, require_adapters) -> None:
    (dev,) = require_adapters(spec)
    x, n = pairs()
    data = np.stack([x, n], axis=1).astype(np.uint32)
    out = empty(dev, 4 * len(x))
    run(dev, [Dispatch(div_program(), {"xs": upload(dev, data), "qs": out}, {"n": len(x)}, -(-len(x) // 64))])
    got = readback(dev, out, Scalar.U32, (len(x),))
    np.testing.assert_array_equal(got, (x // n).astype(np.uint32))
