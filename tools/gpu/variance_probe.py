"""One process of the run-to-run variance probe: why the same kernel can time 2-5x apart from
one process to the next on a GPU while the runs inside a process agree.

Each process measures, with GPU timestamps, in this order and as JSON lines:
- the FMA and copy microbenchmarks (SM clock and memory clock proxies), cold;
- per case: attnc's heuristic variant timed the way `attnc bench` does (one submission per
  run, a host round trip between runs), then the same dispatches back to back in one
  submission, then on newly allocated buffers, then with pipelines compiled anew;
- the FMA and copy microbenchmarks again, after the cases.
Run several such processes one after another (tools/gpu/variance_probe.sh) while nvidia-smi
logs clocks, power, utilization and throttle reasons: the columns say which cause it is.

Usage: python3 tools/gpu/variance_probe.py --device wgpu:vulkan --dtype f32 --out OUT.jsonl --tag N
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnc.bench.cases import load_suite, make_inputs  # noqa: E402
from attnc.bench.ceilings import measure_copy, measure_fma  # noqa: E402
from attnc.runtime import dispatch as rt  # noqa: E402
from attnc.runtime.api import prepare_attention  # noqa: E402
from attnc.runtime.devices import get_device  # noqa: E402
from attnc.runtime.timing import rotation_count  # noqa: E402

START = time.time()


def emit(out: Any, **row: Any) -> None:
    """One JSON line, stamped with the process, tag and seconds since the process started."""
    row = {"pid": os.getpid(), "t": round(time.time() - START, 3), **row}
    out.write(json.dumps(row) + "\n")
    out.flush()
    print(json.dumps(row), file=sys.stderr, flush=True)


def ceilings(dev: Any, out: Any, when: str, tag: str) -> None:
    """The FMA (f32) and copy microbenchmarks, large sizes, few runs."""
    fma = measure_fma(dev, "f32", workgroups=8192, iters=256, runs=5, warmup=1)
    copy = measure_copy(dev, nbytes=1 << 30, runs=5, warmup=1)
    emit(out, tag=tag, kind="ceiling", when=when, fma_tflops=round(fma.value, 2), fma_ms=round(fma.ms, 4),
         copy_gbs=round(copy.value, 1), copy_ms=round(copy.ms, 4))


def time_op(dev: Any, op: Any, handles: list[Any], runs: int) -> list[float]:
    """`attnc bench`'s way: one submission per run, each waited for (rotating input copies)."""
    return [op.run(timestamps=True, binding=handles[i % len(handles)]) for i in range(runs)]


def back_to_back(dev: Any, handles: list[Any], runs: int) -> list[float]:
    """The same dispatches, `runs` times in one submission: per-run GPU time (no idle gaps)."""
    ds = [d for i in range(runs) for d in handles[i % len(handles)].dispatches]
    times = rt.run(dev, ds, timestamps=True)
    per = len(handles[0].dispatches)
    return [sum(times[i * per:(i + 1) * per]) for i in range(runs)]


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="wgpu:vulkan")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--cases", default="vit_s4096_h64,phi35_prefill_s501_h96,dec4_gqa8_kv7680,gemma_gqa4_h256_s512")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = get_device(args.device)
    tag = f"{args.device}/{args.dtype}/{args.tag}"
    with open(args.out, "a", encoding="utf-8") as out:
        emit(out, tag=tag, kind="start", device=dev.spec, name=dev.name)
        ceilings(dev, out, "cold", tag)
        cases = {c.name: c for c in load_suite("seeds")}
        for name in args.cases.split(","):
            case = cases[name]
            q, k, v = make_inputs(case, args.dtype)
            nbytes = q.nbytes + k.nbytes + v.nbytes
            copies = [(q, k, v)] + [(q + 0, k + 0, v + 0) for _ in range(rotation_count(nbytes) - 1)]
            t0 = time.time()
            op = prepare_attention(q.shape, k.shape, v.shape, q.dtype, causal=case.causal, device=dev)
            handles = [op.bind_copy(*c) for c in copies]
            op.run(timestamps=True, binding=handles[0])  # compiles
            compile_s = time.time() - t0
            rt.warm_up(dev)
            bench = time_op(dev, op, handles, args.runs + 3)[3:]
            b2b = back_to_back(dev, handles, args.runs)
            fresh = [op.bind_copy(*c) for c in copies]  # new buffers, same pipelines
            rt.warm_up(dev)
            new_bufs = time_op(dev, op, fresh, args.runs + 3)[3:]
            dev.pipelines._entries.clear()  # the same WGSL compiled again into new pipelines
            op.run(timestamps=True, binding=fresh[0])
            rt.warm_up(dev)
            new_pipes = time_op(dev, op, fresh, args.runs + 3)[3:]
            emit(out, tag=tag, kind="case", case=name, variant=op.variant, compile_s=round(compile_s, 2),
                 copies=len(copies), bench_ms=med(bench), bench_min=round(min(bench), 5),
                 bench_max=round(max(bench), 5), b2b_ms=med(b2b), new_buffers_ms=med(new_bufs),
                 new_pipelines_ms=med(new_pipes), samples=[round(x, 5) for x in bench])
            del handles, fresh
        ceilings(dev, out, "after", tag)


if __name__ == "__main__":
    main()
