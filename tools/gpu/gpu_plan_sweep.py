"""Time variants of the heuristic plan side by side (interleaved rounds, inputs rotated) to
decide a heuristic or a lowering change. Each variant is `FIELD=VALUE,...` over Plan fields,
BM/BN (tile sizes) and NSPLIT; `-` is the heuristic plan itself; a `@STRATEGY:` prefix starts
from the heuristic plan restricted to that strategy (ATTNC_STRATEGY), e.g. `@tiled:BM=32,TM=2`.
`KV=q8_0` (q4_0, int8) reads K and V quantized to that format (attnc.quant), e.g.
`KV=q4_0,KL=4`; `KV=q4_0` alone is the heuristic plan over that cache (plan_for's k_format). `DT=f32` (f16) runs
that variant on inputs of that dtype, from that dtype's heuristic plan (two dtypes compared
in one process). `ABL=name[+name]` emits the main pass with those ablations of gpu_ablate.py
(parts removed, results wrong by design: only the time matters).
Checks query head 0 of copy 0 against float64 numpy (over the dequantized K/V for a KV
format); SWEEP_WARM_MS (default 60) is the GPU warm-up before each round; `--dtype f16` runs
f16 q, k, v (default f32). Usage:
python tools/gpu/gpu_plan_sweep.py DEVICE CASE[,CASE...] VARIANT [VARIANT...] [--dtype f16] [--json FILE]"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
from typing import TextIO

import numpy as np

from attnc.bench.cases import load_suites, make_inputs
from attnc.lowering import schedule  # noqa: E402
from attnc.lowering.plan import from_compact  # noqa: E402
from attnc.quant import dequantize, quantize
from attnc.runtime import api
from attnc.runtime.devices import get_device
from attnc.runtime.dispatch import warm_up

ROUNDS, PER_ROUND = 5, 4


def head0_relerr(case, q, k, v, o) -> float:
    """Relative error of query head 0 of batch 0 against float64 numpy."""
    s = (q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64)) / np.sqrt(case.D)
    lim = case.key_limits()
    s = np.where(np.arange(case.T)[None, :] < lim[:, None], s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    ref = (p @ v[0, 0]) / p.sum(1, keepdims=True)
    return float(np.linalg.norm(o[0, 0] - ref) / np.linalg.norm(ref))


def take_json(argv: list[str]) -> TextIO | None:
    """Remove `--json FILE` from argv; the file opened for appending, or None."""
    if "--json" not in argv:
        return None
    i = argv.index("--json")
    out = open(argv[i + 1], "a")  # (kept open for the whole run)
    del argv[i:i + 2]
    return out


def time_rounds(dev, runs: list, warm_ms: float) -> None:
    """Time every (op, handles, times) of `runs` in ROUNDS interleaved rounds, each after a GPU
    warm-up of warm_ms: PER_ROUND runs per op and round, rotating over its input handles,
    appended to its times (the first round's are the warm-up, left out of the medians)."""
    for r in range(ROUNDS):
        warm_up(dev, warm_ms)
        for op, handles, times in runs:
            for i in range(PER_ROUND):
                times.append(op.run(timestamps=True, binding=handles[(r + i) % len(handles)]))


def emit(row: dict, out: TextIO | None) -> None:
    """Print one result row as JSON, and append it to the --json file when there is one."""
    print(json.dumps(row), flush=True)
    if out:
        out.write(json.dumps(row) + "\n")


def parse(spec: str) -> dict[str, int]:
    return {} if spec == "-" else {k: int(x) for k, x in (kv.split("=") for kv in spec.split(","))}


def take_item(spec: str, key: str) -> tuple[str, str | None]:
    """(the spec without its `KEY=VALUE` item, the value or None); a `@STRATEGY:` prefix stays."""
    prefix = ""
    if spec.startswith("@"):
        head, _, spec = spec.partition(":")
        prefix = head + ":"
    items = [] if spec in ("-", "") else spec.split(",")
    values = [x.split("=", 1)[1] for x in items if x.startswith(key + "=")]
    rest = ",".join(x for x in items if not x.startswith(key + "="))
    return prefix + (rest or ("" if prefix else "-")), (values[0] if values else None)


DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}


def take_dt(spec: str) -> tuple[str, np.dtype | None]:
    """(the spec without its `DT=f16|f32` item, that dtype or None)."""
    rest, dt = take_item(spec, "DT")
    return rest, (None if dt is None else DTYPES[dt])


_DERIVED: dict[tuple[int, str], list] = {}


def derived_copies(copies: list, what: str, make) -> list:
    """`make(copy)` of every input copy, made once per copy list and `what` (one case at a
    time: casting or quantizing a long cache on the host takes seconds)."""
    key = (id(copies), what)
    if key not in _DERIVED:
        _DERIVED.clear()
        _DERIVED[key] = [make(c) for c in copies]
    return _DERIVED[key]


def copy_count(case) -> int:
    """Input copies to rotate: 3 for large problems, 2 when K and V alone overflow any cache
    (64 MiB), else 8."""
    kv_bytes = 4 * case.B * case.Hkv * case.T * (case.D + case.Dv)
    return 3 if case.flops() > 1e10 else (2 if kv_bytes > 64 << 20 else 8)


def take_dtype(argv: list[str]) -> np.dtype:
    """Remove `--dtype f16|f32` from argv; the numpy dtype (float32 without it)."""
    if "--dtype" not in argv:
        return np.dtype(np.float32)
    i = argv.index("--dtype")
    name = argv[i + 1]
    del argv[i:i + 2]
    return DTYPES[name]


def strategy_base(dev, case, dims, spec: str, base, tun0) -> tuple:
    """(spec without its `@STRATEGY:` prefix, base plan, tunables) for a variant."""
    if not spec.startswith("@"):
        return spec, base, tun0
    strat, _, rest = spec[1:].partition(":")
    old = os.environ.get("ATTNC_STRATEGY")
    os.environ["ATTNC_STRATEGY"] = strat
    storage = base.storage
    try:
        new, tun0 = schedule.plan_for(dev.capabilities, schedule.pick_family(dev.capabilities, None), dims,
                                       causal=case.causal)
    finally:
        if old is None:
            del os.environ["ATTNC_STRATEGY"]
        else:
            os.environ["ATTNC_STRATEGY"] = old
    return rest or "-", dataclasses.replace(new, storage=storage), tun0


def prepare_variant(dev, case, dims, base, tun0, spec: str, copies) -> tuple:
    """One variant of the heuristic plan, bound to every input copy and run once:
    (op, handles, head-0 relerr). Raises what prepare or the run raises."""
    spec, fmt = take_item(spec, "KV")
    spec, abl = take_item(spec, "ABL")
    spec, dt = take_dt(spec)
    other_dtype = dt is not None and dt != copies[0][0].dtype
    if other_dtype:
        copies = derived_copies(copies, dt.name, lambda c: tuple(x.astype(dt) for x in c))
    if other_dtype or fmt is not None:  # the heuristic plan of those inputs (over a quantized K)
        base, tun0 = schedule.plan_for(dev.capabilities, schedule.pick_family(dev.capabilities, None), dims,
                                       causal=case.causal, f16=copies[0][0].dtype == np.float16,
                                       k_format=fmt)
    spec, base, tun0 = strategy_base(dev, case, dims, spec, base, tun0)
    kw = parse(spec)
    tun = {**tun0, **{x: kw.pop(x) for x in ("BM", "BN") if x in kw}}
    ns = kw.pop("NSPLIT", None)
    dtype = copies[0][0].dtype
    if fmt is not None:
        copies = derived_copies(copies, f"{dtype.name}/{fmt}",
                                lambda c: (c[0], quantize(c[1], fmt), quantize(c[2], fmt)))
    with ablation(abl):
        op = api.prepare(dims, dtype, causal=case.causal, device=dev, k_format=fmt, v_format=fmt,
                         plan=dataclasses.replace(base, **from_compact(kw)), tunables=tun, nsplit=ns)
        handles = [op.bind_copy(*c) for c in copies]
        op.run(binding=handles[0])
    q, k, v = copies[0]
    if fmt is not None:
        k, v = dequantize(k), dequantize(v)
    return op, handles, head0_relerr(case, q, k, v, op.result()[0])


def ablation(names: str | None) -> contextlib.AbstractContextManager:
    """The lowering with gpu_ablate.py's ablations `names` applied (None: as it is)."""
    if names is None:
        return contextlib.nullcontext()
    from gpu_ablate import ablated  # it imports this module

    return ablated(names)


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    out = take_json(argv)
    dtype = take_dtype(argv)
    dev = get_device(argv[0])
    cases = {c.name: c for suite in load_suites().values() for c in suite}  # every suite of shapes.json
    for name in argv[1].split(","):
        case = cases[name]
        copies = [tuple(x.astype(dtype) for x in make_inputs(case, seed=i))
                  for i in range(copy_count(case))]
        q, k, v = copies[0]
        dims = api.validate(q, k, v)
        fam = schedule.pick_family(dev.capabilities, None)
        base, tun0 = schedule.plan_for(dev.capabilities, fam, dims, causal=case.causal, f16=dtype == np.float16)
        ops = []
        for spec in argv[2:]:
            try:
                ops.append((spec, *prepare_variant(dev, case, dims, base, tun0, spec, copies), []))
            except Exception as exc:  # report and go on with the other variants
                print(f"{name} {spec}: {type(exc).__name__}: {exc}", flush=True)
        warm_ms = float(os.environ.get("SWEEP_WARM_MS", "60"))
        time_rounds(dev, [(op, h, times) for _s, op, h, _e, times in ops], warm_ms)
        for spec, op, _h, err, times in ops:
            ms = statistics.median(times[PER_ROUND:])
            row = {"case": name, "device": argv[0], "dtype": (take_dt(spec)[1] or dtype).name, "spec": spec,
                   "variant": op.variant,
                   "ms": round(ms, 5),
                   "tflops": round(case.flops() / ms / 1e9, 2), "relerr": err, "ms_min": round(min(times), 5),
                   "sgmin": op.plan.min_subgroup}
            emit(row, out)


if __name__ == "__main__":
    main()
