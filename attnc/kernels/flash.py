"""The shipped kernels, written in the DSL: FlashAttention prefill and split-KV decode, over
contiguous or paged keys and values.

One kernel body covers every option of `attnc.attention`: each option adds a line or two of
DSL (a score modifier or a mask term), so every variant shares one description. The paged
kernel is the same body reading K and V through a block table (indirect indexing): the keys
of batch row b are the pages block_table[b, 0], block_table[b, 1], ... of a shared pool.
"""


from collections.abc import Callable

from attnc.frontend.dsl import (
    apply_mod,
    dim,
    dot,
    f32,
    grid,
    i32,
    inf,
    input,
    kernel,
    let,
    minimum,
    online_softmax,
    scalar,
    splits,
    tanh,
    tiles,
    tunable,
    where,
)

ScoreMod = Callable[..., object]
MaskMod = Callable[..., object]
Window = tuple[int | None, int | None]  # (left, right); an end that is None is open
# a window side past every distance between a query and a key (2^30: positions lie within 2^29
# of 0, as no binding holds more rows): larger sides read as this one, so that the bounds
# `qpos - left` and `qpos + right` stay within i32 for every side a caller passes (2^31 - 1 wrapped)
WINDOW_SIDE_CAP = 1 << 30


# Tensor types: dtype and symbolic dims (BHSD; the runtime passes strides, so BSHD works too).
Q = f32["B", "Hq", "S", "D"]
K = f32["B", "Hkv", "T", "D"]
V = f32["B", "Hkv", "T", "Dv"]
# paged K/V: NP pages of P keys each; a row's key j is in page block_table[b, j // P], row j % P
K_PAGES = f32["NP", "Hkv", "P", "D"]
V_PAGES = f32["NP", "Hkv", "P", "Dv"]


@kernel
def flash_attention(q: Q, k: K, v: V, scale: f32, *,
                    BM=tunable(32), BN=tunable(32), split=False,
                    causal=False, window: Window | None = None, softcap=False, alibi=False, bias=False,
                    sinks=False, kv_lens=False, score_mod: ScoreMod | None = None,
                    mask_mod: MaskMod | None = None, lse=False, pack_gqa=False, offsets=False):
    """FlashAttention with every option of attnc.attention; split=True gives flash-decoding.

    offsets=True computes one chunk of a larger problem: query rows start at q_offset of
    q_total, keys at kv_offset of kv_total, and positions in masks and mods are absolute; the
    mods also see the batch and query head of the whole problem (b_offset, h_offset) and its
    sizes for dim("B"), dim("Hq"), dim("Hkv"), dim("S"), dim("T") (b_total, hq_total,
    hkv_total, q_total, kv_total).
    """
    return _attention(q, k, v, scale, BM=BM, BN=BN, split=split, causal=causal, window=window, softcap=softcap,
                      alibi=alibi, bias=bias, sinks=sinks, kv_lens=kv_lens, score_mod=score_mod, mask_mod=mask_mod,
                      lse=lse, pack_gqa=pack_gqa, offsets=offsets, paged=False)


@kernel
def paged_flash_attention(q: Q, k: K_PAGES, v: V_PAGES, scale: f32, *,
                          BM=tunable(32), BN=tunable(32), split=False,
                          causal=False, window: Window | None = None, softcap=False, alibi=False, bias=False,
                          sinks=False, kv_lens=False, score_mod: ScoreMod | None = None,
                          mask_mod: MaskMod | None = None, lse=False, pack_gqa=False):
    """flash_attention over paged K/V: k [NP, Hkv, P, D] and v [NP, Hkv, P, Dv] are pools of
    pages, block_table [B, NB] (i32) lists each batch row's pages in order; T = NB * P is the
    longest sequence (kv_lens gives each row's length). Every option works as for
    flash_attention; the page of a key is read once per key and indexes both K and V."""
    return _attention(q, k, v, scale, BM=BM, BN=BN, split=split, causal=causal, window=window, softcap=softcap,
                      alibi=alibi, bias=bias, sinks=sinks, kv_lens=kv_lens, score_mod=score_mod, mask_mod=mask_mod,
                      lse=lse, pack_gqa=pack_gqa, offsets=False, paged=True)


def _attention(q, k, v, scale, *, BM, BN, split, causal, window, softcap, alibi, bias, sinks, kv_lens,
               score_mod, mask_mod, lse, pack_gqa, offsets, paged):
    """The body of both kernels (contiguous or paged K/V)."""
    group = dim("Hq") // dim("Hkv")
    if pack_gqa:  # the query heads sharing a KV head are rows of one tile: K/V are read once
        axes = dict(b="B", hk="Hkv", r=tiles("R", BM))  # R = (Hq / Hkv) * S, same memory as [Hq, S]
    else:
        axes = dict(b="B", h="Hq", qi=tiles("S", BM))
    if split:
        axes["ks"] = splits("T", "NSPLIT")
    b, x, rows, *ks = grid(**axes)
    # row: the query row within this call's q (what q and the bias are indexed by); qi: the
    # position of that row in the whole problem (what masks and mods see). They differ only
    # with offsets; with packed GQA rows neither is the tile variable `rows`.
    if pack_gqa:
        hk = x
        h = let("h", hk * group + rows // dim("S"))
        row = let("i", rows % dim("S"))
    else:
        h, row = x, rows
        hk = let("hk", h // group)
    n_keys, n_queries = (scalar("kv_total", i32), scalar("q_total", i32)) if offsets else (dim("T"), dim("S"))
    length = let("len", input("kv_lens", i32["B"])[b]) if kv_lens else n_keys
    qi = let("qabs", row + scalar("q_offset", i32)) if offsets else row
    qpos = let("qpos", qi + (length - n_queries))  # queries aligned to the end of the keys
    mb, mh, whole = b, h, None  # what the mods see: the batch, the query head, the dims
    if offsets and (score_mod is not None or mask_mod is not None):
        mb = let("babs", b + scalar("b_offset", i32))
        mh = let("habs", h + scalar("h_offset", i32))
        whole = {"B": lambda: scalar("b_total", i32), "Hq": lambda: scalar("hq_total", i32),
                 "Hkv": lambda: scalar("hkv_total", i32), "S": lambda: n_queries, "T": lambda: n_keys}
    acc = online_softmax(rows=rows, width="Dv")
    for kt in tiles("T", BN, split=ks[0] if ks else None):
        kj = let("kabs", kt + scalar("kv_offset", i32)) if offsets else kt
        if paged:  # the key's page in the pool, and its row in the page
            page = let("page", input("block_table", i32["B", "NB"])[b, kt // dim("P")])
            krow, kb = let("prow", kt % dim("P")), page
        else:
            krow, kb = kt, b
        s = let("s", dot(q[b, h, row, :], k[kb, hk, krow, :]) * scale)
        if softcap:
            cap = scalar("softcap")
            s = let("capped", cap * tanh(s / cap))
        if alibi:
            s = let("alibi", s + input("alibi_slopes", f32["Hq"])[h] * f32(kj - qpos))
        if bias:
            s = let("biased", s + input("bias", f32["B", "Hq", "S", "T"])[b, h, row, kt])
        if score_mod is not None:
            s = let("mod", apply_mod(score_mod, (s, mb, mh, qi, kj), "score", whole))
        keep = None
        if kv_lens:
            keep = kj < length
        if causal:
            keep = _and(keep, kj <= qpos)
        if window is not None:
            left, right = window
            if left is not None:
                keep = _and(keep, kj >= qpos - minimum(scalar("window_left", i32), WINDOW_SIDE_CAP))
            if right is not None:
                keep = _and(keep, kj <= qpos + minimum(scalar("window_right", i32), WINDOW_SIDE_CAP))
        if mask_mod is not None:
            keep = _and(keep, apply_mod(mask_mod, (mb, mh, qi, kj), "mask", whole))
        if keep is not None:
            s = where(let("keep", keep), s, -inf)
        acc.update(s, v[kb, hk, krow, :])
    if sinks:
        acc.sink(input("sinks", f32["Hq"])[h])
    return acc.combine(ks[0], lse=lse) if ks else acc.result(lse=lse)


def _and(a, b):
    """Conjunction that treats None as 'no mask yet'."""
    return b if a is None else a & b
