"""`attnc.paged_attention`: attention over K/V stored in pages, the layout of vLLM's and ONNX
Runtime's WebGPU PagedAttention.

k_pages [NP, Hkv, P, D] and v_pages [NP, Hkv, P, Dv] are pools of NP pages of P keys;
block_table [B, NB] (integers) lists the pages of each batch row in order, so key j of row b
is row j % P of page block_table[b, j // P]. The kernel is the shipped flash kernel reading K
and V through the table (kernels/flash.py, `paged_flash_attention`: indirect indexing in the
DSL), with every option of `attention()`: kv_lens (each row's length; without it every row
has T = NB * P keys), GQA, causal (queries aligned to the end of the row's keys), window,
softcap, ALiBi, bias [B, Hq, S, T], sinks, lse, score_mod / mask_mod (kv_idx is the position
in the row's sequence), split-KV decoding, f16.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np

from attnc.runtime.api import (
    QUANTIZED,
    _input_key,
    _tensors_device,
    as_input,
    check_shared_dtype,
    kv_formats,
    prepare_dims,
    rows_packable,
    scalar_options,
    validate_dims,
    vector_readable,
)
from attnc.runtime.build import mods_scan
from attnc.runtime.locking import serialized
from attnc.runtime.lru import LRU
from attnc.runtime.prepared import Prepared, gives_new_output
from attnc.runtime.tensor import Tensor, host_array

MAX_CACHED_OPS = 16
_OPS: LRU[Hashable, Prepared] = LRU(MAX_CACHED_OPS)


def validate_paged(q: Any, k_pages: Any, v_pages: Any, block_table: Any) -> dict[str, int]:
    """Check the shapes and dtypes of a paged call; return its dims (B, Hq, Hkv, S, T, D, Dv
    and NP pages, P keys per page, NB table entries per row; T = NB * P)."""
    for n, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if len(x.shape) != 4:
            raise ValueError(f"{n}: expected 4 dims, got {len(x.shape)} (shape {tuple(x.shape)})")
        if n != "q" and isinstance(x, QUANTIZED):
            continue  # a quantized pool: its format says how the kernel reads it
        if x.dtype not in (np.float32, np.float16):
            raise ValueError(f"{n}: dtype must be float32 or float16, got {x.dtype}")
    check_shared_dtype({"q": q, "k_pages": k_pages, "v_pages": v_pages}, "the pools")
    B, Hq, S, D = q.shape
    NP, Hkv, P, Dk = k_pages.shape
    if Dk != D:
        raise ValueError(f"head dim D differs: q has {D}, k_pages has {Dk}")
    if tuple(v_pages.shape[:3]) != (NP, Hkv, P):
        raise ValueError(f"v_pages shape {tuple(v_pages.shape)} does not match k_pages shape "
                         f"{tuple(k_pages.shape)} in (pages, Hkv, page size)")
    shape = tuple(block_table.shape)
    if len(shape) != 2 or shape[0] != B:
        raise ValueError(f"block_table: expected shape ({B}, max_pages) (B from q), got {shape}")
    if NP < 1 or P < 1 or shape[1] < 1:
        raise ValueError(f"paged K/V must not be empty: k_pages {tuple(k_pages.shape)}, block_table {shape}")
    dims = validate_dims(dict(B=B, Hq=Hq, S=S, D=D, Hkv=Hkv, T=shape[1] * P, Dv=v_pages.shape[3]))
    return {**dims, "NP": int(NP), "P": int(P), "NB": int(shape[1])}


def _checked_table(table: Any, dims: dict[str, int], kv_lens: Any) -> Any:
    """A host block table checked: integers, and every entry a row uses (those of its first
    ceil(kv_lens[b] / P) pages, all of them without kv_lens) a page of the pool. A GPU table
    is used as it is (an entry past the pool reads the nearest page, never outside it)."""
    if isinstance(table, Tensor):
        if table.dtype != np.int32:
            raise ValueError(f"block_table: dtype {table.dtype}; the kernel reads int32")
        return table
    arr = host_array("block_table", table)
    if arr is None:
        raise ValueError(f"block_table: expected an integer array or an attnc.Tensor, got {type(table).__name__}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"block_table: expected integers, got dtype {arr.dtype}")
    P, NP = dims["P"], dims["NP"]
    lens = np.full(dims["B"], dims["T"]) if kv_lens is None or isinstance(kv_lens, Tensor) \
        else np.asarray(host_array("kv_lens", kv_lens)).astype(np.int64)
    if lens.shape == (dims["B"],) and (lens > dims["T"]).any():  # more keys than the table's pages hold
        b = int(np.argmax(lens > dims["T"]))
        raise ValueError(f"kv_lens[{b}] = {int(lens[b])} needs {int(-(-lens[b] // P))} pages of {P} keys, but "
                         f"block_table has {arr.shape[1]} entries per row ({dims['T']} keys)")
    used = np.arange(arr.shape[1])[None, :] < (-(-np.clip(lens, 0, dims["T"]) // P))[:, None]
    bad = used & ((arr < 0) | (arr >= NP))
    if bad.any():
        b, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(arr[b, j])} is outside the page pool: k_pages and v_pages "
                         f"hold {NP} pages (0..{NP - 1}); row {b} uses its first "
                         f"{int(-(-min(int(lens[b]), dims['T']) // P))} entries")
    return np.ascontiguousarray(arr, dtype=np.int32)


@serialized
def paged_attention(q: Any, k_pages: Any, v_pages: Any, block_table: Any, *, kv_lens: Any = None,
                    causal: bool = False, scale: float | None = None,
                    window: tuple[int | None, int | None] | None = None, bias: Any = None,
                    alibi_slopes: Any = None, softcap: float | None = None, sinks: Any = None,
                    return_lse: bool = False, device: Any = None, target: str | None = None,
                    score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
                    inputs: Mapping[str, Any] | None = None, out: Tensor | None = None,
                    out_lse: Tensor | None = None, output: str | None = None) -> Any:
    """Attention of q [B, Hq, S, D] over paged keys and values (see the module docstring):
    row b's keys are its first kv_lens[b] (default NB * P) positions in the pages
    block_table[b]. Options, results and GPU tensors as for attention(); a host block table
    entry that a row uses and that is not a page of the pool is a ValueError naming it."""
    q, kp, vp = as_input("q", q), as_input("k_pages", k_pages), as_input("v_pages", v_pages)
    table_shape = block_table if isinstance(block_table, Tensor) else host_array("block_table", block_table)
    if table_shape is None:
        raise ValueError(f"block_table: expected an integer array or an attnc.Tensor, got "
                         f"{type(block_table).__name__}")
    dims = validate_paged(q, kp, vp, table_shape)
    table = _checked_table(block_table, dims, kv_lens)
    options = {n: x for n, x in (("bias", bias), ("alibi_slopes", alibi_slopes), ("sinks", sinks),
                                 ("kv_lens", kv_lens)) if x is not None}
    dev = _tensors_device(device, {"q": q, "k_pages": kp, "v_pages": vp, "block_table": table, **options,
                                   "out": out, "out_lse": out_lse})
    scalars = scalar_options(dims, window, softcap, scale, score_mod, mask_mod, causal, return_lse)
    if inputs is not None and not isinstance(inputs, Mapping):
        raise ValueError(f"inputs must be a dict of name -> array or number, got {type(inputs).__name__}")
    named = dict(inputs or {})
    if "block_table" in named:
        raise ValueError("inputs: 'block_table' is paged_attention's own argument")
    formats = kv_formats(kp, vp)
    vec = vector_readable(q, kp, vp)
    packable = rows_packable(dims, out, out_lse)
    scan = mods_scan(score_mod, mask_mod)
    shapes = tuple(sorted((n, _input_key(x)) for n, x in named.items()))
    key = None if scan is not None and scan.key is None else \
        (id(dev), tuple(sorted(dims.items())), str(q.dtype), vec, packable, bool(causal), scale,
         None if window is None else tuple(window), tuple(sorted(scalars.items())), tuple(sorted(options)),
         bool(return_lse), target, tuple(sorted(formats.items())), None if scan is None else scan.key, shapes)

    def make() -> Prepared:
        op = prepare_dims(dims, q.dtype, causal=causal, scale=scale, window=window, softcap=softcap, device=dev,
                          target=target, return_lse=return_lse, score_mod=score_mod, mask_mod=mask_mod,
                          vector_loads=vec, pack_gqa=None if packable else False, paged=True,
                          inputs={**named, "block_table": table}, **options, **formats)
        op.defaults.clear()  # every call passes its own tensors: keep no data
        return op

    op = _OPS.get_or_make(key, make)
    if scan is not None:
        named.update(op.captured_values(scan))
    new_output = gives_new_output(out, output, isinstance(q, Tensor) or isinstance(kp, Tensor)
                                  or isinstance(vp, Tensor))
    return op._call(q, kp, vp, out, out_lse, None, output, {**options, **named, "block_table": table},
                    keep_groups=not new_output)
