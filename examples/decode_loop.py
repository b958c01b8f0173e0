"""Token-by-token decoding over a growing KV cache, on the application's own WebGPU device.

The "application" is a small numpy model (two attention layers, 8 query heads sharing 2
KV heads, head dim 64, a batch of two sequences with prompts of different lengths). It
creates its GPUDevice with wgpu itself and hands it to attnc. Per layer an attnc.KVCache
keeps the keys and values on the GPU: the prompt goes in with one ragged append (each row its
own length), then every step appends one token per row and attends over each row's prefix.
A step uploads the new query and K/V rows into GPU tensors, records every layer's append
and attention (one compute pass per layer: `attend(..., append=(k, v))`) into one command
encoder between two timestamp passes, submits it once and reads the outputs back; each
output is checked against numpy attention over the same keys.

    python3 examples/decode_loop.py [--steps 256] [--backend wgpu|dawn] [--kv-format q8_0|q4_0|int8]
                                    [--json FILE]

With --kv-format the caches keep K and V quantized (each appended row quantized on the GPU);
the check is then against numpy over the rows as stored (attnc.quant's dequantized values).

Printed per step (every 32nd, then a summary): host time (building and submitting the step's
GPU work, not waiting for it: wall time, and the CPU time of this thread, which other
processes on a busy machine do not inflate), GPU time (timestamps around the step's passes,
where the device offers them), the bytes the step uploaded (attnc's device counters) and
the error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time

import numpy as np

import attnc
from attnc import quant

LAYERS, HQ, HKV, D, D_MODEL = 2, 8, 2, 64, 128
PROMPTS = (40, 23)  # tokens already in each sequence before decoding


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float64 attention of q [B, Hq, S, D] over each row's first lengths[b] keys, causal, the
    queries aligned to the end of the prefix (what attnc's kv_lens means)."""
    B, Hq, S, _ = q.shape
    group = Hq // k.shape[1]
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for b in range(B):
        n = int(lengths[b])
        kb = np.repeat(k[b, :, :n].astype(np.float64), group, axis=0)
        vb = np.repeat(v[b, :, :n].astype(np.float64), group, axis=0)
        s = q[b].astype(np.float64) @ kb.transpose(0, 2, 1) / math.sqrt(q.shape[3])
        pos = np.arange(S)[:, None] + n - S  # query i sits at position n - S + i
        s = np.where(np.arange(n)[None, :] <= pos, s, -np.inf)
        m = np.max(s, axis=-1, keepdims=True)
        p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
        den = p.sum(-1, keepdims=True)
        out[b] = np.where(den > 0, (p @ vb) / np.where(den > 0, den, 1.0), 0.0)
    return out


class Model:
    """The application's numpy model: per layer, projections to q, k, v and back."""

    def __init__(self, rng: np.random.Generator):
        scale = 1 / math.sqrt(D_MODEL)
        self.wq = [rng.standard_normal((D_MODEL, HQ * D)) * scale for _ in range(LAYERS)]
        self.wk = [rng.standard_normal((D_MODEL, HKV * D)) * scale for _ in range(LAYERS)]
        self.wv = [rng.standard_normal((D_MODEL, HKV * D)) * scale for _ in range(LAYERS)]
        self.wo = [rng.standard_normal((HQ * D, D_MODEL)) / math.sqrt(HQ * D) for _ in range(LAYERS)]

    def qkv(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [B, n, D_MODEL] -> q [B, Hq, n, D], k and v [B, Hkv, n, D] (float32)."""
        B, n, _ = x.shape

        def heads(y: np.ndarray, h: int) -> np.ndarray:
            return np.ascontiguousarray(y.reshape(B, n, h, D).transpose(0, 2, 1, 3), np.float32)

        return heads(x @ self.wq[layer], HQ), heads(x @ self.wk[layer], HKV), heads(x @ self.wv[layer], HKV)

    def mix(self, layer: int, x: np.ndarray, o: np.ndarray) -> np.ndarray:
        """The next hidden state from the attention output o [B, Hq, n, D]."""
        B, _, n, _ = o.shape
        return np.tanh(x + o.transpose(0, 2, 1, 3).reshape(B, n, HQ * D) @ self.wo[layer])


def application_device(backend: str) -> tuple[object, object]:
    """The application's own GPUDevice, made with wgpu (or Dawn): timestamps if the adapter
    has them; attnc gets the device as it is and requests nothing more."""
    module = importlib.import_module({"wgpu": "wgpu", "dawn": "wgpudawn"}[backend])
    adapter = module.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        sys.exit(f"no {backend} adapter")
    features = [f for f in ("timestamp-query",) if f in adapter.features]
    return module, adapter.request_device_sync(required_features=features)


class Timestamps:
    """GPU time of the passes recorded between `begin` and `end`: two empty compute passes
    that write a timestamp each (attnc's passes run in between, in recording order)."""

    def __init__(self, module, gpu):
        self.on = "timestamp-query" in gpu.features
        if self.on:
            self.gpu = gpu
            self.queries = gpu.create_query_set(type="timestamp", count=2)
            usage = module.BufferUsage
            self.resolved = gpu.create_buffer(size=16, usage=usage.QUERY_RESOLVE | usage.COPY_SRC)
            self.period = 1.0
            if module.__name__ == "wgpu":  # wgpu-native resolves raw ticks
                from wgpu.backends.wgpu_native._ffi import lib

                self.period = float(lib.wgpuQueueGetTimestampPeriod(gpu.queue._internal))

    def mark(self, encoder, index: int) -> None:
        if self.on:
            writes = {"query_set": self.queries, "beginning_of_pass_write_index": index}
            encoder.begin_compute_pass(timestamp_writes=writes).end()

    def resolve(self, encoder) -> None:
        if self.on:
            encoder.resolve_query_set(self.queries, 0, 2, self.resolved, 0)

    def read_us(self) -> float | None:
        if not self.on:
            return None
        ticks = np.frombuffer(self.gpu.queue.read_buffer(self.resolved), np.uint64).astype(np.int64)
        return float(ticks[1] - ticks[0]) * self.period / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--backend", choices=("wgpu", "dawn"), default="wgpu")
    ap.add_argument("--kv-format", choices=quant.FORMATS, help="keep K and V quantized in this format")
    ap.add_argument("--json", help="write the per-step measurements and the summary here")
    args = ap.parse_args(argv)
    fmt = args.kv_format

    def stored(rows: np.ndarray) -> np.ndarray:
        """Rows [..., D] as the cache holds them: themselves, or quantized and read back."""
        return rows if fmt is None else quant.dequantize(quant.quantize(rows, fmt)).astype(np.float32)

    module, gpu = application_device(args.backend)
    dev = attnc.get_device(gpu)  # the application's device, as an attnc Device
    print(f"device: {dev!r}; features the application enabled: {sorted(gpu.features)}")
    rng = np.random.default_rng(0)
    model = Model(rng)
    B, capacity = len(PROMPTS), max(PROMPTS) + args.steps
    caches = [attnc.KVCache(B, HKV, capacity, D, device=dev, k_format=fmt, v_format=fmt) for _ in range(LAYERS)]
    mirrors = [(np.zeros((B, HKV, capacity, D), np.float32), np.zeros((B, HKV, capacity, D), np.float32))
               for _ in range(LAYERS)]
    timer = Timestamps(module, gpu)

    # prefill: the prompts (padded to the longest), one ragged append per layer
    S = max(PROMPTS)
    x = rng.standard_normal((B, S, D_MODEL))
    for b, n in enumerate(PROMPTS):  # row b's prompt is its last n positions
        x[b, : S - n] = 0.0
    worst = 0.0
    for layer, cache in enumerate(caches):
        q, k, v = model.qkv(layer, x)
        # row b keeps its last PROMPTS[b] tokens: shift them to the front of the new rows
        k_rows = np.stack([np.roll(k[b], n - S, axis=1) for b, n in enumerate(PROMPTS)])
        v_rows = np.stack([np.roll(v[b], n - S, axis=1) for b, n in enumerate(PROMPTS)])
        cache.append(k_rows, v_rows, counts=list(PROMPTS))
        mk, mv = mirrors[layer]
        for b, n in enumerate(PROMPTS):
            mk[b, :, :n], mv[b, :, :n] = stored(k_rows[b, :, :n]), stored(v_rows[b, :, :n])
        o = cache.attend(q, causal=True)  # host q: the result comes back as numpy
        ref = reference(q, mk, mv, cache.lengths)
        worst = max(worst, float(np.linalg.norm(o - ref) / np.linalg.norm(ref)))
        x = model.mix(layer, x, o)
    print(f"prefill: prompts {list(PROMPTS)}, relative error {worst:.2e}")

    # decode: GPU tensors for the step's new query and K/V rows, outputs per layer
    q_t = [attnc.zeros((B, HQ, 1, D), device=dev) for _ in range(LAYERS)]
    k_t = [attnc.zeros((B, HKV, 1, D), device=dev) for _ in range(LAYERS)]
    v_t = [attnc.zeros((B, HKV, 1, D), device=dev) for _ in range(LAYERS)]
    o_t = [attnc.zeros((B, HQ, 1, D), device=dev) for _ in range(LAYERS)]
    x = x[:, -1:]
    rows, worst = [], 0.0
    for step in range(args.steps):
        projected = [model.qkv(layer, x) for layer in range(LAYERS)]  # (a real model: layer by layer on the GPU)
        before = dev.counters.snapshot()
        t0, c0 = time.perf_counter(), time.thread_time()
        encoder = gpu.create_command_encoder()
        timer.mark(encoder, 0)
        for layer, cache in enumerate(caches):
            q, k, v = projected[layer]
            q_t[layer].write(q)
            k_t[layer].write(k)
            v_t[layer].write(v)
            # append this token's K/V rows, then attend: one compute pass per layer
            cache.attend(q_t[layer], causal=True, out=o_t[layer], encoder=encoder, append=(k_t[layer], v_t[layer]))
        timer.mark(encoder, 1)
        timer.resolve(encoder)
        gpu.queue.submit([encoder.finish()])
        host_us, cpu_us = (time.perf_counter() - t0) * 1e6, (time.thread_time() - c0) * 1e6
        moved = dev.counters.since(before)
        outs = [t.numpy() for t in o_t]  # waits for the GPU
        gpu_us = timer.read_us()
        err = 0.0
        for layer in range(LAYERS):
            q, k, v = projected[layer]
            mk, mv = mirrors[layer]
            for b in range(B):
                n = int(caches[layer].lengths[b]) - 1
                mk[b, :, n], mv[b, :, n] = stored(k[b, :, 0]), stored(v[b, :, 0])
            ref = reference(q, mk, mv, caches[layer].lengths)
            err = max(err, float(np.linalg.norm(outs[layer] - ref) / np.linalg.norm(ref)))
            x = model.mix(layer, x, outs[layer])
        worst = max(worst, err)
        rows.append({"step": step, "host_us": host_us, "host_cpu_us": cpu_us, "gpu_us": gpu_us,
                     "bytes_uploaded": moved["bytes_uploaded"],
                     "buffers_created": moved["buffers_created"], "relative_error": err})
        if step % 32 == 0 or step == args.steps - 1:
            gpu_text = "n/a" if gpu_us is None else f"{gpu_us:8.1f} us"
            print(f"step {step:4d}: keys {caches[0].lengths.tolist()}, host {host_us:8.1f} us (CPU {cpu_us:7.1f} us), "
                  f"GPU {gpu_text}, uploaded {moved['bytes_uploaded']} B, relative error {err:.2e}")
        if err > 1e-5:
            print(f"step {step}: relative error {err:.3e} above 1e-5", file=sys.stderr)
            return 1

    step_bytes = LAYERS * (B * HQ * D + 2 * B * HKV * D) * 4
    later = rows[2:] or rows
    summary = {
        "device": repr(dev), "steps": args.steps, "layers": LAYERS, "batch": B, "heads": [HQ, HKV], "head_dim": D,
        "kv_format": fmt,
        "host_us_median": statistics.median(r["host_us"] for r in later),
        "host_cpu_us_median": statistics.median(r["host_cpu_us"] for r in later),
        "gpu_us_median": None if rows[0]["gpu_us"] is None else statistics.median(r["gpu_us"] for r in later),
        "bytes_uploaded_per_step": sorted({r["bytes_uploaded"] for r in later}),
        "new_q_and_kv_bytes_per_step": step_bytes,
        "buffers_created_after_step_2": sum(r["buffers_created"] for r in later),
        "max_relative_error": worst,
    }
    gpu_text = "n/a" if summary["gpu_us_median"] is None else f"{summary['gpu_us_median']:.1f} us"
    print(f"summary: {args.steps} steps x {LAYERS} layers, median host {summary['host_us_median']:.1f} us "
          f"(CPU {summary['host_cpu_us_median']:.1f} us), median GPU {gpu_text} per step; "
          f"uploaded {summary['bytes_uploaded_per_step']} B per step "
          f"(the new q, k and v rows: {step_bytes} B); buffers created after step 2: "
          f"{summary['buffers_created_after_step_2']}; max relative error {worst:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "steps": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
