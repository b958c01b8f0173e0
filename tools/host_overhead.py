"""Host time per attention call: what attnc costs the CPU beside the GPU work it submits.

    python tools/host_overhead.py [--device SPEC] [--shape B,Hq,Hkv,S,T,D] [--calls 1000]
                                  [--json FILE] [--modes MODE,...]

Modes (each on the same shape, float32, non-causal; the GPU work is the same in all):
  attention_numpy  attnc.attention() with numpy in and out (uploads, runs, reads back): the
                   path every call took before GPU tensors; wall time per call
  attention_gpu    attnc.attention() with GPU tensors (a new output tensor per call)
  op_submit        a prepared op on GPU tensors with out=, submitting its own encoder
  submit_floor     an empty command encoder finished and submitted: what any call that submits
                   its own work pays the WebGPU library and driver at least
  op_record        a prepared op on GPU tensors with out=, recorded into the caller's encoder
                   (one encoder per 32 calls, submitted outside the timed calls)
  layers32         32 layers (own q/k/v/o each) recorded into one encoder, one submission:
                   per layer and per step
  decode_step      a KV-cache decode step: q written, one K/V row per batch row appended
                   (host data), attention recorded; bytes uploaded per step from the counters

Host time is measured two ways: `thread CPU` (time.thread_time: CPU time of the calling
thread in Python, wgpu-py and the native WebGPU library; blocking and other processes do not
count) over the whole run, and `idle wall` (time.perf_counter around each call, the GPU idle
at its start: the previous call's work is waited for outside the timed region), the median.
Every mode checks its last result against float64 numpy. The JSON holds every number, the
command, the date, attnc/wgpu/numpy versions and the device.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnc  # noqa: E402

MODES = ("attention_numpy", "attention_gpu", "op_submit", "submit_floor", "op_record", "layers32", "decode_step")


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, lens: np.ndarray | None = None) -> np.ndarray:
    """float64 attention (GQA, optional kv_lens with queries aligned to the end)."""
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k.astype(np.float64), group, axis=1)
    vv = np.repeat(v.astype(np.float64), group, axis=1)
    s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) / math.sqrt(q.shape[3])
    if lens is not None:
        s = np.where(np.arange(k.shape[2])[None, None, None, :] < lens[:, None, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def measure(call: Callable[[], None], calls: int, wait: Callable[[], None] | None) -> dict:
    """Thread CPU per call over `calls` back-to-back calls, and the median idle wall time of
    `calls` calls each started on an idle GPU (`wait` between them, untimed)."""
    call()
    if wait:
        wait()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        call()
    cpu = (time.thread_time() - cpu0) / calls * 1e6
    busy_wall = (time.perf_counter() - wall0) / calls * 1e6
    if wait:
        wait()
    walls = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        walls.append((time.perf_counter() - t) * 1e6)
        if wait:
            wait()
    return {"calls": calls, "thread_cpu_us": cpu, "idle_wall_us_median": statistics.median(walls),
            "idle_wall_us_p90": sorted(walls)[int(0.9 * len(walls))], "back_to_back_wall_us": busy_wall}


def versions() -> dict:
    out = {"attnc": attnc.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for dist in ("wgpu", "wgpudawn"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="attnc device spec (default: the best adapter)")
    ap.add_argument("--shape", default="1,8,2,1,256,64", help="B,Hq,Hkv,S,T,D (decode by default)")
    ap.add_argument("--calls", type=int, default=1000, help="calls per mode (attention_numpy: a fifth)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {MODES}")
    B, Hq, Hkv, S, T, D = (int(x) for x in args.shape.split(","))
    dev = attnc.get_device(args.device)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    ref = reference(q, k, v)
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    out = attnc.zeros((B, Hq, S, D), device=dev)
    op = attnc.prepare(qt, kt, vt)
    wait = out.numpy  # a readback waits for everything submitted before it
    results: dict[str, dict] = {}
    print(f"{dev!r}, shape (B, Hq, Hkv, S, T, D) = {(B, Hq, Hkv, S, T, D)}, variant {op.variant}")

    def record(name: str, row: dict, err: float, note: str = "") -> None:
        row["relative_error"] = err
        results[name] = row
        print(f"{name:16s} thread CPU {row['thread_cpu_us']:9.1f} us/call   "
              f"idle wall {row['idle_wall_us_median']:9.1f} us/call (p90 {row['idle_wall_us_p90']:.1f})   "
              f"relerr {err:.1e}  {note}", flush=True)

    if "attention_numpy" in modes:
        n = max(20, args.calls // 5)
        row = measure(lambda: attnc.attention(q, k, v, device=dev), n, None)
        record("attention_numpy", row, rel(attnc.attention(q, k, v, device=dev), ref), "(includes the readback)")
    if "attention_gpu" in modes:
        row = measure(lambda: attnc.attention(qt, kt, vt), args.calls, wait)
        record("attention_gpu", row, rel(attnc.attention(qt, kt, vt).numpy(), ref))
    if "op_submit" in modes:
        op(qt, kt, vt, out=out)  # the first call makes the uniform buffers and bind groups
        before = dev.counters.snapshot()
        row = measure(lambda: op(qt, kt, vt, out=out), args.calls, wait)
        made = dev.counters.since(before)  # (the untimed waits between calls are readbacks)
        row["created"] = {n: made[n] for n in ("buffers_created", "bind_groups_created", "pipelines_compiled",
                                               "bytes_uploaded")}
        record("op_submit", row, rel(out.numpy(), ref),
               "created: " + ", ".join(f"{n} {c}" for n, c in row["created"].items()))
    if "submit_floor" in modes:
        def empty_submit() -> None:
            dev.gpu.queue.submit([dev.gpu.create_command_encoder().finish()])

        record("submit_floor", measure(empty_submit, args.calls, wait), 0.0, "(no attnc code)")
    if "op_record" in modes:
        state = {"enc": dev.gpu.create_command_encoder(), "n": 0}

        def recorded() -> None:
            op(qt, kt, vt, out=out, encoder=state["enc"])
            state["n"] += 1

        def flush() -> None:
            dev.gpu.queue.submit([state["enc"].finish()])
            state["enc"], state["n"] = dev.gpu.create_command_encoder(), 0
            wait()

        recorded()
        flush()
        cpu0 = time.thread_time()
        walls = []
        for i in range(args.calls):
            t = time.perf_counter()
            recorded()
            walls.append((time.perf_counter() - t) * 1e6)
            if state["n"] == 32 or i == args.calls - 1:
                c = time.thread_time()
                flush()
                cpu0 += time.thread_time() - c  # the submission is not a recorded call's cost
        row = {"calls": args.calls, "thread_cpu_us": (time.thread_time() - cpu0) / args.calls * 1e6,
               "idle_wall_us_median": statistics.median(walls),
               "idle_wall_us_p90": sorted(walls)[int(0.9 * len(walls))]}
        record("op_record", row, rel(out.numpy(), ref), "(submission of each 32 calls not counted)")
    if "layers32" in modes:
        layers = [(attnc.tensor(rng.standard_normal(q.shape).astype(np.float32), dev),
                   attnc.tensor(rng.standard_normal(k.shape).astype(np.float32), dev),
                   attnc.tensor(rng.standard_normal(v.shape).astype(np.float32), dev),
                   attnc.zeros(out.shape, device=dev)) for _ in range(32)]

        def step() -> None:
            enc = dev.gpu.create_command_encoder()
            for lq, lk, lv, lo in layers:
                op(lq, lk, lv, out=lo, encoder=enc)
            dev.gpu.queue.submit([enc.finish()])

        row = measure(step, max(10, args.calls // 32), layers[-1][3].numpy)
        row["per_layer_thread_cpu_us"] = row["thread_cpu_us"] / 32
        row["per_layer_idle_wall_us"] = row["idle_wall_us_median"] / 32
        lq, lk, lv, lo = layers[-1]
        record("layers32", row, rel(lo.numpy(), reference(lq.numpy(), lk.numpy(), lv.numpy())),
               f"per step of 32 layers and one submission: {row['per_layer_thread_cpu_us']:.1f} us CPU per layer")
    if "decode_step" in modes:
        cache = attnc.KVCache(B, Hkv, T + 2 * args.calls + 8, D, device=dev)
        cache.append(k, v)
        q_t = attnc.zeros(q.shape, device=dev)
        o_t = attnc.zeros(out.shape, device=dev)
        rows_k = rng.standard_normal((B, Hkv, 1, D)).astype(np.float32)
        rows_v = rng.standard_normal((B, Hkv, 1, D)).astype(np.float32)

        def decode() -> None:
            q_t.write(q)
            cache.append(rows_k, rows_v)
            cache.attend(q_t, out=o_t)

        decode()
        before = dev.counters.snapshot()
        decode()
        moved = dev.counters.since(before)
        row = measure(decode, args.calls, o_t.numpy)
        row["bytes_uploaded_per_step"] = moved["bytes_uploaded"]
        row["new_rows_and_q_bytes"] = q.nbytes + rows_k.nbytes + rows_v.nbytes
        row["created_per_step"] = {n: moved[n] for n in ("buffers_created", "bind_groups_created",
                                                         "pipelines_compiled")}
        kk, vv = cache.k.numpy(), cache.v.numpy()
        err = rel(o_t.numpy(), reference(q, kk, vv, cache.lengths))
        record("decode_step", row, err, f"uploaded {moved['bytes_uploaded']} B per step "
               f"(q + new K/V rows: {row['new_rows_and_q_bytes']} B)")
    if args.json:
        doc = {"tool": "tools/host_overhead.py", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
               "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
               "versions": versions(), "device": {"spec": dev.spec, "name": dev.name, "adapter_type": dev.adapter_type,
                                                  "repr": repr(dev)},
               "shape": dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D), "variant": op.variant, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    bad = [n for n, r in results.items() if r["relative_error"] > 1e-5]
    if bad:
        print(f"relative error above 1e-5: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
