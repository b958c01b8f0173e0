"""The device's measured ceilings: a WGSL FMA microbenchmark (f32, f16) and a buffer copy.

FMA: every invocation runs `chains` independent vec4 fma chains, the loop body unrolled
`unroll` times, for `iters` iterations (a uniform, so the compiler cannot fold the loop);
TFLOP/s counts 2 flops per fma lane. Copy: each invocation copies `per_thread` vec4<f32>
with a coalesced stride; GB/s counts bytes read plus bytes written. Both are timed with GPU
timestamps (median of runs after warm-up) like every benchmark result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from attnc.bench import gpu as g
from attnc.bench.timing import Dispatch, time_dispatches
from attnc.bench.wgsl import Shader


@dataclass(frozen=True, slots=True)
class Ceiling:
    """One measured ceiling: its value in `unit`, the median ms and the sizes used."""

    name: str
    value: float
    unit: str
    ms: float
    timing: str
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


# sizes for a CPU adapter (well under a second each on lavapipe) and for a real GPU
SMALL = {"fma_workgroups": 64, "fma_iters": 16, "copy_bytes": 16 << 20}
LARGE = {"fma_workgroups": 8192, "fma_iters": 256, "copy_bytes": 1 << 30}


def fma_wgsl(dtype: str = "f32", chains: int = 8, unroll: int = 8, workgroup: int = 256) -> str:
    """The FMA microbenchmark shader for f32 or f16."""
    sh = Shader(workgroup_size=(workgroup, 1, 1))
    vec = f"vec4<{dtype}>"
    if dtype == "f16":
        sh.enable("f16")
    sh.storage("out", vec, "read_write")
    sh.uniform("p", [("iters", "u32"), ("stride", "u32"), ("mul", "f32"), ("add", "f32")])
    sh.builtin("workgroup_id", "wid")
    sh.builtin("local_invocation_index", "lid", "u32")
    sh.line(f"let id = (wid.x + wid.y * p.stride) * {workgroup}u + lid;")
    sh.line(f"let x = {vec}({dtype}(p.mul));")
    sh.line(f"let y = {vec}({dtype}(p.add));")
    for c in range(chains):
        sh.line(f"var a{c} = {vec}({dtype}(f32((id + {c}u) % 1024u) * 0.001));")
    with sh.block("for (var i = 0u; i < p.iters; i++)"):
        for _ in range(unroll):
            sh.lines([f"a{c} = fma(a{c}, x, y);" for c in range(chains)])
    sh.line("out[id] = " + " + ".join(f"a{c}" for c in range(chains)) + ";")
    return sh.render()


def copy_wgsl(per_thread: int = 4, workgroup: int = 256) -> str:
    """The copy shader: each invocation moves `per_thread` vec4<f32>, coalesced."""
    sh = Shader(workgroup_size=(workgroup, 1, 1))
    sh.storage("src", "vec4<f32>", "read")
    sh.storage("dst", "vec4<f32>", "read_write")
    sh.uniform("p", [("n", "u32"), ("stride", "u32")])
    sh.builtin("workgroup_id", "wid")
    sh.builtin("local_invocation_index", "lid", "u32")
    sh.line(f"let base = (wid.x + wid.y * p.stride) * {workgroup * per_thread}u + lid;")
    for k in range(per_thread):
        with sh.block(f"if (base + {k * workgroup}u < p.n)"):
            sh.line(f"dst[base + {k * workgroup}u] = src[base + {k * workgroup}u];")
    return sh.render()


def _has_f16(device: Any) -> bool:
    """Whether the GPUDevice was created with shader-f16."""
    return "shader-f16" in set(device.gpu.features)


def measure_fma(
    device: Any,
    dtype: str = "f32",
    *,
    workgroups: int = SMALL["fma_workgroups"],
    iters: int = SMALL["fma_iters"],
    chains: int = 8,
    unroll: int = 8,
    runs: int = 10,
    warmup: int = 2,
) -> Ceiling:
    """Peak FMA throughput in TFLOP/s for f32 or f16 (needs shader-f16)."""
    if dtype == "f16" and not _has_f16(device):
        raise ValueError(f"{device!r} has no shader-f16")
    workgroup = 256
    pipe = g.pipeline(device, fma_wgsl(dtype, chains, unroll, workgroup), f"fma_{dtype}")
    x, y = g.grid2d(workgroups)
    threads = x * y * workgroup
    out = g.storage(device, threads * 4 * (2 if dtype == "f16" else 4))
    # mul = 0.999, add = 0.001 (as f32 bits): chains converge to 1, never overflow in f16
    mul_add = np.array([0.999, 0.001], dtype=np.float32).view(np.uint32)
    params = g.uniform(device, [iters, x, *mul_add.tolist()])
    run = [Dispatch(pipe, (g.bind_group(device, pipe, [out, params]),), (x, y, 1))]
    timing = time_dispatches(device, [run], runs=runs, warmup=warmup)
    flops = 2.0 * 4 * chains * unroll * iters * threads
    return Ceiling(
        f"fma_{dtype}",
        flops / (timing.ms * 1e-3) / 1e12,
        "TFLOP/s",
        timing.ms,
        timing.method,
        {
            "workgroups": x * y,
            "workgroup_size": workgroup,
            "iters": iters,
            "chains": chains,
            "unroll": unroll,
            "flops": flops,
        },
    )


def measure_copy(
    device: Any,
    *,
    nbytes: int = SMALL["copy_bytes"],
    per_thread: int = 4,
    runs: int = 10,
    warmup: int = 2,
) -> Ceiling:
    """Device-to-device copy bandwidth in GB/s (read + write bytes), capped by the limits."""
    limits = device.gpu.limits
    cap = min(int(limits["max-storage-buffer-binding-size"]), int(limits["max-buffer-size"]))
    nbytes = max(16, min(nbytes, cap) // 16 * 16)
    n = nbytes // 16
    workgroup = 256
    pipe = g.pipeline(device, copy_wgsl(per_thread, workgroup), "copy")
    x, y = g.grid2d(-(-n // (workgroup * per_thread)))
    src, dst = g.storage(device, nbytes), g.storage(device, nbytes)
    params = g.uniform(device, [n, x])
    run = [Dispatch(pipe, (g.bind_group(device, pipe, [src, dst, params]),), (x, y, 1))]
    timing = time_dispatches(device, [run], runs=runs, warmup=warmup)
    return Ceiling(
        "copy",
        2.0 * nbytes / (timing.ms * 1e-3) / 1e9,
        "GB/s",
        timing.ms,
        timing.method,
        {"bytes": nbytes, "per_thread": per_thread, "workgroup_size": workgroup},
    )


def measure_ceilings(device: Any, *, size: str = "auto", runs: int = 10, warmup: int = 2) -> dict[str, Ceiling]:
    """FMA f32 (and f16 when offered) and copy ceilings; size 'small', 'large' or 'auto'."""
    if size == "auto":
        size = "small" if g.is_cpu(device) else "large"
    if size not in ("small", "large"):
        raise ValueError(f"ceiling size must be auto, small or large, not {size!r}")
    p = SMALL if size == "small" else LARGE
    fma = {
        "workgroups": p["fma_workgroups"],
        "iters": p["fma_iters"],
        "runs": runs,
        "warmup": warmup,
    }
    out = {"fma_f32": measure_fma(device, "f32", **fma)}
    if _has_f16(device):
        out["fma_f16"] = measure_fma(device, "f16", **fma)
    out["copy"] = measure_copy(device, nbytes=p["copy_bytes"], runs=runs, warmup=warmup)
    return out
