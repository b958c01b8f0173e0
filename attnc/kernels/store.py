"""The shipped store kernels, written in the DSL: append K/V rows to a cache in its format.

`kv_store` writes the rows x[b, h, n] of a [B, H, N, D] tensor with n < counts[b] at positions
pos[b] + n of a contiguous cache [B, H, C, D] (counts[b] = N appends every row; fewer, a
ragged append, leaves the rest of the cache as it was); `kv_store_paged` writes them through a
block table into a pool of pages [NP, H, P, D] (row t of batch entry b lives in page
table[b, t / P], slot t % P). A row is skipped by giving it an index outside the cache: a
store writes nothing there.
Trace with `cache_dtype=` "f32", "f16", "q8_0", "q4_0" or "int8" (x_dtype="f16" for f16
rows): the store quantizes each row as attnc.quant.quantize does. `kv_store_pair` and
`kv_store_pair_paged` write a decode step's K and V rows in one dispatch (trace with
`k_cache_dtype=`, `v_cache_dtype=`, `k_dtype=`, `v_dtype=`): a KV cache's append then costs
one store dispatch, not two. attnc/runtime/store.py runs them (`store_rows`, `store_dispatch`).
"""

from attnc.frontend.dsl import dim, f32, grid, i32, let, store, store_kernel, where

# Tensor types (the cache's dtype is set per trace: cache_dtype=)
X = f32["B", "H", "N", "D"]
POS = i32["B"]
COUNTS = i32["B"]  # rows to write per batch entry (the first counts[b] of N)
CACHE = f32["B", "H", "C", "D"]
# a page pool and its block table, named as the paged attention kernel names them (NP pages,
# NB table entries a row)
TABLE = i32["B", "NB"]
POOL = f32["NP", "H", "P", "D"]
# K and V rows of one append: their head dims may differ (D, DV)
K_ROWS, V_ROWS = f32["B", "H", "N", "D"], f32["B", "H", "N", "DV"]
K_CACHE, V_CACHE = f32["B", "H", "C", "D"], f32["B", "H", "C", "DV"]
K_POOL, V_POOL = f32["NP", "H", "P", "D"], f32["NP", "H", "P", "DV"]


@store_kernel
def kv_store(x: X, pos: POS, counts: COUNTS, cache: CACHE):
    """cache[b, h, pos[b] + n, :] = x[b, h, n, :] for n < counts[b] (rows past C are not written)."""
    b, h, n = grid(b="B", h="H", n="N")
    store(cache[b, h, where(n < counts[b], pos[b] + n, -1), :], x[b, h, n, :])


@store_kernel
def kv_store_paged(x: X, pos: POS, counts: COUNTS, table: TABLE, cache: POOL):
    """Row pos[b] + n (n < counts[b]) of batch entry b into slot (pos[b] + n) % P of page
    table[b, (pos[b] + n) / P]; a position past the NB * P a table row holds is not written
    (as a contiguous cache's rows past C), never into the page a clamped table read finds."""
    b, h, n = grid(b="B", h="H", n="N")
    t = let("t", pos[b] + n)
    page = let("page", where(_held(n, t, counts[b]), table[b, t // dim("P")], -1))
    store(cache[page, h, t % dim("P"), :], x[b, h, n, :])


def _held(n, t, count):
    """Whether new row n, at position t, is appended: among the row's first `count` and within
    the positions its block table row holds."""
    return (n < count) & (t >= 0) & (t < dim("NB") * dim("P"))


@store_kernel
def kv_store_pair(k: K_ROWS, v: V_ROWS, pos: POS, counts: COUNTS, k_cache: K_CACHE, v_cache: V_CACHE):
    """kv_store of K's and V's new rows at once: one dispatch per append."""
    b, h, n = grid(b="B", h="H", n="N")
    t = let("t", where(n < counts[b], pos[b] + n, -1))
    store(k_cache[b, h, t, :], k[b, h, n, :])
    store(v_cache[b, h, t, :], v[b, h, n, :])


@store_kernel
def kv_store_pair_paged(k: K_ROWS, v: V_ROWS, pos: POS, counts: COUNTS, table: TABLE, k_cache: K_POOL,
                        v_cache: V_POOL):
    """kv_store_paged of K's and V's new rows at once, through one block table."""
    b, h, n = grid(b="B", h="H", n="N")
    t = let("t", pos[b] + n)
    page = let("page", where(_held(n, t, counts[b]), table[b, t // dim("P")], -1))
    slot = t % dim("P")
    store(k_cache[page, h, slot, :], k[b, h, n, :])
    store(v_cache[page, h, slot, :], v[b, h, n, :])
