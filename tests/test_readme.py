"""The README's Python example runs as written (on the default adapter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.gpu
def test_readme_python_example_runs(require_adapters) -> None:
    require_adapters("wgpu:vulkan", "dawn:vulkan")
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no python example"
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["o"].shape == (1, 8, 128, 64) and scope["lse"].shape == (1, 8, 128)
