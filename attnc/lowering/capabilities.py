"""What planning may know about a device: adapter kind, WGSL dialect, subgroup facts, limits.

The runtime measures these on a real adapter (`Device.capabilities`); tests and tools build
them by hand to plan for devices they do not have. Planning reads nothing else, so the same
facts always give the same plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from attnc.lowering.plan import DEFAULT_LIMITS, Dialect


@dataclass(frozen=True)
class Capabilities:
    """A device's facts as the planner reads them.

    cpu: a CPU adapter (lavapipe, llvmpipe, SwiftShader): no clocks to fill, slow shader
    compiles, different tile shapes pay. features: attnc's normalized names ("subgroups",
    "f16", "timestamps"). subgroup_size: the size a probe shader measured (None without
    subgroups); subgroup_min_size: the smallest the adapter reports; subgroup_lanes_contiguous:
    the widest aligned group of lanes the probe found in one subgroup in invocation order.
    limits: the limits the device was created with (WebGPU's defaults where one is missing).
    """

    cpu: bool
    dialect: Dialect
    features: frozenset[str] = frozenset()
    subgroup_size: int | None = None
    subgroup_min_size: int | None = None
    subgroup_lanes_contiguous: int = 0
    limits: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)
    name: str = "device"

    def limit(self, name: str) -> int:
        """A limit the device grants, or WebGPU's default for it."""
        if name in self.limits:
            return int(self.limits[name])
        return int(DEFAULT_LIMITS[name])
