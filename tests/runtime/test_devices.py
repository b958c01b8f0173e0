"""Devices, subgroup-size probe, pipelines and dispatch on the real adapters of the test machine."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from attnc.errors import DeviceError, LoweringError
from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.runtime.devices import Device, default_device, devices, get_device
from attnc.runtime.dispatch import (
    Dispatch,
    DispatchError,
    empty,
    fold_grid,
    readback,
    run,
    upload,
)
from tests.targets import LP_SUBGROUP_SIZES

pytestmark = pytest.mark.gpu

ADD_WGSL = """\
struct Params { n: u32, alpha: f32, shift: i32, grid_total: u32, grid_stride_x: u32 }

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * params.grid_stride_x;
    if (group >= params.grid_total) {
        return;
    }
    let i = group * 64u + lid;
    if (i < params.n) {
        out[i] = a[i] + params.alpha * b[i] + f32(params.shift);
    }
}
"""


def add_program(wgsl: str = ADD_WGSL) -> Program:
    """out = a + alpha * b + shift, one-dimensional over ceil(n / 64) workgroups."""
    fields = ("n", "alpha", "shift", "grid_total", "grid_stride_x")
    types = (Scalar.U32, Scalar.F32, Scalar.I32, Scalar.U32, Scalar.U32)
    return Program(
        name="add",
        wgsl=wgsl,
        entry_point="main",
        workgroup_size=64,
        bindings=(
            Binding("a", 0, Access.READ, Scalar.F32),
            Binding("b", 1, Access.READ, Scalar.F32),
            Binding("out", 2, Access.READ_WRITE, Scalar.F32),
            Binding("params", 3, Access.UNIFORM, Scalar.U32),
        ),
        uniforms=tuple(
            UniformField(f, 4 * i, t) for i, (f, t) in enumerate(zip(fields, types, strict=True))
        ),
        grid=("n / 64",),
        features=frozenset(),
        workgroup_storage_bytes=0,
    )


def test_devices_lists_the_expected_adapters(require_adapters) -> None:
    found = require_adapters()
    assert [d.spec for d in found] == ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]
    assert len({d.key for d in devices()}) == len(devices())
    for d in found:
        assert d.dialect == {"wgpu": "naga", "dawn": "tint"}[d.backend]
        assert d.features <= {"subgroups", "f16", "timestamps"}
        assert d.limits["max-compute-workgroups-per-dimension"] >= 65535
        assert (
            d.gpu.limits["max-compute-workgroup-storage-size"]
            == (d.limits["max-compute-workgroup-storage-size"])
        )
    vulkan = [d for d in found if d.api == "Vulkan"]
    assert all({"subgroups", "f16", "timestamps"} <= d.features for d in vulkan)
    opengl = [d for d in found if d.api == "OpenGL"]
    assert all("subgroups" not in d.features and d.subgroup_size is None for d in opengl)


def test_default_and_get_device(require_adapters) -> None:
    found = require_adapters("wgpu:vulkan", "wgpu:opengl", "dawn:vulkan")
    best = default_device()
    assert best.api != "OpenGL"  # a Vulkan adapter of the same type ranks first
    assert get_device(None) is best and get_device(best) is best
    assert get_device("dawn").backend == "dawn"
    assert get_device("WGPU:OpenGL") is found[1]
    with pytest.raises(DeviceError, match="available: wgpu:vulkan"):
        get_device("metal")


@pytest.mark.subgroup_sizes
def test_measured_subgroup_size_follows_env(require_adapters) -> None:
    width = os.environ.get("LP_NATIVE_VECTOR_WIDTH", "256")
    expected = LP_SUBGROUP_SIZES.get(width)
    if expected is None:
        pytest.skip(f"LP_NATIVE_VECTOR_WIDTH={width} has no known subgroup size")
    for d in require_adapters("wgpu:vulkan", "dawn:vulkan"):
        assert d.subgroup_size == expected, d
        assert d.subgroup_min_size <= d.subgroup_size <= d.subgroup_max_size


PROBE_SCRIPT = """\
import dataclasses
import json
from attnc.runtime.devices import devices
print(json.dumps({d.spec: d.subgroup_size for d in devices()}))
"""


@pytest.mark.parametrize("width", ["128", "512"])
def test_subgroup_size_probe_in_subprocess(width: str, missing_adapter) -> None:
    env = dict(os.environ, LP_NATIVE_VECTOR_WIDTH=width)
    done = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    for spec in ("wgpu:vulkan", "dawn:vulkan"):
        if spec not in sizes:
            missing_adapter(f"{spec} missing under LP_NATIVE_VECTOR_WIDTH={width}: {sizes}")
        assert sizes[spec] == LP_SUBGROUP_SIZES[width], (spec, sizes)


def test_fold_grid() -> None:
    assert fold_grid(0, 65535) == (0, 1, 1)
    assert fold_grid(65535, 65535) == (65535, 1, 1)
    assert fold_grid(70001, 65535) == (35001, 2, 1)
    for n in (65536, 131071, 1_000_003, 65535 * 65535):
        x, y, z = fold_grid(n, 65535)
        assert x <= 65535 and x * y >= n > x * (y - 1) and z == 1
    with pytest.raises(DispatchError):
        fold_grid(65535 * 65535 + 1, 65535)


def test_dispatch_folds_grid_and_times(device) -> None:
    groups = 70001  # > 65535: folded into (35001, 2); one workgroup past the end returns
    n = groups * 64 - 5
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
    bufs = {"a": upload(device, a), "b": upload(device, b), "out": empty(device, 4 * n)}
    program = add_program()
    step = Dispatch(program, bufs, {"n": n, "alpha": 0.5, "shift": -3}, groups)
    times = run(device, [step, step], timestamps=True)
    assert times is not None and len(times) == 2 and all(t > 0 for t in times), times
    np.testing.assert_allclose(readback(device, bufs["out"], np.float32, (n,)), a + 0.5 * b - 3)
    assert len(device.pipelines) >= 1
    cached = len(device.pipelines)
    assert run(device, [step]) is None
    assert len(device.pipelines) == cached


def test_compile_log_records_each_new_pipeline_once(device, tmp_path, monkeypatch) -> None:
    """ATTNC_COMPILE_LOG gets one JSON line per run that created pipelines, none for cached ones,
    with each program's workgroup barriers."""
    log = tmp_path / "compile.jsonl"
    monkeypatch.setenv("ATTNC_COMPILE_LOG", str(log))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "probe")
    bufs = {"a": upload(device, np.ones(64, np.float32)), "b": upload(device, np.ones(64, np.float32)),
            "out": empty(device, 4 * 64)}
    barriers = ADD_WGSL.replace("    let group", "    workgroupBarrier();\n    workgroupBarrier();\n    let group")
    program = add_program(barriers)  # a key no other test compiled
    step = Dispatch(program, bufs, {"n": 64, "alpha": 1.0, "shift": 0}, 1)
    run(device, [step])
    run(device, [step])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 1 and records[0]["programs"] == ["add"] and records[0]["barriers"] == [2], records
    assert records[0]["device"] == device.spec and records[0]["test"] == "probe"
    assert records[0]["first_run_s"] >= 0 and records[0]["create_s"] >= 0


def test_upload_pads_and_round_trips(device) -> None:
    for array in (np.arange(3, dtype=np.float16), np.arange(5, dtype=np.int32).reshape(1, 5)):
        buffer = upload(device, array)
        assert buffer.size % 4 == 0 and buffer.size >= array.nbytes
        np.testing.assert_array_equal(readback(device, buffer, array.dtype, array.shape), array)
    with pytest.raises(DispatchError, match="cannot upload dtype float64"):
        upload(device, np.zeros(2))


def test_read_aliasing_is_allowed_and_write_aliasing_raises(device) -> None:
    x = upload(device, np.ones(64, np.float32))
    out = empty(device, 256)
    program = add_program()
    run(
        device, [Dispatch(program, {"a": x, "b": x, "out": out}, {"n": 64, "alpha": 1, "shift": 0})]
    )
    np.testing.assert_array_equal(readback(device, out, np.float32, (64,)), np.full(64, 2.0))
    with pytest.raises(DispatchError, match="'a' and 'out'"):
        run(
            device,
            [Dispatch(program, {"a": out, "b": x, "out": out}, {"n": 64, "alpha": 1, "shift": 0})],
        )


def test_dispatch_argument_errors(device) -> None:
    x = upload(device, np.ones(64, np.float32))
    program = add_program()
    values = {"n": 64, "alpha": 1, "shift": 0}
    with pytest.raises(DispatchError, match=r"missing \['out'\]"):
        run(device, [Dispatch(program, {"a": x, "b": x}, values)])
    bufs = {"a": x, "b": x, "out": empty(device, 256)}
    with pytest.raises(DispatchError, match="unknown uniform"):
        run(device, [Dispatch(program, bufs, {**values, "m": 1})])
    with pytest.raises(DispatchError, match="set by the runtime"):
        run(device, [Dispatch(program, bufs, {**values, "grid_total": 1})])
    with pytest.raises(DispatchError, match="no value for uniform 'shift'"):
        run(device, [Dispatch(program, bufs, {"n": 64, "alpha": 1})])


@pytest.mark.parametrize(
    ("bad_line", "line"),
    [
        ("    let i = group * 64u + lid +;", 14),  # parse error
        ("    let i: f32 = group * 64u + lid;", 14),  # type error
    ],
)
@pytest.mark.parametrize("in_bounds", [False, True])
def test_invalid_wgsl_raises_lowering_error(device, bad_line: str, line: int, in_bounds: bool) -> None:
    """Also through wgpu-native's trusted module (an `in_bounds` program, no runtime checks)."""
    lines = ADD_WGSL.splitlines()
    assert lines[line - 1].strip().startswith("let i =")
    lines[line - 1] = bad_line
    program = dataclasses.replace(add_program("\n".join(lines) + "\n"), in_bounds=in_bounds)
    x = upload(device, np.ones(64, np.float32))
    bufs = {"a": x, "b": x, "out": empty(device, 256)}
    with pytest.raises(LoweringError) as info:
        run(device, [Dispatch(program, bufs, {"n": 64, "alpha": 1, "shift": 0})])
    err = info.value
    assert f"{device.dialect} rejected the WGSL of 'add'" in err.message
    assert err.span is not None and err.span.line == line, err.render()
    assert bad_line.strip() in err.render()


def test_program_needing_a_missing_feature_raises(require_adapters) -> None:
    (gl,) = require_adapters("wgpu:opengl")
    program = add_program()
    needs_f16 = dataclasses.replace(program, features=frozenset({"f16"}))
    with pytest.raises(DeviceError, match="needs \\['f16'\\]"):
        run(gl, [Dispatch(needs_f16, {}, {})])


@pytest.mark.gpu
@pytest.mark.subgroup_sizes
def test_subgroup_lanes_are_contiguous_where_subgroups_are_offered(require_adapters) -> None:
    """The probe's xor-shuffle check: every lane group up to the subgroup size (at most 32)
    maps local_invocation_index onto one subgroup in order, as the subgroups family assumes."""
    for dev in require_adapters("wgpu:vulkan", "dawn:vulkan"):
        assert dev.subgroup_lanes_contiguous == min(dev.subgroup_size, 32), dev
    (gl,) = require_adapters("wgpu:opengl")
    assert gl.subgroup_lanes_contiguous == 0


def _probed_device(probe: tuple[int, int] | None) -> Device:
    """A Device of a fake Vulkan adapter whose subgroup probe returned `probe` (size, bad bits);
    None: an adapter without subgroups. Nothing is requested of a GPU."""
    import types

    features = {"subgroup", "shader-f16"} if probe is not None else {"shader-f16"}
    adapter = types.SimpleNamespace(info={"backend_type": "Vulkan", "adapter_type": "DiscreteGPU", "device": "Fake",
                                          "subgroup_min_size": 4, "subgroup_max_size": 128},
                                    features=features, limits={})
    dev = Device("wgpu", None, adapter)
    if probe is not None:
        dev.__dict__["_subgroup_probe"] = probe  # what the cached probe would hold
    return dev


@pytest.mark.parametrize(("size", "bad", "lanes"), [
    (32, 0, 32), (64, 0, 32), (128, 0, 32), (16, 0, 16), (8, 0, 8), (4, 0, 4),  # all good: the size, at most 32
    (32, 1, 1), (32, 2, 2), (32, 4, 4), (32, 8, 8), (32, 16, 16),  # the first bad bit bounds the group
    (32, 0b10100, 4), (32, 0b11111, 1), (32, 0b11000, 8), (64, 32, 32), (64, 0b100000 | 16, 16),
    (8, 8, 8), (8, 16 | 8, 8), (16, 0b10000, 16), (4, 0b11100, 4),  # bits past the size do not matter
])
def test_contiguous_lanes_follow_the_probes_bad_bits(size: int, bad: int, lanes: int) -> None:
    """subgroup_lanes_contiguous is the largest aligned lane group (up to min(size, 32)) below the
    probe's first bad xor bit: an adapter whose xor-shuffles by 4 lanes leave the subgroup (bit 4)
    has 4, so that plans needing 8 or more contiguous lanes per key are refused on it (taken as
    min(size, 32) regardless, they would write NaN). No subgroups: 0, and no probe runs."""
    dev = _probed_device((size, bad))
    assert dev.subgroup_size == size
    assert dev.subgroup_lanes_contiguous == lanes
    plain = _probed_device(None)
    assert plain.subgroup_lanes_contiguous == 0 and plain.subgroup_size is None
    assert "_subgroup_probe" not in plain.__dict__


def test_naga_checks_are_off_for_in_bounds_programs_only(require_adapters, monkeypatch) -> None:
    """attnc's kernels (`in_bounds`) get wgpu-native's trusted module without runtime checks;
    any other program keeps the default module; Dawn is never asked; ATTNC_NAGA_CHECKS sets the
    checks of every program."""
    from attnc.runtime.dispatch import naga_checks

    wg, dawn = require_adapters("wgpu:vulkan", "dawn:vulkan")
    plain = add_program()
    ours = dataclasses.replace(plain, in_bounds=True)
    monkeypatch.delenv("ATTNC_NAGA_CHECKS", raising=False)
    assert (naga_checks(wg, ours), naga_checks(wg, plain), naga_checks(dawn, ours)) == ((), None, None)
    monkeypatch.setenv("ATTNC_NAGA_CHECKS", "loops,bounds")
    assert naga_checks(wg, ours) == naga_checks(wg, plain) == ("bounds", "loops")
    monkeypatch.setenv("ATTNC_NAGA_CHECKS", "none")
    assert naga_checks(wg, plain) == () and naga_checks(dawn, plain) is None
    keys = []
    for value in ("none", "", "bounds", "bounds,loops"):
        monkeypatch.setenv("ATTNC_NAGA_CHECKS", value)
        keys.append(wg.pipelines.key(wg, ours))
    assert keys[0] == keys[1] and len(set(keys)) == 3  # a pipeline per set of checks


def test_naga_runtime_checks_knob_keeps_the_bits(require_adapters, monkeypatch) -> None:
    """ATTNC_NAGA_CHECKS (which runtime checks Naga inserts; attnc's kernels default to none)
    compiles its own pipelines and gives the same bits as without the checks; a name it does
    not know is refused."""
    import attnc

    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 70, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 90, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 90, 32)).astype(np.float32)
    ref = attnc.attention(q, k, v, causal=True, device=dev)
    before = len(dev.pipelines)
    for checks in ("bounds,loops", "loops", "none"):
        monkeypatch.setenv("ATTNC_NAGA_CHECKS", checks)
        np.testing.assert_array_equal(attnc.attention(q, k, v, causal=True, device=dev), ref)
    assert len(dev.pipelines) > before  # compiled again, not served from the cache
    monkeypatch.setenv("ATTNC_NAGA_CHECKS", "bounds,fast")
    monkeypatch.setattr(dev, "pipelines", type(dev.pipelines)())
    with pytest.raises(ValueError, match="ATTNC_NAGA_CHECKS"):
        attnc.attention(q, k, v, device=dev)


# --------------------------------------------------------------------------- unusable adapters
class _Queue:
    """A queue that drops what is submitted: what a silently lost device does."""

    def __init__(self, real):
        self._real = real

    def submit(self, buffers) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._real, name)


class _GPU:
    """A real GPUDevice that fails the way `fail` says."""

    def __init__(self, real, fail: str):
        self._real, self._fail = real, fail

    def create_compute_pipeline(self, **kw):
        if self._fail == "pipeline":
            raise RuntimeError("indirect-validation error: ComputePipeline(Internal(\"The selected version doesn't "
                               "support Features(BUFFER_STORAGE | COMPUTE_SHADER)\"))")
        return self._real.create_compute_pipeline(**kw)

    @property
    def queue(self):
        return _Queue(self._real.queue) if self._fail == "lost" else self._real.queue

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Adapter:
    """A real adapter that says it is another one and fails as told: at the device request (what
    wgpu-native's GL backend does on a GL version without compute shaders), at pipeline
    creation, or by losing the work; "ok" does not fail."""

    def __init__(self, real, fail: str, **info):
        self._real, self._fail = real, fail
        self.info = {**dict(real.info), **info}
        self.features, self.limits = real.features, real.limits
        self.requests = 0

    def request_device_sync(self, **kw):
        self.requests += 1
        if self._fail == "request":
            raise RuntimeError("Request device failed: Parent device is lost")
        return _GPU(self._real.request_device_sync(**kw), self._fail)


def _fake_devices(wgpu_module):
    """Adapters of wgpu-native that fail in each way, discrete or integrated GPUs (ranked first)."""

    def vulkan():  # a fresh adapter for each (an adapter gives one device)
        return next(a for a in wgpu_module.gpu.enumerate_adapters_sync() if a.info.get("backend_type") == "Vulkan")

    return [Device("wgpu", wgpu_module, _Adapter(vulkan(), "request", adapter_type="DiscreteGPU", device="Fake GPU A")),
            Device("wgpu", wgpu_module, _Adapter(vulkan(), "pipeline", adapter_type="DiscreteGPU", device="Fake GPU B",
                                                 backend_type="OpenGL")),
            Device("wgpu", wgpu_module, _Adapter(vulkan(), "lost", adapter_type="IntegratedGPU", device="Fake GPU C",
                                                 backend_type="Metal"))]


def test_adapters_attnc_cannot_run_on_are_not_listed_and_say_why(require_adapters, monkeypatch, capsys) -> None:
    """A device request that fails, a pipeline that cannot be created, work that is lost: those
    adapters are left out of devices(), never the default, a DeviceError with the reason when
    asked for, and `attnc devices` shows them with it. Each is checked once."""
    from attnc import cli
    from attnc.runtime import devices as devmod

    real = require_adapters()
    assert all(d.unusable is None for d in real)
    fakes = _fake_devices(real[0].wgpu)
    monkeypatch.setattr(devmod, "_enumerate", lambda: tuple(fakes + real))
    assert devices() == real
    assert devices(include_unusable=True) == fakes + real
    reasons = [d.unusable for d in fakes]
    assert "Parent device is lost" in reasons[0]
    assert "COMPUTE_SHADER" in reasons[1]
    assert "wrong values" in reasons[2]
    assert default_device() in real
    with pytest.raises(DeviceError, match="wrote wrong values"):
        get_device("wgpu:metal")  # (fake C, the only one of its kind)
    with pytest.raises(DeviceError, match="COMPUTE_SHADER"):
        get_device(fakes[1])  # the Device itself
    assert get_device("wgpu:opengl") is real[1]  # the spec: the usable adapter of that kind
    assert [d.adapter.requests for d in fakes] == [1, 1, 1]  # each checked once
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    for d in fakes:
        assert d.name in out and d.unusable in out
    assert out.count("unusable:") == 3


def test_no_usable_adapter_is_a_device_error_with_the_reasons(require_adapters, monkeypatch) -> None:
    from attnc.runtime import devices as devmod

    real = require_adapters("wgpu:vulkan")
    fakes = _fake_devices(real[0].wgpu)
    monkeypatch.setattr(devmod, "_enumerate", lambda: tuple(fakes))
    assert devices() == []
    with pytest.raises(DeviceError, match="no usable WebGPU adapter") as err:
        default_device()
    assert all(d.unusable in "\n".join(err.value.notes) for d in fakes)
    with pytest.raises(DeviceError, match="Parent device is lost"):
        get_device("wgpu:vulkan")
