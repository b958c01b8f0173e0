"""Problems larger than a storage binding: split over batch, then KV heads, then blocks of
query rows x keys (a kernel with absolute positions), merged by log-sum-exp on the host.

Every piece computes its rows as in the whole problem: the options' tensors are sliced with
it (keeping their broadcast dims), and a piece that runs with `offsets` (whole_problem) sees
the whole problem's positions, and in score_mod/mask_mod its batch, query heads and sizes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from attnc.errors import DeviceError
from attnc.runtime.devices import Device
from attnc.runtime.tensor import host_array

OFFSET_KEYS = ("q_offset", "q_total", "kv_offset", "kv_total")


def binding_limit(dev: Device) -> int:
    """The largest buffer the device lets one binding see."""
    lim = dev.gpu.limits
    return min(int(lim.get("max-storage-buffer-binding-size", 2**27)), int(lim.get("max-buffer-size", 2**28)))


def binding_sizes(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None) -> dict[str, int]:
    """Bytes of each buffer a call binds by name: the inputs, o (in q's dtype, float16 rows
    padded to an even length) and the compact bias."""
    B, Hq, S, _ = q.shape
    Dv = v.shape[3]
    row = Dv + Dv % 2 if q.dtype == np.float16 else Dv
    sizes = {"q": q.nbytes, "k": k.nbytes, "v": v.nbytes, "o": q.dtype.itemsize * B * Hq * S * row}
    if bias is not None:
        arr = host_array("bias", bias)  # (a ValueError naming it for host data numpy cannot read)
        sizes["bias"] = 4 * int((np.asarray(bias) if arr is None else arr).size)
    return sizes


def largest_binding(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None) -> int:
    """Bytes of the largest buffer a call binds (binding_sizes)."""
    return max(binding_sizes(q, k, v, bias).values())


def whole_problem(dims: dict[str, int], offsets: Any) -> dict[str, int]:
    """The scalars that place one piece (of sizes `dims`) in the whole problem, from
    (q_offset, q_total, kv_offset, kv_total) or a dict of any of those and b_offset, b_total,
    h_offset (query heads), hq_total, hkv_total; what is not given is the piece's own."""
    out = {"q_offset": 0, "q_total": dims["S"], "kv_offset": 0, "kv_total": dims["T"],
           "b_offset": 0, "b_total": dims["B"], "h_offset": 0, "hq_total": dims["Hq"], "hkv_total": dims["Hkv"]}
    if isinstance(offsets, dict):
        given = dict(offsets)
    else:
        if len(tuple(offsets)) != len(OFFSET_KEYS):
            raise ValueError(f"offsets: expected ({', '.join(OFFSET_KEYS)}), got {offsets!r}")
        given = dict(zip(OFFSET_KEYS, offsets, strict=True))
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ValueError(f"offsets: unknown keys {unknown}; known: {sorted(out)}")
    out.update({n: int(x) for n, x in given.items()})
    return out


def split_limit(dev: Device, dims: dict[str, int]) -> int:
    """The most KV splits whose partial states ([B, Hq, S, splits, Dv + 2] f32) fit one binding."""
    per_split = 4 * dims["B"] * dims["Hq"] * dims["S"] * (dims["Dv"] + 2)
    return max(1, binding_limit(dev) // per_split)


def _bias4(bias: Any) -> np.ndarray | None:
    """The bias as a 4-d array with its broadcast (size-1) dims kept."""
    if bias is None:
        return None
    return np.asarray(bias).reshape((1,) * (4 - np.ndim(bias)) + np.shape(bias))


def _has_mods(kw: dict[str, Any]) -> bool:
    return kw.get("score_mod") is not None or kw.get("mask_mod") is not None


def chunked(q: np.ndarray, k: np.ndarray, v: np.ndarray, kw: dict[str, Any], limit: int,
            attend: Callable[..., Any], prepare: Callable[..., Any]) -> Any:
    """Attention in pieces when a binding would exceed the device's limit: halves of the batch,
    then halves of the KV heads (with their query heads); rows are independent across both.
    `attend` is `attnc.attention` (for the halves that fit), `prepare` its `prepare`."""
    B, Hq = q.shape[:2]
    whole = dict(b_offset=0, b_total=B, h_offset=0, hq_total=Hq, hkv_total=k.shape[1])
    return _halves(q, k, v, kw, limit, attend, prepare, whole)


def _halves(q: np.ndarray, k: np.ndarray, v: np.ndarray, kw: dict[str, Any], limit: int,
            attend: Callable[..., Any], prepare: Callable[..., Any], whole: dict[str, int]) -> Any:
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    if largest_binding(q, k, v, kw.get("bias")) <= limit:
        # a piece that fits runs whole; with a mod, through offsets, so that the mod sees the
        # batch, heads and sizes of the whole problem
        return _chunk_sequence(q, k, v, kw, limit, prepare, whole) if _has_mods(kw) else attend(q, k, v, **kw)
    if B > 1:
        cut = B // 2
        parts = [(slice(0, cut), slice(0, Hkv)), (slice(cut, B), slice(0, Hkv))]
    elif Hkv > 1:
        cut = Hkv // 2
        parts = [(slice(0, B), slice(0, cut)), (slice(0, B), slice(cut, Hkv))]
    else:
        return _chunk_sequence(q, k, v, kw, limit, prepare, whole)
    group = Hq // Hkv
    bias4 = _bias4(kw.get("bias"))
    outs = []
    for bs, hs in parts:
        qh = slice(hs.start * group, hs.stop * group)
        sub = dict(kw)
        if bias4 is not None:
            sub["bias"] = bias4[bs if bias4.shape[0] > 1 else slice(None), qh if bias4.shape[1] > 1 else slice(None)]
        if kw.get("kv_lens") is not None:
            sub["kv_lens"] = kw["kv_lens"][bs]
        for name in ("alibi_slopes", "sinks"):
            if kw.get(name) is not None:
                sub[name] = kw[name][qh]
        at = {**whole, "b_offset": whole["b_offset"] + bs.start, "h_offset": whole["h_offset"] + qh.start}
        kb = slice(0, 1) if k.shape[0] == 1 else bs  # K/V shared by the batch stay whole
        outs.append(_halves(q[bs, qh], k[kb, hs], v[kb, hs], sub, limit, attend, prepare, at))
    axis = 0 if B > 1 else 1
    if kw.get("return_lse"):
        return (np.concatenate([o for o, _ in outs], axis), np.concatenate([lse for _, lse in outs], axis))
    return np.concatenate(outs, axis)


def _chunk_sequence(q: np.ndarray, k: np.ndarray, v: np.ndarray, kw: dict[str, Any], limit: int,
                    prepare: Callable[..., Any], whole: dict[str, int]) -> Any:
    """Blocks of query rows times blocks of keys, each a kernel with absolute positions
    (offsets), merged on the host by log-sum-exp (sinks too). Every binding of a block fits
    `limit`: q and o by its rows, k and v by its keys, the bias by both where it has both."""
    B, Hq, S, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=Dv)
    bias4 = _bias4(kw.get("bias"))
    per_row = max(q.nbytes // S, 4 * B * Hq * Dv, 1)  # q and o of one query row (every batch, head)
    per_key = max(k.nbytes // T, v.nbytes // T, 1)  # k and v of one key
    if max(per_row, per_key) > limit:
        raise DeviceError(f"one query row or key of this problem needs {max(per_row, per_key)} bytes in one "
                          f"binding; the device grants max-storage-buffer-binding-size = {limit}")
    budget = int(limit * 0.9)
    sq = max(1, budget // per_row)
    sk = max(1, budget // per_key)
    if bias4 is not None:  # 4 bytes per (row, key) element of every batch and head it holds
        cell = 4 * bias4.shape[0] * bias4.shape[1]
        rows_too, keys_too = bias4.shape[2] > 1, bias4.shape[3] > 1
        if rows_too and keys_too:
            sq = min(sq, max(1, math.isqrt(budget // cell)))
            sk = min(sk, max(1, budget // (cell * sq)))
        elif rows_too:
            sq = min(sq, max(1, budget // cell))
        elif keys_too:
            sk = min(sk, max(1, budget // cell))
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
                sub["bias"] = bias4[:, :, slice(s0, s1) if bias4.shape[2] > 1 else slice(None),
                                    slice(t0, t1) if bias4.shape[3] > 1 else slice(None)]
            cdims = {**dims, "S": s1 - s0, "T": t1 - t0}
            at = {**whole, "q_offset": s0, "q_total": S, "kv_offset": t0, "kv_total": T}
            prep = _piece(prepare, cdims, q.dtype, at, sub, kw.get("return_lse"))
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
            d = np.where(lse_all == m, 0.0, lse_all - m)  # a sink of +inf: exp(0), not exp(inf - inf)
            w = np.exp(d[:len(parts)])
            den = np.exp(d).sum(axis=0)
            o = sum(wc[..., None] * p[0].astype(np.float64) for wc, p in zip(w, parts, strict=True))
            o = np.where((den > 0)[..., None], o / np.where(den > 0, den, 1.0)[..., None], 0.0)
            o = np.where(np.isnan(den)[..., None], np.nan, o)
            lse_out = np.where(den > 0, m + np.log(np.where(den > 0, den, 1.0)), -np.inf)
            lse_out = np.where(np.isnan(den), np.nan, lse_out)
        o_rows.append(o.astype(q.dtype))
        lse_rows.append(lse_out.astype(np.float32))
    o_full = np.concatenate(o_rows, axis=2)
    return (o_full, np.concatenate(lse_rows, axis=2)) if kw.get("return_lse") else o_full


def _piece(prepare: Callable[..., Any], dims: dict[str, int], dtype: Any, offsets: dict[str, int],
           opts: dict[str, Any], lse_asked: bool) -> Any:
    """The op of one block of rows x keys: it writes lse for the host's merge, one storage
    buffer more than a call without return_lse binds, which a refusal then says."""
    try:
        return prepare(dims, dtype, return_lse=True, offsets=offsets, **opts)
    except DeviceError as e:
        if lse_asked or "storage buffers" not in e.message:
            raise
        raise DeviceError(e.message, notes=(*e.notes, "this problem is larger than a storage binding, so it runs "
                                            "in blocks of keys merged on the host by their lse: one storage buffer "
                                            "more than the call alone (the whole call fits where the device grants "
                                            "a larger max-storage-buffer-binding-size)")) from None
