"""ONNX Runtime WebGPU EP baseline: one com.microsoft MultiHeadAttention node.

Model: q [B,S,Hq*D] (BSD, as the op requires), k [B,Hq,T,D] and v [B,Hq,T,Dv] (BNSH, the
KV-cache layout), num_heads=Hq, unidirectional=1 for causal, default scale 1/sqrt(D).
GQA: MultiHeadAttention has no KV-head count, so KV heads are repeated Hq/Hkv times on
the host (ORT then reads Hq KV heads; GB/s still counts the logical Hkv bytes).
GroupQueryAttention is not used: it is always causal with a KV cache, which does not match
the non-causal S=4 decode cases.

Timing: session profiling on. The WebGPU EP writes one "Api" event per GPU program it ran
(name "&<kernel>&<program>", e.g. "&MultiHeadAttention&FlashAttention", args with
"shapes" and "cache_key"), timed with GPU timestamp queries, in whole microseconds. A run's
GPU time is the sum over its programs (e.g. CopyKVCache + FlashAttention); events are split
into runs by count. When no such events appear, the synchronized wall time of
`session.run` is used (it includes host/device copies) and the result says "wall".
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnc.bench.baselines.onnx_proto import mha_model
from attnc.bench.cases import Case
from attnc.bench.impls import Inputs, Measured, RunOptions, Unavailable
from attnc.bench.timing import Timing

PROVIDER = "WebGpuExecutionProvider"
INSTALL = "pip install onnxruntime-webgpu==1.27.0"


def _feeds(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """The model's inputs: q to BSD, KV heads repeated to Hq."""
    bsd = np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(case.B, case.S, case.Hq * case.D))
    rep = (lambda x: np.repeat(x, case.group, axis=1)) if case.group > 1 else np.ascontiguousarray
    return {"q": bsd, "k": rep(k), "v": rep(v)}


def program_events(trace: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(program name, GPU µs) of every WebGPU program event of a profile, in order."""
    out = []
    for e in trace:
        args = e.get("args") or {}
        if e.get("cat") == "Api" and "cache_key" in args and "dur" in e:
            out.append((str(e.get("name", "")), float(e["dur"])))
    return out


def split_runs(events: list[tuple[str, float]], total: int) -> list[list[tuple[str, float]]] | None:
    """Split program events into `total` runs of equal program sequence; None if impossible."""
    if total < 1 or not events or len(events) % total:
        return None
    k = len(events) // total
    runs = [events[i * k : (i + 1) * k] for i in range(total)]
    names = [n for n, _ in runs[-1]]
    if any([n for n, _ in r] != names for r in runs[1:]):
        return None
    return runs


def providers_used(trace: list[dict[str, Any]]) -> list[str]:
    """The execution providers that ran nodes, from the profile's Node events."""
    return sorted(
        {str(e["args"]["provider"]) for e in trace if e.get("cat") == "Node" and "provider" in (e.get("args") or {})}
    )


def run(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
    """Time MultiHeadAttention on ORT's WebGPU EP (its own Dawn, same physical adapter)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unavailable(f"onnxruntime is not installed ({INSTALL})") from None
    if PROVIDER not in ort.get_available_providers():
        raise Unavailable(f"this onnxruntime has no {PROVIDER} ({INSTALL})")
    model = mha_model(case.B, case.S, case.T, case.Hq, case.D, case.Dv, causal=case.causal, dtype=opts.dtype)
    feeds = [_feeds(case, *c) for c in copies]
    total = opts.warmup + opts.runs
    with tempfile.TemporaryDirectory(prefix="attnc-ort-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        so.log_severity_level = 3
        sess = ort.InferenceSession(model, so, providers=[PROVIDER])
        wall: list[float] = []
        first = None
        for i in range(total):
            t0 = time.perf_counter()
            result = sess.run(None, feeds[i % len(feeds)])[0]
            wall.append((time.perf_counter() - t0) * 1e3)
            first = result if i == 0 else first
        trace = json.loads(Path(sess.end_profiling()).read_text())
    assert first is not None
    out = first.reshape(case.B, case.S, case.Hq, case.Dv).transpose(0, 2, 1, 3)
    runs = split_runs(program_events(trace), total)
    extra: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "providers": providers_used(trace),
        "kv_heads_repeated": case.group > 1,
    }
    if runs is None:
        samples = wall[opts.warmup :]
        timing = Timing(
            statistics.median(samples),
            tuple(samples),
            (),
            "wall",
            False,
            len(copies),
            ("no WebGPU program times in ORT's profile",),
        )
        return Measured(timing, np.ascontiguousarray(out), extra)
    timed = runs[opts.warmup :]
    samples = [sum(us for _, us in r) / 1e3 for r in timed]
    programs = [name.rsplit("&", 1)[-1] for name, _ in timed[0]]
    per_program = tuple(statistics.median(r[i][1] / 1e3 for r in timed) for i in range(len(programs)))
    extra["programs"] = programs
    extra["program_ms"] = list(per_program)
    timing = Timing(
        statistics.median(samples),
        tuple(samples),
        per_program,
        "gpu-timestamps (ORT profiler, 1 us resolution)",
        False,
        len(copies),
    )
    return Measured(timing, np.ascontiguousarray(out), extra)
