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


@pytest.mark.gpu
def test_readme_quantized_cache_example_runs(require_adapters) -> None:
    """The second Python block (a quantized KV cache) continues the first one's q, k, v."""
    import numpy as np

    from attnc import quant
    from tests.textbook import assert_close, attention_ref

    require_adapters("wgpu:vulkan", "dawn:vulkan")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    scope: dict = {}
    for block in blocks[:2]:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    k, v = quant.dequantize(scope["kc"])[:, :, :128], quant.dequantize(scope["vc"])[:, :, :128]
    assert_close(scope["o"], attention_ref(scope["q"], k, v), 1e-5, "o")
    assert np.array_equal(k, quant.dequantize(quant.quantize(scope["k"], "q8_0")))
