"""GPU tensors: strided views of GPUBuffers that attention() and prepared ops read and write in
place, so that an application's data stays on its device.

A `Tensor` is a GPUBuffer, a byte offset, a shape, element strides and a dtype (float32,
float16, int32 or uint32) on one attnc `Device`. Make one from host data (`tensor`, an
upload), as zeros (`zeros`), or around a buffer the application owns (`as_tensor`); read it
back with `.numpy()`. Views (`permute`, `transpose`, indexing with ints and slices) share the
buffer. f16 tensors are packed two per 32-bit word, as attnc's kernels read them.

A `QuantGPUTensor` is a quantized tensor (q8_0, q4_0, int8: attnc/quant.py) on the GPU: its
logical shape and format, and its packed u32 words in a dense uint32 Tensor. `tensor()` of a
host `QuantTensor` uploads one; `.numpy()` reads it back as a QuantTensor.

Host objects are numpy arrays or anything numpy can read without a copy through DLPack
(`__dlpack__`, e.g. a PyTorch CPU tensor) or `__array__` (`host_array`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnc.quant import QuantTensor, check_format, words_per_row
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import Device, get_device
from attnc.runtime.locking import serialized

# the dtypes a GPU tensor may have (what the kernels read and write)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32), np.dtype(np.uint32))


def overlaps(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether two indices of a view with these element strides address one element: quickly
    for layouts whose dims nest (each stride past the extent of the smaller ones), else by
    listing every element's offset."""
    dims = sorted((abs(s), n) for s, n in zip(strides, shape, strict=True) if n > 1)
    extent = 0  # the largest offset the smaller dims reach
    for stride, n in dims:
        if stride <= extent:
            break
        extent += stride * (n - 1)
    else:
        return False
    offsets = np.zeros((), np.int64)
    for stride, n in dims:
        offsets = np.add.outer(offsets, stride * np.arange(n, dtype=np.int64))
    return np.unique(offsets).size < offsets.size


def dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of a dense tensor of `shape`."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(out[::-1])


def host_array(name: str, x: Any) -> np.ndarray | None:
    """`x` as a numpy array when it is host data: a numpy array, or an object numpy reads
    through DLPack (`__dlpack__`, e.g. a PyTorch CPU tensor) or `__array__`; None for anything
    else (a GPU Tensor, a list, None). Host objects numpy cannot read are a ValueError naming
    the argument."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, Tensor) or x is None:
        return None
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            if not hasattr(x, "__array__"):
                raise ValueError(f"{name}: numpy cannot read this {type(x).__name__} through DLPack: {exc}") from None
    if hasattr(x, "__array__"):
        try:
            return np.asarray(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: numpy cannot read this {type(x).__name__}: {exc}") from None
    return None


def _check_dtype(name: str, dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in DTYPES:
        raise ValueError(f"{name}: dtype {dt} is not a GPU tensor dtype (float32, float16, int32, uint32)")
    return dt


class Tensor:
    """A strided view of a GPUBuffer on one attnc Device: shape, element strides, dtype, byte
    offset. attnc's kernels read inputs and write outputs through such views without copies.

    Binding rules (WebGPU's): the byte offset of a tensor a kernel binds must be a multiple of
    the device's `min-storage-buffer-offset-alignment` (256 on most GPUs), and the bytes it
    spans at most `max-storage-buffer-binding-size`; violations are errors naming the
    argument when the tensor is used, not when the view is made.
    """

    __slots__ = ("device", "buffer", "shape", "strides", "dtype", "offset", "_slice", "__weakref__")

    def __init__(self, device: Device, buffer: Any, shape: Sequence[int], dtype: Any,
                 strides: Sequence[int] | None = None, offset: int = 0, *, name: str = "tensor"):
        shape = tuple(int(n) for n in shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"{name}: shape {shape} has a negative dim")
        dt = _check_dtype(name, dtype)
        strides = dense_strides(shape) if strides is None else tuple(int(s) for s in strides)
        if len(strides) != len(shape):
            raise ValueError(f"{name}: {len(strides)} strides for {len(shape)} dims (shape {shape})")
        if any(s < 0 for s in strides):
            raise ValueError(f"{name}: negative strides {strides} (the kernels read with unsigned strides)")
        offset = int(offset)
        if offset < 0 or offset % dt.itemsize:
            raise ValueError(f"{name}: byte offset {offset} is not a non-negative multiple of {dt.itemsize} "
                             f"(the size of {dt})")
        self.device, self.buffer, self.shape, self.strides = device, buffer, shape, strides
        self.dtype, self.offset = dt, offset
        self._slice: rt.BufferSlice | None = None
        rt.track_destroyed_buffers(type(buffer))
        owner = getattr(buffer, "_device", None)
        if owner is not None and owner is not device.gpu:
            raise ValueError(f"{name}: the buffer belongs to another GPUDevice than {device!r}")
        end = self.offset + self.span_bytes
        if end > buffer.size:
            raise ValueError(f"{name}: shape {shape} with strides {strides} from byte {offset} needs {end} bytes; "
                             f"the buffer has {buffer.size}")

    @classmethod
    def _dense(cls, device: Device, buffer: Any, shape: tuple[int, ...], dtype: np.dtype,
               strides: tuple[int, ...]) -> Tensor:
        """A tensor attnc makes over a new buffer it sized for it (ints, a GPU dtype, offset 0,
        a span within the buffer): what __init__ checks holds by construction."""
        t = cls.__new__(cls)
        t.device, t.buffer, t.shape, t.strides, t.dtype = device, buffer, shape, strides, dtype
        t.offset, t._slice = 0, None
        return t

    # ------------------------------------------------------------------ facts
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the elements (not of the span a strided view covers)."""
        return self.size * self.itemsize

    @property
    def span_bytes(self) -> int:
        """Bytes from the first element to the end of the last one (0 when empty)."""
        last = 0  # the element index of the last element
        for n, s in zip(self.shape, self.strides, strict=True):
            if n == 0:
                return 0
            last += (n - 1) * s
        return (last + 1) * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        """Dense and row-major (strides of size-1 dims do not matter)."""
        return all(s == d for n, s, d in zip(self.shape, self.strides, dense_strides(self.shape), strict=True)
                   if n > 1)

    @property
    def destroyed(self) -> bool:
        """Whether its buffer was destroyed (by `destroy()` or `buffer.destroy()`)."""
        return rt.is_destroyed(self.buffer)

    def __repr__(self) -> str:
        extra = "" if self.is_contiguous else f", strides={self.strides}"
        extra += f", offset={self.offset}" if self.offset else ""
        return f"attnc.Tensor(shape={self.shape}, dtype={self.dtype}{extra}, device={self.device.spec})"

    # ------------------------------------------------------------------ data
    @serialized
    def numpy(self) -> np.ndarray:
        """A host copy (waits for the GPU work that writes it)."""
        self.check_alive("tensor")
        if not self.buffer.usage & self.device.wgpu.BufferUsage.COPY_SRC:
            raise ValueError("tensor: its buffer was created without COPY_SRC usage, so it cannot be read back")
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        start = self.offset // 4 * 4
        end = min(self.buffer.size, -(-(self.offset + self.span_bytes) // 4) * 4)
        raw = rt.read_bytes(self.device, self.buffer, start, end - start)
        flat = np.frombuffer(raw, self.dtype, count=self.span_bytes // self.itemsize, offset=self.offset - start)
        view = np.lib.stride_tricks.as_strided(flat, self.shape, tuple(s * self.itemsize for s in self.strides))
        return np.array(view)

    @serialized
    def write(self, data: Any) -> Tensor:
        """Copy host data of this shape into the tensor in place (queue.write_buffer; the
        tensor must be contiguous and its bytes start and end on 4-byte boundaries, or be a
        whole tensor attnc allocated, whose buffer is padded to a word)."""
        self.check_alive("tensor")
        if not self.buffer.usage & self.device.wgpu.BufferUsage.COPY_DST:
            raise ValueError("tensor: its buffer was created without COPY_DST usage, so it cannot be written from "
                             "the host (queue.write_buffer); create it with COPY_DST, or write a buffer that has it "
                             "and copy from there")
        arr = host_array("data", data)
        if arr is None:
            raise ValueError(f"data: expected host data (numpy, __array__ or DLPack), got {type(data).__name__}")
        if arr.shape != self.shape:
            raise ValueError(f"data: shape {arr.shape} does not match the tensor's {self.shape}")
        if not self.is_contiguous:
            raise ValueError(f"tensor: write() needs a contiguous tensor; this view has strides {self.strides}")
        host = converted("data", arr, self.dtype, "the tensor's")
        tail = -self.nbytes % 4
        if tail and self.offset % 4 == 0 and _PADDED.get(self.buffer) == self.offset + self.nbytes:
            # a tensor attnc allocated (an odd number of halves): the bytes up to the next word are
            # its buffer's padding, which nothing reads, so the write covers them with zeros
            host = np.concatenate([host.reshape(-1).view(np.uint8), np.zeros(tail, np.uint8)])
        elif self.offset % 4 or tail:
            raise ValueError(f"tensor: write() needs 4-byte aligned bytes; offset {self.offset}, {self.nbytes} bytes "
                             "(WebGPU writes whole 4-byte words: write the words around this view, e.g. through "
                             "a float16 view of an even number of elements)")
        if self.nbytes:
            rt.write(self.device, self.buffer, self.offset, host)
        return self

    @serialized
    def destroy(self) -> None:
        """Destroy the buffer (and with it every view of it)."""
        self.buffer.destroy()

    def check_alive(self, name: str) -> None:
        if self.destroyed:
            raise ValueError(f"{name}: its GPU buffer was destroyed")

    # ------------------------------------------------------------------ views
    def permute(self, *axes: int) -> Tensor:
        """The same data with its dims reordered (e.g. [B, S, H, D] viewed as [B, H, S, D] with
        `permute(0, 2, 1, 3)`)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"permute: {axes} is not a permutation of {self.ndim} dims")
        return Tensor(self.device, self.buffer, [self.shape[a] for a in axes], self.dtype,
                      [self.strides[a] for a in axes], self.offset)

    def transpose(self, a: int, b: int) -> Tensor:
        """The same data with dims a and b swapped."""
        axes = list(range(self.ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return self.permute(*axes)

    def __getitem__(self, index: Any) -> Tensor:
        """A view: ints drop a dim, slices (positive steps) narrow one, `...` fills the rest."""
        items = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in items) > 1:
            raise IndexError("an index can only have one ellipsis")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + (slice(None),) * (self.ndim - len(items) + 1) + items[at + 1:]
        if len(items) > self.ndim:
            raise IndexError(f"too many indices ({len(items)}) for {self.ndim} dims")
        items = items + (slice(None),) * (self.ndim - len(items))
        shape, strides, offset = [], [], self.offset
        for dim, (it, n, s) in enumerate(zip(items, self.shape, self.strides, strict=True)):
            if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
                i = int(it) + (n if it < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {it} is out of range for dim {dim} of size {n}")
                offset += i * s * self.itemsize
            elif isinstance(it, slice):
                start, stop, step = it.indices(n)
                if step <= 0:
                    raise IndexError("GPU tensor views take positive slice steps only")
                count = max(0, -(-(stop - start) // step))
                offset += (start * s * self.itemsize) if count else 0
                shape.append(count)
                strides.append(s * step)
            else:
                raise IndexError(f"GPU tensors are indexed with ints and slices, not {type(it).__name__}")
        return Tensor(self.device, self.buffer, shape, self.dtype, strides, offset)

    # ------------------------------------------------------------------ binding
    def binding(self, name: str) -> rt.BufferSlice:
        """The byte range of the buffer a kernel binds for this tensor: from its offset over its
        span, rounded up to 4 bytes. Errors name the argument: an offset off the device's
        binding alignment, a span over its largest binding, a destroyed buffer."""
        self.check_alive(name)
        found = self._slice
        if found is not None:
            return found
        limits = self.device.gpu.limits
        align = int(limits.get("min-storage-buffer-offset-alignment", 256))
        if self.offset % align:
            raise ValueError(f"{name}: byte offset {self.offset} is not a multiple of {align}, the device's "
                             "min-storage-buffer-offset-alignment that WebGPU requires of a binding's offset "
                             "(start the tensor at an aligned offset, or copy it)")
        size = max(4, -(-self.span_bytes // 4) * 4)
        largest = rt.max_binding_bytes(self.device)
        if size > largest:
            raise ValueError(f"{name}: spans {size} bytes, more than the device's max-storage-buffer-binding-size "
                             f"({largest})")
        if self.offset + size > self.buffer.size:
            raise ValueError(f"{name}: a binding covers whole 4-byte words, {self.offset + size} bytes; the buffer "
                             f"has {self.buffer.size}")
        self._slice = rt.BufferSlice(self.buffer, self.offset, size)
        return self._slice


class QuantGPUTensor:
    """A quantized tensor of logical `shape` (head dim last) in format `fmt` on the GPU: its
    packed u32 words (attnc/quant.py's layouts) in `words`, a dense 1-D uint32 Tensor. The
    kernels address it by the element index of the dense logical tensor, so it has no views."""

    __slots__ = ("fmt", "shape", "words", "__weakref__")

    def __init__(self, fmt: str, shape: Sequence[int], words: Tensor, *, name: str = "tensor"):
        check_format(fmt)
        shape = tuple(int(n) for n in shape)
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"{name}: a quantized tensor needs positive dims, got shape {shape}")
        want = math.prod(shape[:-1]) * words_per_row(fmt, shape[-1])
        if not isinstance(words, Tensor) or words.dtype != np.uint32 or words.shape != (want,) \
                or not words.is_contiguous:
            got = f"{words.dtype} {words.shape}" if isinstance(words, Tensor) else type(words).__name__
            raise ValueError(f"{name}: a {fmt} tensor of shape {shape} is {want} dense uint32 words; got {got}")
        self.fmt, self.shape, self.words = fmt, shape, words

    @property
    def device(self) -> Device:
        return self.words.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed words."""
        return self.words.nbytes

    @property
    def destroyed(self) -> bool:
        return self.words.destroyed

    def __repr__(self) -> str:
        return f"attnc.QuantGPUTensor(fmt={self.fmt!r}, shape={self.shape}, device={self.device.spec})"

    @serialized
    def numpy(self) -> QuantTensor:
        """A host copy (a QuantTensor; attnc.quant.dequantize gives its values)."""
        return QuantTensor(self.fmt, self.shape, self.words.numpy())

    def binding(self, name: str) -> rt.BufferSlice:
        """The words' binding (errors as Tensor.binding)."""
        return self.words.binding(name)

    @serialized
    def destroy(self) -> None:
        self.words.destroy()


@serialized
def quant_zeros(fmt: str, shape: Sequence[int], device: Any = None) -> QuantGPUTensor:
    """A new quantized GPU tensor of zero words (every value 0)."""
    dev = get_device(device)
    shape = tuple(int(n) for n in shape)
    n = math.prod(shape[:-1]) * words_per_row(check_format(fmt), shape[-1]) if shape else 0
    return QuantGPUTensor(fmt, shape, Tensor(dev, rt.empty(dev, 4 * max(n, 1)), (n,), np.uint32))


def on_gpu(x: Any) -> bool:
    """Whether `x` is a GPU tensor (plain or quantized)."""
    return isinstance(x, (Tensor, QuantGPUTensor))


# buffers attnc allocated for one tensor, by the bytes of its data: what follows, up to the
# next 4-byte word, is padding that nothing reads (Tensor.write may cover it)
_PADDED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def first_new_infinity(src: np.ndarray, out: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first finite element of `src` that is an infinity in `out` (its
    conversion to a narrower float), or None."""
    if out.size == 0 or np.isfinite(out).all():
        return None
    grew = np.isinf(out) & np.isfinite(src)
    return tuple(int(i) for i in np.argwhere(grew)[0]) if grew.any() else None


def converted(name: str, arr: np.ndarray, dtype: np.dtype, target: str) -> np.ndarray:
    """`arr` as a contiguous array of `dtype`, or a ValueError where the conversion would change
    a value's kind (floats truncated to ints, complex parts dropped), wrap an integer past the
    range of `dtype`, or turn a finite number into an infinity (float64 past float32's range)."""
    if not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise ValueError(f"{name}: dtype {arr.dtype} does not convert to {target} {dtype} without losing its kind "
                         f"of number; convert it first (e.g. data.astype(np.{dtype}))")
    if dtype.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        info, lo, hi = np.iinfo(dtype), int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            value = lo if lo < info.min else hi
            raise ValueError(f"{name}: {value} at index {np.argwhere(arr == value)[0].tolist()} is outside {target} "
                             f"{dtype}'s range [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):
        host = np.ascontiguousarray(arr, dtype)
    at = first_new_infinity(arr, host) if dtype.kind == "f" and arr.dtype.kind == "f" else None
    if at is not None:
        raise ValueError(f"{name}: {arr[at].item()!r} at index {list(at)} is outside {target} "
                         f"{dtype}'s range (largest {np.finfo(dtype).max}): it would become an infinity")
    return host


@serialized
def tensor(data: Any, device: Any = None, dtype: Any = None) -> Any:
    """Upload host data (numpy, `__array__` or DLPack) into a new GPU tensor on `device`
    (a Device, a GPUDevice, a spec string, or None for the default). `dtype` converts; without
    it the data's dtype must be one of float32, float16, int32, uint32. A host QuantTensor
    (attnc.quant.quantize) becomes a QuantGPUTensor of its format."""
    if isinstance(data, QuantTensor):
        if dtype is not None:
            raise ValueError("dtype: a quantized tensor keeps its format; dtype= does not apply")
        dev = get_device(device)
        words = Tensor(dev, rt.upload(dev, data.words), data.words.shape, np.uint32)
        return QuantGPUTensor(data.fmt, data.shape, words)
    arr = host_array("data", data)
    if arr is None:
        raise ValueError(f"data: expected host data (numpy, __array__ or DLPack), got {type(data).__name__}")
    dev = get_device(device)
    dt = _check_dtype("data", arr.dtype if dtype is None else dtype)
    host = converted("data", arr, dt, "dtype")
    buffer = rt.upload(dev, host)
    _PADDED[buffer] = host.nbytes
    return Tensor(dev, buffer, host.shape, dt)


@serialized
def zeros(shape: Sequence[int], dtype: Any = np.float32, device: Any = None) -> Tensor:
    """A new zero-filled GPU tensor (WebGPU zero-initialises buffers)."""
    dev = get_device(device)
    dt = _check_dtype("dtype", dtype)
    shape = tuple(int(n) for n in shape)
    buffer = rt.empty(dev, math.prod(shape) * dt.itemsize)
    _PADDED[buffer] = math.prod(shape) * dt.itemsize
    return Tensor(dev, buffer, shape, dt)


@serialized
def as_tensor(buffer: Any, shape: Sequence[int], dtype: Any = np.float32, strides: Sequence[int] | None = None,
              offset: int = 0, device: Any = None) -> Tensor:
    """A tensor view of a GPUBuffer the application owns (no copy). The device is the buffer's
    own (wrapped as an attnc Device on first use); `device`, when given, must be that one."""
    owner = getattr(buffer, "_device", None)
    if owner is None and device is None:
        raise ValueError("buffer: cannot tell which GPUDevice it belongs to; pass device=")
    dev = Device.from_gpu_device(owner) if owner is not None else get_device(device)
    if device is not None and get_device(device) is not dev:
        raise ValueError(f"buffer: it belongs to {dev!r}, not to device={device!r}")
    if not buffer.usage & dev.wgpu.BufferUsage.STORAGE:
        raise ValueError("buffer: created without STORAGE usage, so kernels cannot bind it")
    return Tensor(dev, buffer, shape, dtype, strides, offset, name="buffer")
