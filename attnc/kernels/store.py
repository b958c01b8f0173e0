"""The shipped store kernels, written in the DSL: append K/V rows to a cache in its format.

`kv_store` writes the rows x[b, h, n] of a [B, H, N, D] tensor at positions pos[b] + n of a
contiguous cache [B, H, C, D]; `kv_store_paged` writes them through a block table into a
pool of pages [NB, H, P, D] (row t of batch entry b lives in page table[b, t / P], slot t % P).
Trace with `cache_dtype=` "f32", "f16", "q8_0", "q4_0" or "int8" (x_dtype="f16" for f16
rows): the store quantizes each row as attnc.quant.quantize does. attnc/runtime/store.py runs
them (`store_rows`).
"""

from attnc.frontend.dsl import dim, f32, grid, i32, let, store, store_kernel

# Tensor types (the cache's dtype is set per trace: cache_dtype=)
X = f32["B", "H", "N", "D"]
POS = i32["B"]
CACHE = f32["B", "H", "C", "D"]
TABLE = i32["B", "NP"]
POOL = f32["NB", "H", "P", "D"]


@store_kernel
def kv_store(x: X, pos: POS, cache: CACHE):
    """cache[b, h, pos[b] + n, :] = x[b, h, n, :] for every b, h, n (rows past C are not written)."""
    b, h, n = grid(b="B", h="H", n="N")
    store(cache[b, h, pos[b] + n, :], x[b, h, n, :])


@store_kernel
def kv_store_paged(x: X, pos: POS, table: TABLE, cache: POOL):
    """Row pos[b] + n of batch entry b into slot (pos[b] + n) % P of page table[b, (pos[b] + n) / P]."""
    b, h, n = grid(b="B", h="H", n="N")
    t = let("t", pos[b] + n)
    store(cache[table[b, t // dim("P")], h, t % dim("P"), :], x[b, h, n, :])
