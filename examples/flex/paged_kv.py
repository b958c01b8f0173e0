"""Paged keys and values, as in a KV cache: the keys of sequence b are pages of P rows in a
shared pool, listed in order by block_table[b] (vLLM's layout). `attnc.paged_attention` runs
the shipped flash kernel reading K and V through the table, with every option of
attnc.attention; `paged_attention` below is the same idea written as a kernel of one's own
(DSL code with indirect indexing), run with `attnc.build`."""

import numpy as np

import attnc
from attnc import dim, dot, f32, grid, i32, inf, let, online_softmax, tiles, tunable, where

Q = f32["B", "Hq", "S", "D"]
K_PAGES = f32["NP", "Hkv", "P", "D"]  # NP pages of P keys
V_PAGES = f32["NP", "Hkv", "P", "Dv"]


def paged_decode(q, k_pages, v_pages, block_table, seq_lens, **options):
    """Causal attention of the last S tokens of each sequence over its seq_lens[b] keys."""
    return attnc.paged_attention(q, k_pages, v_pages, block_table, kv_lens=seq_lens, causal=True, **options)


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
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    lens = np.array([64, 37], np.int32)
    o = paged_decode(q, pool_k, pool_v, table, lens)
    op = attnc.build(paged_attention)
    o_own = op(q=q, k_pages=pool_k, v_pages=pool_v, scale=D ** -0.5, seq_lens=lens, page_table=table, dims={"T": 64})
    print(o.shape, float(np.abs(o - o_own).max()))
