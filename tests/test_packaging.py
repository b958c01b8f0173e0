"""What a plain `pip install attnc` user gets: metadata (licence, no test-only dependencies),
every module importable without the extras, and Dawn's absence explained by what to install."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
import attnc.runtime.devices as devices_mod
from attnc.cli import main
from attnc.errors import DeviceError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what the extras bring (import names); a plain install has none of them
EXTRA_MODULES = ("hypothesis", "pytest", "matplotlib", "tqdm", "wgpudawn", "onnx", "onnxruntime", "tinygrad",
                 "dawn", "safetensors", "tokenizers", "torch")


def _dist_name(requirement: str) -> str:
    """`hypothesis>=6.100` -> `hypothesis`."""
    for i, c in enumerate(requirement):
        if not (c.isalnum() or c in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


def test_runtime_dependencies_are_only_what_attnc_imports() -> None:
    """Each runtime dependency is imported by some module under attnc/ (else it belongs to an
    extra); hypothesis in particular is a test dependency."""
    imported: set[str] = set()
    for path in (ROOT / "attnc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    deps = [_dist_name(r) for r in PYPROJECT["project"]["dependencies"]]
    assert "hypothesis" not in deps and "hypothesis" not in imported
    assert "hypothesis" in [_dist_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]]
    for dist in deps:
        assert dist.replace("-", "_") in imported, f"runtime dependency {dist} is imported nowhere in attnc/"


def test_licence_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    # PEP 639 metadata needs setuptools 77 or later to build
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in PYPROJECT["build-system"]["requires"])


def test_every_module_imports_without_the_extras() -> None:
    """A plain install: importing any attnc module (and `attnc --help`) needs none of the extras."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for m in {EXTRA_MODULES!r}:\n"
        "    sys.modules[m] = None  # import raises ImportError, as when not installed\n"
        "import attnc\n"
        "names = [i.name for i in pkgutil.walk_packages(attnc.__path__, 'attnc.') if not i.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "from attnc.cli import main\n"
        "assert main(['check', sys.argv[1]]) == 0\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "flash_attention.attn")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 20


# ----------------------------------------------------------------------------- Dawn not installed


class _FakeDevice:
    """An adapter as cmd_devices and get_device read it (no GPU needed)."""

    def __init__(self, backend: str, api: str):
        self.backend, self.api, self.adapter_type, self.name = backend, api, "CPU", "fake"
        self.features = frozenset()
        self.subgroup_size = self.subgroup_min_size = self.subgroup_max_size = None
        self.limits: dict[str, int] = {}
        self.unusable: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.backend}:{self.api.lower()}"


@pytest.fixture
def wgpu_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """wgpudawn not importable; wgpu-native offers a Vulkan and an OpenGL adapter."""
    fakes = [_FakeDevice("wgpu", "Vulkan"), _FakeDevice("wgpu", "OpenGL")]
    monkeypatch.setitem(sys.modules, "wgpudawn", None)
    # (devices(), default_device() and get_device() all list adapters through _enumerate)
    monkeypatch.setattr(devices_mod, "_enumerate", lambda: tuple(fakes))
    return fakes


SPECS = st.tuples(st.sampled_from(["dawn", "Dawn", "DAWN", " dawn "]),
                  st.one_of(st.just(""), st.sampled_from(["vulkan", "Vulkan", "metal", "d3d12", "opengl"]),
                            st.text(st.characters(codec="ascii", categories=["L"]), max_size=6)))


@given(spec=SPECS)
@settings(max_examples=40, deadline=None)
def test_dawn_without_wgpudawn_says_what_to_install(spec: tuple[str, str]) -> None:
    backend, api = spec
    text = f"{backend}:{api}" if api else backend
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wgpudawn", None)
        mp.setattr(devices_mod, "_enumerate", lambda: (_FakeDevice("wgpu", "Vulkan"),))
        with pytest.raises(DeviceError) as e:
            devices_mod.get_device(text)
    msg = e.value.render()
    assert 'pip install "attnc[dawn]"' in msg and repr(text) in msg and "\n" not in msg


def test_attention_and_the_cli_name_the_dawn_extra(wgpu_only: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(DeviceError, match=r'pip install "attnc\[dawn\]"'):
        attnc.attention(q, q, q, device="dawn")
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "wgpu:vulkan" in out and 'dawn: not installed (pip install "attnc[dawn]")' in out


def test_other_missing_devices_keep_their_message(wgpu_only: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown backend, or Dawn installed without an adapter for the API, lists what exists."""
    with pytest.raises(DeviceError) as e:
        devices_mod.get_device("webgl")
    assert "attnc[dawn]" not in e.value.render() and "available: wgpu:vulkan" in e.value.render()
    monkeypatch.setitem(sys.modules, "wgpudawn", types.ModuleType("wgpudawn"))  # importable now
    with pytest.raises(DeviceError) as e:
        devices_mod.get_device("dawn:metal")
    assert "attnc[dawn]" not in e.value.render() and "available: wgpu:opengl" in e.value.render()
