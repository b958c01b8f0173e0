"""A KV cache on the GPU: keys and values that grow in place, and attention over them.

`KVCache(batch, kv_heads, capacity, head_dim)` holds k [B, Hkv, capacity, D] and v [B, Hkv,
capacity, Dv] (float32 or float16) in GPU buffers, and each batch row's length twice: on the
host (`lengths`) and in a GPU int32 tensor (`kv_lens`) that attention reads. `append` writes
new rows behind each row's valid prefix with a store kernel, which also advances the GPU
lengths, so a decode step moves only the new rows; `attend` runs attention of new queries
over each row's prefix (queries aligned to its end, as with `kv_lens`).

Every write goes through `_store`: one store program per float cache dtype, and for K or V
kept quantized (`k_format=` / `v_format=`: q8_0, q4_0, int8; attnc/quant.py) the DSL store
kernel of attnc/kernels/store.py, which quantizes the new rows on the device and writes them
at each row's length (read from the GPU lengths); attention reads the quantized buffers
directly.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField, storage_buffers
from attnc.quant import check_format, check_head_dim, storable, words_per_row
from attnc.runtime import dispatch as rt
from attnc.runtime.api import prepare, rows_packable
from attnc.runtime.build import mods_scan
from attnc.runtime.devices import get_device
from attnc.runtime.locking import serialized
from attnc.runtime.lru import LRU
from attnc.runtime.prepared import Prepared, max_storage_buffers
from attnc.runtime.store import pair_store_program as dsl_pair_store_program
from attnc.runtime.store import store_program as dsl_store_program
from attnc.runtime.store import store_uniforms
from attnc.runtime.tensor import QuantGPUTensor, Tensor, dense_strides, host_array, quant_zeros, zeros

WORKGROUP = 64

# src [B, H, n, D] (any strides) -> dst [B, H, capacity, D] rows lens[b] .. lens[b] + count(b);
# count(b) = n, or counts[b] when ragged. One invocation per destination element (f32) or per
# 32-bit word of two f16 halves, keeping a half that belongs to a row outside the range.
STORE_WGSL = """\
struct Params {
    grid_total: u32, grid_stride_x: u32, B: u32, H: u32, n: u32, D: u32, cap: u32, ragged: u32,
    s0: u32, s1: u32, s2: u32, s3: u32, per: u32,
}

@group(0) @binding(0) var<storage, read> src: array<ELEM>;
@group(0) @binding(1) var<storage, read> lens: array<i32>;
@group(0) @binding(2) var<storage, read> counts: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<ELEM>;
@group(0) @binding(4) var<uniform> P: Params;

fn row_count(b: u32) -> u32 {
    if (P.ragged != 0u) {
        return u32(max(counts[b], 0));
    }
    return P.n;
}

fn src_index(b: u32, h: u32, i: u32, d: u32) -> u32 {
    return b * P.s0 + h * P.s1 + i * P.s2 + d * P.s3;
}
BODY"""

STORE_F32 = """
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let g = group * 64u + lid;
    if (group >= P.grid_total || g >= P.B * P.H * P.per) {
        return;
    }
    let bh = g / P.per;
    let b = bh / P.H;
    let h = bh % P.H;
    let i = (g % P.per) / P.D;
    let d = (g % P.per) % P.D;
    if (i >= row_count(b)) {
        return;
    }
    dst[(bh * P.cap + u32(lens[b]) + i) * P.D + d] = src[src_index(b, h, i, d)];
}
"""

STORE_F16 = """
fn src_half(b: u32, h: u32, rel: u32) -> f32 {
    let e = src_index(b, h, rel / P.D, rel % P.D);
    let pair = unpack2x16float(src[e >> 1u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let g = group * 64u + lid;
    if (group >= P.grid_total || g >= P.B * P.H * P.per) {
        return;
    }
    let bh = g / P.per;
    let b = bh / P.H;
    let h = bh % P.H;
    let e0 = (bh * P.cap + u32(lens[b])) * P.D;   // the first element written in this block
    let e1 = e0 + row_count(b) * P.D;              // one past the last
    let w = (e0 >> 1u) + g % P.per;
    if (2u * w >= e1) {
        return;
    }
    var pair = unpack2x16float(dst[w]);
    if (2u * w >= e0) {
        pair.x = src_half(b, h, 2u * w - e0);
    }
    if (2u * w + 1u < e1) {
        pair.y = src_half(b, h, 2u * w + 1u - e0);
    }
    dst[w] = pack2x16float(pair);
}
"""

ADVANCE_WGSL = """\
struct Params { grid_total: u32, grid_stride_x: u32, B: u32, n: u32, ragged: u32 }

@group(0) @binding(0) var<storage, read> counts: array<i32>;
@group(0) @binding(1) var<storage, read_write> lens: array<i32>;
@group(0) @binding(2) var<uniform> P: Params;

// lens[b] += count(b), after the store dispatches that read the old lengths
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let b = group * 64u + lid;
    if (group >= P.grid_total || b >= P.B) {
        return;
    }
    var c = i32(P.n);
    if (P.ragged != 0u) {
        c = counts[b];
    }
    lens[b] = lens[b] + c;
}
"""

STORE_FIELDS = ("grid_total", "grid_stride_x", "B", "H", "n", "D", "cap", "ragged", "s0", "s1", "s2", "s3", "per")
ADVANCE_FIELDS = ("grid_total", "grid_stride_x", "B", "n", "ragged")


def _program(name: str, wgsl: str, bindings: tuple[tuple[str, Access, Scalar], ...], fields: tuple[str, ...]
             ) -> Program:
    return Program(name=name, wgsl=wgsl, entry_point="main", workgroup_size=WORKGROUP,
                   bindings=tuple(Binding(n, i, a, e) for i, (n, a, e) in enumerate(bindings)),
                   uniforms=tuple(UniformField(f, 4 * i, Scalar.U32) for i, f in enumerate(fields)),
                   grid=(), features=frozenset(), workgroup_storage_bytes=0)


def store_program(dtype: np.dtype) -> Program:
    """The program that writes new rows into a cache of `dtype` (float32, or float16 packed
    two per 32-bit word as attnc's kernels read them)."""
    half = dtype == np.float16
    elem = Scalar.U32 if half else Scalar.F32
    wgsl = STORE_WGSL.replace("ELEM", "u32" if half else "f32").replace("BODY", STORE_F16 if half else STORE_F32)
    return _program(f"kv_store_{'f16' if half else 'f32'}", wgsl,
                    (("src", Access.READ, elem), ("lens", Access.READ, Scalar.I32),
                     ("counts", Access.READ, Scalar.I32), ("dst", Access.READ_WRITE, elem),
                     ("params", Access.UNIFORM, Scalar.U32)), STORE_FIELDS)


ADVANCE = _program("kv_advance", ADVANCE_WGSL, (("counts", Access.READ, Scalar.I32),
                                                ("lens", Access.READ_WRITE, Scalar.I32),
                                                ("params", Access.UNIFORM, Scalar.U32)), ADVANCE_FIELDS)


def advance_uniforms(batch: int, n: int, ragged: bool) -> tuple[dict[str, int], int]:
    """The length advance's uniform values and workgroup count for an append of n rows (counts
    read from its counts binding when `ragged`)."""
    return dict(B=batch, n=n, ragged=int(ragged)), -(-batch // WORKGROUP)


def _storage(fmt: str | None, shape: tuple[int, ...], dtype: np.dtype, device: Any) -> Tensor | QuantGPUTensor:
    """A zeroed cache tensor: quantized in `fmt`, else of `dtype`."""
    return zeros(shape, dtype, device) if fmt is None else quant_zeros(fmt, shape, device)


class KVCache:
    """Keys and values of B sequences on a device, appended in place (see the module docstring).

    `k`, `v`: GPU tensors [B, Hkv, capacity, D] / [B, Hkv, capacity, Dv]; `lengths`: each
    row's valid prefix (host copy); `kv_lens`: the same lengths in a GPU int32 tensor.
    Appending past `capacity` is a ValueError (the cache does not reallocate). float16 caches
    with an odd head dim get an even capacity (a 32-bit word never spans two sequences).

    `k_format` / `v_format` ("q8_0", "q4_0", "int8", or None for `dtype`) keep K / V quantized:
    `k` / `v` are then QuantGPUTensors, appends quantize the new rows on the device (host
    rows are converted to `dtype` first; GPU rows may be float32 or float16), and `attend`
    reads them as they are. q8_0 and q4_0 need a head dim that is a multiple of 32, int8 of 4.
    A ragged append writes exactly counts[b] rows of batch row b in every format.
    """

    @serialized
    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, value_dim: int | None = None,
                 dtype: Any = np.float32, device: Any = None, *, k_format: str | None = None,
                 v_format: str | None = None):
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float16):
            raise ValueError(f"dtype must be float32 or float16, got {dt}")
        for name, n in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim),
                        ("value_dim", head_dim if value_dim is None else value_dim)):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        dv = head_dim if value_dim is None else value_dim
        for name, fmt, width in (("k_format", k_format, head_dim), ("v_format", v_format, dv)):
            if fmt is not None:
                check_format(fmt)
                check_head_dim(fmt, "head_dim" if name == "k_format" else "value_dim", int(width))
        if dt == np.float16 and (head_dim % 2 or dv % 2) and capacity % 2:
            capacity += 1
        self.device = get_device(device)
        largest = rt.max_binding_bytes(self.device)
        for name, fmt, width in (("k", k_format, head_dim), ("v", v_format, dv)):
            row = 4 * words_per_row(fmt, int(width)) if fmt is not None else dt.itemsize * int(width)
            nbytes = int(batch) * int(kv_heads) * int(capacity) * row
            if nbytes > largest:  # attention binds the cache whole (refused at the first append before)
                raise ValueError(f"{name}: a cache of batch={batch}, kv_heads={kv_heads}, capacity={capacity} and "
                                 f"{'head_dim' if name == 'k' else 'value_dim'}={width} ({fmt or dt.name}) needs "
                                 f"{nbytes} bytes, more than {self.device.spec}'s max-storage-buffer-binding-size "
                                 f"({largest}): attention binds it whole; lower the capacity or the batch, or "
                                 "request a larger limit for the device")
        self.dtype, self.batch, self.kv_heads, self.capacity = dt, int(batch), int(kv_heads), int(capacity)
        self.head_dim, self.value_dim = int(head_dim), int(dv)
        self.k_format, self.v_format = k_format, v_format
        self.k: Tensor | QuantGPUTensor = _storage(k_format, (batch, kv_heads, capacity, head_dim), dt, self.device)
        self.v: Tensor | QuantGPUTensor = _storage(v_format, (batch, kv_heads, capacity, dv), dt, self.device)
        self.kv_lens = zeros((batch,), np.int32, self.device)
        self._lengths = np.zeros(batch, np.int64)
        # ragged appends: rows per batch row, one buffer per distinct pattern (so appends recorded
        # into one encoder before it is submitted do not overwrite each other's counts)
        self._counts: collections.OrderedDict[tuple[int, ...], Tensor] = collections.OrderedDict()
        self._no_counts = zeros((batch,), np.int32, self.device)  # bound when every row appends n
        self._store_program = store_program(dt)
        self._staging: dict[str, Any] = {}
        self._uniforms: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._groups: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._ops: dict[Any, Prepared] = {}
        # the store passes of appends made before, by what they bind (see _store)
        self._passes: LRU[Any, rt.Pass] = LRU(32)

    def __repr__(self) -> str:
        return (f"attnc.KVCache(batch={self.batch}, kv_heads={self.kv_heads}, capacity={self.capacity}, "
                f"head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.dtype}, "
                + "".join(f"{n}={f!r}, " for n, f in (("k_format", self.k_format), ("v_format", self.v_format)) if f)
                + f"lengths={self._lengths.tolist()}, device={self.device.spec})")

    @property
    def lengths(self) -> np.ndarray:
        """Each batch row's number of valid keys (a copy)."""
        return self._lengths.copy()

    # ------------------------------------------------------------------ lengths
    @serialized
    def set_lengths(self, lengths: Sequence[int] | np.ndarray) -> None:
        """Set every row's valid prefix (e.g. 0 to start over, or fewer to drop rows), on the
        host and the GPU; the rows past it are overwritten by the next appends."""
        arr = host_array("lengths", np.asarray(lengths) if isinstance(lengths, (list, tuple)) else lengths)
        if arr is None or arr.shape != (self.batch,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"lengths: expected {self.batch} ints, got {lengths!r}")
        if np.any(arr < 0) or np.any(arr > self.capacity):
            raise ValueError(f"lengths: values must be in [0, capacity={self.capacity}], got {arr.tolist()}")
        self._lengths = arr.astype(np.int64)
        self.kv_lens.write(arr.astype(np.int32))

    @serialized
    def reset(self) -> None:
        """Empty every row."""
        self.set_lengths(np.zeros(self.batch, np.int64))

    # ------------------------------------------------------------------ append
    @serialized
    def append(self, k_new: Any, v_new: Any, counts: Sequence[int] | np.ndarray | None = None, *,
               encoder: Any = None) -> None:
        """Write new keys and values behind each row's valid prefix, in place.

        k_new [B, Hkv, n, D] and v_new [B, Hkv, n, Dv]: host data (converted to the cache's
        dtype) or GPU tensors of the cache's dtype and device (any strides, e.g. a [B, n, Hkv,
        D] buffer viewed with permute(0, 2, 1, 3)). `counts` (B ints in [0, n]) appends only
        the first counts[b] rows of batch row b (ragged); None appends all n. With `encoder=`
        the store is recorded there (GPU tensors only) and the caller submits; the host
        lengths advance at once either way. `attend(q, append=(k_new, v_new))` appends and
        attends in one compute pass."""
        ready, after = self._append_pass(k_new, v_new, counts, encoder is not None)
        if ready is not None:
            if encoder is None:
                ready.submit()
            else:
                ready.record(encoder)
        self._lengths = after

    def _append_pass(self, k_new: Any, v_new: Any, counts: Sequence[int] | np.ndarray | None, recorded: bool
                     ) -> tuple[rt.Pass | None, np.ndarray]:
        """The checked append's compute pass (None when there is nothing to store, or under
        ATTNC_SANITIZE=bounds, which runs it at once) and the lengths after it."""
        n = self._check_source("k_new", k_new, self.head_dim)
        nv = self._check_source("v_new", v_new, self.value_dim)
        if nv != n:
            raise ValueError(f"v_new: {nv} new rows, but k_new has {n}")
        if counts is None:
            rows = np.full(self.batch, n, np.int64)
        else:
            rows = np.asarray(counts)
            if rows.shape != (self.batch,) or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"counts: expected {self.batch} ints (one per batch row), got {counts!r}")
            if np.any(rows < 0) or np.any(rows > n):
                raise ValueError(f"counts: values must be in [0, n={n}] (the rows given), got {rows.tolist()}")
            rows = rows.astype(np.int64)
        after = self._lengths + rows
        if np.any(after > self.capacity):
            b = int(np.argmax(after > self.capacity))
            raise ValueError(f"append: batch row {b} holds {int(self._lengths[b])} keys; {int(rows[b])} more exceed "
                             f"the cache's capacity of {self.capacity} (make a larger KVCache)")
        if n == 0 or not rows.any():
            return None, after
        k_src = self._source("k_new", k_new, recorded, self.k_format)
        v_src = self._source("v_new", v_new, recorded, self.v_format)
        ragged = counts is not None and not np.all(rows == n)
        counts_t = self._counts_tensor(rows) if ragged else None
        if rt.sanitizing() and recorded:
            raise ValueError("ATTNC_SANITIZE=bounds reads its records after the run: append without encoder=")
        return self._store([(k_src, self.k), (v_src, self.v)], n, counts_t), after

    def _counts_tensor(self, rows: np.ndarray) -> Tensor:
        """A GPU int32 tensor holding these per-row counts (made once per distinct pattern,
        the 16 most recent kept)."""
        key = tuple(int(r) for r in rows)
        found = self._counts.get(key)
        if found is None:
            found = self._counts[key] = Tensor(self.device, rt.upload(self.device, rows.astype(np.int32)),
                                               (self.batch,), np.int32)
            if len(self._counts) > 16:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        return found

    def _check_source(self, name: str, x: Any, width: int) -> int:
        """The number of new rows n of a source [B, Hkv, n, width]."""
        shape = tuple(x.shape) if isinstance(x, Tensor) or hasattr(x, "shape") else None
        if shape is None or len(shape) != 4 or shape[:2] != (self.batch, self.kv_heads) or shape[3] != width:
            raise ValueError(f"{name}: expected shape ({self.batch}, {self.kv_heads}, n, {width}), "
                             f"got {shape if shape is not None else type(x).__name__}")
        return int(shape[2])

    def _source(self, name: str, x: Any, recorded: bool, fmt: str | None = None
                ) -> tuple[rt.BufferSlice, tuple[int, ...], np.dtype]:
        """A source bound: a GPU tensor in place (checked), host data uploaded into the cache's
        own staging buffer (only the new rows); with its element strides and dtype. A
        quantized destination (`fmt`) takes float32 or float16 GPU rows."""
        if isinstance(x, QuantGPUTensor):
            raise ValueError(f"{name}: a {x.fmt} QuantGPUTensor; append takes float rows (the cache quantizes them)")
        if isinstance(x, Tensor):
            if x.device is not self.device:
                raise ValueError(f"{name}: the tensor is on {x.device!r}; the cache is on {self.device!r}")
            if fmt is not None and x.dtype not in (np.float32, np.float16):
                raise ValueError(f"{name}: dtype {x.dtype}; a {fmt} cache quantizes float32 or float16 rows")
            if fmt is None and x.dtype != self.dtype:
                raise ValueError(f"{name}: dtype {x.dtype}; the cache holds {self.dtype}")
            return x.binding(name), x.strides, x.dtype
        if recorded:
            raise ValueError(f"{name}: host data cannot be recorded into an encoder (it would be uploaded before "
                             "the encoder runs, and a later append would overwrite it); pass an attnc.Tensor")
        arr = host_array(name, x)
        if arr is None:
            raise ValueError(f"{name}: expected host data or an attnc.Tensor, got {type(x).__name__}")
        if arr.dtype.kind != "f":
            raise ValueError(f"{name}: expected floating point values, got {arr.dtype}")
        host = np.ascontiguousarray(arr, self.dtype)
        if fmt is not None and not np.isfinite(host).all():  # as attnc.quant.quantize refuses them
            past = " (values beyond float16's range become inf)" if self.dtype == np.float16 else ""
            raise ValueError(f"{name}: inf or NaN cannot be stored as {fmt}{past}")
        if fmt is not None:
            storable(host, fmt, name)
        raw = host.reshape(-1).view(np.uint8)
        if raw.size % 4:
            raw = np.concatenate([raw, np.zeros(4 - raw.size % 4, np.uint8)])
        buffer = self._staging.get(name)
        if buffer is None or buffer.size < raw.size:
            buffer = self._staging[name] = rt.create_buffer(self.device, max(16, raw.size), label=f"attnc.{name}")
        rt.write(self.device, buffer, 0, raw)
        return rt.BufferSlice(buffer, 0, raw.size), tuple(int(s) // host.itemsize for s in host.strides), host.dtype

    def _store(self, pairs: list[tuple[tuple[rt.BufferSlice, tuple[int, ...], np.dtype], Tensor | QuantGPUTensor]],
               n: int, counts: Tensor | None) -> rt.Pass | None:
        """The one write path: the compute pass storing each (source, destination) pair's first n
        rows (counts[b] of them for batch row b when given), then advancing the GPU lengths
        (made once per distinct binding and kept); under ATTNC_SANITIZE=bounds it runs the
        instrumented dispatches at once and returns None."""
        dev = self.device
        sanitize = rt.sanitizing()
        ragged = counts is not None
        counts_slice = (self._no_counts if counts is None else counts).binding("counts")
        lens_slice = self.kv_lens.binding("kv_lens")
        dst_slices = tuple(dst.binding("cache") for _, dst in pairs)
        # the pass depends on these (and on the pipelines, which ATTNC_NAGA_CHECKS changes) only
        key = None if sanitize else (n, counts_slice, lens_slice, os.environ.get("ATTNC_NAGA_CHECKS"),
                                     tuple((*src, d) for (src, _), d in zip(pairs, dst_slices, strict=True)))
        ready = None if key is None else self._passes.get(key)
        if ready is None:
            per_dim = int(dev.gpu.limits["max-compute-workgroups-per-dimension"])
            items = []
            quantized = [(src, dst) for src, dst in pairs if isinstance(dst, QuantGPUTensor)]
            if quantized:  # one dispatch of the DSL store kernel for K and V when both are quantized
                written = counts if counts is not None else self._counts_tensor(np.full(self.batch, n))
                items.extend(self._quant_store(quantized, n, written.binding("counts"), per_dim, sanitize))
            for ((src, strides, _dtype), dst), dst_slice in zip(pairs, dst_slices, strict=True):
                if isinstance(dst, QuantGPUTensor):
                    continue
                width = dst.shape[3]
                per = n * width if self.dtype == np.float32 else -(-n * width // 2) + 1
                groups = -(-self.batch * self.kv_heads * per // WORKGROUP)
                values = dict(B=self.batch, H=self.kv_heads, n=n, D=width, cap=self.capacity, ragged=int(ragged),
                              s0=strides[0], s1=strides[1], s2=strides[2], s3=strides[3], per=per)
                bufs = {"src": src, "lens": lens_slice, "counts": counts_slice, "dst": dst_slice}
                items.append(self._item(self._store_program, bufs, values, groups, per_dim, sanitize))
            values, groups = advance_uniforms(self.batch, n, ragged)
            bufs = {"counts": counts_slice, "lens": lens_slice}
            items.append(self._item(ADVANCE, bufs, values, groups, per_dim, sanitize))
            if sanitize:  # the instrumented shaders, their records checked after the run
                rt.run(dev, items)
                return None
            ready = rt.Pass(dev, items, "attnc.kv_append", encoder_label="attnc.kv_append")
            self._passes.put(key, ready)
        return ready

    def _quant_store(self, pairs: list[tuple[tuple[rt.BufferSlice, tuple[int, ...], np.dtype], QuantGPUTensor]],
                     n: int, counts: rt.BufferSlice, per_dim: int, sanitize: bool) -> list[Any]:
        """The items of the DSL store kernel writing the first counts[b] of n rows of each (source
        [B, Hkv, n, width], quantized destination) pair at each row's GPU length (no row past the
        capacity): K's and V's in one dispatch (kv_store_pair) when both are quantized and the
        device binds its six storage buffers, else one dispatch each."""
        rows = ["f16" if src_dtype == np.float16 else "f32" for (_src, _strides, src_dtype), _ in pairs]
        if len(pairs) == 2:
            kern, prog = dsl_pair_store_program(pairs[0][1].fmt, pairs[1][1].fmt, rows[0], rows[1])
            if storage_buffers((prog,)) > max_storage_buffers(self.device):
                return [item for pair in pairs for item in self._quant_store([pair], n, counts, per_dim, sanitize)]
            names = (("k", "k_cache"), ("v", "v_cache"))
        else:
            kern, prog = dsl_store_program(pairs[0][1].fmt, rows[0], False)
            names = (("x", "cache"),)
        shapes: dict[str, tuple[int, ...]] = {"pos": (self.batch,), "counts": (self.batch,)}
        given: dict[str, tuple[int, ...]] = {"pos": (1,), "counts": (1,)}
        bufs: dict[str, Any] = {"pos": self.kv_lens.binding("kv_lens"), "counts": counts}
        for ((src, strides, _dtype), dst), (x_name, cache_name) in zip(pairs, names, strict=True):
            shapes[x_name], given[x_name] = (self.batch, self.kv_heads, n, dst.shape[3]), strides
            shapes[cache_name], given[cache_name] = dst.shape, dense_strides(dst.shape)
            bufs[x_name], bufs[cache_name] = src, dst.binding("cache")
        values, points = store_uniforms(kern, prog, shapes, given)
        return [self._item(prog, bufs, values, points, per_dim, sanitize)]

    def _item(self, program: Program, bufs: dict[str, Any], values: dict[str, int], groups: int, per_dim: int,
              sanitize: bool) -> Any:
        """(pipeline, bind group, grid) of one store dispatch; uniform buffers by content and
        bind groups by buffers are made once. With `sanitize` (ATTNC_SANITIZE=bounds), the
        rt.Dispatch (run instrumented by `_store`)."""
        if sanitize:
            return rt.Dispatch(program, bufs, values, groups)
        compiled = self.device.pipelines.get(self.device, program)
        grid = rt.fold_grid(groups, per_dim)
        ukey = (id(program), tuple(sorted(values.items())))
        ub = self._uniforms.get(ukey)
        if ub is None:
            block = rt.uniform_block(rt.Dispatch(program, {}, values, groups), grid)
            ub = self._uniforms[ukey] = rt.uniform_buffer(self.device, block)
            if len(self._uniforms) > 32:
                self._uniforms.popitem(last=False)
        gkey = (program.name, ub, tuple(bufs[b.name] for b in program.bindings if b.access is not Access.UNIFORM))
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = rt.create_bind_group(self.device, program, compiled, bufs, ub)
            if len(self._groups) > 64:
                self._groups.popitem(last=False)
        return compiled, group, grid

    # ------------------------------------------------------------------ attention
    @serialized
    def attend(self, q: Any, *, causal: bool = False, scale: float | None = None,
               window: tuple[int | None, int | None] | None = None, bias: Any = None, alibi_slopes: Any = None,
               softcap: float | None = None, sinks: Any = None, return_lse: bool = False, target: str | None = None,
               score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
               out: Tensor | None = None, out_lse: Tensor | None = None, encoder: Any = None,
               output: str | None = None, append: tuple[Any, ...] | None = None) -> Any:
        """Attention of q [B, Hq, S, D] (host data or a GPU tensor; Hq a multiple of Hkv) over
        each row's valid prefix: attention(q, k, v, kv_lens=lengths) with the cache's tensors,
        so query i of row b sits at position lengths[b] - S + i and `causal` masks the keys after
        it. The op for each query shape and option set is prepared once; `out=`, `encoder=`
        and `output=` are as for a prepared op (Prepared.__call__). The result is numpy for
        host q, else the op's own GPU tensor, which the next attend overwrites; o is in q's dtype
        (q has the dtype of the cache's float K or V; over K and V both quantized it may be either
        float: a float16 q gives a float16 o, rows Dv + 1 apart for an odd Dv) and `out=` must be
        a tensor of that dtype the kernel can write (docs/API.md, float16).

        `append=(k_new, v_new)` or `(k_new, v_new, counts)`: append those rows first, as
        `append()` does, in the same compute pass as the attention (a decode step in one pass:
        a pass boundary costs about 6 us of the step on an H200 with wgpu-native)."""
        options = dict(causal=causal, scale=scale, window=window, softcap=softcap, return_lse=return_lse,
                       target=target, score_mod=score_mod, mask_mod=mask_mod)
        extra = {n: x for n, x in (("bias", bias), ("alibi_slopes", alibi_slopes), ("sinks", sinks)) if x is not None}
        shape = tuple(q.shape) if hasattr(q, "shape") else None
        if shape is None or len(shape) != 4 or shape[0] != self.batch or shape[3] != self.head_dim:
            raise ValueError(f"q: expected shape ({self.batch}, Hq, S, {self.head_dim}), got "
                             f"{shape if shape is not None else type(q).__name__}")
        for name, x in (("q", q), *extra.items()):  # (here, not only when an op is prepared: one message)
            if isinstance(x, Tensor) and x.device is not self.device:
                raise ValueError(f"{name}: the tensor is on {x.device!r}; the cache is on {self.device!r}")
        scan = mods_scan(score_mod, mask_mod)  # the mods' code and constants, what they capture
        plain = tuple((n, x if isinstance(x, (bool, int, float, str, tuple, type(None))) else id(x))
                      for n, x in sorted(options.items()) if n not in ("score_mod", "mask_mod"))
        dtype = q.dtype if isinstance(q.dtype, np.dtype) else str(q.dtype)
        # outputs whose query heads' rows do not follow one another (e.g. a [B, S, Hq, Dv] buffer
        # viewed as [B, Hq, S, Dv]) need an op that does not pack GQA heads into rows
        packable = rows_packable({"S": shape[2]}, out, out_lse)
        key = (shape, dtype, tuple(sorted(extra)), plain, None if scan is None else scan.key, packable)
        op = self._ops.get(key) if scan is None or scan.key is not None else None
        if op is None:
            examples = {} if packable else {"out": out, "out_lse": out_lse}
            op = prepare(q, self.k, self.v, kv_lens=self.kv_lens, device=self.device, **extra, **options,
                         **examples)
            if scan is None or scan.key is not None:
                self._ops[key] = op
        if scan is not None:  # this call's captured tensors and numbers
            extra.update(op.captured_values(scan))
        if output is None:  # (host q with encoder=: the op says host data cannot be recorded)
            output = "tensor" if isinstance(q, Tensor) or encoder is not None else "numpy"
        if append is None:
            return op(q, self.k, self.v, kv_lens=self.kv_lens, out=out, out_lse=out_lse, encoder=encoder,
                      output=output, **extra)
        if not isinstance(append, tuple) or len(append) not in (2, 3):
            raise ValueError(f"append: expected (k_new, v_new) or (k_new, v_new, counts), got {type(append).__name__}"
                             + (f" of {len(append)}" if isinstance(append, tuple) else ""))
        before, after = self._append_pass(append[0], append[1], append[2] if len(append) == 3 else None,
                                          encoder is not None)
        if before is None:  # nothing to store, or stored already (ATTNC_SANITIZE=bounds runs it at once)
            self._lengths = after
        result = op._call(q, self.k, self.v, out, out_lse, encoder, output, {"kv_lens": self.kv_lens, **extra},
                          keep_groups=True, before=before)
        self._lengths = after
        return result

