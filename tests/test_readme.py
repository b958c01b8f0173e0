"""The README's Python examples run as written, in order (on the default adapter)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from attnc import quant
from tests.textbook import assert_close, attention_ref

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.gpu
def test_readme_python_example_runs(require_adapters) -> None:
    require_adapters("wgpu:vulkan", "dawn:vulkan")
    # the usage examples, then the DSL section's kernel (on the first example's q, k, v)
    usage, dsl = README.read_text().split("\n## A kernel in the DSL\n")
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) >= 3, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["o"].shape == (1, 8, 128, 64) and scope["lse"].shape == (1, 8, 128)
    # the second block (a quantized KV cache) continues the first one's q, k, v
    exec(compile(blocks[1], str(README), "exec"), scope)  # noqa: S102
    k, v = quant.dequantize(scope["kc"])[:, :, :128], quant.dequantize(scope["vc"])[:, :, :128]
    assert_close(scope["o"], attention_ref(scope["q"], k, v), 1e-5, "o")
    assert np.array_equal(k, quant.dequantize(quant.quantize(scope["k"], "q8_0")))
    for block in blocks[2:]:  # the later examples build on the first one's q, k, v
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102
    assert scope["o1"].shape == (1, 8, 1, 64) and scope["cache"].lengths.tolist() == [101]
    q1, k0, v0 = scope["q1"].numpy(), scope["k"][:, :, :101], scope["v"][:, :, :101]
    assert_close(scope["o2"].numpy(), attention_ref(q1, k0, v0, causal=True, kv_lens=np.array([101])), 1e-5, "o2")
    (kernel_block,) = re.findall(r"```python\n(.*?)```", dsl.split("\n## ")[0], re.S)
    exec(compile(kernel_block, str(README), "exec"), scope)  # noqa: S102
    assert_close(scope["o_dsl"], attention_ref(scope["q"], scope["k"], scope["v"], causal=True), 1e-5, "o_dsl")
