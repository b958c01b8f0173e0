"""Implementations the benchmark compares, behind one call signature.

Each runner takes the device, the case, the input copies (one per rotation; copy 0 is the
one checked for accuracy) and the run options, and returns a `Measured`: its timing, its
output on copy 0, and extra facts for the JSON. A runner that cannot run here raises
`Unavailable` with the reason, which the table shows instead of numbers.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnc.bench.cases import Case
from attnc.bench.timing import Timing, time_callable, time_dispatches

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


def run_attnc(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
    """attnc's own kernels through `attnc.runtime.api.prepare_attention` (GPU time of the op)."""
    try:
        api = importlib.import_module("attnc.runtime.api")
    except ImportError as exc:
        raise Unavailable(f"attnc.runtime.api does not import ({exc})") from None
    q, k, v = copies[0]
    kwargs: dict[str, Any] = {"causal": case.causal, "device": device}
    if opts.target is not None:
        kwargs["target"] = opts.target
    prepare = getattr(api, "prepare_attention", None)
    if prepare is None:
        return _attnc_wall(api, copies, opts, kwargs)
    op = prepare(q.shape, k.shape, v.shape, q.dtype, **kwargs)
    handles: list[Any] = []
    if len(copies) > 1 and _accepts(op.run, "binding"):
        handles = [op.bind_copy(*c) for c in copies]
    rotating = bool(handles) and all(h is not None for h in handles)
    if not rotating:
        op.bind(*copies[0])
    state = {"i": 0}

    def once() -> float:
        if rotating:
            ms = op.run(timestamps=True, binding=handles[state["i"] % len(handles)])
        else:
            ms = op.run(timestamps=True)
        state["i"] += 1
        return float(ms)

    timing = time_callable(once, runs=opts.runs, warmup=opts.warmup, method="gpu-timestamps")
    if rotating:
        op.run(timestamps=False, binding=handles[0])
    timing = _with_rotations(timing, len(copies) if rotating else 1)
    extra = {k: v for k, v in {"variant": getattr(op, "variant", None)}.items() if v is not None}
    o, _lse = op.result()
    return Measured(timing, np.asarray(o), extra)


def _attnc_wall(api: Any, copies: Sequence[Inputs], opts: RunOptions, kwargs: dict[str, Any]) -> Measured:
    """Fallback until `prepare_attention` exists: wall time of a whole `attention()` call."""
    if not hasattr(api, "attention"):
        raise Unavailable("attnc.runtime.api has neither prepare_attention nor attention")
    state = {"i": 0}

    def once() -> None:
        api.attention(*copies[state["i"] % len(copies)], **kwargs)
        state["i"] += 1

    timing = time_callable(
        once, runs=opts.runs, warmup=opts.warmup,
        method="wall (attention(): upload, dispatch, readback)",
    )  # fmt: skip
    out = api.attention(*copies[0], **kwargs)
    return Measured(_with_rotations(timing, len(copies)), np.asarray(out), {})


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` takes a keyword argument `name`."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _with_rotations(t: Timing, n: int) -> Timing:
    """A copy of `t` that records `n` input rotations."""
    return Timing(t.ms, t.samples, t.per_dispatch_ms, t.method, t.quantized, n, t.notes)


def _lazy(module: str) -> Runner:
    """A runner `run` from attnc.bench.baselines.<module>, imported when first called."""

    def runner(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
        mod = importlib.import_module(f"attnc.bench.baselines.{module}")
        return mod.run(device, case, copies, opts)

    return runner


IMPLS: dict[str, Runner] = {
    "attnc": run_attnc,
    "naive": run_naive,
    "ort": _lazy("ort"),
    "tinygrad": _lazy("tinygrad"),
}
