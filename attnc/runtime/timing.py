"""GPU timing shared by the tuner and the benchmark: how many input copies to rotate over, and
runs timed back to back on a busy GPU.

Why back to back: a GPU's clock governor sets its clocks from how busy it has recently been.
Timing one short submission at a time, with a host round trip between runs, leaves the GPU
idle part of the time, and the governor then settles on a lower clock, not always the same
one. On an H200 (driver 580.159.04, 2026-12-03, tools/gpu/variance_probe.sh) the SM clock sat
near 1.1-1.2 GHz instead of 1.98 GHz through whole processes whose GPU utilization was about
40 %, and the same kernel timed 1.65x apart from one such process to the next; kernels queued
back to back behind a few milliseconds of work run at the full clock every time. The warm-up
before them (dispatch.warm_up) keeps the GPU busy the same way: its submissions hold enough
work (WARM_BATCH) that the host's round trip between them, longer through Dawn, leaves the GPU
idle a small part of the time (docs/BENCHMARKS.md, 2026-12-04).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnc.runtime import dispatch as rt
from attnc.runtime.cachedir import cache_dir, locked, replace_text

DEFAULT_CACHE_BYTES = 64 << 20  # a guess at the last-level cache (H100/H200 L2: 50 MiB)
MAX_QUERIES = 4096  # WebGPU's limit on the size of one timestamp query set
LEAD_MS = 20.0  # clock-raising work recorded ahead of the timed runs
CLOCKS_FILE = "clocks.json"  # the fastest warm dispatch per device (adapter and driver)


def rotation_count(nbytes: int, cache_bytes: int = DEFAULT_CACHE_BYTES, max_copies: int = 32) -> int:
    """How many input copies keep timed runs from reading cached inputs: cover ~3x the cache."""
    if nbytes <= 0 or nbytes >= 3 * cache_bytes:
        return 1
    return int(max(1, min(max_copies, -(-3 * cache_bytes // nbytes))))


def time_back_to_back(device: Any, runs: Sequence[Sequence[rt.Dispatch]], *, lead_ms: float = LEAD_MS
                      ) -> list[float]:
    """The GPU time in ms of each run (its dispatches recorded as one compute pass), the runs
    recorded back to back in one submission behind about `lead_ms` of clock-raising work.

    Consecutive runs must not overlap on the GPU: give them a dependency, e.g. the same
    output buffers (a write after a write orders them). Splits into several submissions only
    where one would need more than MAX_QUERIES timestamps (each with its own lead)."""
    return time_steps(device, [[run] for run in runs], lead_ms=lead_ms)


def time_steps(device: Any, steps: Sequence[Sequence[Sequence[rt.Dispatch]]], *, lead_ms: float = LEAD_MS
               ) -> list[float]:
    """time_back_to_back for steps of several compute passes each (a decode step: the cache's
    append pass, then attention's): the GPU time in ms from the start of a step's first pass
    to the end of its last."""
    if "timestamps" not in device.features:
        raise rt.DeviceError(f"{device!r} does not offer timestamp queries")
    gpu = device.gpu
    max_per_dim = int(gpu.limits["max-compute-workgroups-per-dimension"])
    warm = rt.warm_dispatch(device)
    lead = []
    if device.adapter_type != "CPU" and lead_ms > 0:
        per = rt.warm_dispatch_ms(device)
        lead = [rt.recordable(device, warm, max_per_dim)] * max(1, math.ceil(lead_ms / per))
    recorded = [[[rt.recordable(device, d, max_per_dim) for d in run] for run in step] for step in steps]
    period = float(getattr(device, "timestamp_period", 1.0) or 1.0)
    usage = device.wgpu.BufferUsage
    out: list[float] = []
    per_batch = MAX_QUERIES // 2
    for start in range(0, len(recorded), per_batch):
        batch = recorded[start:start + per_batch]
        count = 2 * len(batch)
        query_set = gpu.create_query_set(type="timestamp", count=count)
        resolved = gpu.create_buffer(size=8 * count, usage=usage.QUERY_RESOLVE | usage.COPY_SRC)
        encoder = gpu.create_command_encoder(label="attnc.time_steps")
        if lead:
            rt.record_pass(encoder, lead)
        for i, step in enumerate(batch):
            for j, run in enumerate(step):
                writes = {"query_set": query_set}
                if j == 0:
                    writes["beginning_of_pass_write_index"] = 2 * i
                if j == len(step) - 1:
                    writes["end_of_pass_write_index"] = 2 * i + 1
                rt.record_pass(encoder, run, writes)
        encoder.resolve_query_set(query_set, 0, count, resolved, 0)
        gpu.queue.submit([encoder.finish()])
        ticks = np.frombuffer(gpu.queue.read_buffer(resolved), dtype=np.uint64).astype(np.int64)
        out.extend(float(t) * period / 1e6 for t in ticks[1::2] - ticks[0::2])
        query_set.destroy()
        resolved.destroy()
    return out


# A measurement after which the GPU runs slower than this fraction of its best is retaken. On the
# H200 (2026-12-04, 28 processes of the seeds suite, both backends) the ratio after a measurement
# was 0.928-0.99 (all but one at 0.945 or more) in the processes whose time agreed with the
# others, and 0.913-0.914 in the two whose case ran 8-10 % slow; a 0.9 gate let those through.
CLOCK_OK = 0.93


def clock_ratio(device: Any) -> float | None:
    """How fast the clock-raising dispatch runs now against the fastest it has run on this
    device, in this process or an earlier one (clocks.json in attnc's cache directory): 1.0,
    the clocks are at their best; 0.2, the GPU runs at a fifth of its best speed. None on a
    CPU adapter or without timestamps."""
    if device.adapter_type == "CPU" or "timestamps" not in device.features:
        return None
    best = min(rt.warm_dispatch_ms(device), _reference(device.key) or math.inf)
    now = min(time_back_to_back(device, [[rt.warm_dispatch(device)]] * 4, lead_ms=0))
    if now < 0.99 * best:
        _remember(device.key, now)
    return min(1.0, best / now)


def _reference(key: str) -> float | None:
    try:
        return float(json.loads((cache_dir() / CLOCKS_FILE).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _remember(key: str, ms: float) -> None:
    path = cache_dir() / CLOCKS_FILE
    try:
        with locked(path):
            try:
                known = json.loads(path.read_text())
                known = known if isinstance(known, dict) else {}
            except (OSError, ValueError, RecursionError):
                known = {}
            known[key] = ms
            replace_text(path, json.dumps(known, indent=1, sort_keys=True))
    except OSError:  # a read-only cache directory only loses the cross-process reference
        pass


def chained(runs: Sequence[Sequence[rt.Dispatch]]) -> list[list[rt.Dispatch]]:
    """The runs (each one op on its own input copy, same programs in the same order) rewritten
    so that each writes the buffers the first run writes: a write after a write orders
    consecutive runs on the GPU, so back-to-back runs do not overlap. Buffers a run writes and
    then reads (split-KV partial states) move with it, so every run still computes its own op."""
    first = runs[0]
    out = [list(first)]
    for run in runs[1:]:
        if [d.program for d in run] != [d.program for d in first]:
            raise ValueError("chained runs must dispatch the same programs in the same order")
        swap: dict[int, Any] = {}
        for mine, theirs in zip(run, first, strict=True):
            for b in mine.program.bindings:
                if b.access is rt.Access.READ_WRITE:
                    swap[id(mine.buffers[b.name])] = theirs.buffers[b.name]
        out.append([rt.Dispatch(d.program, {n: swap.get(id(buf), buf) for n, buf in d.buffers.items()},
                                d.uniforms, d.workgroups) for d in run])
    return out
