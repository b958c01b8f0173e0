"""The shipped store kernels, written in the DSL: append K/V rows to a cache in its format.

`kv_store` writes the rows x[b, h, n] of a [B, H, N, D] tensor at positions pos[b] + n of a
contiguous cache [B, H, C, D]; `kv_store_paged` writes them through a block table into a
pool of pages [NB, H, P, D] (row t of batch entry b lives in page table[b, t / P], slot t % P).
Trace with `cache_dtype=` "f32", "f16", "q8_0", "q4_0" or "int8" (x_dtype="f16" for f16
rows): the store quantizes each row as attnc.quant.quantize does. `kv_store_pair` and
`kv_store_pair_paged` write a decode step's K and V rows in one dispatch (trace with
`k_cache_dtype=`, `v_cache_dtype=`, `k_dtype=`, `v_dtype=`): a KV cache's append then costs
one store dispatch, not two. attnc/runtime/store.py runs them (`store_rows`, `store_dispatch`).
"""

from attnc.frontend.dsl import dim, f32, grid, i32, let, store, store_kernel

# Tensor types (the cache's dtype is set per trace: cache_dtype=)
X = f32["B", "H", "N", "D"]
POS = i32["B"]
CACHE = f32["B", "H", "C", "D"]
TABLE = i32["B", "NP"]
POOL = f32["NB", "H", "P", "D"]
# K and V rows of one append: their head dims may differ (D, DV)
K_ROWS, V_ROWS = f32["B", "H", "N", "D"], f32["B", "H", "N", "DV"]
K_CACHE, V_CACHE = f32["B", "H", "C", "D"], f32["B", "H", "C", "DV"]
K_POOL, V_POOL = f32["NB", "H", "P", "D"], f32["NB", "H", "P", "DV"]


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


@store_kernel
def kv_store_pair(k: K_ROWS, v: V_ROWS, pos: POS, k_cache: K_CACHE, v_cache: V_CACHE):
    """kv_store of K's and V's new rows at once: one dispatch per append."""
    b, h, n = grid(b="B", h="H", n="N")
    store(k_cache[b, h, pos[b] + n, :], k[b, h, n, :])
    store(v_cache[b, h, pos[b] + n, :], v[b, h, n, :])


@store_kernel
def kv_store_pair_paged(k: K_ROWS, v: V_ROWS, pos: POS, table: TABLE, k_cache: K_POOL, v_cache: V_POOL):
    """kv_store_paged of K's and V's new rows at once, through one block table."""
    b, h, n = grid(b="B", h="H", n="N")
    t = let("t", pos[b] + n)
    page, slot = table[b, t // dim("P")], t % dim("P")
    store(k_cache[page, h, slot, :], k[b, h, n, :])
    store(v_cache[page, h, slot, :], v[b, h, n, :])
