"""Every examples/variants script runs and matches the reference; every .attn example parses back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnc.frontend.parser import parse_file
from attnc.ir.printer import print_kernel

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ROOT / "examples" / "variants"
SCRIPTS = sorted(p for p in VARIANTS.glob("*.py") if p.name != "common.py")
ATTN = sorted((ROOT / "examples").rglob("*.attn"))


@pytest.mark.gpu
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_variant_example_runs(script: Path, require_adapters) -> None:
    require_adapters("wgpu:vulkan")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, script.name], cwd=VARIANTS, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "relative error" in r.stdout


@pytest.mark.parametrize("path", ATTN, ids=[str(p.relative_to(ROOT)) for p in ATTN])
def test_attn_example_parses_and_round_trips(path: Path) -> None:
    k = parse_file(path)
    assert print_kernel(k) == print_kernel(parse_file(path))
    if path.parent.name == "attn":  # written by the printer: already canonical
        assert path.read_text() == print_kernel(k)


def test_every_variant_has_its_attn_text() -> None:
    written = {p.stem for p in (VARIANTS / "attn").glob("*.attn")}
    assert {s.stem for s in SCRIPTS} <= written
