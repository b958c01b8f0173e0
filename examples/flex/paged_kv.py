"""Paged keys and values, as in a KV cache: the keys of sequence b are pages of P rows in a
shared pool, listed in order by page_table[b]. A custom kernel (DSL code) reads them through the
table; `attnc.build` runs it from Python."""

import numpy as np

import attnc
from attnc import dim, dot, f32, grid, i32, inf, let, online_softmax, tiles, tunable, where

Q = f32["B", "Hq", "S", "D"]
K_PAGES = f32["NP", "Hkv", "P", "D"]  # NP pages of P keys
V_PAGES = f32["NP", "Hkv", "P", "Dv"]


@attnc.kernel
def paged_attention(q: Q, k_pages: K_PAGES, v_pages: V_PAGES, scale: f32, *, BM=tunable(16), BN=tunable(32)):
    """Queries aligned to the end of each sequence's seq_lens[b] keys (decoding), causal."""
    b, h, qi = grid(b="B", h="Hq", qi=tiles("S", BM))
    hk = let("hk", h // (dim("Hq") // dim("Hkv")))
    length = let("len", attnc.input("seq_lens", i32["B"])[b])
    qpos = let("qpos", qi + length - dim("S"))
    acc = online_softmax(rows=qi, width="Dv")
    for kj in tiles("T", BN):  # T: the longest sequence, a size the caller gives
        page = let("page", attnc.input("page_table", i32["B", "NB"])[b, kj // dim("P")])
        s = dot(q[b, h, qi, :], k_pages[page, hk, kj % dim("P"), :]) * scale
        acc.update(where((kj < length) & (kj <= qpos), s, -inf), v_pages[page, hk, kj % dim("P"), :])
    return acc.result()


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, D, P, pages = 2, 8, 2, 1, 64, 16, 12
    pool_k, pool_v = (rng.standard_normal((pages, Hkv, P, D)).astype(np.float32) for _ in range(2))
    table = rng.permutation(pages)[:B * 4].reshape(B, 4).astype(np.int32)  # 4 pages per sequence
    op = attnc.build(paged_attention)
    o = op(q=rng.standard_normal((B, Hq, S, D)).astype(np.float32), k_pages=pool_k, v_pages=pool_v,
           scale=D ** -0.5, seq_lens=np.array([64, 37], np.int32), page_table=table, dims={"T": 64})
    print(o.shape)
