"""docs/API.md's Python examples run as written, in order, in one scope (each block builds on
the ones before it), on the default adapter: the contract page checks what it claims."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "API.md"


@pytest.mark.gpu
def test_api_page_examples_run(require_adapters) -> None:
    require_adapters("wgpu:vulkan", "dawn:vulkan")
    text = API.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    scope: dict = {}
    ran = 0
    for block in blocks:
        try:
            code = compile(block, str(API), "exec")
        except SyntaxError:  # a signature, written with `*` and `...` as the page's notation
            assert "*," in block, f"a Python block of docs/API.md does not compile:\n{block}"
            continue
        exec(code, scope)  # noqa: S102 - our own documentation
        ran += 1
    assert ran >= 8 and "cache" in scope and "op" in scope
