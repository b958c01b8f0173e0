"""Query and key counts at every tile boundary, for the strategies whose workgroups bound the keys
of several rows at once (tiled, stream, lanes): the key range a tile visits comes from its first
and last rows (`Shader.tile_bounds`), and an off-by-one there drops or adds a key only where a
row's last key starts a new key tile, at (T - S) mod BN = 1 for a causal mask; with split-KV
the same holds at the splits' shares. The rows strategy (one row per invocation, KC keys a
step) joins them: its last step's keys past the row's bound are left out by the step's own
guard, which no mask covers when none is given. Shapes are runtime uniforms, so one pipeline
per plan serves every shape here."""

from __future__ import annotations

import itertools

import pytest

from attnc.lowering.plan import Family, Plan, Strategy
from tests.forced_plan import check_forced_plan, dialect

pytestmark = pytest.mark.gpu

BM, BN = 16, 16


def plans(dev) -> dict[str, tuple[Plan, dict[str, int]]]:
    """A small plan of each strategy (lanes only where the adapter has subgroups)."""
    out = {
        "tiled": (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=16,
                       value_stage_columns=16, vector_width=4), {"BM": BM, "BN": BN}),
        "stream": (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=64, lanes_per_key=2,
                        keys_per_step=1, query_dim=16, value_columns=16, vector_width=4), {"BM": 4, "BN": BN}),
    }
    # KC = 4 keys a step: T and the splits' shares end at every offset within a step below
    out["rows"] = (Plan(Family.PORTABLE, strategy=Strategy.ROWS, keys_per_step=4, query_dim=16, value_columns=16,
                        vector_width=4), {"BM": 8, "BN": BN})
    if dev.subgroup_size:
        out["lanes"] = (Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1,
                             subgroup_width=dev.subgroup_size, query_dim=16, value_columns=16, vector_width=4,
                             dialect=dialect(dev)),
                        {"BM": 4 * dev.subgroup_size, "BN": BN})
    return out


# rows: one, around a query tile's end; keys beyond the rows: around a key tile's end
ROWS = (1, BM - 1, BM + 1)
KEYS_PAST_ROWS = (-1, 0, 1, BN - 1, BN, BN + 1)
MASKS = {  # (each a pipeline per plan: compiling them is most of this test's time)
    "none": {},  # only T bounds the keys (no mask hides a key read past it)
    "causal-kv-lens": dict(causal=True, kv_lens="draw"),  # the upper bound from the tile's last row
    "window": dict(window=(3, 0)),  # a lower bound from the first row, an upper (kj <= q) from the last
}


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_masks_at_every_tile_boundary(require_adapters, spec, mask) -> None:
    dev = require_adapters(spec)[0]
    for name, (plan, tun) in plans(dev).items():
        for seed, (S, past, nsplit) in enumerate(itertools.product(ROWS, KEYS_PAST_ROWS, (None, 3))):
            T = S + past
            if T < 1:
                continue
            dims = dict(B=2, Hq=2, Hkv=1, S=S, T=T, D=16, Dv=16)
            try:
                check_forced_plan(dev, dims, plan, tun, nsplit, dict(MASKS[mask]), seed)
            except AssertionError as exc:
                raise AssertionError(f"{name} plan, S={S}, T={T}, {nsplit} splits: {exc}") from None
