"""The adapter facts the GPU heuristics read (lowering/schedule.py), as the H200 reports them
(docs/BENCHMARKS.md), for tests of the GPU plans on machines without that GPU."""

from __future__ import annotations

from typing import Any

from attnc.lowering.capabilities import Capabilities
from attnc.lowering.plan import Dialect

H200: dict[str, Any] = dict(adapter_type="DiscreteGPU", dialect="naga", subgroup_min_size=4, subgroup_size=32,
                            subgroup_lanes_contiguous=32, features=frozenset({"subgroups", "timestamps"}),
                            limits={"max-compute-workgroup-storage-size": 49152,
                                    "max-compute-invocations-per-workgroup": 1024})


def h200_like(**changed: Any) -> Capabilities:
    """The H200's facts with some changed, e.g. `dialect="tint"` (Dawn) or `adapter_type="CPU"`."""
    facts = {**H200, **changed}
    return Capabilities(cpu=facts.pop("adapter_type") == "CPU", dialect=Dialect(facts.pop("dialect")),
                        name="H200-like device", **facts)
