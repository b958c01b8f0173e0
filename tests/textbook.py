"""A textbook float64 attention, written from the semantics in docs/API.md (not from attnc's code).

Dense [B, Hq, S, T] scores, explicit boolean masks, one softmax over the key axis. The order
of the contract is followed literally:

    s = (q . k) * scale                       scale defaults to 1/sqrt(D)
    softcap c:      s = c * tanh(s / c)
    alibi slopes:   s += slope[h] * (j - i_abs)
    bias:           s += bias (broadcast to [B, Hq, S, T])
    score_mod:      s = score_mod(s, b, h, i, j)   (i: the raw query row index, as attnc passes it)
    i_abs = i + L - S, L = kv_lens[b] if given else T
    masked:         j >= L (kv_lens), j > i_abs (causal), j outside [i_abs - left, i_abs + right]
                    (window, None side unbounded), not mask_mod(b, h, i, j)
    sinks[h]:       one extra logit in the softmax denominator, contributing no value
    o = sum_j p_j v_j,  lse = log(denominator);  a row with every key masked and no sink gives
    o = 0 and lse = -inf, never NaN; NaN inputs propagate to the affected rows (a NaN or inf in
    k or v reaches only the rows that see its key).
    sinks[h] = +inf takes all the weight (o = 0, lse = +inf, masked keys or not); -inf is no
    sink; NaN makes the head's rows NaN.

`score_mod` / `mask_mod` here take numpy arrays (broadcast index grids b [B,1,1,1], h [1,Hq,1,1],
i [1,1,S,1], j [1,1,1,T]); tests pass the numpy twin of the DSL function they give attnc.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np


def attention_ref(q, k, v, *, causal: bool = False, scale: float | None = None,
                  window: tuple[int | None, int | None] | None = None, bias=None,
                  alibi_slopes=None, softcap: float | None = None, sinks=None, kv_lens=None,
                  score_mod: Callable | None = None, mask_mod: Callable | None = None,
                  return_lse: bool = False):
    """o [B, Hq, S, Dv] (and lse [B, Hq, S]) in float64, from the values of the given arrays."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, Hq, S, D = q.shape
    _, Hkv, T, _ = k.shape
    assert Hq % Hkv == 0
    group = Hq // Hkv
    # GQA: query head h reads kv head h // group
    kh = np.repeat(k, group, axis=1)
    vh = np.repeat(v, group, axis=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    with np.errstate(all="ignore"):
        s = np.einsum("bhid,bhjd->bhij", q, kh) * float(scale)

        bi = np.arange(B).reshape(B, 1, 1, 1)
        hi = np.arange(Hq).reshape(1, Hq, 1, 1)
        i = np.arange(S).reshape(1, 1, S, 1)
        j = np.arange(T).reshape(1, 1, 1, T)
        L = np.full((B, 1, 1, 1), T, dtype=np.int64)
        if kv_lens is not None:
            L = np.asarray(kv_lens, dtype=np.int64).reshape(B, 1, 1, 1)
        i_abs = i + L - S

        if softcap is not None:
            c = float(softcap)
            s = c * np.tanh(s / c)
        if alibi_slopes is not None:
            slope = np.asarray(alibi_slopes, dtype=np.float64).reshape(1, Hq, 1, 1)
            s = s + slope * (j - i_abs).astype(np.float64)
        if bias is not None:
            s = s + np.broadcast_to(np.asarray(bias, dtype=np.float64), (B, Hq, S, T))
        if score_mod is not None:
            s = np.broadcast_to(np.asarray(score_mod(s, bi, hi, i, j), dtype=np.float64),
                                (B, Hq, S, T))

        keep = np.ones((B, Hq, S, T), dtype=bool)
        if kv_lens is not None:
            keep &= j < L
        if causal:
            keep &= j <= i_abs
        if window is not None:
            left, right = window
            if left is not None:
                keep &= j >= i_abs - left
            if right is not None:
                keep &= j <= i_abs + right
        if mask_mod is not None:
            keep &= np.broadcast_to(np.asarray(mask_mod(bi, hi, i, j), dtype=bool), keep.shape)

        s = np.where(keep, s, -np.inf)
        m = s.max(axis=-1)  # [B, Hq, S]; NaN propagates, -inf when all masked
        if sinks is not None:
            sink = np.broadcast_to(np.asarray(sinks, dtype=np.float64).reshape(1, Hq, 1), m.shape)
            m = np.maximum(m, sink)  # np.maximum propagates NaN
        m_safe = np.where(np.isneginf(m), 0.0, m)
        p = np.exp(s - m_safe[..., None])  # exp(-inf) = 0 on masked keys
        denom = p.sum(axis=-1)
        if sinks is not None:  # exp(0) for the max: a sink of +inf takes all the weight (o = 0, lse = +inf)
            denom = denom + np.exp(np.where(sink == m_safe, 0.0, sink - m_safe))
        if np.isfinite(vh).all():
            num = np.einsum("bhij,bhjd->bhid", p, vh)
        else:  # only the keys a row sees: a masked key's NaN / inf value is never read (0 * NaN = NaN)
            num = np.einsum("bhij,bhijd->bhid", p, np.where(keep[..., None], vh[:, :, None], 0.0))
        zero = denom == 0  # False for NaN, so NaN rows stay NaN
        o = np.where(zero[..., None], 0.0, num / np.where(zero, 1.0, denom)[..., None])
        lse = np.where(zero, -np.inf, m_safe + np.log(np.where(zero, 1.0, denom)))
    return (o, lse) if return_lse else o


def rel_err(a, b) -> float:
    """Frobenius relative error ||a - b|| / ||b|| in float64 (absolute error when ||b|| = 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.linalg.norm((a - b).ravel()))
    ref = float(np.linalg.norm(b.ravel()))
    return diff if ref == 0.0 else diff / ref


# GPUs may flush f32 subnormals to zero (WGSL allows it): a softmax weight under 2^-126 of the
# row's largest can vanish, changing o by less than T * 2^-126 * max|v| (under 1e-30 for every
# size tested); that much of each element's difference is not counted (docs/API.md, Accuracy).
FLUSHED = 1e-30


def assert_close(got, ref, tol: float, what: str = "o") -> None:
    """NaN and +-inf where the reference has them (same places), rel_err <= tol elsewhere, after
    forgiving each element FLUSHED of absolute difference (subnormal weights flushed to zero)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    nan_ref, nan_got = np.isnan(ref), np.isnan(got)
    assert np.array_equal(nan_ref, nan_got), (
        f"{what}: NaN at {np.argwhere(nan_got).tolist()[:8]}, expected at {np.argwhere(nan_ref).tolist()[:8]}")
    inf_ref = np.isinf(ref)
    assert np.array_equal(inf_ref, np.isinf(got)) and np.array_equal(ref[inf_ref], got[inf_ref]), (
        f"{what}: infinities differ: got {np.argwhere(np.isinf(got)).tolist()[:8]}, "
        f"expected {np.argwhere(inf_ref).tolist()[:8]}")
    fin = ~(nan_ref | inf_ref)
    diff = np.maximum(np.abs(got[fin] - ref[fin]) - FLUSHED, 0.0)
    err = rel_err(ref[fin] + diff, ref[fin]) if diff.any() else 0.0
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


API_MD = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def capture_dtypes() -> dict[str, tuple[str, str]]:
    """docs/API.md's table of the arrays a mod may capture: numpy dtype name -> (what the kernel
    reads it as, how it is stored on the device), one entry per dtype the table names."""
    lines = API_MD.read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("| numpy dtype of the array |"))
    out: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names, read_as, stored = (cell.strip() for cell in line.strip("|").split("|"))
        for name in re.sub(r"\(.*?\)", "", names).split(","):
            out[name.strip()] = (read_as, stored)
    return out
