"""Masks whose key bounds sit at the i32 limits or wrap around, through every strategy's key
range (tiled and stream: per query tile; rows and lanes: per row; split KV) on Naga and Tint:
a "no limit" sentinel of 2^31 - 1 (a constant, a table value, an i32 scalar) keeps every key,
and a row-dependent bound that wraps for some rows (the IR's integers wrap, docs/API.md) keeps
what its wrapped value says. The reference evaluates the masks with explicit i32 wrap-around."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import attnc
from attnc.ir.interp import wrap_i32
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime import api
from tests.forced_plan import dialect
from tests.textbook import assert_close, attention_ref

I32_MAX = 2**31 - 1
LIMIT = np.array([I32_MAX], dtype=np.int32)

# (plan, tunables, nsplit): small tiles, so that several query and key tiles are visited
PLANS = {
    "tiled": (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=32,
                   value_stage_columns=16, vector_width=4), {"BM": 16, "BN": 16}, None),
    "tiled-split": (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=32,
                         value_stage_columns=16, vector_width=4), {"BM": 16, "BN": 16}, 3),
    "rows": (Plan(Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=4, query_dim=32, value_columns=32,
                  vector_width=4), {"BM": 16, "BN": 16}, None),
    "lanes": (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, subgroup_width=8, query_dim=32,
                   value_columns=32, vector_width=4), {"BM": 8, "BN": 16}, None),
    "stream-split": (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=32, lanes_per_key=2,
                          keys_per_step=4, query_dim=32, value_columns=32, vector_width=4), {"BM": 4, "BN": 16}, 3),
}

# name: (mask_mod, its numpy meaning over rows i [S, 1] and keys j [1, T], S, T, inputs)
MASKS = {
    "sentinel-constant": (lambda b, h, qi, kj: kj <= I32_MAX, lambda i, j: j <= I32_MAX, 8, 40, None),
    "sentinel-reversed": (lambda b, h, qi, kj: attnc.and_masks(lambda *a: I32_MAX >= a[3], lambda *a: a[3] < I32_MAX)
                          (b, h, qi, kj), lambda i, j: j < I32_MAX, 8, 40, None),
    "sentinel-table": (lambda b, h, qi, kj: kj <= LIMIT[0], lambda i, j: j <= I32_MAX, 8, 40, None),
    "sentinel-scalar": (lambda b, h, qi, kj: kj <= attnc.scalar("lim", attnc.i32), lambda i, j: j <= I32_MAX, 8, 40,
                        {"lim": I32_MAX}),
    # rows 0-13 wrap to large positive bounds (every key masked), 14-35 keep every key, 36-39 none
    "wrapping-product": (lambda b, h, qi, kj: kj >= (qi - 35) * 100_000_000,
                         lambda i, j: j >= wrap_i32((i - 35) * 100_000_000), 40, 100, None),
    # rows 0-10 keep every key; from row 11 on the bound wraps to a negative one (none kept)
    "wrapping-sum": (lambda b, h, qi, kj: kj <= qi + (I32_MAX - 10),
                     lambda i, j: j <= wrap_i32(i + (I32_MAX - 10)), 64, 64, None),
}


# Naga (wgpu:vulkan) every mask; Tint too for the constant bounds, which its constant
# evaluation would refuse if they overflowed (the other masks' bounds are runtime values there)
CASES = [(n, st, spec) for n in MASKS for st in PLANS for spec in ("wgpu:vulkan", "dawn:vulkan")
         if spec == "wgpu:vulkan" or n in ("sentinel-constant", "sentinel-reversed")]


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "strategy", "spec"), CASES)
def test_key_bounds_at_the_i32_limits_match_the_reference(name, strategy, spec, require_adapters) -> None:
    dev = require_adapters(spec)[0]
    mask_mod, keep, S, T, inputs = MASKS[name]
    plan, tun, nsplit = PLANS[strategy]
    if plan.family is Family.SUBGROUPS:  # lanes at the device's subgroup size
        plan = dataclasses.replace(plan, dialect=dialect(dev), subgroup_width=dev.subgroup_size)
        tun = {**tun, "BM": max(tun["BM"], plan.rows_per_invocation * dev.subgroup_size)}
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 2, S, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, T, 32)).astype(np.float32) for _ in range(2))
    op = api.prepare_dims(dict(B=1, Hq=2, Hkv=2, S=S, T=T, D=32, Dv=32), mask_mod=mask_mod, device=dev, plan=plan,
                          tunables=tun, nsplit=nsplit, inputs=inputs, return_lse=True)
    assert op.plan.strategy is plan.strategy
    o, lse = op(q, k, v)
    kept = keep(np.arange(S)[:, None], np.arange(T)[None, :])
    ref_o, ref_lse = attention_ref(q, k, v, bias=np.where(kept, 0.0, -np.inf)[None, None], return_lse=True)
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")
