"""The lanes strategy's value reads stay in their row where Dv is narrower than the value chunk.

A lane reads its chunk's vec4s of V; those past Dv are never stored, so a read past the row
shows nowhere in o: only the bounds sanitizer sees it, at the last key of the last (b, h) row,
where the next row's memory ends. Per vec4 reads (f32 V, per-row int8 V, and a block format
whose chunk is not whole blocks) clamp to the row's last vec4; these cases hold V rows of 1
to 8 vec4s under chunks of 4 to 16, with T of 1 (one key, the last) and 33 (a tile and one)."""

from __future__ import annotations

import pytest

from attnc.lowering.plan import Family, Plan, Strategy
from tests.forced_plan import check_forced_plan, dialect


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize(("v_format", "Dv", "VC"), [(None, 4, 16), ("int8", 32, 64), ("int8", 4, 16),
                                                   ("q8_0", 32, 48)])
@pytest.mark.parametrize("T", [1, 33])
def test_value_reads_narrower_than_the_chunk_stay_in_the_row(v_format, Dv, VC, T, require_adapters,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("ATTNC_SANITIZE", "bounds")
    (dev,) = require_adapters("wgpu:vulkan")
    plan = Plan(Family.SUBGROUPS, strategy=Strategy.LANES, rows_per_invocation=1, subgroup_width=dev.subgroup_size,
                query_dim=32, value_columns=VC, vector_width=4, dialect=dialect(dev))
    dims = dict(B=2, Hq=2, Hkv=1, S=2, T=T, D=32, Dv=Dv)
    check_forced_plan(dev, dims, plan, {"BM": max(8, dev.subgroup_size), "BN": 32}, None, {}, seed=T,
                      kv_formats=(None, v_format))
