"""WebGPU adapters as attnc Devices: enumeration over wgpu-native and Dawn, ranking, and selection.

A `Device` wraps one adapter of one backend ("wgpu" = wgpu-py on wgpu-native, whose WGSL
compiler is Naga; "dawn" = wgpudawn, whose compiler is Tint). It normalizes the
capabilities attnc cares about (feature names differ per backend), creates its GPUDevice
lazily with those features and the larger limits requested, and measures the real subgroup
size once with a probe shader (adapters report only the range WebGPU allows, 4..128).

`Device.from_gpu_device` wraps a GPUDevice the application created instead: its features and
limits are what the application asked for (attnc requests nothing more), and planning picks
the variants that fit them.

Both modules load in one process side by side: each bundles its own native library
(wgpu-native resp. Dawn) with its own instance, and they share only the Vulkan loader and
driver, which supports several instances. Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
from types import ModuleType
from typing import Any

import numpy as np

from attnc.errors import DeviceError
from attnc.lowering.capabilities import Capabilities
from attnc.lowering.plan import Dialect
from attnc.lowering.program import Access, Binding, Program, Scalar
from attnc.runtime.dispatch import (
    Counters,
    Dispatch,
    PipelineCache,
    readback,
    run,
    track_backend_buffers,
    upload,
)
from attnc.runtime.locking import serialized

# backend name -> the Python module that speaks the wgpu-py API for it
BACKEND_MODULES = {"wgpu": "wgpu", "dawn": "wgpudawn"}
# backend name -> the module that defines its GPUDevice, GPUBuffer, ... classes
BACKEND_API_MODULES = {"wgpu": "wgpu.backends.wgpu_native._api", "dawn": "wgpudawn.backends.dawn._api"}
# a buffer destroyed before attnc saw its backend is still known as destroyed (see dispatch)
track_backend_buffers(list(BACKEND_API_MODULES.values()))
# what to install for a backend whose module does not import
BACKEND_INSTALL = {"wgpu": "pip install wgpu", "dawn": 'pip install "attnc[dawn]"'}
DIALECTS = {"wgpu": "naga", "dawn": "tint"}
_APPLICATION_DEVICES = itertools.count(1)  # numbers the application's GPUDevices attnc wraps

# backend feature spelling -> attnc's normalized feature name
FEATURE_NAMES = {
    "wgpu": {"subgroup": "subgroups", "shader-f16": "f16", "timestamp-query": "timestamps"},
    "dawn": {"subgroups": "subgroups", "shader-f16": "f16", "timestamp-query": "timestamps"},
}

# limits requested at the adapter's maximum (the defaults are far lower on most adapters)
RAISED_LIMITS = (
    "max-compute-workgroup-storage-size",
    "max-storage-buffer-binding-size",
    "max-buffer-size",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
    "max-storage-buffers-per-shader-stage",
)

ADAPTER_TYPE_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
NATIVE_APIS = frozenset({"Vulkan", "Metal", "D3D12"})

SETUP_HINT = (
    "install a software Vulkan driver (Mesa lavapipe) with `bash scripts/setup.sh`, which "
    "installs mesa-vulkan-drivers from bookworm-backports"
)


class Device:
    """One adapter of one backend, with normalized capabilities and a lazily created GPUDevice
    (or, from `from_gpu_device`, the application's own GPUDevice)."""

    def __init__(self, backend: str, module: ModuleType, adapter: Any, gpu_device: Any = None):
        info = dict(adapter.info) if adapter is not None else {}
        self.backend = backend
        self.wgpu = module  # the wgpu-py-compatible module (flags, enums, error classes)
        self.adapter = adapter
        self.info = info
        self.name = str(info.get("device", "")) or str(info.get("description", ""))
        self.api = str(info.get("backend_type", "Unknown"))
        self.adapter_type = str(info.get("adapter_type", "Unknown"))
        self.dialect = DIALECTS[backend]
        # external: the GPUDevice is the application's; its features and limits are what it
        # was created with, and attnc requests nothing
        self.external = gpu_device is not None
        # application devices numbered in the order attnc first saw them, so that two on one
        # adapter read apart in messages ("the tensor is on ... but q is on ...")
        self.application_index = next(_APPLICATION_DEVICES) if self.external else 0
        offered = set(gpu_device.features if self.external else adapter.features)
        spelling = FEATURE_NAMES[backend]
        self.features = frozenset(ours for theirs, ours in spelling.items() if theirs in offered)
        self.required_features = tuple(t for t in spelling if t in offered)
        self.limits = dict(gpu_device.limits if self.external else adapter.limits)
        has_sg = "subgroups" in self.features
        self.subgroup_min_size = _info_int(info, "subgroup_min_size") if has_sg else None
        self.subgroup_max_size = _info_int(info, "subgroup_max_size") if has_sg else None
        self.key = "|".join(
            [backend, self.api]
            + [str(info.get(k, "")) for k in ("vendor", "device", "description", "driver")]
        )
        self.pipelines = PipelineCache()
        self.counters = Counters()
        if self.external:
            self.__dict__["gpu"] = gpu_device  # what the cached property below would hold
            _BY_GPU_DEVICE[id(gpu_device)] = self

    @classmethod
    def from_gpu_device(cls, gpu_device: Any, adapter: Any = None) -> Device:
        """The attnc Device of an application's GPUDevice (wgpu-py or wgpudawn), created once
        per GPUDevice: attention runs on it with the features and limits it was created with.

        `adapter` (default: the device's own `.adapter`) only supplies names and the subgroup
        size range; features and limits always come from `gpu_device`."""
        found = _BY_GPU_DEVICE.get(id(gpu_device))
        if found is not None and found.gpu is gpu_device:
            return found
        backend = gpu_backend(gpu_device)
        if backend is None:
            raise DeviceError(f"device: expected a GPUDevice of wgpu-py or wgpudawn, got {type(gpu_device).__name__}")
        if adapter is None:
            adapter = getattr(gpu_device, "adapter", None)
        return cls(backend, importlib.import_module(BACKEND_MODULES[backend]), adapter, gpu_device)

    @functools.cached_property
    def gpu(self) -> Any:
        """The GPUDevice, requested once with attnc's features and the adapter's larger limits."""
        gpu = self._request_device()
        _BY_GPU_DEVICE[id(gpu)] = self
        return gpu

    def _request_device(self) -> Any:
        limits = {k: self.limits[k] for k in RAISED_LIMITS if k in self.limits}
        features = list(self.required_features)
        if self.backend == "dawn":
            # Dawn quantizes timestamps by default (a browser anti-fingerprinting measure),
            # which would make short kernels time as 0: turn that off for native use.
            extras = importlib.import_module("wgpudawn.backends.dawn.extras")
            # ATTNC_DAWN_TOGGLES="+name,-name": more Dawn device toggles, for measurements
            # only (e.g. what Tint's robustness clamps cost); attnc never needs one
            more = [t.strip() for t in os.environ.get("ATTNC_DAWN_TOGGLES", "").split(",") if t.strip()]
            return extras.request_device_sync(
                self.adapter,
                label="attnc",
                required_features=features,
                required_limits=limits,
                enable_toggles=[t[1:] for t in more if t.startswith("+")],
                disable_toggles=["timestamp_quantization"] + [t[1:] for t in more if t.startswith("-")],
            )
        return self.adapter.request_device_sync(
            label="attnc", required_features=features, required_limits=limits
        )

    @functools.cached_property
    def unusable(self) -> str | None:
        """Why attnc cannot run on this adapter, or None when it can: checked once per process
        (lazily) by creating its device and running a tiny compute pipeline, which some drivers
        list adapters for and then refuse (e.g. an OpenGL adapter whose GL version has no
        compute shaders: the device request fails or the device is lost). An application's
        own GPUDevice (`from_gpu_device`) is taken as it is: nothing is submitted to it."""
        if self.external:
            return None
        try:
            _probe_compute(self)
        except Exception as exc:  # whatever the backend raises, the adapter cannot serve attnc
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"{type(exc).__name__}: {first}"[:300]
        return None

    @functools.cached_property
    def subgroup_size(self) -> int | None:
        """The real subgroup size, measured once by a probe shader; None without subgroups."""
        return None if "subgroups" not in self.features else self._subgroup_probe[0]

    @functools.cached_property
    def subgroup_lanes_contiguous(self) -> int:
        """The largest aligned lane group (1, 2, 4 ... 32) whose xor-shuffles the probe found
        to stay inside one subgroup with lanes in local_invocation_index order (0: no subgroups)."""
        if "subgroups" not in self.features:
            return 0
        size, bad = self._subgroup_probe
        g = 1
        while g < min(size, 32) and not bad & g:
            g *= 2
        return g

    @functools.cached_property
    def _subgroup_probe(self) -> tuple[int, int]:
        return _probe_subgroups(self)

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        """What planning reads of this device (runs the subgroup probe once where it has subgroups)."""
        return Capabilities(
            cpu=self.adapter_type == "CPU", dialect=Dialect(self.dialect), features=self.features,
            subgroup_size=self.subgroup_size, subgroup_min_size=self.subgroup_min_size,
            subgroup_lanes_contiguous=self.subgroup_lanes_contiguous,
            limits=self.gpu.limits, name=repr(self))

    @functools.cached_property
    def timestamp_period(self) -> float:
        """Nanoseconds per timestamp tick (Dawn resolves to ns; wgpu-native reports raw ticks)."""
        if self.backend != "wgpu":
            return 1.0
        try:  # wgpu-py does not expose wgpuQueueGetTimestampPeriod; call it through its FFI
            ffi_mod = importlib.import_module("wgpu.backends.wgpu_native._ffi")
            return float(ffi_mod.lib.wgpuQueueGetTimestampPeriod(self.gpu.queue._internal))
        except (ImportError, AttributeError):
            return 1.0

    @property
    def spec(self) -> str:
        """The `backend:api` string `get_device` accepts for this device, e.g. `wgpu:vulkan`."""
        return f"{self.backend}:{self.api.lower()}"

    def __repr__(self) -> str:
        label = getattr(self.gpu, "label", "") if self.external else ""
        own = f" (application device {self.application_index}{f' {label!r}' if label else ''})" if self.external else ""
        return f"<Device {self.backend}:{self.api} {self.adapter_type} {self.name!r}{own}>"


# id(GPUDevice) -> its attnc Device (attnc's own and the wrapped ones); a Device holds its
# GPUDevice, so an id here is never reused by another object
_BY_GPU_DEVICE: dict[int, Device] = {}


def gpu_backend(obj: Any) -> str | None:
    """"wgpu" or "dawn" for a GPUDevice (or other GPU object) of that backend's module, else None."""
    module = type(obj).__module__
    for backend, name in BACKEND_MODULES.items():
        if module == name or module.startswith(name + "."):
            return backend
    return None



def _info_int(info: dict[str, Any], name: str) -> int | None:
    """Read an int from adapter info; wgpu-py 0.32 spells subgroup_* as 'stackgroup_*'."""
    value = info.get(name, info.get(name.replace("subgroup", "stackgroup")))
    return int(value) if value is not None else None


PROBE_WGSL = """\
@group(0) @binding(0) var<storage, read_write> out: array<atomic<u32>>;

// out[0]: the subgroup size; out[1]: bit k set when subgroupShuffleXor(lid, 1 << k) did not
// return lid ^ (1 << k) for some invocation, i.e. local_invocation_index does not map onto
// aligned groups of 2^(k+1) lanes of one subgroup (what the subgroups family relies on).
@compute @workgroup_size(256)
fn main(@builtin(subgroup_size) size: u32, @builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        atomicStore(&out[0], size);
    }
    var bad = 0u;
    bad = bad | select(0u, 1u, 1u < size && subgroupShuffleXor(lid, 1u) != (lid ^ 1u));
    bad = bad | select(0u, 2u, 2u < size && subgroupShuffleXor(lid, 2u) != (lid ^ 2u));
    bad = bad | select(0u, 4u, 4u < size && subgroupShuffleXor(lid, 4u) != (lid ^ 4u));
    bad = bad | select(0u, 8u, 8u < size && subgroupShuffleXor(lid, 8u) != (lid ^ 8u));
    bad = bad | select(0u, 16u, 16u < size && subgroupShuffleXor(lid, 16u) != (lid ^ 16u));
    atomicOr(&out[1], bad);
}
"""


def _probe_subgroups(device: Device) -> tuple[int, int]:
    """(subgroup size, bits of the xor-shuffle offsets that failed) from one probe dispatch."""
    enable = "enable subgroups;\n\n" if device.dialect == "tint" else ""
    program = Program(
        name="subgroup_size_probe",
        wgsl=enable + PROBE_WGSL,
        entry_point="main",
        workgroup_size=256,
        bindings=(Binding("out", 0, Access.READ_WRITE, Scalar.U32),),
        uniforms=(),
        grid=(),
        features=frozenset({"subgroups"}),
        workgroup_storage_bytes=0,
    )
    out = upload(device, np.zeros(2, np.uint32))
    run(device, [Dispatch(program, {"out": out}, {}, 1)])
    size, bad = (int(x) for x in readback(device, out, Scalar.U32, (2,)))
    return size, bad


COMPUTE_PROBE_WGSL = """\
@group(0) @binding(0) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    out[lid] = lid * 3u + 1u;
}
"""


def _probe_compute(device: Device) -> None:
    """Create the device, compile a compute pipeline, run it and check what it wrote; raise if
    any of it fails."""
    program = Program(name="compute_probe", wgsl=COMPUTE_PROBE_WGSL, entry_point="main", workgroup_size=64,
                      bindings=(Binding("out", 0, Access.READ_WRITE, Scalar.U32),), uniforms=(), grid=(),
                      features=frozenset(), workgroup_storage_bytes=0)
    out = upload(device, np.zeros(64, np.uint32))
    run(device, [Dispatch(program, {"out": out}, {}, 1)])
    got = readback(device, out, Scalar.U32, (64,))
    if not np.array_equal(got, np.arange(64, dtype=np.uint32) * 3 + 1):
        raise DeviceError("a compute pipeline ran but wrote wrong values")


@functools.cache
def _enumerate() -> tuple[Device, ...]:
    """Enumerate adapters of every importable backend once per process."""
    found: list[Device] = []
    for backend, module_name in BACKEND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            adapters = module.gpu.enumerate_adapters_sync()
        except Exception:  # a backend whose native library fails to load offers nothing
            continue
        found.extend(Device(backend, module, a) for a in adapters)
    return tuple(found)


def missing_backends() -> dict[str, str]:
    """Backends whose Python module does not import, each with what to install for it."""
    missing = {}
    for backend, module_name in BACKEND_MODULES.items():
        try:
            importlib.import_module(module_name)
        except ImportError:
            missing[backend] = BACKEND_INSTALL[backend]
    return missing


@serialized
def devices(include_unusable: bool = False) -> list[Device]:
    """The adapters from wgpu-native and (when `wgpudawn` imports) Dawn on which attnc runs,
    enumerated once; each is checked once (Device.unusable) when first listed. With
    `include_unusable`, the others too (their `unusable` says why)."""
    found = _enumerate()
    return list(found) if include_unusable else [d for d in found if d.unusable is None]


def rank(device: Device) -> tuple[int, int, int]:
    """Sort key, smaller is better: adapter type, then native API over OpenGL, then features."""
    return (
        ADAPTER_TYPE_RANK.get(device.adapter_type, len(ADAPTER_TYPE_RANK)),
        0 if device.api in NATIVE_APIS else 1,
        -len(device.features),
    )


def _best_usable(candidates: list[Device]) -> Device | None:
    """The best-ranked device attnc can run on (ties keep enumeration order: wgpu before dawn),
    checking only as many as it takes."""
    for d in sorted(candidates, key=rank):  # (a stable sort: ties keep enumeration order)
        if d.unusable is None:
            return d
    return None


def _unusable_notes(found: list[Device]) -> tuple[str, ...]:
    return tuple(f"{d.spec} ({d.adapter_type}, {d.name}) is unusable: {d.unusable}" for d in found)


@serialized
def default_device() -> Device:
    """The best adapter attnc can run on; DeviceError with set-up instructions when there is none."""
    found = list(_enumerate())
    best = _best_usable(found)
    if best is None:
        raise DeviceError(
            "no usable WebGPU adapter found (neither wgpu-native nor Dawn offers one on which attnc "
            "can run a compute pipeline)" if found else
            "no WebGPU adapter found (neither wgpu-native nor Dawn offers one)",
            notes=_unusable_notes(found) + (SETUP_HINT,),
        )
    return best


@serialized
def get_device(spec: Any = None) -> Device:
    """Resolve None (the default), a Device, an application's GPUDevice (wgpu-py or wgpudawn;
    wrapped once, see Device.from_gpu_device) or a 'backend[:api]' string such as 'wgpu:opengl'."""
    if spec is None:
        return default_device()
    if isinstance(spec, Device):
        if spec.unusable is not None:
            raise DeviceError(f"attnc cannot run on {spec.spec} ({spec.name}): {spec.unusable}")
        return spec
    if not isinstance(spec, str):
        if gpu_backend(spec) is not None and hasattr(spec, "create_compute_pipeline"):
            return Device.from_gpu_device(spec)
        raise DeviceError(
            f"device must be None, a Device, a GPUDevice or a 'backend[:api]' string, not {spec!r}"
        )
    backend, _, api = spec.lower().partition(":")
    backend, api = backend.strip(), api.strip()
    found = list(_enumerate())
    matches = [d for d in found if d.backend == backend and (not api or d.api.lower() == api)]
    best = _best_usable(matches)
    if best is None and matches:
        raise DeviceError(f"attnc cannot run on {spec!r}: {matches[0].unusable}",
                          notes=_unusable_notes(matches[1:]) + tuple(
                              f"available: {d.spec} ({d.adapter_type}, {d.name})" for d in devices()))
    if best is None:
        missing = missing_backends()
        if backend in missing:
            raise DeviceError(f"no device matches {spec!r}: the {backend} backend is not installed "
                              f"({BACKEND_MODULES[backend]} does not import); {missing[backend]}")
        listing = tuple(f"available: {d.spec} ({d.adapter_type}, {d.name})" for d in devices())
        if not found:
            listing = (SETUP_HINT,)
        raise DeviceError(
            f"no device matches {spec!r} (expected 'backend[:api]' with backend in "
            f"{sorted(BACKEND_MODULES)})",
            notes=listing + _unusable_notes([d for d in found if d.unusable is not None]),
        )
    return best
