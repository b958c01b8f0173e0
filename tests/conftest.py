"""Shared test helpers: the adapters the test machines provide, and the CI rule for missing ones.

Tests get them as fixtures (`require_adapters`, `missing_adapter`, `device`) rather than by
importing this module, which pytest loads as a conftest, not as a package module.
In CI (`CI=true`) a missing adapter is a failure, so a broken driver set-up cannot turn the
GPU suite into a row of skips; on a developer's machine it is a skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples (reproducible, and a red run
# can be replayed); local runs draw new examples every time, which is where bugs are found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
    settings.load_profile("ci")

# attention() follows a tuning cache when one exists; the tests run the heuristic variants
# whatever `attnc tune` stored on this machine (tests of the cache point it elsewhere); each
# test process (pytest-xdist workers too) makes its own and removes it when it exits
os.environ["ATTNC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-test-cache-")
atexit.register(shutil.rmtree, os.environ["ATTNC_CACHE_DIR"], ignore_errors=True)

if TYPE_CHECKING:
    from attnc.runtime.devices import Device

# what scripts/setup.sh provides on Debian bookworm: Mesa lavapipe (Vulkan) and llvmpipe (GL)
EXPECTED_ADAPTERS = ("wgpu:vulkan", "wgpu:opengl", "dawn:vulkan")


def in_ci() -> bool:
    """True when running under CI (`CI=true`), where missing adapters must fail the run."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def fail_or_skip(message: str) -> None:
    """Fail in CI, skip elsewhere: the one place that applies the CI rule."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing adapter is a failure)", pytrace=False)
    pytest.skip(message)


def find_adapters(*specs: str) -> list[Device]:
    """The devices for 'backend:api' specs (default: all expected); fail (CI) or skip if missing."""
    from attnc.runtime.devices import devices

    found = {d.spec: d for d in reversed(devices())}  # first enumerated wins per spec
    wanted = specs or EXPECTED_ADAPTERS
    missing = [s for s in wanted if s not in found]
    if missing:
        fail_or_skip(f"adapters {missing} not found; have {sorted(found)}")
    return [found[s] for s in wanted]


@pytest.fixture
def require_adapters() -> Callable[..., list[Device]]:
    """`require_adapters(*specs)`: the devices for 'backend:api' specs (default: all expected)."""
    return find_adapters


@pytest.fixture
def missing_adapter() -> Callable[[str], None]:
    """`missing_adapter(message)`: fail under CI=true, skip elsewhere."""
    return fail_or_skip


@pytest.fixture(params=EXPECTED_ADAPTERS)
def device(request: pytest.FixtureRequest) -> Device:
    """Each expected adapter in turn (CI rule applied)."""
    return find_adapters(request.param)[0]


@pytest.fixture
def target(request: pytest.FixtureRequest) -> tuple[Device, str]:
    """(device, family) for an indirect (spec, family) param of tests/targets.py; the CI rule
    for a missing one; on lavapipe, the subgroup size LP_NATIVE_VECTOR_WIDTH promises."""
    from tests.targets import expected_subgroup_size

    spec, family = request.param
    dev = find_adapters(spec)[0]
    if family == "subgroups":
        if "subgroups" not in dev.features:
            fail_or_skip(f"{spec} does not offer subgroups")
        want = expected_subgroup_size(dev)
        if want is not None:
            assert dev.subgroup_size == want, (
                f"{dev!r}: measured subgroup size {dev.subgroup_size}, expected {want} for "
                f"LP_NATIVE_VECTOR_WIDTH={os.environ.get('LP_NATIVE_VECTOR_WIDTH')}")
    return dev, family
