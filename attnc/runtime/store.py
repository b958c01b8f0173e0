"""Appending rows to a K/V cache on the device with the shipped DSL store kernels
(attnc/kernels/store.py), in the cache's format (f32, f16, q8_0, q4_0, int8)."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnc.ir import nodes as ir
from attnc.lowering.program import Program
from attnc.lowering.store import emit_store
from attnc.quant import QuantTensor, check_head_dim, storable
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import Device, get_device
from attnc.runtime.locking import serialized
from attnc.runtime.tensor import dense_strides

_PROGRAMS: dict[tuple[tuple[str, ...], tuple[str, ...], bool], tuple[ir.StoreKernel, Program]] = {}


def store_program(cache_format: str, x_dtype: str = "f32", paged: bool = False) -> tuple[ir.StoreKernel, Program]:
    """The traced store kernel and its program for a cache format and row dtype (cached)."""
    return _traced((cache_format,), (x_dtype,), paged)


def pair_store_program(k_format: str, v_format: str, k_rows: str = "f32", v_rows: str = "f32",
                       paged: bool = False) -> tuple[ir.StoreKernel, Program]:
    """The store kernel writing K's and V's rows in one dispatch (kv_store_pair), traced for
    these cache formats and row dtypes, and its program (cached)."""
    return _traced((k_format, v_format), (k_rows, v_rows), paged)


def _traced(formats: tuple[str, ...], rows: tuple[str, ...], paged: bool) -> tuple[ir.StoreKernel, Program]:
    key = (formats, rows, paged)
    if key not in _PROGRAMS:
        from attnc.kernels.store import kv_store, kv_store_paged, kv_store_pair, kv_store_pair_paged

        if len(formats) == 1:
            kern = (kv_store_paged if paged else kv_store).trace(cache_dtype=formats[0], x_dtype=rows[0])
        else:
            kern = (kv_store_pair_paged if paged else kv_store_pair).trace(
                k_cache_dtype=formats[0], v_cache_dtype=formats[1], k_dtype=rows[0], v_dtype=rows[1])
        _PROGRAMS[key] = (kern, emit_store(kern))
    return _PROGRAMS[key]


def _format(cache: Any, name: str = "cache") -> str:
    if isinstance(cache, QuantTensor):
        return cache.fmt
    if isinstance(cache, np.ndarray) and cache.dtype in (np.float32, np.float16):
        return "f32" if cache.dtype == np.float32 else "f16"
    got = f"a {cache.dtype} array" if isinstance(cache, np.ndarray) else f"a {type(cache).__name__}"
    raise ValueError(f"{name}: expected a float32/float16 array or a QuantTensor, got {got}")


def check_rows(x: Any, cache_shape: tuple[int, ...], paged: bool, name: str = "rows") -> None:
    """ValueError naming the problem (and `name`) when x is not [B, H, N, D] float rows for this cache."""
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype not in (np.float32, np.float16):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name}: expected a float32 or float16 array [B, H, N, D], got {got}")
    _, H, _, D = cache_shape
    if x.shape[1] != H or x.shape[3] != D or (not paged and x.shape[0] != cache_shape[0]):
        want = f"[*, H={H}, N, D={D}]" if paged else f"[B={cache_shape[0]}, H={H}, N, D={D}]"
        raise ValueError(f"{name}: shape {x.shape} does not match the cache: expected {want}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: inf or NaN cannot be stored in a KV cache")


@serialized
def store_rows(cache: QuantTensor | np.ndarray, x: np.ndarray, pos: np.ndarray, *,
               table: np.ndarray | None = None, counts: np.ndarray | None = None,
               device: Device | str | None = None) -> QuantTensor | np.ndarray:
    """A copy of `cache` with rows x[b, h, n] written at position pos[b] + n of batch entry b, in
    the cache's format, by the DSL store kernel on the device.

    cache: [B, H, C, D] (contiguous), or with `table` [B, NB] a page pool [NP, H, P, D] in
    which position t of entry b is slot t % P of page table[b, t // P]. `counts` (B ints in
    [0, N]) writes only the first counts[b] rows of entry b; None writes all N."""
    counts = _counts(x, counts)
    fmt = _check(cache, x, pos, table, counts)
    dev = get_device(device)
    buf = _upload(dev, cache)
    rt.run(dev, [store_dispatch(dev, fmt, buf, tuple(cache.shape), x, np.asarray(pos), table, counts)])
    return _read(dev, buf, cache)


@serialized
def store_pair_rows(k_cache: QuantTensor | np.ndarray, v_cache: QuantTensor | np.ndarray, k_rows: np.ndarray,
                    v_rows: np.ndarray, pos: np.ndarray, *, table: np.ndarray | None = None,
                    counts: np.ndarray | None = None, device: Device | str | None = None
                    ) -> tuple[QuantTensor | np.ndarray, QuantTensor | np.ndarray]:
    """store_rows of K's and V's rows at the same positions (block table, counts) by one
    dispatch of the pair store kernel, which a KV cache's append uses: copies of (k_cache, v_cache)."""
    counts = _counts(k_rows, counts)
    k_fmt = _check(k_cache, k_rows, pos, table, counts, "k_")
    v_fmt = _check(v_cache, v_rows, pos, table, counts, "v_")
    if k_rows.shape[:3] != v_rows.shape[:3]:
        raise ValueError(f"v_rows: shape {v_rows.shape}; k_rows has {k_rows.shape}: the same [B, H, N] expected")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)}; k_cache has {tuple(k_cache.shape)}: the same "
                         "[B, H, C] (pages: [NP, H, P]) expected")
    dev = get_device(device)
    k_buf, v_buf = _upload(dev, k_cache), _upload(dev, v_cache)
    rt.run(dev, [pair_store_dispatch(dev, (k_fmt, k_buf, tuple(k_cache.shape)), (v_fmt, v_buf, tuple(v_cache.shape)),
                                     k_rows, v_rows, np.asarray(pos), table, counts)])
    return _read(dev, k_buf, k_cache), _read(dev, v_buf, v_cache)


def _counts(x: Any, counts: Any) -> np.ndarray:
    """The rows to write per batch entry: `counts` checked (B ints in [0, N] for rows x [B, H, N,
    D]), or N for every entry when None."""
    shape = getattr(x, "shape", ())
    if len(shape) != 4:  # the rows' own check names the problem
        return np.zeros(0, np.int32)
    B, _, N, _ = shape
    if counts is None:
        return np.full(B, N, np.int32)
    c = np.asarray(counts)
    if c.shape != (B,) or c.dtype.kind not in "iu":
        raise ValueError(f"counts: expected {B} integers (one per batch entry), got {c.dtype} {c.shape}")
    if ((c < 0) | (c > N)).any():
        raise ValueError(f"counts: values must be in [0, N={N}] (the rows given), got {c.tolist()}")
    return c.astype(np.int32)


def _check(cache: QuantTensor | np.ndarray, x: np.ndarray, pos: np.ndarray, table: np.ndarray | None,
           counts: np.ndarray, prefix: str = "") -> str:
    """The cache's format once the cache, the rows x, pos and the table are checked against the
    rows written (the first counts[b] of entry b, from _counts) (ValueError naming the problem;
    `prefix` names which cache and rows: "k_", "v_")."""
    cache_name = f"{prefix}cache"
    fmt = _format(cache, cache_name)
    shape = tuple(cache.shape)
    paged = table is not None
    if len(shape) != 4:
        raise ValueError(f"{cache_name}: expected 4 dims [B, H, C, D] (pages: [NP, H, P, D]), got shape {shape}")
    check_rows(x, shape, paged, f"{prefix}rows")
    if fmt not in ("f32", "f16"):
        check_head_dim(fmt, cache_name, shape[3])
        storable(x, fmt, f"{prefix}rows")
    elif fmt == "f16" and shape[3] % 2:
        raise ValueError(f"{cache_name}: an f16 cache stores two values per 32-bit word; head dim {shape[3]} is odd")
    B = x.shape[0]
    pos = np.asarray(pos)
    if pos.shape != (B,) or pos.dtype.kind not in "iu":
        raise ValueError(f"pos: expected {B} integers (one per batch entry), got {pos.dtype} {pos.shape}")
    if (pos < 0).any():
        raise ValueError(f"pos: positions must be >= 0, got {pos.tolist()}")
    ends = pos + counts  # one past each entry's last written row
    if paged:
        table = np.asarray(table)
        if table.ndim != 2 or table.shape[0] != B or table.dtype.kind not in "iu":
            raise ValueError(f"table: expected integers [B={B}, pages], got {table.dtype} {table.shape}")
        page, pool = shape[2], shape[0]
        end = int(ends.max(initial=0))
        if end > table.shape[1] * page:
            raise ValueError(f"table: position {end - 1} needs page {(end - 1) // page}, but the block table "
                             f"has {table.shape[1]} pages per entry")
        for b in range(B):
            if ends[b] <= pos[b]:  # nothing written for this entry
                continue
            used = table[b, pos[b] // page:(ends[b] - 1) // page + 1]
            bad = used[(used < 0) | (used >= pool)]
            if bad.size:
                raise ValueError(f"table: entry {b} points at page {int(bad[0])}, past the page pool of {pool} pages")
    elif int(ends.max(initial=0)) > shape[2]:
        b = int(np.argmax(ends))
        raise ValueError(f"pos: rows {int(pos[b])}..{int(ends[b]) - 1} of entry {b} run past the cache's "
                         f"capacity C={shape[2]}")
    return fmt


def _upload(dev: Device, cache: QuantTensor | np.ndarray) -> Any:
    """A device buffer holding the cache's words (f16 padded to whole 32-bit words)."""
    words = cache.words if isinstance(cache, QuantTensor) else np.ascontiguousarray(cache)
    if words.dtype == np.float16 and words.size % 2:
        words = np.concatenate([words.reshape(-1), np.zeros(1, np.float16)])
    return rt.upload(dev, words)


def _read(dev: Device, buf: Any, cache: QuantTensor | np.ndarray) -> QuantTensor | np.ndarray:
    """The cache read back from `buf`, in the form and format it was given."""
    shape = tuple(cache.shape)
    if isinstance(cache, QuantTensor):
        return QuantTensor(cache.fmt, shape, rt.readback(dev, buf, np.uint32, cache.words.shape))
    if cache.dtype == np.float16:
        n = cache.size + cache.size % 2
        return rt.readback(dev, buf, np.float16, (n,))[:cache.size].reshape(shape)
    return rt.readback(dev, buf, np.float32, shape)


def store_dispatch(dev: Device, fmt: str, cache_buf: Any, cache_shape: tuple[int, ...], x: np.ndarray,
                   pos: np.ndarray, table: np.ndarray | None = None, counts: np.ndarray | None = None
                   ) -> rt.Dispatch:
    """The store kernel's dispatch writing rows x at pos (the first counts[b] of entry b; all
    when None) into a cache already on the device (`cache_buf`, of logical shape `cache_shape`
    in `fmt`); x, pos, table and counts are uploaded. The caller has checked them (store_rows does)."""
    kern, prog = store_program(fmt, _rows_dtype(x), table is not None)
    return _dispatch(dev, kern, prog, {"x": x}, {"cache": (cache_buf, cache_shape)}, pos, table, _counts(x, counts))


def pair_store_dispatch(dev: Device, k_target: tuple[str, Any, tuple[int, ...]], v_target: tuple[str, Any,
                        tuple[int, ...]], k_rows: np.ndarray, v_rows: np.ndarray, pos: np.ndarray,
                        table: np.ndarray | None = None, counts: np.ndarray | None = None) -> rt.Dispatch:
    """One dispatch writing K's rows and V's rows at pos (the first counts[b] of entry b; all
    when None), each target a (format, device buffer, logical shape) cache; rows, pos, table
    and counts are uploaded, and checked by the caller."""
    kern, prog = pair_store_program(k_target[0], v_target[0], _rows_dtype(k_rows), _rows_dtype(v_rows),
                                    table is not None)
    return _dispatch(dev, kern, prog, {"k": k_rows, "v": v_rows},
                     {"k_cache": k_target[1:], "v_cache": v_target[1:]}, pos, table, _counts(k_rows, counts))


def _rows_dtype(x: np.ndarray) -> str:
    return "f16" if x.dtype == np.float16 else "f32"


def _dispatch(dev: Device, kern: ir.StoreKernel, prog: Program, rows: dict[str, np.ndarray],
              caches: dict[str, tuple[Any, tuple[int, ...]]], pos: np.ndarray, table: np.ndarray | None,
              counts: np.ndarray) -> rt.Dispatch:
    """The dispatch of a store kernel: host arrays (rows, pos, counts, table) uploaded dense,
    caches bound as they are on the device; dims and strides from their shapes."""
    arrays = {name: np.ascontiguousarray(x) for name, x in rows.items()} | {
        "pos": np.asarray(pos, dtype=np.int32), "counts": np.asarray(counts, dtype=np.int32)}
    if table is not None:
        arrays["table"] = np.ascontiguousarray(table, dtype=np.int32)
    bufs: dict[str, Any] = {name: buf for name, (buf, _shape) in caches.items()}
    shapes = {name: tuple(shape) for name, (_buf, shape) in caches.items()}
    for name, arr in arrays.items():
        shapes[name] = arr.shape
        if arr.dtype == np.float16 and arr.size % 2:
            arr = np.concatenate([arr.reshape(-1), np.zeros(1, np.float16)])
        bufs[name] = rt.upload(dev, arr)
    values, points = store_uniforms(kern, prog, shapes, {n: dense_strides(sh) for n, sh in shapes.items()})
    return rt.Dispatch(prog, bufs, values, points)


def store_uniforms(kern: ir.StoreKernel, prog: Program, shapes: dict[str, tuple[int, ...]],
                   strides: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """A store program's uniform values (its dims from the tensors' shapes, their element
    strides) and its workgroup count (one per grid point)."""
    dims: dict[str, int] = {}
    values: dict[str, int] = {}
    for p in kern.params:
        dims.update(zip(p.type.dims, shapes[p.name], strict=True))
        values.update({f"s_{p.name}_{i}": int(st) for i, st in enumerate(strides[p.name])})
    values.update({f"d_{d}": int(x) for d, x in dims.items()})
    fields = {f.name for f in prog.uniforms} - set(rt.AUTO_UNIFORMS)
    return {f: values[f] for f in fields}, int(np.prod([dims[d] for d in prog.grid]))
