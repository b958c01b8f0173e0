"""The (adapter, variant family) pairs the runtime tests run on, and lavapipe's subgroup sizes.

The `target` fixture (tests/conftest.py) turns one of these params into a device.
"""

from __future__ import annotations

import os

import pytest

# (adapter spec, variant family): every family each expected adapter offers
TARGETS = (
    ("wgpu:vulkan", "portable"),
    ("wgpu:vulkan", "subgroups"),
    ("wgpu:opengl", "portable"),
    ("dawn:vulkan", "portable"),
    ("dawn:vulkan", "subgroups"),
)
# lavapipe's subgroup size follows LP_NATIVE_VECTOR_WIDTH (unset: 256)
LP_SUBGROUP_SIZES = {"128": 4, "256": 8, "512": 16}


def targets(subgroup_sizes: bool = False) -> list:
    """The TARGETS as params; with `subgroup_sizes`, the subgroup ones are rerun per size."""
    return [pytest.param((spec, fam), id=f"{spec}-{fam}",
                         marks=[pytest.mark.subgroup_sizes] if subgroup_sizes and fam == "subgroups" else [])
            for spec, fam in TARGETS]


def spread(names: list[str], start: int = 0) -> list:
    """(target, name) params giving each name one target, round robin from TARGETS[start]: a
    catalogue of functions (each a new pipeline per target, seconds on a CPU adapter) meets every
    target without running every function on every one; argnames "target,name"."""
    out = []
    for i, name in enumerate(names):
        spec, fam = TARGETS[(start + i) % len(TARGETS)]
        out.append(pytest.param((spec, fam), name, id=f"{spec}-{fam}-{name}"))
    return out


def expected_subgroup_size(device) -> int | None:
    """The size lavapipe must report under this process's LP_NATIVE_VECTOR_WIDTH (None: not lavapipe)."""
    if "llvmpipe" not in device.name:
        return None
    width = os.environ.get("LP_NATIVE_VECTOR_WIDTH", "256").strip() or "256"
    if width not in LP_SUBGROUP_SIZES:
        pytest.skip(f"LP_NATIVE_VECTOR_WIDTH={width}: lavapipe reports a size its subgroups do not honour")
    return LP_SUBGROUP_SIZES[width]
