"""Pipelines, buffers and dispatch: run lowered `Program`s on a `Device`, optionally GPU-timed.

Everything is a function of explicit arguments; the only state is the `PipelineCache` each
Device owns (`device.pipelines`). A Program's grid is one-dimensional; `run` folds it into
(x, y, 1) under the device's per-dimension limit and sets the uniform fields `grid_total`
(the true workgroup count) and `grid_stride_x` (the folded x size) so the shader can
re-linearise `workgroup_id.x + workgroup_id.y * grid_stride_x` and return past the end.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.abc
import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from attnc.errors import AttncError, DeviceError, LoweringError, Span
from attnc.lowering import sanitize
from attnc.lowering.program import Access, Binding, Program, Scalar
from attnc.runtime.lru import LRU


class DeviceLike(Protocol):
    """What dispatching needs of a device (`attnc.runtime.devices.Device` is one): the wgpu-py
    module and GPUDevice it speaks through, its normalized features and its pipeline cache."""

    backend: str
    key: str
    spec: str
    adapter_type: str
    dialect: str
    features: frozenset[str]
    wgpu: Any
    pipelines: PipelineCache
    counters: Counters

    @property
    def gpu(self) -> Any: ...

    @property
    def timestamp_period(self) -> float: ...


# uniform fields the runtime fills in itself
AUTO_UNIFORMS = ("grid_total", "grid_stride_x")

BUFFER_TYPES = {
    Access.READ: "read-only-storage",
    Access.READ_WRITE: "storage",
    Access.UNIFORM: "uniform",
}
PACK_FORMATS = {Scalar.U32: "<I", Scalar.I32: "<i", Scalar.F32: "<f"}
NUMPY_DTYPES = {
    Scalar.F32: np.dtype(np.float32),
    Scalar.F16: np.dtype(np.float16),
    Scalar.I32: np.dtype(np.int32),
    Scalar.U32: np.dtype(np.uint32),
}

# "wgsl:12:5" (Naga, in its ariadne-style report) or ":12:5 error: msg" (Tint)
NAGA_LOCATION = re.compile(r"wgsl:(\d+):(\d+)")
TINT_LOCATION = re.compile(r"(?:^|\s)[^\s:]*:(\d+):(\d+) error: (.*)$", re.MULTILINE)
ERROR_LINE = re.compile(r"error: (.*)$", re.MULTILINE)


@dataclass
class Counters:
    """What attnc created on a device and moved to and from it, counted where it happens (the
    helpers below), so that tests assert "a repeated call creates nothing" and benchmarks print
    the bytes a step uploads. `uploads`/`bytes_uploaded` count host data written into buffers
    (create_buffer_with_data and queue.write_buffer); `readbacks`/`bytes_read` count
    queue.read_buffer calls (wgpu-py makes a staging buffer for each, not counted here)."""

    buffers_created: int = 0
    bytes_allocated: int = 0
    bind_groups_created: int = 0
    pipelines_compiled: int = 0
    uploads: int = 0
    bytes_uploaded: int = 0
    readbacks: int = 0
    bytes_read: int = 0
    submits: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counts now, as a plain dict (subtract two snapshots to count what happened between)."""
        return dict(self.__dict__)

    def since(self, before: Mapping[str, int]) -> dict[str, int]:
        """What happened since `before` (a snapshot): count by count."""
        return {k: v - before.get(k, 0) for k, v in self.__dict__.items()}


@dataclass(frozen=True, slots=True)
class BufferSlice:
    """A byte range of a GPUBuffer to bind (offset aligned to the device's
    min-storage-buffer-offset-alignment, size a multiple of 4)."""

    buffer: Any
    offset: int
    size: int


DESTROYED = "_attnc_destroyed"


def track_destroyed_buffers(buffer_class: type) -> None:
    """Make `buffer_class.destroy()` mark the buffer (once per class), so that `is_destroyed`
    can tell: WebGPU offers no query for it, and wgpu-native aborts the whole process when a
    submission uses a destroyed buffer, where attnc must raise an error naming the argument."""
    original = buffer_class.__dict__.get("destroy")
    if original is None or getattr(original, "_attnc_marks", False):
        return

    def destroy(self: Any) -> None:
        setattr(self, DESTROYED, True)
        original(self)

    destroy._attnc_marks = True  # type: ignore[attr-defined]
    destroy.__doc__ = original.__doc__
    destroy.__wrapped__ = original  # type: ignore[attr-defined]
    buffer_class.destroy = destroy  # type: ignore[attr-defined]


class _TrackOnImport(importlib.abc.MetaPathFinder):
    """Marks `destroy()` of a backend's GPUBuffer class as its module is imported: an
    application may make and destroy buffers before attnc sees a device of that backend."""

    def __init__(self, modules: set[str]):
        self.modules = modules

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.modules:
            return None
        self.modules.discard(fullname)  # (the search below finds the module's own spec)
        spec = importlib.util.find_spec(fullname)
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            if isinstance(getattr(module, "GPUBuffer", None), type):
                track_destroyed_buffers(module.GPUBuffer)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def track_backend_buffers(modules: Sequence[str]) -> None:
    """Track destroyed buffers of these backend API modules: now for the imported ones, at
    their import for the others."""
    later = set()
    for name in modules:
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "GPUBuffer", None), type):
            track_destroyed_buffers(module.GPUBuffer)
        elif module is None:
            later.add(name)
    if later:
        sys.meta_path.insert(0, _TrackOnImport(later))


def is_destroyed(buffer: Any) -> bool:
    """Whether `buffer.destroy()` was called (on a backend whose buffers attnc tracks)."""
    return getattr(buffer, DESTROYED, False)


def max_binding_bytes(device: DeviceLike) -> int:
    """The most bytes one storage binding may cover on this device (WebGPU's default, 128 MiB,
    where the device does not say)."""
    return int(device.gpu.limits.get("max-storage-buffer-binding-size", 1 << 27))


def buffer_of(bound: Any) -> Any:
    """The GPUBuffer of a binding given as a GPUBuffer or a BufferSlice."""
    return bound.buffer if isinstance(bound, BufferSlice) else bound


def binding_resource(bound: Any) -> dict[str, Any]:
    """The bind group `resource` of a GPUBuffer (whole) or a BufferSlice."""
    if isinstance(bound, BufferSlice):
        return {"buffer": bound.buffer, "offset": bound.offset, "size": bound.size}
    return {"buffer": bound, "offset": 0, "size": bound.size}


class DispatchError(AttncError):
    """A dispatch was described wrongly: missing or aliased buffers, bad uniforms, bad grid."""

    kind = "dispatch error"


class BoundsError(AttncError):
    """Under ATTNC_SANITIZE=bounds, a shader indexed an array or buffer out of bounds."""

    kind = "out-of-bounds access"


SANITIZERS = ("bounds",)
MAX_PIPELINES = 512  # compiled pipelines a device keeps (PipelineCache)


def sanitizing() -> bool:
    """Whether ATTNC_SANITIZE asks for the bounds sanitizer (lowering/sanitize.py): every
    dispatch then runs an instrumented shader and `run` raises BoundsError for any index past
    the end of an array, read or written, even one whose value a select discards."""
    value = os.environ.get("ATTNC_SANITIZE", "").strip()
    if value and value not in SANITIZERS:
        raise ValueError(f"ATTNC_SANITIZE={value!r}: expected one of {SANITIZERS} or nothing")
    return value == "bounds"


_INSTRUMENTED: dict[Program, tuple[Program, tuple[sanitize.Site, ...]]] = {}


def _sanitized_parts(device: DeviceLike, d: Dispatch) -> tuple[Dispatch, tuple[sanitize.Site, ...], Any]:
    """The dispatch with its program instrumented and a fresh, zeroed violation record bound."""
    if d.program not in _INSTRUMENTED:
        _INSTRUMENTED[d.program] = sanitize.instrument(d.program)
    program, sites = _INSTRUMENTED[d.program]
    record = empty(device, 4 * sanitize.record_words(sites))
    return Dispatch(program, {**d.buffers, sanitize.BUFFER: record}, d.uniforms, d.workgroups), sites, record


def _check_records(device: DeviceLike, checked: list[tuple[Dispatch, Dispatch, tuple[sanitize.Site, ...], Any]]
                   ) -> None:
    """Read the sanitizer's records (waits for the GPU); raise BoundsError naming every site
    (positions in the original WGSL, which `attnc compile` writes)."""
    for d, _, sites, record in checked:
        words = readback(device, record, Scalar.U32, (sanitize.record_words(sites),)).tolist()
        if not words[0]:
            continue
        found = sanitize.violations(words, sites)
        site, index, length = found[0]
        lines = d.program.wgsl.splitlines()
        span = Span(f"<{d.program.name}.wgsl>", site.line, site.column, lines[site.line - 1],
                    site.column + len(site.text.splitlines()[0]))
        notes = tuple(f"line {s.line}:{s.column}: {s.text} reached index {i} of {n}" for s, i, n in found)
        raise BoundsError(
            f"{d.program.name}: {words[0]} out-of-bounds accesses at {len(found)} site(s); "
            f"the first, {site.text}, reached index {index} of {length}", span, notes)


@dataclass(frozen=True, slots=True)
class CompiledProgram:
    """A compute pipeline with its explicit bind group layout."""

    pipeline: Any
    layout: Any


@functools.lru_cache(maxsize=1024)
def _digest(wgsl: str) -> str:
    """sha256 of a shader's text (once per text: a pipeline is looked up at every dispatch)."""
    return hashlib.sha256(wgsl.encode()).hexdigest()


class PipelineCache:
    """Compiled pipelines of one device, keyed by (device key, name, sha256 of WGSL, entry): the
    MAX_PIPELINES most recently used (a prepared op holds its own, evicted or not)."""

    def __init__(self) -> None:
        self._entries: LRU[tuple[str, str, str, str], CompiledProgram] = LRU(MAX_PIPELINES)

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, device: DeviceLike, program: Program) -> tuple[str, str, str, str]:
        """The cache key: everything that changes the compiled pipeline (the WGSL, and on
        wgpu-native the runtime checks Naga inserts, `_shader_module`)."""
        digest = _digest(program.wgsl)
        checks = naga_checks(device, program)
        return (device.key, program.name, f"{digest}{'' if checks is None else '|' + ','.join(checks)}",
                program.entry_point)

    def get(self, device: DeviceLike, program: Program) -> CompiledProgram:
        """Return the compiled pipeline for `program`, compiling it on first use."""
        key = self.key(device, program)
        compiled = self._entries.get(key)
        if compiled is None:
            compiled = compile_program(device, program)
            self._entries.put(key, compiled)
        return compiled


def log_compile(device: DeviceLike, programs: Sequence[Program], create_s: float, first_run_s: float) -> None:
    """Append a JSON line to $ATTNC_COMPILE_LOG for a run that compiled new pipelines:
    pipeline creation time, and the first submission's wall time (lavapipe's LLVM compiles a
    shader at its first dispatch, so that is where its compile time shows), with each
    program's workgroup barriers (lavapipe turns a compute shader into a coroutine that
    suspends at each barrier: its compile time grows with their number)."""
    record = {"device": device.spec, "programs": [p.name for p in programs],
              "barriers": [p.wgsl.count("workgroupBarrier()") for p in programs], "create_s": round(create_s, 3),
              "first_run_s": round(first_run_s, 3), "test": os.environ.get("PYTEST_CURRENT_TEST", "")}
    with open(os.environ["ATTNC_COMPILE_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def compile_program(device: DeviceLike, program: Program) -> CompiledProgram:
    """Create the shader module and compute pipeline; compiler errors become LoweringError."""
    _check_features(device, program)
    gpu = device.gpu
    visibility = device.wgpu.ShaderStage.COMPUTE
    entries = [
        {"binding": b.binding, "visibility": visibility, "buffer": {"type": BUFFER_TYPES[b.access]}}
        for b in program.bindings
    ]
    try:
        layout = gpu.create_bind_group_layout(label=program.name, entries=entries)
        pipeline_layout = gpu.create_pipeline_layout(
            label=program.name, bind_group_layouts=[layout]
        )
        module = _shader_module(device, program)
        pipeline = gpu.create_compute_pipeline(
            label=program.name,
            layout=pipeline_layout,
            compute={"module": module, "entry_point": program.entry_point},
        )
    except (device.wgpu.GPUError, device.wgpu.GPUPipelineError) as exc:
        raise shader_error(device, program, str(exc)) from None
    device.counters.pipelines_compiled += 1
    return CompiledProgram(pipeline, layout)


NAGA_CHECKS = ("bounds", "loops")


def naga_checks(device: DeviceLike, program: Program) -> tuple[str, ...] | None:
    """The runtime checks Naga inserts into `program` on wgpu-native, from "bounds" (index
    clamps on every buffer, workgroup-array and vector access) and "loops" (loop bounding);
    None: wgpu-native's default module (both), and always on Dawn.

    A program that is `in_bounds` (attnc's kernels, tested under the bounds sanitizer) gets
    neither: its indices stay in bounds by construction and its loops run a bounded number of
    times, and on an H200 the clamps cost 10-17 % of every seeds case (docs/BENCHMARKS.md,
    2026-11-22). Other programs keep both. ATTNC_NAGA_CHECKS ("bounds", "loops", both
    comma-separated, or "none") sets them for every program: to put the clamps back, or to
    measure what they cost."""
    if device.backend != "wgpu":
        return None
    value = os.environ.get("ATTNC_NAGA_CHECKS", "").strip()
    if not value:
        return () if program.in_bounds else None
    names = {c.strip() for c in value.split(",")} - {"none"}
    if names - set(NAGA_CHECKS):
        raise ValueError(f"ATTNC_NAGA_CHECKS={value!r}: expected 'none' or names from {NAGA_CHECKS}")
    return tuple(c for c in NAGA_CHECKS if c in names)


def _shader_module(device: DeviceLike, program: Program) -> Any:
    """The WGSL shader module, with the runtime checks `naga_checks` picks: through
    wgpu-native's `wgpuDeviceCreateShaderModuleTrusted` when they differ from the default."""
    checks = naga_checks(device, program)
    trusted = None
    if checks is not None:
        from wgpu.backends.wgpu_native import _api
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        trusted = getattr(_api.libf, "wgpuDeviceCreateShaderModuleTrusted", None)
    if trusted is None:  # Dawn, a program that keeps the checks, or a wgpu-native without the entry
        return device.gpu.create_shader_module(label=program.name, code=program.wgsl)
    mask = (lib.WGPUShaderRuntimeChecks_BoundsChecks if "bounds" in checks else 0) | (
        lib.WGPUShaderRuntimeChecks_ForceLoopBounding if "loops" in checks else 0)
    src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(program.wgsl))
    src[0].chain.next = ffi.NULL
    src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", src),
                             label=_api.to_c_string_view(program.name))
    handle = trusted(device.gpu._internal, desc, mask)
    return _api.GPUShaderModule(program.name, handle, device.gpu)


def _check_features(device: DeviceLike, program: Program) -> None:
    """Raise DeviceError when the program needs a feature the device does not offer."""
    missing = program.features - device.features
    if missing:
        raise DeviceError(
            f"program {program.name!r} needs {sorted(missing)}, which {device!r} does not offer"
        )


def shader_error(device: DeviceLike, program: Program, message: str) -> LoweringError:
    """Turn a Naga/Tint message into a LoweringError pointing at the WGSL line when it names one."""
    lines = program.wgsl.splitlines()
    span = None
    summary = message.strip().splitlines()[0] if message.strip() else "unknown error"
    tint = TINT_LOCATION.search(message)
    naga = NAGA_LOCATION.search(message)
    location = tint or naga
    if tint:
        summary = tint.group(3)
    elif (found := ERROR_LINE.search(message)) is not None:
        summary = found.group(1)
    elif "Caused by:" in message:  # wgpu-native's error chain: join its causes on one line
        chain = message.split("Caused by:", 1)[1].strip().splitlines()
        summary = ": ".join(
            c.strip() for c in chain if c.strip() and not c.strip().startswith("In wgpu")
        )
    if location:
        line, column = int(location.group(1)), int(location.group(2))
        source = lines[line - 1] if 0 < line <= len(lines) else ""
        span = Span(f"<{program.name}.wgsl>", line, column, source)
    return LoweringError(
        f"{device.dialect} rejected the WGSL of {program.name!r}: {summary}",
        span,
        notes=("compiler output:\n" + message.strip(),),
    )


def _usage(device: DeviceLike) -> int:
    """Usage flags for data buffers: bindable as storage, writable and readable from the host."""
    usage = device.wgpu.BufferUsage
    return usage.STORAGE | usage.COPY_SRC | usage.COPY_DST


def create_buffer(device: DeviceLike, size: int, usage: int | None = None, label: str = "") -> Any:
    """A new zero-initialised buffer (counted); data buffers by default (`_usage`)."""
    lib = native(device)
    usage = _usage(device) if usage is None else usage
    if lib is not None:
        buffer = lib.buffer(device.gpu, size, usage, label)
    else:
        buffer = device.gpu.create_buffer(label=label, size=size, usage=usage)
    device.counters.buffers_created += 1
    device.counters.bytes_allocated += size
    return buffer


def upload(device: DeviceLike, array: np.ndarray) -> Any:
    """Copy a f32/f16/i32/u32 numpy array into a new storage buffer (size padded to 4 bytes)."""
    host = np.ascontiguousarray(array)
    if host.dtype not in NUMPY_DTYPES.values():
        raise DispatchError(
            f"cannot upload dtype {host.dtype}; expected one of "
            f"{sorted(str(d) for d in NUMPY_DTYPES.values())}"
        )
    data = host.tobytes()
    data += bytes(-len(data) % 4 if data else 4)
    return upload_bytes(device, data, _usage(device))


def upload_bytes(device: DeviceLike, data: bytes, usage: int, label: str = "") -> Any:
    """A new buffer holding `data` (a multiple of 4 bytes), counted as created and uploaded."""
    buffer = device.gpu.create_buffer_with_data(label=label, data=data, usage=usage)
    c = device.counters
    c.buffers_created += 1
    c.bytes_allocated += len(data)
    c.uploads += 1
    c.bytes_uploaded += len(data)
    return buffer


def write(device: DeviceLike, buffer: Any, offset: int, data: Any) -> None:
    """queue.write_buffer of host data (bytes or a contiguous array; offset and length multiples
    of 4) into an existing buffer, counted."""
    lib = native(device)
    if lib is not None:
        nbytes = lib.write(device.gpu, buffer, offset, data)
    else:
        nbytes = memoryview(data).nbytes
        device.gpu.queue.write_buffer(buffer, offset, data)
    device.counters.uploads += 1
    device.counters.bytes_uploaded += nbytes


def empty(device: DeviceLike, nbytes: int) -> Any:
    """A zero-initialised storage buffer of at least `nbytes` (padded to 4, at least 4)."""
    return create_buffer(device, max(4, (int(nbytes) + 3) // 4 * 4))


def read_bytes(device: DeviceLike, buffer: Any, offset: int, size: int) -> memoryview:
    """`size` bytes of `buffer` from `offset` (both multiples of 4); waits for the GPU. Counted."""
    data = device.gpu.queue.read_buffer(buffer, offset, size)
    device.counters.readbacks += 1
    device.counters.bytes_read += size
    return data


def submit(device: DeviceLike, command_buffers: list[Any]) -> None:
    """queue.submit, counted."""
    device.gpu.queue.submit(command_buffers)
    device.counters.submits += 1


def readback(device: DeviceLike, buffer: Any, dtype: Scalar | Any, shape: Sequence[int]) -> np.ndarray:
    """Read the first prod(shape) elements of `buffer` as a new numpy array of `dtype`."""
    dt = NUMPY_DTYPES[dtype] if isinstance(dtype, Scalar) else np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dt.itemsize
    if nbytes > buffer.size:
        raise DispatchError(f"cannot read {nbytes} bytes from a buffer of {buffer.size} bytes")
    size = min(buffer.size, max(4, (nbytes + 3) // 4 * 4))
    data = read_bytes(device, buffer, 0, size)
    return np.frombuffer(data, dtype=dt, count=count).reshape(tuple(shape)).copy()


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One program invocation: storage buffers (GPUBuffers or BufferSlices) by binding name,
    uniform values, workgroup count."""

    program: Program
    buffers: Mapping[str, Any]
    uniforms: Mapping[str, int | float] = field(default_factory=dict)
    workgroups: int = 1


def fold_grid(workgroups: int, max_per_dim: int) -> tuple[int, int, int]:
    """Fold a 1-D workgroup count into (x, y, 1) with x <= max_per_dim and x*y >= workgroups."""
    if workgroups < 0:
        raise DispatchError(f"workgroup count must be >= 0, got {workgroups}")
    if workgroups <= max_per_dim:
        return (workgroups, 1, 1)
    y = -(-workgroups // max_per_dim)
    if y > max_per_dim:
        raise DispatchError(
            f"{workgroups} workgroups exceed {max_per_dim}**2, the 2-D dispatch limit"
        )
    return (-(-workgroups // y), y, 1)


def pack_uniforms(program: Program, values: Mapping[str, int | float]) -> bytes:
    """Pack uniform values at their offsets into a block of `program.uniform_size` bytes."""
    names = {f.name for f in program.uniforms}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DispatchError(
            f"{program.name}: unknown uniform(s) {unknown}; fields: {sorted(names)}"
        )
    block = bytearray(program.uniform_size)
    for f in program.uniforms:
        if f.name not in values:
            raise DispatchError(f"{program.name}: no value for uniform {f.name!r}")
        if f.type not in PACK_FORMATS:
            raise DispatchError(f"{program.name}: uniform {f.name!r} has type {f.type.value}")
        try:
            struct.pack_into(PACK_FORMATS[f.type], block, f.offset, values[f.name])
        except struct.error as exc:
            raise DispatchError(
                f"{program.name}: uniform {f.name!r} = {values[f.name]!r}: {exc}"
            ) from None
    return bytes(block)


def _check_buffers(d: Dispatch) -> None:
    """Every storage binding has a buffer, no extras, and no writable binding aliases another."""
    storage = [b for b in d.program.bindings if b.access is not Access.UNIFORM]
    names = {b.name for b in storage}
    missing = sorted(names - set(d.buffers))
    extra = sorted(set(d.buffers) - names)
    if missing or extra:
        raise DispatchError(
            f"{d.program.name}: buffers missing {missing}, unexpected {extra}; "
            f"bindings: {sorted(names)}"
        )
    for i, a in enumerate(storage):
        for b in storage[i + 1 :]:
            writable = Access.READ_WRITE in (a.access, b.access)
            if writable and buffer_of(d.buffers[a.name]) is buffer_of(d.buffers[b.name]):
                raise DispatchError(
                    f"{d.program.name}: the same buffer is bound to {a.name!r} and {b.name!r}, "
                    "and one of them is writable (WebGPU forbids this aliasing)"
                )


def uniform_block(d: Dispatch, grid: tuple[int, int, int]) -> bytes:
    """The packed uniform block of one dispatch folded into `grid` (the runtime's own fields
    `grid_total` and `grid_stride_x` filled in)."""
    values = dict(d.uniforms)
    given = sorted(set(values) & set(AUTO_UNIFORMS))
    if given:
        raise DispatchError(f"{d.program.name}: uniforms {given} are set by the runtime")
    if d.program.uniforms and not any(b.access is Access.UNIFORM for b in d.program.bindings):
        raise DispatchError(f"{d.program.name}: uniform fields but no uniform binding")
    fields = {f.name for f in d.program.uniforms}
    auto = {"grid_total": d.workgroups, "grid_stride_x": grid[0]}
    values.update({k: v for k, v in auto.items() if k in fields})
    return pack_uniforms(d.program, values)


def uniform_buffer(device: DeviceLike, data: bytes) -> Any:
    """A new uniform buffer holding `data` (counted)."""
    usage = device.wgpu.BufferUsage.UNIFORM | device.wgpu.BufferUsage.COPY_DST
    return upload_bytes(device, data, usage, label="attnc.uniforms")


def create_bind_group(device: DeviceLike, program: Program, compiled: CompiledProgram,
                      buffers: Mapping[str, Any], uniform: Any | None) -> Any:
    """The bind group of `program` over storage buffers by binding name (GPUBuffers or
    BufferSlices) and its uniform buffer (counted)."""
    lib = native(device)
    if lib is not None:
        group = lib.bind_group(device.gpu, program, compiled.layout, buffers, uniform)
    else:
        entries = []
        for b in program.bindings:
            resource = binding_resource(uniform if b.access is Access.UNIFORM else buffers[b.name])
            entries.append({"binding": b.binding, "resource": resource})
        group = device.gpu.create_bind_group(label=program.name, layout=compiled.layout, entries=entries)
    device.counters.bind_groups_created += 1
    return group


def _bind_group(
    device: DeviceLike, d: Dispatch, compiled: CompiledProgram, grid: tuple[int, int, int]
) -> Any:
    """Create the bind group of one dispatch, with a fresh uniform buffer when it has one."""
    data = uniform_block(d, grid)
    has_uniform = any(b.access is Access.UNIFORM for b in d.program.bindings)
    return create_bind_group(device, d.program, compiled, d.buffers,
                             uniform_buffer(device, data) if has_uniform else None)


def encode_pass(encoder: Any, items: Sequence[tuple[CompiledProgram, Any, tuple[int, int, int]]], label: str,
                timestamp_writes: dict[str, Any] | None = None) -> None:
    """Record one compute pass of (pipeline, bind group, folded grid) dispatches; a grid of no
    workgroups is not dispatched."""
    compute = encoder.begin_compute_pass(label=label, timestamp_writes=timestamp_writes)
    for compiled, bind_group, grid in items:
        if grid[0] == 0:
            continue
        compute.set_pipeline(compiled.pipeline)
        compute.set_bind_group(0, bind_group)
        compute.dispatch_workgroups(*grid)
    compute.end()


class Pass:
    """The dispatches of one compute pass, (pipeline, bind group, folded grid) each, ready to
    be recorded into an encoder or submitted in one of their own, again and again.

    Where attnc reaches the native WebGPU library under the GPUDevice (`native`), the pass
    is recorded through its C functions directly with one error capture around them all:
    wgpu-py's wrappers cost about as much host time per call as the native work (a
    descriptor struct, an error capture and a Python object for every encoder, pass and
    command); errors are raised as wgpu-py raises them. Elsewhere, wgpu-py's API."""

    __slots__ = ("device", "items", "label", "encoder_label", "_lib", "_raw", "_desc")

    def __init__(self, device: DeviceLike, items: Sequence[tuple[CompiledProgram, Any, tuple[int, int, int]]],
                 label: str, encoder_label: str = "attnc"):
        self.device, self.items, self.label, self.encoder_label = device, tuple(items), label, encoder_label
        self._lib = native(device)
        self._raw: tuple[tuple[Any, Any, int, int, int], ...] = ()
        self._desc: Any = None
        if self._lib is not None:  # the handles stay valid while `items` holds their objects
            self._raw = tuple((c.pipeline._internal, g._internal, *grid) for c, g, grid in self.items if grid[0])
            self._desc = self._lib.pass_descriptor(label)

    def record(self, encoder: Any) -> None:
        """Record the pass into the caller's GPUCommandEncoder (the caller submits it). An
        encoder of another device is a ValueError naming `encoder` (WebGPU would only say so at
        the caller's finish()); one that cannot record (finished) is WebGPU's validation error,
        raised here."""
        if not callable(getattr(encoder, "begin_compute_pass", None)):
            raise ValueError(f"encoder: expected a GPUCommandEncoder, got {type(encoder).__name__}")
        owner = getattr(encoder, "_device", None)  # wgpu-py's and wgpudawn's encoders know their device
        if owner is not None and owner is not self.device.gpu:
            raise ValueError(f"encoder: it was created by another GPUDevice; this op runs on {self.device!r} "
                             "(record into an encoder of that device)")
        lib = self._lib
        if lib is None or type(encoder) is not lib.encoder_type:
            encode_pass(encoder, self.items, self.label)
        else:
            lib.record(encoder._internal, self._raw, self._desc)

    def submit(self) -> None:
        """Record the pass into a new command encoder and submit it (counted)."""
        lib = self._lib
        if lib is None:
            encoder = self.device.gpu.create_command_encoder(label=self.encoder_label)
            encode_pass(encoder, self.items, self.label)
            submit(self.device, [encoder.finish()])
            return
        lib.submit(self.device.gpu, self._raw, self._desc, self.encoder_label)
        self.device.counters.submits += 1


class Native:
    """The C library of wgpu-py (wgpu-native) or wgpudawn (Dawn), for the calls a repeated
    attention call makes (`Pass`, `create_bind_group`); one per GPUDevice, which it does not
    hold (each call is given it)."""

    def __init__(self, api: Any, error_types: Mapping[str, type], base_error: type):
        self.lib, self.ffi = api.lib, api.ffi
        # the library's error handler, which the device's error callback reports to while a
        # call runs: wgpu-py's captures around each call, wgpudawn's keeps a pending list
        self.errors = api.error_handler
        self.error_types, self.base_error = error_types, base_error
        if callable(getattr(self.errors, "capture", None)) and callable(getattr(self.errors, "release", None)):
            self._open, self._close = self.errors.capture, self.errors.release
        elif isinstance(getattr(self.errors, "pending", None), list) and callable(self.errors.log_error):
            self._open, self._close = self._no_capture, self._pending
        else:
            raise AttributeError("an error handler attnc does not know")
        self.encoder_type, self.bind_group_type = api.GPUCommandEncoder, api.GPUBindGroup
        self.buffer_type, self.unmapped = api.GPUBuffer, api.enums.BufferMapState.unmapped
        self._views: dict[str, Any] = {}  # label -> WGPUStringView and the bytes it points to
        self._encoders: dict[str, Any] = {}  # label -> command encoder descriptor
        self._finish_desc = self.ffi.new("WGPUCommandBufferDescriptor *")
        self._passes: dict[str, Any] = {}
        self._probe()

    def _probe(self) -> None:
        """Fill one of each struct the calls below fill (a library whose header differs fails
        here, when the Native is made, rather than in a call)."""
        null = self.ffi.NULL
        entry = self.ffi.new("WGPUBindGroupEntry[]", 1)[0]
        entry.binding, entry.buffer, entry.offset, entry.size = 0, null, 0, 4
        group = self.ffi.new("WGPUBindGroupDescriptor *")
        group.label, group.layout, group.entryCount, group.entries = self._view("attnc"), null, 0, null
        buffer = self.ffi.new("WGPUBufferDescriptor *")
        buffer.label, buffer.size, buffer.usage = self._view("attnc"), 4, 0
        self.pass_descriptor("attnc")
        self.ffi.new("WGPUCommandEncoderDescriptor *").label = self._view("attnc")

    def _view(self, label: str) -> Any:
        found = self._views.get(label)
        if found is None:
            text = label.encode()
            data = self.ffi.new("char[]", text)
            view = self.ffi.new("WGPUStringView *")
            view.data, view.length = data, len(text)
            found = self._views[label] = (view, data)
        return found[0][0]

    def pass_descriptor(self, label: str) -> Any:
        """A compute pass descriptor labelled `label` (made once per label)."""
        found = self._passes.get(label)
        if found is None:
            found = self._passes[label] = self.ffi.new("WGPUComputePassDescriptor *")
            found.label = self._view(label)
        return found

    @staticmethod
    def _no_capture(name: str) -> None:
        pass

    def _pending(self, name: str) -> tuple[str, str] | None:
        """The first error reported since the last check (the others are logged), or None."""
        pending = self.errors.pending
        if not pending:
            return None
        first, *others = pending
        pending.clear()
        for _, message in others:
            self.errors.log_error(message)
        return first

    def _raise(self, error: tuple[str, str] | None) -> None:
        if error is not None:
            raise self.error_types.get(error[0], self.base_error)(error[1])

    def _encode(self, encoder: Any, raw: Sequence[tuple[Any, Any, int, int, int]], desc: Any) -> None:
        lib = self.lib
        compute = lib.wgpuCommandEncoderBeginComputePass(encoder, desc)
        try:
            for pipeline, group, x, y, z in raw:
                lib.wgpuComputePassEncoderSetPipeline(compute, pipeline)
                lib.wgpuComputePassEncoderSetBindGroup(compute, 0, group, 0, self.ffi.NULL)
                lib.wgpuComputePassEncoderDispatchWorkgroups(compute, x, y, z)
            lib.wgpuComputePassEncoderEnd(compute)
        finally:
            lib.wgpuComputePassEncoderRelease(compute)

    def record(self, encoder: Any, raw: Sequence[tuple[Any, Any, int, int, int]], desc: Any) -> None:
        """Record a pass into an encoder (its native handle)."""
        self._open("attnc.record")
        try:
            self._encode(encoder, raw, desc)
        finally:
            error = self._close("attnc.record")
        self._raise(error)

    def submit(self, gpu: Any, raw: Sequence[tuple[Any, Any, int, int, int]], desc: Any, label: str) -> None:
        """Record a pass into a new encoder of `gpu` labelled `label`, finish it and, when
        that raised no error (as the API would have, before submitting), submit it; release
        what was made."""
        lib = self.lib
        encoder_desc = self._encoders.get(label)
        if encoder_desc is None:
            encoder_desc = self._encoders[label] = self.ffi.new("WGPUCommandEncoderDescriptor *")
            encoder_desc.label = self._view(label)
        self._open("attnc.encode")
        try:
            encoder = lib.wgpuDeviceCreateCommandEncoder(gpu._internal, encoder_desc)
            try:
                self._encode(encoder, raw, desc)
                commands = lib.wgpuCommandEncoderFinish(encoder, self._finish_desc)
            finally:
                lib.wgpuCommandEncoderRelease(encoder)
        finally:
            error = self._close("attnc.encode")
        if error is not None:
            lib.wgpuCommandBufferRelease(commands)
            self._raise(error)
        self._open("attnc.submit")
        try:
            lib.wgpuQueueSubmit(gpu.queue._internal, 1, self.ffi.new("WGPUCommandBuffer[1]", [commands]))
        finally:
            lib.wgpuCommandBufferRelease(commands)
            error = self._close("attnc.submit")
        self._raise(error)

    def write(self, gpu: Any, buffer: Any, offset: int, data: Any) -> int:
        """queue.write_buffer of `data` (anything with the buffer protocol, contiguous) into
        `buffer` at `offset`, checked as wgpu-py checks it; the bytes written."""
        view = memoryview(data)
        if not view.contiguous:
            raise ValueError("The given data is not contiguous")
        nbytes = view.nbytes
        if not 0 <= offset < buffer.size:
            raise ValueError("Invalid buffer_offset")
        if nbytes == 0:
            raise ValueError("Invalid data_offset")
        if nbytes > buffer.size - offset:
            raise ValueError("Invalid data_length")
        self._open("attnc.write")
        try:
            self.lib.wgpuQueueWriteBuffer(gpu.queue._internal, buffer._internal, offset,
                                          self.ffi.from_buffer("uint8_t[]", view), nbytes)
        finally:
            error = self._close("attnc.write")
        self._raise(error)
        return nbytes

    def buffer(self, gpu: Any, size: int, usage: int, label: str) -> Any:
        """A new GPUBuffer of `gpu` (not mapped), made by the C call."""
        desc = self.ffi.new("WGPUBufferDescriptor *")
        desc.label, desc.size, desc.usage = self._view(label), size, int(usage)
        handle = self._create("attnc.buffer", lambda: self.lib.wgpuDeviceCreateBuffer(gpu._internal, desc),
                              self.lib.wgpuBufferRelease)
        return self.buffer_type(label, handle, gpu, size, usage, self.unmapped)

    def _create(self, what: str, create: Any, release: Any) -> Any:
        """A C create call inside one error capture: the handle, or the error raised (a handle
        made alongside an error released first)."""
        self._open(what)
        try:
            handle = create()
        finally:
            error = self._close(what)
        if error is not None:
            if handle:
                release(handle)
            self._raise(error)
        return handle

    def bind_group(self, gpu: Any, program: Program, layout: Any, buffers: Mapping[str, Any],
                   uniform: Any | None) -> Any:
        """A GPUBindGroup of `program` on `gpu` (as `create_bind_group` describes it), made by
        the C call."""
        entries = self.ffi.new("WGPUBindGroupEntry[]", len(program.bindings))
        for e, b in zip(entries, program.bindings, strict=True):
            bound = uniform if b.access is Access.UNIFORM else buffers[b.name]
            e.binding = b.binding
            if isinstance(bound, BufferSlice):
                e.buffer, e.offset, e.size = bound.buffer._internal, bound.offset, bound.size
            else:
                e.buffer, e.offset, e.size = bound._internal, 0, bound.size
        desc = self.ffi.new("WGPUBindGroupDescriptor *")
        desc.label = self._view(program.name)
        desc.layout, desc.entryCount, desc.entries = layout._internal, len(program.bindings), entries
        handle = self._create("attnc.bind_group", lambda: self.lib.wgpuDeviceCreateBindGroup(gpu._internal, desc),
                              self.lib.wgpuBindGroupRelease)
        return self.bind_group_type(program.name, handle, gpu)  # (it releases the handle when dropped)


# GPUDevice -> its Native (None: attnc does not reach its library)
_NATIVE: weakref.WeakKeyDictionary[Any, Native | None] = weakref.WeakKeyDictionary()
# the wgpu-py-like modules whose C library `Native` calls: module of the GPUDevice class -> helpers module
NATIVE_MODULES = {"wgpu.backends.wgpu_native._api": "wgpu.backends.wgpu_native._helpers",
                  "wgpudawn.backends.dawn._api": "wgpudawn.backends.dawn._helpers"}


def native(device: DeviceLike) -> Native | None:
    """The `Native` of the device's GPUDevice: made once per GPUDevice of wgpu-py or wgpudawn
    that has what it calls; None for any other (attnc then uses the API), or when
    ATTNC_NATIVE=0 was set when it was first asked for."""
    gpu = device.gpu
    try:
        return _NATIVE[gpu]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: not one of the modules above
        return None
    found = None
    helpers_name = NATIVE_MODULES.get(type(gpu).__module__)
    if helpers_name is not None and os.environ.get("ATTNC_NATIVE", "1") != "0":
        try:
            api, helpers = sys.modules[type(gpu).__module__], importlib.import_module(helpers_name)
            if getattr(helpers, "IS_WEB", False):  # (errors arrive later there)
                raise ImportError("in a browser")
            base = importlib.import_module(type(gpu).__module__.split(".")[0]).GPUError
            found = Native(api, helpers.ERROR_TYPES, base)
            for name in NATIVE_FUNCTIONS:
                getattr(found.lib, name)
        except Exception:  # (a library attnc does not know: the API serves)
            found = None
    _NATIVE[gpu] = found
    return found


NATIVE_FUNCTIONS = ("wgpuDeviceCreateCommandEncoder", "wgpuCommandEncoderBeginComputePass",
                    "wgpuComputePassEncoderSetPipeline", "wgpuComputePassEncoderSetBindGroup",
                    "wgpuComputePassEncoderDispatchWorkgroups", "wgpuComputePassEncoderEnd",
                    "wgpuComputePassEncoderRelease", "wgpuCommandEncoderFinish", "wgpuCommandEncoderRelease",
                    "wgpuQueueSubmit", "wgpuCommandBufferRelease", "wgpuDeviceCreateBindGroup",
                    "wgpuBindGroupRelease", "wgpuDeviceCreateBuffer", "wgpuBufferRelease", "wgpuQueueWriteBuffer")


Recordable = tuple[CompiledProgram, Any, tuple[int, int, int], str]


def recordable(device: DeviceLike, d: Dispatch, max_per_dim: int) -> Recordable:
    """What a compute pass needs to record one dispatch: its pipeline (compiled on first use),
    bind group and folded grid, and its program's name (for pass labels)."""
    compiled = device.pipelines.get(device, d.program)
    grid = fold_grid(d.workgroups, max_per_dim)
    return compiled, _bind_group(device, d, compiled, grid), grid, d.program.name


def record_pass(encoder: Any, recorded: Sequence[Recordable], timestamp_writes: Mapping[str, Any] | None = None
                ) -> None:
    """Record dispatches (from `recordable`) as one compute pass of `encoder`, labelled by
    their programs' names."""
    encode_pass(encoder, [(c, g, grid) for c, g, grid, _ in recorded], "+".join(r[3] for r in recorded),
                None if timestamp_writes is None else dict(timestamp_writes))


def run(
    device: DeviceLike, dispatches: Sequence[Dispatch], timestamps: bool = False, span: bool = False
) -> list[float] | None:
    """Encode all dispatches in one command encoder and submit them.

    With `timestamps`, each dispatch gets a compute pass of its own that writes begin/end
    GPU timestamps, and the per-dispatch durations in milliseconds are returned (this waits
    for the GPU); otherwise None. With `span` too, all dispatches share one compute pass and
    the one value returned is its duration. Without timestamps they share one pass as well:
    WebGPU orders the dispatches of a pass and makes each one's writes visible to the next,
    and a pass boundary between the main pass and the split-KV combine measured 6-8 us on an
    H200 (tools/gpu/gpu_decode_probe.py).
    """
    if timestamps and "timestamps" not in device.features:
        raise DeviceError(f"{device!r} does not offer timestamp queries")
    gpu = device.gpu
    max_per_dim = int(gpu.limits["max-compute-workgroups-per-dimension"])
    prepared = []
    logging = bool(os.environ.get("ATTNC_COMPILE_LOG"))
    known, start = len(device.pipelines), time.perf_counter()
    checked = []
    for d in dispatches:
        _check_features(device, d.program)
        _check_buffers(d)
        if sanitizing():
            checked.append((d, *_sanitized_parts(device, d)))
            d = checked[-1][1]
        prepared.append(recordable(device, d, max_per_dim))
    per_dispatch = timestamps and not span
    passes = [[p] for p in prepared] if per_dispatch else [prepared] if prepared else []
    query_set = None
    count = 2 * len(passes)
    if timestamps and passes:
        query_set = gpu.create_query_set(type="timestamp", count=count)
    encoder = gpu.create_command_encoder(label="attnc.run")
    for i, group in enumerate(passes):
        writes = None
        if query_set is not None:
            writes = {
                "query_set": query_set,
                "beginning_of_pass_write_index": 2 * i,
                "end_of_pass_write_index": 2 * i + 1,
            }
        record_pass(encoder, group, writes)
    resolved = None
    if query_set is not None:
        usage = device.wgpu.BufferUsage
        resolved = create_buffer(device, 8 * count, usage.QUERY_RESOLVE | usage.COPY_SRC)
        encoder.resolve_query_set(query_set, 0, count, resolved, 0)
    created = time.perf_counter()
    submit(device, [encoder.finish()])
    if logging and len(device.pipelines) > known:
        wait_idle(device)
        log_compile(device, [d.program for d in dispatches], created - start, time.perf_counter() - created)
    _check_records(device, checked)
    if not timestamps:
        return None
    if resolved is None:
        return []
    ticks = np.frombuffer(read_bytes(device, resolved, 0, resolved.size), dtype=np.uint64).astype(np.int64)
    if span:
        return [float(ticks[-1] - ticks[0]) * device.timestamp_period / 1e6]
    return [float(t) * device.timestamp_period / 1e6 for t in ticks[1::2] - ticks[0::2]]


def wait_idle(device: DeviceLike) -> None:
    """Wait until the device's queue has finished everything submitted so far (a 16-byte read
    of a scratch buffer, which waits for the submissions before it)."""
    probe = _IDLE_PROBES.get(id(device))
    if probe is None:
        usage = device.wgpu.BufferUsage.COPY_SRC | device.wgpu.BufferUsage.COPY_DST
        probe = _IDLE_PROBES[id(device)] = create_buffer(device, 16, usage)
    read_bytes(device, probe, 0, 16)


_IDLE_PROBES: dict[int, Any] = {}


WARM_WGSL = """\
@group(0) @binding(0) var<storage, read_write> buf: array<vec4<f32>>;

// Streams a large buffer through the GPU with some fma work per element: memory-bound
// kernels are only timed right once the memory clock is up too, not just the SM clock.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < arrayLength(&buf)) {
        var a = buf[i];
        for (var j = 0u; j < 16u; j = j + 1u) {
            a = fma(a, vec4<f32>(0.5), vec4<f32>(0.25));
        }
        buf[i] = a;
    }
}
"""

_WARM_BUFFERS: dict[int, Any] = {}
_WARM_BEST: dict[int, float] = {}  # the fastest warm-up submission seen per device (ms)
RAMP_MS, MAX_MS = 1000.0, 3000.0
# warm dispatches per warm-up submission: about 8 ms of GPU work on an H200, so that the host's
# round trip between submissions (longer through Dawn than through wgpu-native) leaves the GPU
# idle a small part of the time; with 4 per submission (1 ms) Dawn's processes kept the GPU
# about 40 % busy and its clock governor at 1.0-1.26 GHz of 1.98 (tools/gpu/variance_probe.sh)
WARM_BATCH = 32


def warm_dispatch(device: DeviceLike) -> Dispatch:
    """A dispatch that keeps the GPU busy (WARM_WGSL over a buffer of up to 256 MiB, about a
    quarter of a millisecond on an H200), with its buffer made once per device."""
    program = Program(
        name="warm_up", wgsl=WARM_WGSL, entry_point="main", workgroup_size=256,
        bindings=(Binding("buf", 0, Access.READ_WRITE, Scalar.F32),), uniforms=(), grid=(),
        features=frozenset(), workgroup_storage_bytes=0,
    )
    nbytes = min(256 << 20, max_binding_bytes(device) // 16 * 16)
    buf = _WARM_BUFFERS.get(id(device))
    if buf is None:
        buf = _WARM_BUFFERS[id(device)] = empty(device, nbytes)
    return Dispatch(program, {"buf": buf}, {}, -(-nbytes // (16 * 256)))


def warm_dispatch_ms(device: DeviceLike) -> float:
    """The fastest one `warm_dispatch` has run in this process, in ms (warming the GPU up first
    when none was timed yet; 1.0 where the device cannot time it)."""
    if id(device) not in _WARM_BEST:
        warm_up(device)
    return _WARM_BEST.get(id(device), float(WARM_BATCH)) / WARM_BATCH


def warm_up(device: DeviceLike, ms: float = 60.0) -> bool:
    """Keep the GPU busy until its clocks are up, then return: at least `ms` of wall time,
    at most MAX_MS, and until a warm-up submission runs within 10 % of the fastest one this
    process has seen on the device (the first call of a process runs RAMP_MS at least, to
    learn that time).

    Returns whether the clocks came up (False: MAX_MS passed first).

    A GPU that idled (pipeline compilation, host work, a low duty cycle) runs at lowered SM
    and memory clocks, and short timed runs with host round trips in between do not raise
    them again; a fixed short warm-up is not enough. Measured on an H200
    (tools/gpu/gpu_plan_sweep.py, SWEEP_WARM_MS): after compiling, dec_h128 timed 0.177 ms and
    phi35 0.80 ms after a 60 ms warm-up, 0.072 and 0.205 ms after 1 s or 3 s.
    """
    if device.adapter_type == "CPU":  # no clocks to ramp up
        return True
    warm = warm_dispatch(device)
    timed = "timestamps" in device.features
    start = time.perf_counter()
    least = ms if timed and id(device) in _WARM_BEST else max(ms, RAMP_MS)
    while (elapsed := (time.perf_counter() - start) * 1e3) < MAX_MS:
        t = run(device, [warm] * WARM_BATCH, timestamps=timed, span=True)
        if timed:  # (reading the timestamps waits for the submission)
            best = _WARM_BEST[id(device)] = min(_WARM_BEST.get(id(device), math.inf), t[0])
            up = t[0] <= 1.1 * best
        else:
            read_bytes(device, warm.buffers["buf"], 0, 16)  # waits for the submission
            up = True
        if elapsed >= least and up:
            return True
    return False
