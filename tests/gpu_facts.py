"""The adapter facts the GPU heuristics read (`api.plan_for`, `split_count`, ...), as the H200
reports them (docs/BENCHMARKS.md), for tests of the GPU plans on machines without that GPU."""

from __future__ import annotations

import types

H200 = dict(adapter_type="DiscreteGPU", dialect="naga", subgroup_min_size=4, subgroup_size=32,
            subgroup_lanes_contiguous=32, features=frozenset({"subgroups", "timestamps"}),
            gpu=types.SimpleNamespace(limits={"max-compute-workgroup-storage-size": 49152,
                                              "max-compute-invocations-per-workgroup": 1024}))


def h200_like(**changed: object) -> types.SimpleNamespace:
    """The H200's facts with some changed, e.g. `dialect="tint"` (Dawn) or `adapter_type="CPU"`."""
    return types.SimpleNamespace(**{**H200, **changed})
