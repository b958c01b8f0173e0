"""A kernel's params beyond the ones a call binds itself: the tensors and numbers its mods
captured, the inputs passed by name, and the dims their shapes bind.

`bind_params` is the one place that turns such values into what a dispatch needs: storage
arrays in their buffer layout, element strides, uniform scalars, and the sizes of dims no
other tensor gave (a table's `NB`, a captured array's `rel_0`). Buffer layouts (the same as
docs/MANIFEST.md's): f32 and i32 one per 32-bit word; f16 two per word; u8 and bool four per
word, element i in byte i % 4 (little-endian) of word i // 4; u32 one per word, below 2**31.
numpy arrays are accepted, any object numpy reads through DLPack or `__array__` (a CPU
tensor of another library), and GPU tensors (attnc.Tensor: f32, f16, i32 and u32, bound in
place by the prepared op). Tracing learns of these types through
`capture.register_tensor_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnc.frontend import capture
from attnc.ir import nodes as ir
from attnc.ir.verify import F32_MAX, F32_MAX_ROUNDING
from attnc.runtime.tensor import Tensor, first_new_infinity, host_array

_I32_MAX = 2**31 - 1


def _array_like_info(obj: Any) -> capture.TensorInfo | None:
    """GPU tensors (attnc.Tensor), and host objects numpy reads (DLPack or `__array__`, with a
    shape and dtype: a CPU tensor of another library)."""
    if isinstance(obj, Tensor):
        return capture.TensorInfo(obj.dtype, obj.shape)
    if isinstance(obj, np.ndarray) or not hasattr(obj, "shape") or \
            not (hasattr(obj, "__array__") or hasattr(obj, "__dlpack__")):
        return None
    try:
        arr = host_array("tensor", obj)
    except ValueError:  # (a bfloat16 tensor): captured, and a TraceError naming it where the mod reads it
        try:
            shape = tuple(int(n) for n in obj.shape)
        except (TypeError, ValueError):
            return None
        return capture.TensorInfo(np.dtype("V1"), shape, f"{getattr(obj, 'dtype', '?')} (numpy cannot read it)")
    return None if arr is None else capture.TensorInfo(arr.dtype, tuple(int(n) for n in arr.shape))


capture.register_tensor_type(_array_like_info)


@dataclass
class BoundParams:
    """What bind_params made: every dim's size, the tensors (as given) and the scalars."""

    dims: dict[str, int]
    tensors: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float | int] = field(default_factory=dict)


def _where(name: str, sources: dict[str, str]) -> str:
    return sources.get(name, f"input {name!r}")


def _shape(obj: Any, what: str) -> tuple[int, ...]:
    """The shape of a tensor value: a GPU tensor's, or of the host array numpy reads."""
    if isinstance(obj, Tensor):
        return obj.shape
    return _as_array(obj, what).shape


def _as_array(obj: Any, what: str) -> np.ndarray:
    arr = host_array(what, obj)
    if arr is None:
        raise ValueError(f"{what}: expected an array or an attnc.Tensor, got {type(obj).__name__}")
    return arr


def _host(arr: np.ndarray, dtype: ir.DType, what: str) -> np.ndarray:
    """`arr` converted to the buffer layout of a tensor param of `dtype` (ValueError naming it)."""
    kind = arr.dtype.kind
    if dtype in (ir.DType.F32, ir.DType.F16):
        if kind not in "fiu":
            raise ValueError(f"{what}: expected real numbers for an {dtype.value} tensor, got dtype {arr.dtype}")
        target = np.dtype(np.float16 if dtype is ir.DType.F16 else np.float32)
        if arr.dtype == target:
            return np.ascontiguousarray(arr)
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=target)
        _check_range(arr, out, what)
        return out
    if dtype is ir.DType.BOOL:
        if kind != "b":
            raise ValueError(f"{what}: expected a bool array, got dtype {arr.dtype}")
        return _bytes(arr.astype(np.uint8))
    if kind not in "iu":
        raise ValueError(f"{what}: expected integers for an {dtype.value} tensor, got dtype {arr.dtype}")
    lo, hi = {ir.DType.I32: (-(2**31), _I32_MAX), ir.DType.U32: (0, _I32_MAX), ir.DType.U8: (0, 255)}[dtype]
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"{what}: values must be in [{lo}, {hi}] for an {dtype.value} tensor "
                         f"(found {int(arr.min())}..{int(arr.max())})")
    if dtype is ir.DType.U8:
        return _bytes(arr.astype(np.uint8))
    return np.ascontiguousarray(arr, dtype=np.int32 if dtype is ir.DType.I32 else np.uint32)


def _check_range(arr: np.ndarray, out: np.ndarray, what: str) -> None:
    """A ValueError naming `what`, the first value and its index where a finite element of `arr`
    became an infinity in `out` (float64 past float32's range, anything past float16's): the
    same refusal as a captured number of 1e39 gets; inf and NaN elements stay as they are."""
    at = first_new_infinity(arr, out)
    if at is None:
        return
    name = out.dtype.name
    raise ValueError(f"{what}: {arr[at].item()!r} at index {list(at)} is outside {name}'s range (largest "
                     f"{float(np.finfo(out.dtype).max):.7g}), which the kernel reads it as; pass inf for an infinity")


def _bytes(arr: np.ndarray) -> np.ndarray:
    """u8 elements four per little-endian u32 word, padded to whole words."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-flat.size % 4 or (4 if flat.size == 0 else 0), np.uint8)])
    return flat.view("<u4")


def _compact(arr: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """The array without its zero-stride (broadcast) axes repeated, and which axes those were."""
    zero = [s == 0 and n > 1 for s, n in zip(arr.strides, arr.shape, strict=True)]
    if any(zero):
        arr = arr[tuple(slice(0, 1) if z else slice(None) for z in zero)]
    return arr, zero


def host_param(obj: Any, dtype: ir.DType, shape: tuple[int, ...], what: str) -> tuple[np.ndarray, list[int]]:
    """A host value of a tensor param of `dtype` and `shape` (size-1 axes broadcast): checked
    (ValueError naming `what`) and converted to (array in the buffer layout, element strides)."""
    arr = _as_array(obj, what)
    if arr.ndim != len(shape):
        raise ValueError(f"{what}: expected {len(shape)} dims of shape {shape}, got shape {arr.shape}")
    for i, (n, f) in enumerate(zip(arr.shape, shape, strict=True)):
        if n not in (1, f):
            raise ValueError(f"{what}: axis {i} is {n}, this op takes {f} (shape {shape}; 1 broadcasts)")
    arr, zero = _compact(arr)
    st = _dense(arr.shape)
    strides = [0 if z or (n == 1 and f > 1) else s for s, n, f, z in zip(st, arr.shape, shape, zero, strict=True)]
    return _host(arr, dtype, what), strides


def bind_params(kern: ir.Kernel, dims: dict[str, int], values: dict[str, Any], *,
                skip: frozenset[str] | set[str] = frozenset(), sources: dict[str, str] | None = None,
                dims_from: str = "q, k, v", how: str = "with inputs={name: value}") -> BoundParams:
    """Bind every param of `kern` not in `skip` from `values` (by param name): check its rank,
    dtype and that its dims agree with `dims` (which came from `dims_from`) and with each other
    (a size-1 axis broadcasts), and add the dims it alone gives. `sources` names where a value
    came from, for messages ("the array a mod captures as 'rel'"). Raises ValueError naming
    the tensor. Tensors stay as given (host data or GPU tensors: the prepared op binds them)."""
    sources = sources or {}
    out = BoundParams(dict(dims))
    todo = [p for p in kern.params if p.name not in skip]
    missing = [p.name for p in todo if p.name not in values]
    if missing:
        raise ValueError(f"kernel {kern.name} needs {', '.join(repr(m) for m in missing)}: pass "
                         f"{'them' if len(missing) > 1 else 'it'} {how}")
    shapes: dict[str, tuple[int, ...]] = {}
    for p in todo:
        what, obj = _where(p.name, sources), values[p.name]
        if not p.type.dims:
            out.scalars[p.name] = scalar_value(obj, p.type.dtype, what)
            continue
        shape = shapes[p.name] = _shape(obj, what)
        if len(shape) != len(p.type.dims):
            raise ValueError(f"{what}: expected {len(p.type.dims)} dims {list(p.type.dims)}, got shape {tuple(shape)}")
        if math.prod(shape) == 0:
            raise ValueError(f"{what}: empty (shape {tuple(shape)}); a kernel input has at least one element")
        if isinstance(obj, Tensor):
            want = _GPU_DTYPE.get(p.type.dtype)
            if want is None or obj.dtype != want:
                raise ValueError(f"{what}: a GPU tensor of dtype {obj.dtype}; the kernel reads {p.type.dtype.value}"
                                 + (f" (a {want} tensor)" if want is not None else
                                    " (bool and u8 are packed four per word: pass host data)"))
        else:
            _host(_as_array(obj, what)[(0,) * len(shape)].reshape(1), p.type.dtype, what)  # the dtype fits
        out.tensors[p.name] = obj
    # each dim's size is the one size other than 1 its tensors have (size-1 axes broadcast)
    origin: dict[str, str] = {d: dims_from for d in dims}
    for p in todo:
        for d, n in zip(p.type.dims, shapes.get(p.name, ()), strict=True):
            have = out.dims.get(d)
            if have is None or (have == 1 and d not in dims):
                out.dims[d], origin[d] = int(n), _where(p.name, sources)
            elif n not in (1, have):
                raise ValueError(f"{_where(p.name, sources)}: dim {d} is {n}, but {have} in {origin[d]}")
    return out


_GPU_DTYPE = {ir.DType.F32: np.dtype(np.float32), ir.DType.F16: np.dtype(np.float16),
              ir.DType.I32: np.dtype(np.int32), ir.DType.U32: np.dtype(np.uint32)}


def _dense(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def scalar_value(obj: Any, dtype: ir.DType, what: str) -> float | int:
    """A number for a scalar param of `dtype` (a uniform), checked; ValueError naming `what`."""
    if isinstance(obj, np.ndarray):
        if obj.ndim != 0:
            raise ValueError(f"{what}: expected a number, got an array of shape {obj.shape}")
        obj = obj[()]
    if isinstance(obj, bool | np.bool_) or not isinstance(obj, int | float | np.integer | np.floating):
        raise ValueError(f"{what}: expected a number, got {type(obj).__name__}")
    if dtype is ir.DType.I32:
        if not float(obj).is_integer() or not -(2**31) <= int(obj) <= _I32_MAX:
            raise ValueError(f"{what}: expected an integer in the i32 range, got {obj!r}")
        return int(obj)
    value = float(obj)
    if math.isfinite(value) and abs(value) >= F32_MAX_ROUNDING:
        raise ValueError(f"{what}: {obj!r} is outside float32's range (largest {F32_MAX:.7g}), which the kernel "
                         "computes in; pass inf for an infinity")
    return value
