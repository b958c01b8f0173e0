"""Paged against contiguous decode on one device: the same keys and values, once as [B, Hkv, T, D]
tensors and once as shuffled pages [pages, Hkv, P, D] with a block table, each op recorded
ROUNDS x CALLS times into one command encoder (no host work between calls), alternating, with
the per-call time of each round's submission; prints the medians and paged/contiguous.

    python tools/gpu/paged_probe.py DEVICE [--dtype f16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import attnc
from attnc.runtime.api import prepare_dims
from attnc.runtime.paged import validate_paged

CASES = {"dec_gqa8_kv7680": dict(B=1, Hq=64, Hkv=8, S=1, T=7680, D=64),
         "dec4_gqa8_kv7680": dict(B=1, Hq=64, Hkv=8, S=4, T=7680, D=64),
         "dec_h128_kv16384": dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128)}
PAGE_SIZES = (16, 256)


def per_call_ms(dev: attnc.Device, call, calls: int, out: attnc.Tensor) -> float:
    """Wall time of one submission of `calls` recorded calls, per call (GPU-bound: no host work
    between), waited for by reading `out` back (a few KiB, amortized over the calls)."""
    encoder = dev.gpu.create_command_encoder()
    for _ in range(calls):
        call(encoder)
    buf = encoder.finish()
    t = time.perf_counter()
    dev.gpu.queue.submit([buf])
    out.numpy()
    return (time.perf_counter() - t) * 1e3 / calls


def probe(dev: attnc.Device, name: str, dims: dict[str, int], page: int, dtype: np.dtype,
          rounds: int, calls: int) -> dict:
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, T, D = (dims[x] for x in ("B", "Hq", "Hkv", "S", "T", "D"))
    q = rng.standard_normal((B, Hq, S, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, T, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, T, D)).astype(dtype)
    n_pages = B * (-(-T // page))
    order = rng.permutation(n_pages)
    table = order.reshape(B, -1).astype(np.int32)
    kp = np.zeros((n_pages, Hkv, page, D), dtype)
    vp = np.zeros_like(kp)
    for b in range(B):
        for j, p in enumerate(table[b]):
            rows = slice(j * page, min((j + 1) * page, T))
            kp[p, :, : rows.stop - rows.start] = k[b, :, rows]
            vp[p, :, : rows.stop - rows.start] = v[b, :, rows]
    lens = np.full(B, T, np.int32)
    qt, kt, vt, kpt, vpt = (attnc.tensor(x, device=dev) for x in (q, k, v, kp, vp))
    tt, lt = attnc.tensor(table, device=dev), attnc.tensor(lens, device=dev)
    contiguous = attnc.prepare(qt, kt, vt)
    pdims = validate_paged(qt, kpt, vpt, tt)
    paged = prepare_dims(pdims, q.dtype, device=dev, paged=True, inputs={"block_table": tt}, kv_lens=lt)
    o1, o2 = attnc.zeros(q.shape[:3] + (D,), dtype, device=dev), attnc.zeros(q.shape[:3] + (D,), dtype, device=dev)
    contiguous(qt, kt, vt, out=o1)
    paged(qt, kpt, vpt, out=o2, block_table=tt, kv_lens=lt)
    err = float(np.abs(o1.numpy().astype(np.float64) - o2.numpy()).max())
    times: dict[str, list[float]] = {"contiguous": [], "paged": []}
    for r in range(rounds + 1):  # the first round warms clocks and caches
        c = per_call_ms(dev, lambda e: contiguous(qt, kt, vt, out=o1, encoder=e), calls, o1)
        p = per_call_ms(dev, lambda e: paged(qt, kpt, vpt, out=o2, block_table=tt, kv_lens=lt, encoder=e), calls, o2)
        if r:
            times["contiguous"].append(c)
            times["paged"].append(p)
    med = {k2: statistics.median(x) for k2, x in times.items()}
    return dict(case=name, page_size=page, dtype=str(np.dtype(dtype)), contiguous_ms=med["contiguous"],
                paged_ms=med["paged"], ratio=med["paged"] / med["contiguous"], max_abs_diff=err,
                contiguous_variant=contiguous.variant, paged_variant=paged.variant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = attnc.get_device(a.device)
    dtype = np.float16 if a.dtype == "f16" else np.float32
    rows = []
    for name in a.cases.split(","):
        for page in PAGE_SIZES:
            row = probe(dev, name, CASES[name], page, dtype, a.rounds, a.calls)
            rows.append(row)
            print(f"{name} P={page} {a.dtype}: contiguous {row['contiguous_ms']:.4f} ms, "
                  f"paged {row['paged_ms']:.4f} ms, paged/contiguous {row['ratio']:.3f} "
                  f"(max |diff| {row['max_abs_diff']:.1e})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=repr(dev), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
