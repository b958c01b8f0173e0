"""GPU time of compute dispatches: timestamp queries around each pass, warm-up, median of runs.

One *run* is a list of dispatches (one op, e.g. the three passes of the naive attention).
Every dispatch gets its own compute pass whose beginning and end write GPU timestamps; the
time of a run is `end of its last pass - beginning of its first`, so gaps and barriers
between the passes of one op count. Many runs are recorded into one command buffer (up to
`MAX_QUERIES` timestamps per query set), resolved into a buffer and read back once, so
reading results never sits between two timed runs.

Both backends resolve timestamps to nanoseconds (wgpu-native normalizes them; Dawn converts
them unless `disable_timestamp_query_conversion` is on); `Device.timestamp_period` is applied
all the same. Dawn quantizes timestamps unless the device turns `timestamp_quantization`
off (attnc's devices do); quantized results are detected and flagged.

Input rotation: when an op's inputs are smaller than a few times the last-level cache, a
run would read them from cache. Callers build several copies of the inputs
(`rotation_count`) and pass one dispatch list per copy; run i uses copy i mod n.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_QUERIES = 4096  # WebGPU's limit on the size of one timestamp query set
DAWN_QUANTUM_NS = 1 << 16  # Dawn's timestamp quantization masks the low 16 bits


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One compute dispatch: a pipeline, its bind groups (by group index) and a 3-D grid."""

    pipeline: Any
    bind_groups: tuple[Any, ...]
    workgroups: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Timing:
    """Median and samples (ms) of timed runs; `method` says how they were taken."""

    ms: float
    samples: tuple[float, ...]
    per_dispatch_ms: tuple[float, ...] = ()
    method: str = "gpu-timestamps"
    quantized: bool = False
    rotations: int = 1
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The JSON-friendly fields of this timing (no samples)."""
        return {
            "timing": self.method,
            "runs": len(self.samples),
            "rotations": self.rotations,
            "ms_min": min(self.samples) if self.samples else None,
            "ms_max": max(self.samples) if self.samples else None,
            "timestamps_quantized": self.quantized,
        }


def has_timestamps(gpu: Any) -> bool:
    """Whether the GPUDevice was created with the timestamp-query feature."""
    return "timestamp-query" in set(gpu.features)


def _encode_run(encoder: Any, run: Sequence[Dispatch], query_set: Any, first: int) -> None:
    """Record one run, one compute pass per dispatch, writing timestamps from index `first`."""
    for i, d in enumerate(run):
        writes = None
        if query_set is not None:
            writes = {
                "query_set": query_set,
                "beginning_of_pass_write_index": first + 2 * i,
                "end_of_pass_write_index": first + 2 * i + 1,
            }
        cpass = encoder.begin_compute_pass(timestamp_writes=writes)
        cpass.set_pipeline(d.pipeline)
        for index, group in enumerate(d.bind_groups):
            cpass.set_bind_group(index, group)
        cpass.dispatch_workgroups(*d.workgroups)
        cpass.end()


def _timestamped(device: Any, runs: Sequence[Sequence[Dispatch]]) -> tuple[list[float], list[list[float]], bool]:
    """Execute runs in batches with timestamps; return per-run ms, per-dispatch ms, quantized."""
    gpu = device.gpu
    usage = device.wgpu.BufferUsage
    period = float(getattr(device, "timestamp_period", 1.0) or 1.0)
    per_run = 2 * max(len(r) for r in runs)
    batch = max(1, MAX_QUERIES // per_run)
    totals: list[float] = []
    parts: list[list[float]] = []
    raw_all: list[np.ndarray] = []
    for start in range(0, len(runs), batch):
        chunk = runs[start : start + batch]
        count = per_run * len(chunk)
        query_set = gpu.create_query_set(type="timestamp", count=count)
        resolved = gpu.create_buffer(size=8 * count, usage=usage.QUERY_RESOLVE | usage.COPY_SRC)
        encoder = gpu.create_command_encoder()
        for j, run in enumerate(chunk):
            _encode_run(encoder, run, query_set, j * per_run)
        encoder.resolve_query_set(query_set, 0, count, resolved, 0)
        gpu.queue.submit([encoder.finish()])
        ticks = np.frombuffer(gpu.queue.read_buffer(resolved), dtype=np.uint64).astype(np.int64)
        for j, run in enumerate(chunk):
            t = ticks[j * per_run : j * per_run + 2 * len(run)]
            raw_all.append(t)
            ns = (t - t[0]).astype(np.float64) * period
            totals.append(float(ns[-1]) / 1e6)
            parts.append([float(b - a) / 1e6 for a, b in zip(ns[0::2], ns[1::2], strict=True)])
        query_set.destroy()
        resolved.destroy()
    raw = np.concatenate(raw_all)
    quantized = bool(len(raw) >= 4 and np.all(raw % DAWN_QUANTUM_NS == 0))
    return totals, parts, quantized


def _wall(device: Any, runs: Sequence[Sequence[Dispatch]]) -> list[float]:
    """Execute runs one submission each, waiting for each; return wall-clock ms per run."""
    gpu = device.gpu
    out = []
    for run in runs:
        t0 = time.perf_counter()
        encoder = gpu.create_command_encoder()
        _encode_run(encoder, run, None, 0)
        gpu.queue.submit([encoder.finish()])
        gpu.queue.on_submitted_work_done_sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_dispatches(
    device: Any,
    variants: Sequence[Sequence[Dispatch]],
    *,
    runs: int = 20,
    warmup: int = 3,
    timestamps: bool = True,
) -> Timing:
    """Time an op given as one dispatch list per input copy; run i uses copy i mod n."""
    if not variants or not all(variants):
        raise ValueError("time_dispatches needs at least one non-empty dispatch list")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    order = [variants[i % len(variants)] for i in range(warmup + runs)]
    use_ts = timestamps and has_timestamps(device.gpu)
    if use_ts:
        totals, parts, quantized = _timestamped(device, order)
        totals, parts = totals[warmup:], parts[warmup:]
        per_dispatch = tuple(statistics.median(p[i] for p in parts) for i in range(len(parts[0])))
        notes = ("Dawn timestamp quantization is on: times are multiples of 65.5 us",) * quantized
        return Timing(
            statistics.median(totals),
            tuple(totals),
            per_dispatch,
            "gpu-timestamps",
            quantized,
            len(variants),
            notes,
        )
    samples = _wall(device, order)[warmup:]
    return Timing(statistics.median(samples), tuple(samples), (), "wall", False, len(variants))


def time_callable(fn: Any, *, runs: int = 20, warmup: int = 3, method: str = "wall") -> Timing:
    """Median of `fn()` over runs: fn returns its own ms, or None to be timed by the wall clock."""
    samples: list[float] = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        ms = fn()
        if ms is None:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(float(ms))
    return Timing(statistics.median(samples), tuple(samples), (), method)
