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


def expected_subgroup_size(device) -> int | None:
    """The size lavapipe must report under this process's LP_NATIVE_VECTOR_WIDTH (None: not lavapipe)."""
    if "llvmpipe" not in device.name:
        return None
    width = os.environ.get("LP_NATIVE_VECTOR_WIDTH", "256").strip() or "256"
    if width not in LP_SUBGROUP_SIZES:
        pytest.skip(f"LP_NATIVE_VECTOR_WIDTH={width}: lavapipe reports a size its subgroups do not honour")
    return LP_SUBGROUP_SIZES[width]
