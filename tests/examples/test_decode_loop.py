"""examples/decode_loop.py runs as written: 256 decode steps over growing KV caches on the
application's own device, every step checked against numpy inside the script; here also what
it measured: the bytes a step uploads are the new query and K/V rows, and nothing is created
after the first steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_decode_loop_example_runs(require_adapters, tmp_path) -> None:
    require_adapters("wgpu:vulkan")
    out = tmp_path / "decode.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "examples/decode_loop.py", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "summary: 256 steps" in r.stdout and "(application device 1" in r.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["max_relative_error"] <= 1e-5
    assert summary["bytes_uploaded_per_step"] == [summary["new_q_and_kv_bytes_per_step"]]
    assert summary["buffers_created_after_step_2"] == 0


@pytest.mark.gpu
def test_decode_loop_example_over_quantized_caches(require_adapters, tmp_path) -> None:
    """--kv-format: the same loop with K and V quantized on the GPU, checked against numpy over
    the rows as stored; nothing created after the first steps."""
    require_adapters("wgpu:vulkan")
    out = tmp_path / "decode_q8.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "examples/decode_loop.py", "--steps", "48", "--kv-format", "q8_0",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["kv_format"] == "q8_0" and summary["steps"] == 48
    assert summary["max_relative_error"] <= 1e-5
    assert summary["buffers_created_after_step_2"] == 0
