"""Implementations the benchmark compares, behind one call signature.

Each runner takes the device, the case, the input copies (one per rotation; copy 0 is the
one checked for accuracy) and the run options, and returns a `Measured`: its timing, its
output on copy 0, and extra facts for the JSON. A runner that cannot run here raises
`Unavailable` with the reason, which the table shows instead of numbers.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnc.bench.cases import Case, document_ids
from attnc.bench.timing import Timing, time_callable, time_dispatches
from attnc.runtime import dispatch as rt
from attnc.runtime import timing as timing_rt
from attnc.runtime.api import prepare_attention

BACK_TO_BACK = f"gpu-timestamps, runs back to back behind {timing_rt.LEAD_MS:g} ms of work"
ONE_PER_SUBMISSION = "gpu-timestamps, one run per submission"

Inputs = tuple[np.ndarray, np.ndarray, np.ndarray]


class Unavailable(RuntimeError):
    """An implementation cannot run here (missing package, unsupported dtype or shape)."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to time: runs, warm-up runs, dtype, and attnc's variant family."""

    runs: int = 20
    warmup: int = 3
    dtype: str = "f32"
    target: str | None = None
    documents: int = 0  # DOCS_IMPL: the tokens packed as this many equal documents


@dataclass(frozen=True, slots=True)
class Measured:
    """A runner's result: timing, output on input copy 0, and extra JSON fields."""

    timing: Timing
    out: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[Any, Case, Sequence[Inputs], RunOptions], Measured]


def run_naive(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
    """The naive three-pass WGSL attention (f32 only)."""
    from attnc.bench.naive import NaiveAttention

    if opts.dtype != "f32":
        raise Unavailable("naive baseline is f32 only")
    op = NaiveAttention(device, case)
    indices = [op.bind(*c) for c in copies]
    timing = time_dispatches(device, [op.dispatches(i) for i in indices], runs=opts.runs, warmup=opts.warmup)
    time_dispatches(device, [op.dispatches(indices[0])], runs=1, warmup=0)
    extra = {"dispatches": len(op.dispatches(0)), "row_chunks": len(op.chunks)}
    return Measured(timing, op.result(indices[0]), extra)


KV_PREFIX = "attnc-"  # attnc-q8_0, attnc-q4_0, attnc-int8: attnc over K and V stored in that format
DOCS_IMPL = "attnc+documents"  # attnc with a document mask (mask_mod reading the document ids)


def run_attnc(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions,
              kv_format: str | None = None, documents: int = 0) -> Measured:
    """attnc's own kernels through `prepare_attention`: the GPU time of the op, its runs back to
    back on a busy GPU (runtime/timing.py says why), input copies rotated. With `kv_format`,
    K and V of every copy are quantized to it first (attnc.quant) and read in that format.
    With `documents`, a mask_mod keeps the keys of each query's own document (equal documents,
    cases.document_ids): the block map of a mask that reads data at work."""
    q, k, v = copies[0]
    kwargs: dict[str, Any] = {"causal": case.causal, "device": device}
    if documents:
        doc, off = document_ids(case.T, documents), case.T - case.S

        def same_document(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return doc[q_idx + off] == doc[kv_idx]

        kwargs["mask_mod"] = same_document
    if opts.target is not None:
        kwargs["target"] = opts.target
    extra: dict[str, Any] = {}
    if kv_format is not None:
        from attnc.quant import check_head_dim, quantize

        for name, d in (("k", case.D), ("v", case.Dv)):
            try:
                check_head_dim(kv_format, name, d)
            except ValueError as exc:  # a shape this format cannot store: no measurement, not a failure
                raise Unavailable(str(exc)) from None
        kwargs.update(k_format=kv_format, v_format=kv_format)
        copies = [(c[0], quantize(c[1], kv_format), quantize(c[2], kv_format)) for c in copies]
        extra.update(kv_format=kv_format, kv_bytes=copies[0][1].nbytes + copies[0][2].nbytes)
    else:
        extra.update(kv_bytes=int(k.nbytes + v.nbytes))
    op = prepare_attention(q.shape, k.shape, v.shape, q.dtype, **kwargs)
    handles = [op.bind_copy(*c) for c in copies]
    op.run(binding=handles[0])  # compiles (and on lavapipe, where compiling happens at the first run)
    extra["variant"] = op.variant
    if rt.sanitizing() or "timestamps" not in device.features:  # one run per submission, as a user's call
        state = {"i": 0}

        def once() -> float | None:
            ms = op.run(timestamps="timestamps" in device.features, binding=handles[state["i"] % len(handles)])
            state["i"] += 1
            return ms

        timing = time_callable(once, runs=opts.runs, warmup=opts.warmup, method=ONE_PER_SUBMISSION)
    else:
        runs = timing_rt.chained([h.dispatches for h in handles])
        order = [runs[i % len(runs)] for i in range(opts.warmup + opts.runs)]
        if device.adapter_type != "CPU":  # the host work above (quantizing, compiling, uploading) idled the GPU
            rt.warm_up(device, ms=60.0)
        samples = timing_rt.time_back_to_back(device, order)[opts.warmup:]
        method = BACK_TO_BACK if device.adapter_type != "CPU" else "gpu-timestamps, runs back to back"
        timing = Timing(statistics.median(samples), tuple(samples), (), method)
    op.run(binding=handles[0])
    o, _lse = op.result()
    if kv_format is not None:  # (after the result: the appends overwrite the last cache row)
        extra.update(_append_costs(device, kv_format, handles[0], copies[0], opts))
        if device.adapter_type != "CPU" and "timestamps" in device.features:
            rt.warm_up(device, ms=60.0)  # its runs one per submission idled the GPU; measure()'s clock check follows
    return Measured(_with_rotations(timing, len(copies)), np.asarray(o), extra)


def _append_costs(device: Any, fmt: str, handle: Any, copy: Inputs, opts: RunOptions) -> dict[str, Any]:
    """GPU ms of one decode step's append (a new K and V row per (batch, KV head), quantized to
    `fmt` at the last position of the bound cache): the pair store kernel and the length
    advance, the two dispatches KVCache.append records.

    `append_ms`: what the append adds to the step, recorded as KVCache records it (its own pass,
    then the attention's): the median of such steps less the median of the attention alone,
    interleaved in one submission. `append_one_pass_ms`: the same with the append's dispatches
    in the attention's pass. `append_alone_ms`: the append's pass alone, one submission each.
    Without timestamps (or sanitizing), `append_ms` is the append alone, by the wall clock."""
    from attnc.runtime.kvcache import ADVANCE, advance_uniforms
    from attnc.runtime.store import pair_store_dispatch

    q, k, v = copy
    B, Hkv, T, _ = k.shape
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((B, Hkv, 1, t.shape[3])).astype(q.dtype) for t in (k, v)]
    pos = np.full(B, T - 1, np.int32)
    store = pair_store_dispatch(device, (fmt, handle.bufs["k"], k.shape), (fmt, handle.bufs["v"], v.shape),
                                *rows, pos)
    lens = rt.upload(device, pos)
    counts = rt.upload(device, np.zeros(B, np.int32))  # (read only when ragged)
    advance = rt.Dispatch(ADVANCE, {"counts": counts, "lens": lens}, *advance_uniforms(B, 1, False))
    append = [store, advance]
    timestamps = "timestamps" in device.features

    def alone() -> float | None:  # one submission, the append's pass alone
        times = rt.run(device, append, timestamps=timestamps, span=True)
        return None if times is None else float(sum(times))

    out: dict[str, Any] = {"append_alone_ms": time_callable(alone, runs=opts.runs, warmup=opts.warmup).ms}
    if rt.sanitizing() or not timestamps:
        return out | {"append_ms": out["append_alone_ms"]}
    attention = list(handle.dispatches)
    kinds = ([attention], [append, attention], [append + attention])
    if device.adapter_type != "CPU":  # the runs above, one per submission, idled the GPU
        rt.warm_up(device, ms=60.0)
    times = timing_rt.time_steps(device, [kinds[i % 3] for i in range(3 * (opts.warmup + opts.runs))])
    medians = [statistics.median(times[3 * opts.warmup + j::3]) for j in range(3)]
    return out | {"append_ms": medians[1] - medians[0], "append_one_pass_ms": medians[2] - medians[0],
                  "append_step_attention_ms": medians[0]}


def _with_rotations(t: Timing, n: int) -> Timing:
    """A copy of `t` that records `n` input rotations."""
    return Timing(t.ms, t.samples, t.per_dispatch_ms, t.method, t.quantized, n, t.notes)


def _lazy(module: str) -> Runner:
    """A runner `run` from attnc.bench.baselines.<module>, imported when first called."""

    def runner(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
        mod = importlib.import_module(f"attnc.bench.baselines.{module}")
        return mod.run(device, case, copies, opts)

    return runner


def _kv_runner(fmt: str) -> Runner:
    """attnc over K and V quantized to `fmt`."""

    def runner(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
        return run_attnc(device, case, copies, opts, kv_format=fmt)

    return runner


def _documents_runner(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
    """attnc with the document mask of opts.documents documents."""
    return run_attnc(device, case, copies, opts, documents=opts.documents)


IMPLS: dict[str, Runner] = {
    "attnc": run_attnc,
    DOCS_IMPL: _documents_runner,
    "naive": run_naive,
    "ort": _lazy("ort"),
    "tinygrad": _lazy("tinygrad"),
    **{KV_PREFIX + f: _kv_runner(f) for f in ("q8_0", "q4_0", "int8")},
}


def kv_format_of(impl: str) -> str | None:
    """The KV format an implementation name stands for (attnc-q8_0 -> q8_0), else None."""
    return impl[len(KV_PREFIX):] if impl.startswith(KV_PREFIX) else None
