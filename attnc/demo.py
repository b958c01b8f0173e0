"""The main job: run the shipped kernels on a device and check each against the IR reference."""

from __future__ import annotations

import time

import numpy as np

# (label, q/k/v dims (B, Hq, Hkv, S, T, D, Dv), attention() options)
CASES: list[tuple[str, tuple[int, ...], dict]] = [
    ("prefill causal GQA", (1, 8, 2, 96, 96, 64, 64), {"causal": True}),
    ("prefill head 72", (1, 4, 4, 77, 77, 72, 72), {}),
    ("prefill head 256", (1, 2, 1, 40, 40, 256, 256), {"causal": True}),
    ("window + kv_lens + sinks", (2, 4, 2, 33, 60, 64, 64),
     {"window": (16, 0), "kv_lens": np.array([60, 41]), "sinks": "per-head", "return_lse": True}),
    ("softcap + alibi", (1, 4, 4, 50, 50, 32, 32), {"softcap": 30.0, "alibi_slopes": "per-head"}),
    ("decode split-KV (Whisper)", (1, 6, 6, 4, 1500, 64, 64), {}),
    ("decode GQA f16", (1, 16, 4, 1, 2048, 64, 64), {"dtype": np.float16}),
]


def _args(dims: tuple[int, ...], opts: dict, rng: np.random.Generator):
    B, Hq, Hkv, S, T, D, Dv = dims
    dt = opts.pop("dtype", np.float32)
    q = rng.standard_normal((B, Hq, S, D)).astype(dt)
    k = rng.standard_normal((B, Hkv, T, D)).astype(dt)
    v = rng.standard_normal((B, Hkv, T, Dv)).astype(dt)
    for name in ("sinks", "alibi_slopes"):
        if opts.get(name) == "per-head":
            opts[name] = rng.uniform(-1, 1, Hq).astype(np.float32) if name == "sinks" else \
                (2.0 ** -np.arange(1, Hq + 1)).astype(np.float32)
    return q, k, v, opts


def reference(q, k, v, opts: dict):
    """Trace the same kernel the runtime uses and run the float64 IR interpreter on it."""
    from attnc.ir.interp import interpret
    from attnc.kernels.flash import flash_attention

    window = opts.get("window")
    kern = flash_attention.trace(
        causal=opts.get("causal", False), window=window, softcap="softcap" in opts,
        alibi="alibi_slopes" in opts, bias="bias" in opts, sinks="sinks" in opts,
        kv_lens="kv_lens" in opts, lse=opts.get("return_lse", False))
    args = {"q": q, "k": k, "v": v, "scale": 1.0 / np.sqrt(q.shape[-1])}
    for name in ("alibi_slopes", "sinks", "kv_lens", "softcap"):
        if name in opts:
            args[name] = opts[name]
    if window is not None:
        args.update({f"window_{s}": w for s, w in zip(("left", "right"), window, strict=True) if w is not None})
    return interpret(kern, args)


def run_demo(device: str | None = None, verbose: bool = True) -> int:
    """Run every case; print error and time; return 0 when all are within the contract."""
    import attnc

    dev = attnc.get_device(device)
    print(f"device: {dev!r} ({', '.join(sorted(dev.features)) or 'no optional features'})")
    rng = np.random.default_rng(0)
    failed = 0
    for label, dims, opts in CASES:
        q, k, v, opts = _args(dims, dict(opts), rng)
        tol = 2e-3 if q.dtype == np.float16 else 1e-5
        t0 = time.perf_counter()
        out = attnc.attention(q, k, v, device=dev, **opts)
        dt = time.perf_counter() - t0
        o = out[0] if isinstance(out, tuple) else out
        ref, _ = reference(q, k, v, opts)
        err = float(np.linalg.norm(o.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))
        ok = err <= tol
        failed += not ok
        if verbose:
            print(f"  {'ok  ' if ok else 'FAIL'} {label:28s} dims={dims} rel.err={err:.2e} "
                  f"(tol {tol:g}) {dt * 1e3:7.1f} ms incl. compile")
    print("all cases match the float64 reference" if not failed else f"{failed} case(s) FAILED")
    return 1 if failed else 0
