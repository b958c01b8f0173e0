"""Small GPU helpers for the benchmark's own kernels: pipelines, buffers, bind groups, reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def pipeline(device: Any, wgsl: str, label: str = "bench") -> Any:
    """A compute pipeline for entry point `main` with an automatic layout."""
    module = device.gpu.create_shader_module(label=label, code=wgsl)
    return device.gpu.create_compute_pipeline(
        label=label, layout="auto", compute={"module": module, "entry_point": "main"}
    )


def storage(device: Any, data: np.ndarray | int) -> Any:
    """A storage buffer holding `data`, or zeroed with `data` bytes (padded to 16)."""
    usage = device.wgpu.BufferUsage
    flags = usage.STORAGE | usage.COPY_SRC | usage.COPY_DST
    if isinstance(data, int):
        return device.gpu.create_buffer(size=max(16, -(-data // 16) * 16), usage=flags)
    raw = np.ascontiguousarray(data).tobytes()
    raw += bytes(-len(raw) % 16 or (16 if not raw else 0))
    return device.gpu.create_buffer_with_data(data=raw, usage=flags)


def uniform(device: Any, values: Sequence[int]) -> Any:
    """A uniform buffer of u32 values (padded to 16 bytes)."""
    usage = device.wgpu.BufferUsage
    words = list(values) + [0] * (-len(values) % 4)
    data = np.asarray(words, dtype=np.uint32).tobytes()
    return device.gpu.create_buffer_with_data(data=data, usage=usage.UNIFORM | usage.COPY_DST)


def bind_group(device: Any, pipe: Any, buffers: Sequence[Any]) -> Any:
    """Bind `buffers` to bindings 0..n-1 of group 0 of `pipe`."""
    entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(buffers)]
    return device.gpu.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=entries)


def read(device: Any, buffer: Any, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    """Read the first prod(shape) elements of `buffer` into a new array."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape))
    data = device.gpu.queue.read_buffer(buffer)
    return np.frombuffer(data, dtype=dt, count=count).reshape(tuple(shape)).copy()


def grid2d(count: int, max_per_dim: int = 65535) -> tuple[int, int]:
    """Split `count` workgroups into (x, y) with x <= max_per_dim and x*y >= count."""
    if count <= max_per_dim:
        return max(1, count), 1
    y = -(-count // max_per_dim)
    return -(-count // y), y


def is_cpu(device: Any) -> bool:
    """Whether the adapter is a CPU (software) one."""
    kind = getattr(device, "adapter_type", None) or dict(getattr(device, "info", {})).get("adapter_type", "")
    return str(kind) == "CPU"
