"""Problems larger than a storage binding: split over batch, then KV heads, then blocks of
query rows x keys (a kernel with absolute positions), merged by log-sum-exp on the host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnc.runtime.devices import Device


def binding_limit(dev: Device) -> int:
    """The largest buffer the device lets one binding see."""
    lim = dev.gpu.limits
    return min(int(lim.get("max-storage-buffer-binding-size", 2**27)), int(lim.get("max-buffer-size", 2**28)))


def largest_binding(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None) -> int:
    """Bytes of the largest buffer a call binds: an input, o (in q's dtype, float16 rows
    padded to an even length) or the compact bias."""
    B, Hq, S, _ = q.shape
    Dv = v.shape[3]
    row = Dv + Dv % 2 if q.dtype == np.float16 else Dv
    sizes = [q.nbytes, k.nbytes, v.nbytes, q.dtype.itemsize * B * Hq * S * row]
    if bias is not None:
        sizes.append(4 * int(np.asarray(bias).size))
    return max(sizes)


def chunked(q: np.ndarray, k: np.ndarray, v: np.ndarray, kw: dict[str, Any], limit: int,
            attend: Callable[..., Any], prepare: Callable[..., Any]) -> Any:
    """Attention in pieces when a binding would exceed the device's limit: halves of the batch,
    then halves of the KV heads (with their query heads); rows are independent across both.
    `attend` is `attnc.attention` (each half may be chunked again), `prepare` its `prepare`."""
    B, Hq, S, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    bias = kw.get("bias")
    full = None if bias is None else np.broadcast_to(bias, (B, Hq, S, T))
    if B > 1:
        cut = B // 2
        parts = [(slice(0, cut), slice(None)), (slice(cut, B), slice(None))]
    elif Hkv > 1:
        cut = Hkv // 2
        parts = [(slice(None), slice(0, cut)), (slice(None), slice(cut, Hkv))]
    else:
        return _chunk_sequence(q, k, v, kw, limit, prepare)
    outs = []
    for bs, hs in parts:
        qh = hs if hs == slice(None) else slice(hs.start * (Hq // Hkv), hs.stop * (Hq // Hkv))
        sub = dict(kw)
        if full is not None:
            sub["bias"] = np.ascontiguousarray(full[bs, qh])
        if kw.get("kv_lens") is not None:
            sub["kv_lens"] = kw["kv_lens"][bs]
        for name in ("alibi_slopes", "sinks"):
            if kw.get(name) is not None:
                sub[name] = kw[name][qh]
        outs.append(attend(q[bs, qh], k[bs, hs], v[bs, hs], **sub))
    axis = 0 if B > 1 else 1
    if kw.get("return_lse"):
        return (np.concatenate([o for o, _ in outs], axis), np.concatenate([lse for _, lse in outs], axis))
    return np.concatenate(outs, axis)


def _chunk_sequence(q: np.ndarray, k: np.ndarray, v: np.ndarray, kw: dict[str, Any], limit: int,
                    prepare: Callable[..., Any]) -> Any:
    """One head too large for a binding: blocks of query rows times blocks of keys, each a
    kernel with absolute positions (offsets), merged on the host by log-sum-exp (sinks too)."""
    B, Hq, S, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=Dv)
    bias = kw.get("bias")
    bias4 = None if bias is None else np.asarray(bias).reshape((1,) * (4 - np.ndim(bias)) + np.shape(bias))
    row = max(q.nbytes // S, 4 * Hq * Dv, 1)
    key = max(k.nbytes // T, v.nbytes // T, 1, 0 if bias4 is None else 4 * bias4[0, 0].size // max(T, 1))
    sq = max(1, int(limit * 0.9) // row)
    sk = max(1, int(limit * 0.9) // key)
    sinks = kw.get("sinks")
    opts = {n: x for n, x in kw.items() if n not in ("sinks", "return_lse", "bias")}
    o_rows, lse_rows = [], []
    for s0 in range(0, S, sq):
        s1 = min(S, s0 + sq)
        parts = []
        for t0 in range(0, T, sk):
            t1 = min(T, t0 + sk)
            sub = dict(opts)
            if bias4 is not None:
                sub["bias"] = bias4[:, :, s0:s1 if bias4.shape[2] > 1 else 1, t0:t1 if bias4.shape[3] > 1 else 1]
            cdims = {**dims, "S": s1 - s0, "T": t1 - t0}
            prep = prepare(cdims, q.dtype, return_lse=True, offsets=(s0, S, t0, T), **sub)
            prep.bind(q[:, :, s0:s1], k[:, :, t0:t1], v[:, :, t0:t1]).run()
            parts.append(prep.result())
        lse = np.stack([p[1] for p in parts]).astype(np.float64)  # [chunks, B, Hq, rows]
        if sinks is not None:
            z = np.broadcast_to(np.asarray(sinks, np.float64)[None, None, :, None], (1,) + lse.shape[1:])
            lse_all = np.concatenate([lse, z])
        else:
            lse_all = lse
        with np.errstate(all="ignore"):
            m = np.max(lse_all, axis=0)
            m = np.where(np.isneginf(m), 0.0, m)
            w = np.exp(lse - m)
            den = np.exp(lse_all - m).sum(axis=0)
            o = sum(wc[..., None] * p[0].astype(np.float64) for wc, p in zip(w, parts, strict=True))
            o = np.where((den > 0)[..., None], o / np.where(den > 0, den, 1.0)[..., None], 0.0)
            o = np.where(np.isnan(den)[..., None], np.nan, o)
            lse_out = np.where(den > 0, m + np.log(np.where(den > 0, den, 1.0)), -np.inf)
        o_rows.append(o.astype(q.dtype))
        lse_rows.append(lse_out.astype(np.float32))
    o_full = np.concatenate(o_rows, axis=2)
    return (o_full, np.concatenate(lse_rows, axis=2)) if kw.get("return_lse") else o_full
