"""A prepared attention op: its kernel, programs and uniforms, ready to run on new tensors.

Calling an op, `op(q, k, v, ...)`, binds GPU tensors (`runtime/tensor.py`) in place and
uploads host arrays into buffers the op keeps, then records its dispatches in one compute
pass: into the caller's command encoder (`encoder=`, the caller submits) or into one of its
own that it submits. Everything a call needs is made once and looked up again: pipelines
(per device), uniform buffers (per distinct uniform block: the strides of the tensors it is
given), bind groups (per set of buffers, by identity). A repeated call with tensors of the
same shapes creates no buffers, pipelines or bind groups and uploads nothing; the device's
counters (`Device.counters`) show it.

Besides q, k, v and the option tensors, an op may take params bound by runtime/params.py's
rules (any dtype and named dims): the tensors and numbers score_mod/mask_mod capture, the
inputs passed by name, and every param of a custom kernel (attnc.build). Their numbers are
uniforms a call may change (`op(q, k, v, temperature=0.5)`), not new kernels.

The older interface, `bind` / `bind_copy` / `run` / `result`, uploads into new buffers for
each binding (the tuner and the benchmarks rotate over such copies) and times runs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnc.errors import DeviceError, LoweringError
from attnc.ir import nodes as ir
from attnc.lowering import Plan, Strategy
from attnc.lowering.plan import fast_reduce, layout
from attnc.lowering.program import Access, Program, storage_buffers
from attnc.lowering.retype import operand_tensors
from attnc.quant import QuantTensor
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import Device
from attnc.runtime.locking import serialized
from attnc.runtime.lru import LRU
from attnc.runtime.params import host_param, scalar_value
from attnc.runtime.tensor import QuantGPUTensor, Tensor, dense_strides, host_array, on_gpu, overlaps

# kernel tensor dtypes as numpy dtypes (bool and u8 params are packed four per word: host data only)
NUMPY_OF = {ir.DType.F32: np.dtype(np.float32), ir.DType.F16: np.dtype(np.float16), ir.DType.I32: np.dtype(np.int32),
            ir.DType.U32: np.dtype(np.uint32), ir.DType.U8: np.dtype(np.uint8), ir.DType.BOOL: np.dtype(np.bool_)}
# the attention kernel's operands: read as vec4 by a plan with vector_width 4
VECTOR_TENSORS = ("q", "k", "v")
# tensor params that may be given with a shape broadcastable to their dims (read with stride 0)
BROADCAST = frozenset({"bias"})
# bind groups an op keeps (least recently used dropped first): enough for one op reused by a
# whole model's layers with their own buffers
MAX_BIND_GROUPS = 256
# the inputs of attention itself (not tables a mod reads), as binding-size errors name them
ATTENTION_INPUTS = frozenset({"q", "k", "v", "bias", "sinks", "kv_lens", "alibi_slopes", "block_table"})
MAX_UNIFORM_BLOCKS = 16
MAX_FRESH_CALLS = 16
OUTPUT_MODES = ("tensor", "numpy")
_GPU = (Tensor, QuantGPUTensor)  # the types of k and v a call's fast path takes
_F32 = np.dtype(np.float32)


def workgroups(factors: tuple[str, ...], env: dict[str, float | int]) -> int:
    """Evaluate a product of grid factors (`X`, `ceil_div(X,n)`, `ceil_div(A*B,n)`,
    `ceil_div(X+n,n)`)."""
    def term(x: str) -> int:
        return int(x) if x.isdigit() else int(env[x])

    total = 1
    for f in factors:
        if f.startswith("ceil_div("):
            num, den = f[len("ceil_div("):-1].split(",")
            n = sum(math.prod(term(x) for x in t.split("*")) for t in num.split("+"))
            total *= -(-n // int(den))
        else:
            total *= int(env[f])
    return total


def broadcast_strides(name: str, x: np.ndarray, full: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """A compact array and element strides that read it broadcast to `full` (0 on size-1 dims)."""
    shape = broadcast_shape(name, x.shape, full)
    arr = np.ascontiguousarray(x.reshape(shape))
    st = dense_strides(shape)
    return arr, [0 if n == 1 and f != 1 else s for s, n, f in zip(st, shape, full, strict=True)]


def broadcast_shape(name: str, shape: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` padded with leading 1s to the rank of `full`, when it broadcasts to `full`."""
    if len(shape) > len(full):
        raise ValueError(f"{name}: shape {shape} has more dims than {full}")
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    for n, f in zip(padded, full, strict=True):
        if n not in (1, f):
            raise ValueError(f"{name}: shape {shape} is not broadcastable to {full}")
    return padded


@dataclasses.dataclass(frozen=True)
class TensorParam:
    """A tensor input of the op's kernel: its concrete shape and dtype, how it may be read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    vector: bool  # read as vec4: unit stride on the last dim, the other strides multiples of 4
    broadcast: bool  # may be given broadcastable to `shape` (stride 0 on its size-1 dims)
    ir_dtype: ir.DType = ir.DType.F32
    generic: bool = False  # bound by runtime/params.py's rules (captures, named inputs, custom kernels)
    fmt: str | None = None  # k / v stored quantized (q8_0, q4_0, int8): given as a (GPU) QuantTensor


def check_host_option(name: str, x: Any, dims: Mapping[str, int], total_keys: int | None = None) -> np.ndarray:
    """A host value of an option tensor, checked against the contract and converted to what
    the kernel reads (float32; int32 kv_lens); errors name the argument."""
    arr = host_array(name, x)
    if arr is None:
        raise ValueError(f"{name}: expected a numpy array, an attnc.Tensor or host data with __array__ or "
                         f"__dlpack__, got {type(x).__name__}")
    if name == "kv_lens":
        B = dims["B"]
        if arr.ndim != 1:
            raise ValueError(f"kv_lens: expected 1 dims, got {arr.ndim} (shape {arr.shape})")
        if arr.shape != (B,):
            raise ValueError(f"kv_lens: expected shape ({B},) (B), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"kv_lens: expected integers, got {arr.dtype}")
        total = dims["T"] if total_keys is None else total_keys
        if not np.all((arr >= 0) & (arr <= total)):
            raise ValueError(f"kv_lens: values must be in [0, T={total}]")
        return np.ascontiguousarray(arr, dtype=np.int32)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if name in ("alibi_slopes", "sinks"):
        if arr.ndim != 1:
            raise ValueError(f"{name}: expected 1 dims, got {arr.ndim} (shape {arr.shape})")
        if arr.shape != (dims["Hq"],):
            raise ValueError(f"{name}: expected shape ({dims['Hq']},) (Hq), got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.float32)  # bound as one run of Hq numbers
    return arr.astype(np.float32, copy=False)


def _destroyed(buffers: tuple[Any, ...]) -> bool:
    """Whether any of these GPUBuffers was destroyed."""
    for b in buffers:
        if getattr(b, rt.DESTROYED, False):
            return True
    return False


def zeros_on(dev: Device, shape: tuple[int, ...]) -> Tensor:
    """A new float32 GPU tensor of `shape` (zero-filled) on `dev`."""
    return Tensor._dense(dev, rt.empty(dev, 4 * math.prod(shape)), shape, _F32, dense_strides(shape))


def gives_new_output(out: Any, output: str | None, gpu_inputs: bool) -> bool:
    """Whether a call of attention() (paged_attention, a built kernel) hands its caller a GPU
    tensor attnc allocates (output="tensor", or GPU inputs and no `output`, without out=): one
    of its own at every call, which no later call writes (a prepared op's own output, by
    contrast, is the op's)."""
    return out is None and (output == "tensor" or (output is None and gpu_inputs))


class Prepared:
    """One attention problem made ready on a device: kernel, programs, uniforms.

    `op(q, k, v, ...)` runs it on GPU tensors or host arrays (see the module docstring);
    `bind` / `run` / `result` are the interface of the tuner and the benchmarks.
    """

    def __init__(self, dev: Device, kern: ir.Kernel, plan: Plan, progs: tuple[Program, ...],
                 dims: dict[str, int], scalars: dict[str, float | int], defaults: dict[str, Any],
                 total_keys: int | None = None, *, generic: frozenset[str] = frozenset(),
                 sources: Mapping[str, str] | None = None):
        self.dev, self.kern, self.plan, self.progs, self.dims = dev, kern, plan, progs, dims
        self.scalars = scalars
        self.total_keys = total_keys  # kv_lens' upper bound (T, or the whole T of a chunked problem)
        self.bufs: dict[str, Any] = {}
        self.dispatches: list[rt.Dispatch] = []
        self.has_lse = any(b.name == "lse" for p in progs for b in p.bindings)
        self.options_key = ""
        vec = plan.vector_width == 4
        operands = operand_tensors(kern)
        # `generic`: params bound by runtime/params.py (captured, named, a custom kernel's);
        # `sources` says what each is in messages ("the array a mod captures as 'doc'")
        self.generic = frozenset(generic)
        self.sources = dict(sources or {})
        self.params = tuple(
            TensorParam(p.name, tuple(dims[d] for d in p.type.dims),
                        np.dtype(np.uint32) if p.type.dtype.is_quant else NUMPY_OF[p.type.dtype],
                        vec and p.name in operands, p.name in BROADCAST or p.name in self.generic,
                        p.type.dtype, p.name in self.generic, p.type.dtype.value if p.type.dtype.is_quant else None)
            for p in kern.params if p.type.dims)
        # scalar params a call may set by name (uniforms): captured numbers, named scalars
        self.scalar_inputs = frozenset(p.name for p in kern.params if not p.type.dims and p.name in self.generic)
        self.option_names = frozenset(p.name for p in self.params if p.generic or p.name not in VECTOR_TENSORS) \
            | self.scalar_inputs
        # k and v indexed by the batch: one of batch 1 serves every query batch (stride 0)
        self._kv_batch = frozenset(p.name for p in kern.params if p.name in ("k", "v") and p.type.dims[:1] == ("B",))
        self.defaults: dict[str, Any] = {}
        # host arrays given as defaults, with a copy of what they held when last converted:
        # read again at every call (_refresh_defaults), so an edit in place is seen
        self._default_sources: dict[str, tuple[Any, np.ndarray]] = {}
        for name, value in defaults.items():
            self.defaults[name] = self._checked_default(name, value)
            seen = host_array(self._what(name), value) if isinstance(self.defaults[name], tuple) else None
            if seen is not None:
                self._default_sources[name] = (value, np.array(seen, copy=True, order="C"))
        out = tuple(kern.output.dims)
        # GQA packed into rows: [B, Hkv, R, Dv] is the memory of [B, Hq, S, Dv]
        self.packed_rows = out == ("B", "Hkv", "R", "Dv")
        if out == ("B", "Hq", "S", "Dv") or self.packed_rows:
            self.out_shape = (dims["B"], dims["Hq"], dims["S"], dims["Dv"])
        else:  # a custom kernel: o in its own dims
            self.out_shape = tuple(dims[d] for d in out)
        self._o_dtype = np.dtype(np.float16 if kern.output.dtype is ir.DType.F16 else np.float32)
        width = self.out_shape[-1]
        self._o_row_stride = width + width % 2 if self._o_dtype == np.float16 else width
        self.split_param = next((str(a.extent.count) for st in kern.body if isinstance(st, ir.Grid)
                                 for a in st.axes if isinstance(a.extent, ir.SplitExtent)), None)
        env = {**dims, **scalars}
        self.grids = [workgroups(p.grid, env) for p in progs]
        base = {f"d_{d}": dims[d] for d in kern.dims}
        base.update({f"p_{p.name}": scalars[p.name] for p in kern.params if not p.type.dims})
        self._base_uniforms = [{n: v for n, v in base.items() if n in {f.name for f in p.uniforms}} for p in progs]
        self._storage = [tuple(b.name for b in p.bindings if b.access is not Access.UNIFORM) for p in progs]
        self._compiled: list[rt.CompiledProgram] | None = None
        self._folded: list[tuple[int, int, int]] = []
        self._uniforms: collections.OrderedDict[Any, list[Any]] = collections.OrderedDict()
        # bind groups by (program, uniform buffer, bound slices), each with weak references to the
        # tensors of the call that made it: see _held_while
        self._groups: LRU[Any, tuple[Any, Any]] = LRU(MAX_BIND_GROUPS)
        self._staging: dict[str, Any] = {}  # host inputs: the op's own upload buffers
        self._uploaded_defaults: dict[str, tuple[rt.BufferSlice, tuple[int, ...]]] = {}
        self._own_out: tuple[Tensor, Tensor | None] | None = None
        self._scratch: dict[str, Any] = {}  # the op's own scratch buffers (split partials, block map)
        # the block map's programs, the tensors they read, and the digest of the host data (and
        # uniforms) the map in the op's scratch was built from: see _map_digest_of
        self._map_programs = frozenset(i for i, p in enumerate(progs) if p.name in ("classify", "compact"))
        self._map_reads = frozenset(n for i in self._map_programs for n in self._storage[i]) - {"blocks"}
        self._map_digest: bytes | None = None
        # calls with the same GPU tensors, by their identity: (recorded pass, the op's own outputs
        # it returned, buffers, weak references to the tensors), see _call
        self._memo: LRU[Any, tuple[Any, Any, tuple[Any, ...], Any]] = LRU(MAX_BIND_GROUPS)
        # calls that return new outputs (attention() with GPU tensors), by the identity of their
        # tensors, held weakly: see _remember_fresh
        self._fresh: LRU[Any, tuple[tuple[Any, ...], tuple[Any, ...], Any]] = LRU(MAX_FRESH_CALLS)
        # a pass of the caller's run ahead of the op's in one compute pass (KVCache.attend's
        # append=): the joined pass, by (the caller's pass, the op's)
        self._joined: LRU[tuple[rt.Pass, rt.Pass], rt.Pass] = LRU(16)
        self._env: tuple[str | None, ...] = ()
        self._pass_label = self.main_program.name
        self.capture_paths: dict[str, Any] = {}  # captured param -> its path in the mods (api.py)

    # ------------------------------------------------------------------ facts
    @property
    def main_program(self) -> Program:
        """The attention pass (before it the block map's programs, after it the combine)."""
        return next((p for p in self.progs if p.name == "main"), self.progs[0])

    @property
    def variant(self) -> str:
        """A readable name of the variant: family, storage, tile sizes and plan tunables."""
        pl = self.main_program
        tun = ",".join(f"{k}={v}" for k, v in self.kern.tunables)
        split = f",NSPLIT={self.scalars[self.split_param]},CSG={self.plan.combine_groups}" \
            if self.split_param in self.scalars else ""
        pn = self.plan
        tiled = (f"WG={pl.workgroup_size},TM={pn.rows_per_invocation},DK={pn.head_chunk},"
                 f"DVS={pn.value_stage_columns},VK={pn.value_block_keys},UN={pn.unroll},PF={pn.prefetch}")
        tiled += f",PC={pn.p_chunk_keys}" if pn.p_chunk_keys else ""
        tiled += f",QO={pn.last_tile_first}" if pn.last_tile_first else ""
        kt = dict(self.kern.tunables)
        grid = next(st for st in self.kern.body if isinstance(st, ir.Grid))
        bm = next(str(a.extent.size) for a in grid.axes if isinstance(a.extent, ir.TileExtent))
        bn = next(str(st.size) for st in ir.walk_stmts(self.kern.body) if isinstance(st, ir.Loop))
        if pn.strategy is Strategy.TILED and fast_reduce(pn, layout(pn, kt[bm], kt[bn])):
            tiled += f",SGFAST={pn.shuffle_only_lanes}"
        stream = f"WG={pl.workgroup_size},KL={pn.lanes_per_key},KC={pn.keys_per_step},SMX={pn.softmax_phase}"
        stream += ",PF=1" if pn.prefetch and pn.softmax_phase == 3 else ""  # SMX=3's next-step loads
        stream += ",LS=1" if pn.lane_sum else ""
        stream += ",IDP=1" if pn.int_dot else ""
        knobs = {Strategy.ROWS: f"KC={pn.keys_per_step},DQ={pn.query_dim}",
                 Strategy.LANES: f"TM={pn.rows_per_invocation},SGB={pn.subgroup_width},DQ={pn.query_dim}",
                 Strategy.STREAM: stream}.get(pn.strategy, tiled)
        if any(p.name == "classify" for p in self.progs) or not pn.block_map:
            knobs += f",BMAP={int(any(p.name == 'classify' for p in self.progs))}"
        kv = "".join(f",{p.name.upper()}={p.fmt}" for p in self.params if p.fmt)
        return f"{pl.name}:{pn.name}[{tun},{knobs},DVC={pn.value_columns},VEC={pn.vector_width}{split}{kv}]"

    @property
    def plan_grid(self) -> list[int]:
        return list(self.grids)

    @property
    def extra(self) -> dict[str, np.ndarray]:
        """The option tensors given as host arrays when the op was prepared, as the kernel reads
        them (float32 / int32; bias compact, broadcast by strides)."""
        return {n: x[0] for n, x in self.defaults.items() if isinstance(x, tuple)}

    @property
    def dtype(self) -> np.dtype:
        """The dtype of q, k and v (of a custom kernel's operands)."""
        ops = operand_tensors(self.kern)
        return next((p.dtype for p in self.params if p.name in ops), self.params[0].dtype)

    @property
    def nsplit(self) -> int:
        """The number of KV splits (1: no split)."""
        return int(self.scalars[self.split_param]) if self.split_param in self.scalars else 1

    def captured_values(self, scan: Any) -> dict[str, Any]:
        """The objects the mods capture in a call (their scan, runtime/build.py's mods_scan),
        by the names of this op's params."""
        return {name: scan.slots[path].obj for name, path in self.capture_paths.items() if path in scan.slots}

    def _what(self, name: str) -> str:
        return self.sources.get(name, name)

    # ------------------------------------------------------------------ arguments
    def _param(self, name: str) -> TensorParam:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def _checked_default(self, name: str, value: Any) -> Any:
        """A prepare-time option value: a GPU Tensor (checked at each call) or a host array,
        kept converted as (array, strides)."""
        if name in self.scalar_inputs:
            return scalar_value(value, self.kern.param(name).type.dtype, self._what(name))
        if isinstance(value, Tensor):
            self._gpu_arg(self._param(name), value)
            return value
        return self._host_value(self._param(name), value)

    def _host_value(self, p: TensorParam, x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        """A host argument checked and converted: (compact array, element strides)."""
        if p.fmt is not None or isinstance(x, QuantTensor):
            return self._quant_arg(p, x, QuantTensor).words, self._quant_strides(p, x)
        if p.generic:
            arr, st = host_param(x, p.ir_dtype, p.shape, self._what(p.name))
            return arr, tuple(st)
        if p.name in VECTOR_TENSORS:
            arr = host_array(p.name, x)
            if arr is None:
                raise ValueError(f"{p.name}: expected a numpy array, an attnc.Tensor or host data with __array__ "
                                 f"or __dlpack__, got {type(x).__name__}")
            if arr.dtype != p.dtype:
                raise ValueError(f"{p.name}: dtype {arr.dtype}; this op takes {p.dtype}")
            arr = np.ascontiguousarray(arr)
            if p.name in self._kv_batch and arr.shape[0] == 1 and arr.shape[1:] == p.shape[1:]:
                return arr, (0,) + dense_strides(arr.shape)[1:]  # K/V shared by every query batch
            if arr.shape != p.shape:
                raise ValueError(f"{p.name}: shape {arr.shape}; this op takes {p.shape}")
            return arr, dense_strides(arr.shape)
        arr = check_host_option(p.name, x, self.dims, self.total_keys)
        if p.broadcast:
            arr, st = broadcast_strides(p.name, arr, p.shape)
            return arr, tuple(st)
        if arr.shape != p.shape:
            raise ValueError(f"{p.name}: expected shape {p.shape}, got {arr.shape}")
        return arr, dense_strides(arr.shape)

    def _quant_arg(self, p: TensorParam, x: Any, kind: type) -> Any:
        """k or v given for a quantized param (or quantized for a float one), checked: a
        QuantTensor (host) or QuantGPUTensor (`kind`) of the op's format and shape."""
        name = p.name
        if p.fmt is None:
            raise ValueError(f"{name}: this op reads {name} as {p.dtype} values; got a {x.fmt} {type(x).__name__} "
                             f"(prepare the op with a quantized {name} like it, or {name}_format={x.fmt!r})")
        if not isinstance(x, (QuantTensor, QuantGPUTensor)):
            got = f"{x.dtype} values" if hasattr(x, "dtype") else f"a {type(x).__name__}"
            raise ValueError(f"{name}: this op reads {name} stored as {p.fmt}; got {got} (quantize them with "
                             f"attnc.quant.quantize(x, {p.fmt!r}))")
        if x.fmt != p.fmt:
            raise ValueError(f"{name}: this op reads {name} stored as {p.fmt}; got a {x.fmt} {type(x).__name__}")
        if tuple(x.shape) != p.shape and not self._shared_batch(p, tuple(x.shape)):
            raise ValueError(f"{name}: shape {tuple(x.shape)}; this op takes {p.shape}")
        if not isinstance(x, kind):
            raise ValueError(f"{name}: expected a {kind.__name__}, got a {type(x).__name__}")
        return x

    def _shared_batch(self, p: TensorParam, shape: tuple[int, ...]) -> bool:
        """Whether k or v of this shape is one batch shared by every query batch ([1, Hkv, T, D])."""
        return p.name in self._kv_batch and shape[0] == 1 and p.shape[0] > 1 and shape[1:] == p.shape[1:]

    def _quant_strides(self, p: TensorParam, x: QuantTensor | QuantGPUTensor) -> tuple[int, ...]:
        """The logical element strides of a quantized k or v (the kernel finds a value's block
        from them): dense, or batch stride 0 for one batch shared by every query batch."""
        strides = dense_strides(p.shape)
        return (0,) + strides[1:] if self._shared_batch(p, tuple(x.shape)) else strides

    def _gpu_arg(self, p: TensorParam, t: Tensor) -> tuple[rt.BufferSlice, tuple[int, ...]]:
        """A GPU tensor argument checked against the op: device, dtype, shape, strides the
        variant can read, binding alignment, a live buffer. Errors name the argument."""
        name = self._what(p.name)
        if t.device is not self.dev:
            raise ValueError(f"{name}: the tensor is on {t.device!r}; this op runs on {self.dev!r}")
        if p.fmt is not None or isinstance(t, QuantGPUTensor):
            return self._quant_arg(p, t, QuantGPUTensor).binding(name), self._quant_strides(p, t)
        if t.dtype != p.dtype:
            packed = " (bool and uint8 params are packed four per word: pass them as host data)" \
                if p.ir_dtype in (ir.DType.BOOL, ir.DType.U8) else ""
            raise ValueError(f"{name}: dtype {t.dtype}; this op takes {p.dtype}{packed}")
        strides = t.strides
        if p.name in self._kv_batch and t.shape[0] == 1 and t.shape[1:] == p.shape[1:] and p.shape[0] > 1:
            strides = (0,) + strides[1:]  # K/V shared by every query batch
        elif t.shape != p.shape:
            if not p.broadcast:
                raise ValueError(f"{name}: shape {t.shape}; this op takes {p.shape}")
            padded = broadcast_shape(name, t.shape, p.shape)
            strides = (0,) * (len(p.shape) - t.ndim) + strides
            strides = tuple(0 if n == 1 and f != 1 else s for s, n, f in zip(strides, padded, p.shape, strict=True))
        elif p.broadcast:
            strides = tuple(0 if n == 1 else s for s, n in zip(strides, p.shape, strict=True))
        if p.vector and (strides[-1] != 1 or any(s % 4 for s in strides[:-1])):
            raise ValueError(f"{name}: strides {t.strides} cannot be read by this variant's vec4 loads (they need "
                             "a head-dim stride of 1 and the other strides multiples of 4); prepare the op with "
                             "a view like this one (attnc.prepare(q, k, v) with the tensors themselves), which picks "
                             "a variant with scalar loads")
        return t.binding(name), strides

    def _out_arg(self, name: str, t: Tensor, shape: tuple[int, ...], inputs: list[Any]) -> tuple[int, ...]:
        """An output tensor (`out`, `out_lse`) checked: device, dtype (o: o_dtype, q's; lse:
        float32), shape, a layout the kernel can write (a float16 o: see `_check_half_layout`),
        a live aligned buffer that no input shares. Returns the strides the kernel writes with."""
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected an attnc.Tensor to write into, got {type(t).__name__}")
        if t.device is not self.dev:
            raise ValueError(f"{name}: the tensor is on {t.device!r}; this op runs on {self.dev!r}")
        want = self.o_dtype if name == "out" else np.dtype(np.float32)
        if t.dtype != want:
            what = (f"this op writes o in {want}, the dtype of q (the kernel stores it; float16 inputs give a "
                    "float16 o)") if name == "out" else "lse is float32"
            raise ValueError(f"{name}: dtype {t.dtype}; {what}")
        if t.shape != shape:
            raise ValueError(f"{name}: shape {t.shape}; this op writes {shape}")
        if name == "out" and want == np.float16:
            self._check_half_layout(name, t)
        t.binding(name)
        for x in inputs:
            if rt.buffer_of(x) is t.buffer:
                raise ValueError(f"{name}: shares its GPUBuffer with an input; WebGPU does not let a dispatch "
                                 "write a buffer it also reads")
        if overlaps(t.shape, t.strides):
            raise ValueError(f"{name}: strides {t.strides} (shape {t.shape}) give one element to several "
                             "indices: outputs would overwrite each other")
        return t.strides

    def _check_half_layout(self, name: str, t: Tensor) -> None:
        """A float16 o is stored as 32-bit words of two halves, columns c (even) and c + 1 of
        a row: the kernel writes it with a contiguous last dim and rows starting on a word, so
        every other stride (of a dim longer than 1) must be even; the binding's offset is
        word-aligned already. With an odd Dv each row's word at columns Dv - 1, Dv holds the
        padding: the element after the row's last is set to 0 (it is never an element of
        another row when these strides hold and rows do not overlap)."""
        if self.out_shape[3] > 1 and t.strides[-1] != 1:
            raise ValueError(f"{name}: strides {t.strides}: a float16 o is written as pairs of halves per 32-bit "
                             "word, so its last dim must be contiguous (stride 1)")
        odd = [s for s, n in zip(t.strides[:-1], t.shape[:-1], strict=True) if n > 1 and s % 2]
        if odd:
            raise ValueError(f"{name}: strides {t.strides}: a float16 o is written as pairs of halves per 32-bit "
                             "word, so every row must start on a word: the strides of B, Hq and S must be even "
                             f"(odd Dv: pad the rows, e.g. attnc.zeros((B, Hq, S, Dv + 1), float16)[..., :Dv])")

    def _new_o(self) -> Tensor:
        """A new o as the kernel writes it (zero-filled): o_dtype, rows o_row_stride apart (a
        float16 o with an odd Dv is a strided view of rows padded to Dv + 1)."""
        dtype, rows, row = self._o_dtype, self.out_shape[:-1], self._o_row_stride
        buffer = rt.empty(self.dev, dtype.itemsize * math.prod(rows) * row)
        return Tensor._dense(self.dev, buffer, self.out_shape, dtype, dense_strides(rows + (row,)))

    def _kernel_out_strides(self, strides: tuple[int, ...], name: str) -> tuple[int, ...]:
        """The strides of o (or lse) as the kernel writes them: with GQA packed into rows, its
        [B, Hkv, R] view of [B, Hq, S] (query row r = g * S + i of KV head hk is head
        hk * G + g, row i)."""
        if not self.packed_rows:
            return strides
        S, group = self.dims["S"], self.dims["Hq"] // self.dims["Hkv"]
        sb, sh, ss = strides[:3]
        if S > 1 and sh != S * ss:
            raise ValueError(f"{name}: strides {strides}: this variant packs the {group} query heads of a KV head "
                             f"into rows, so the head stride must be S={S} times the row stride; prepare the op "
                             f"with an output like this one (attnc.prepare(..., {name}=...)) for a variant that "
                             "writes any strides")
        return (sb, group * sh, ss if S > 1 else sh) + strides[3:]

    def _refresh_defaults(self) -> None:
        """Read the host arrays given as defaults (prepare's option tensors, the arrays mods
        capture) again, as attention() does at every call: one whose values changed in place
        since it was converted is converted again and written into the op's buffer for it
        (bind groups that bind that buffer stay valid); calls that bound new buffers for it
        are forgotten. A byte compare per array when nothing changed."""
        for name, (source, seen) in self._default_sources.items():
            now = np.ascontiguousarray(host_array(name, source))
            if now.shape == seen.shape and now.dtype == seen.dtype and \
                    memoryview(now).cast("B") == memoryview(seen).cast("B"):
                continue
            self.defaults[name] = self._checked_default(name, source)
            self._default_sources[name] = (source, now.copy())
            if name in self._uploaded_defaults:
                arr, st = self.defaults[name]
                self._uploaded_defaults[name] = (self._default_slice(name, arr), st)
            self._fresh.clear()
            self._map_digest = None

    def _check_bindable(self, name: str, arr: np.ndarray) -> int:
        """The bytes a host array takes bound (a multiple of 4), or a ValueError naming it when
        that is past the device's largest binding: each array an op reads is bound whole."""
        nbytes = max(4, -(-arr.nbytes // 4) * 4)
        largest = rt.max_binding_bytes(self.dev)
        if nbytes <= largest:
            return nbytes
        paged = any(p.name == "block_table" for p in self.params)
        if paged and name in ("k", "v"):
            name, hint = f"{name}_pages", "a page pool is bound whole; use a pool of fewer pages, or request a " \
                                          "larger limit for the device"
        elif name in ATTENTION_INPUTS:
            hint = ("a prepared op binds each input whole; attnc.attention with host inputs and no out= splits a "
                    "problem past the limit, or request a larger limit for the device")
        else:
            hint = ("a tensor a mod reads is bound whole, also when attnc.attention runs a larger problem in "
                    "pieces; request a larger limit for the device, or index a smaller table")
        raise ValueError(f"{name}: {arr.nbytes} bytes, more than the device's max-storage-buffer-binding-size "
                         f"({largest}), the most one binding may cover ({hint})")

    def _host_slice(self, name: str, arr: np.ndarray, slot: str | None = None) -> rt.BufferSlice:
        """Upload a host array into the op's own buffer for `name` (grown when too small); `slot`
        names another buffer of it (a default's own, which a call's array never overwrites)."""
        nbytes = self._check_bindable(name, arr)
        slot = slot or name
        buffer = self._staging.get(slot)
        if buffer is None or buffer.size < nbytes:
            buffer = self._staging[slot] = rt.create_buffer(self.dev, max(nbytes, 16), label=f"attnc.{slot}")
        data = arr.reshape(-1)
        if arr.nbytes % 4:
            data = np.concatenate([data.view(np.uint8), np.zeros(4 - arr.nbytes % 4, np.uint8)])
        if data.size:
            rt.write(self.dev, buffer, 0, data)
        return rt.BufferSlice(buffer, 0, nbytes)

    def _default_slice(self, name: str, arr: np.ndarray) -> rt.BufferSlice:
        """A host default uploaded into its own buffer: calls that pass `name` write theirs into
        another, so that the bind groups and recorded passes of calls without it stay valid."""
        return self._host_slice(name, arr, f"{name}.default")

    def _resolve(self, values: Mapping[str, Any], *, fresh: bool, recorded: bool,
                 hosts: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
        """Every tensor param bound: GPU tensors in place, host arrays uploaded (into new
        buffers with `fresh`, else the op's own); their strides in param order. `hosts` gets
        the host arrays of the params the block map reads."""
        bound: dict[str, Any] = {}
        strides: list[tuple[int, ...]] = []
        for p in self.params:
            x = values.get(p.name)
            if x is None:
                x = self.defaults.get(p.name)
                if x is None:
                    raise ValueError(f"{p.name}: missing (this op was prepared with {p.name})")
                if isinstance(x, tuple):  # a host default: uploaded once
                    if hosts is not None and p.name in self._map_reads:
                        hosts[p.name] = x[0]
                    if fresh:
                        self._check_bindable(p.name, x[0])
                        bound[p.name], st = rt.upload(self.dev, x[0]), x[1]
                    else:
                        if p.name not in self._uploaded_defaults:
                            self._uploaded_defaults[p.name] = (self._default_slice(p.name, x[0]), x[1])
                        bound[p.name], st = self._uploaded_defaults[p.name]
                    strides.append(st)
                    continue
            if on_gpu(x):
                bound[p.name], st = self._gpu_arg(p, x)
            else:
                if recorded:
                    raise ValueError(f"{p.name}: host data cannot be recorded into an encoder (it would be "
                                     "uploaded before the encoder runs, and a later call would overwrite it); "
                                     "pass an attnc.Tensor")
                arr, st = self._host_value(p, x)
                if hosts is not None and p.name in self._map_reads:
                    hosts[p.name] = arr
                if fresh:
                    self._check_bindable(p.name, arr)
                bound[p.name] = rt.upload(self.dev, arr) if fresh else self._host_slice(p.name, arr)
            strides.append(st)
        return bound, strides

    # ------------------------------------------------------------------ calls
    @serialized
    def __call__(self, q: Any, k: Any, v: Any, *, out: Tensor | None = None, out_lse: Tensor | None = None,
                 encoder: Any = None, output: str | None = None, **tensors: Any) -> Any:
        """Attention on new q, k, v (GPU tensors or host arrays of the prepared shapes and
        dtype) and, by name, option tensors that replace the prepared ones (bias, kv_lens,
        sinks, alibi_slopes).

        The result stays on the GPU (tensors o [B, Hq, S, Dv] in q's dtype, as the kernel writes
        it, and, with return_lse, lse [B, Hq, S] float32) when q, k or v is a GPU tensor or
        `out=` is given, else it is read back as numpy; `output="tensor"` / `"numpy"` chooses.
        A float16 o with an odd Dv is a strided view whose rows are Dv + 1 apart (o_row_stride).
        Without `out=` the result is the op's own buffer, which the next call overwrites; `out=`
        / `out_lse=` write into given tensors: `out` of o's dtype with any strides (float16: last
        dim contiguous, the other strides even; see _check_half_layout), `out_lse` float32.
        `encoder=` records the dispatches into the caller's GPUCommandEncoder
        without submitting them (the caller submits; every input must be a GPU tensor)."""
        return self._call(q, k, v, out, out_lse, encoder, output, tensors, keep_groups=True)

    def _call(self, q: Any, k: Any, v: Any, out: Tensor | None, out_lse: Tensor | None, encoder: Any,
              output: str | None, tensors: Mapping[str, Any], keep_groups: bool, before: rt.Pass | None = None
              ) -> Any:
        # the fast paths: GPU tensors this op was called with before (tensors are immutable
        # views, so what was checked and bound for them still holds; only a destroyed buffer
        # can change, and is checked)
        for name, t in (("out", out), ("out_lse", out_lse)):
            if t is not None and not isinstance(t, Tensor):
                raise ValueError(f"{name}: expected an attnc.Tensor to write into, got {type(t).__name__} (the "
                                 "result of a call is returned; use output='numpy' for a host array)")
        if self._default_sources:
            self._refresh_defaults()
        env = (os.environ.get("ATTNC_SANITIZE"), os.environ.get("ATTNC_COMPILE_LOG"),
               os.environ.get("ATTNC_NAGA_CHECKS"))
        if env != self._env:  # what the pipelines are (and whether calls are checked or logged) changed
            self._env, self._compiled = env, None
            self._groups.clear()
            self._memo.clear()
            self._fresh.clear()
            self._joined.clear()
        memo_key = fresh_key = None
        previous_map, self._map_digest = self._map_digest, None  # kept only by _bind_call
        if not env[0] and type(q) is Tensor and type(k) in _GPU and type(v) in _GPU and \
                all(type(x) is Tensor or (n in self.scalar_inputs and type(x) in (int, float))
                    for n, x in tensors.items()):
            if keep_groups:
                memo_key = (id(q), id(k), id(v), id(out), id(out_lse), output, encoder is None,
                            *((n, id(x)) if type(x) is Tensor else (n, type(x), x) for n, x in tensors.items()))
                hit = self._memo.get(memo_key)
                if hit is not None and not _destroyed(hit[2]):
                    self._run(hit[0], encoder, before)
                    return self._result(hit[1], out, out_lse)
            elif out is None and encoder is None and before is None:
                fresh_key = (id(q), id(k), id(v), id(out_lse), output,
                             *((n, id(x)) if type(x) is Tensor else (n, type(x), x) for n, x in tensors.items()))
                entry = self._fresh.get(fresh_key)
                if entry is not None and not _destroyed(entry[1]):
                    return self._fresh_run(entry, out_lse, output)
        parts, result, buffers = self._bind_call(q, k, v, out, out_lse, encoder, output, tensors, keep_groups,
                                                 previous_map, before)
        if parts is None:
            return result
        if memo_key is not None and output != "numpy":
            refs = self._held_while((q, k, v, out, out_lse, *tensors.values()), self._memo, memo_key)
            if refs is not None:
                ready = self._pass([(self._compiled[i], g, self._folded[i]) for i, _, _, _, g in parts])
                o, lse = result if self.has_lse else (result, None)
                own = (None if out is not None else o, None if out_lse is not None else lse)
                self._memo.put(memo_key, (ready, own, buffers, refs))
        elif fresh_key is not None:
            self._remember_fresh(fresh_key, parts, out_lse, (q, k, v, out_lse, *tensors.values()))
        return result

    def _result(self, own: tuple[Tensor | None, Tensor | None], out: Tensor | None, out_lse: Tensor | None) -> Any:
        """What a memoized call returns: the caller's out= / out_lse= where given, else the op's
        own outputs it returned the first time."""
        o = out if out is not None else own[0]
        return (o, out_lse if out_lse is not None else own[1]) if self.has_lse else o

    @staticmethod
    def _held_while(args: tuple[Any, ...], store: LRU[Any, Any], key: Any) -> tuple[weakref.ref[Any], ...] | None:
        """Weak references to the GPU tensors among `args` that drop `key` from `store` when any
        of them goes: what an op remembers of a call (bind groups, a recorded pass, which hold
        their buffers) lives no longer than the tensors the caller passed. Kept in the entry
        (a dead reference calls nothing); None when a tensor takes no weak reference (then
        nothing is remembered)."""
        try:
            return tuple(weakref.ref(x, lambda _, key=key: store.pop(key)) for x in args if on_gpu(x))
        except TypeError:
            return None

    def _run(self, ready: rt.Pass, encoder: Any, before: rt.Pass | None, keep: bool = True) -> None:
        """Submit the op's pass, or record it into `encoder`; with `before`, that pass's
        dispatches first, in the same compute pass (the joined pass kept for the next call
        with the same two when `keep`: `ready` is a memoized pass)."""
        if before is not None:
            joined = self._joined.get((before, ready)) if keep else None
            if joined is None:
                joined = rt.Pass(self.dev, before.items + ready.items, ready.label)
                if keep:
                    self._joined.put((before, ready), joined)
            ready = joined
        if encoder is None:
            ready.submit()
        else:
            ready.record(encoder)

    def _pass(self, items: list[tuple[rt.CompiledProgram, Any, tuple[int, int, int]]]) -> rt.Pass:
        """The dispatches of a call, every program in order (the block map's, the attention
        pass, the combine), as one compute pass named after the attention pass. A call that
        reuses it runs them all again: the block map is made from the data of each call."""
        return rt.Pass(self.dev, items, self._pass_label)

    def _remember_fresh(self, key: tuple[Any, ...], parts: list[tuple[int, tuple[str, ...], tuple[Any, ...], Any,
                                                                     Any]], out_lse: Tensor | None,
                        args: tuple[Any, ...]) -> None:
        """Keep what a call that returned new outputs bound, for calls with the same tensors
        (`_fresh_run`): its bind groups that do not bind the new outputs. The tensors are held
        weakly, by identity: the entry goes when any of them does, so it keeps no buffer of
        theirs alive (a bind group holds its buffers) and no later tensor can take its key."""
        made = {"o", "lse"} if self.has_lse and out_lse is None else {"o"}
        kept = []
        for i, names, slices, ub, group in parts:
            if made.isdisjoint(names):
                kept.append((i, names, slices, ub, group))
            else:  # bound anew at each call (not the first call's outputs: they are the caller's)
                kept.append((i, names, tuple(None if n in made else x for n, x in zip(names, slices, strict=True)),
                             ub, None))
        refs = self._held_while(args, self._fresh, key)
        if refs is None:
            return
        buffers = tuple({id(b): b for i, names, slices, _, _ in kept for b in
                         (rt.buffer_of(x) for x in slices if x is not None)}.values())
        self._fresh.put(key, (tuple(kept), buffers, refs))

    def _fresh_run(self, entry: tuple[tuple[Any, ...], tuple[Any, ...], Any], out_lse: Tensor | None,
                   output: str | None) -> Any:
        """A call with the tensors of a `_remember_fresh` entry: new outputs bound, run."""
        o = self._new_o()
        lse = out_lse if out_lse is not None or not self.has_lse else zeros_on(self.dev, self.out_shape[:-1])
        made = {"o": o.binding("o (the output attnc allocates)")}
        if out_lse is None and lse is not None:
            made["lse"] = lse.binding("lse (the output attnc allocates)")
        compiled, items = self._compiled, []
        for i, names, slices, ub, group in entry[0]:
            if group is None:
                bufs = {n: made[n] if x is None else x for n, x in zip(names, slices, strict=True)}
                group = rt.create_bind_group(self.dev, self.progs[i], compiled[i], bufs, ub)  # type: ignore[index]
            items.append((compiled[i], group, self._folded[i]))  # type: ignore[index]
        self._pass(items).submit()
        if output == "numpy":
            o_host = o.numpy()
            return (o_host, lse.numpy()) if lse is not None else o_host
        return (o, lse) if self.has_lse else o

    def _bind_call(self, q: Any, k: Any, v: Any, out: Tensor | None, out_lse: Tensor | None, encoder: Any,
                   output: str | None, tensors: Mapping[str, Any], keep_groups: bool,
                   previous_map: bytes | None = None, before: rt.Pass | None = None
                   ) -> tuple[list[Any] | None, Any, tuple[Any, ...]]:
        """A call checked and bound from scratch, run; returns what the fast paths reuse: per
        program (index, binding names, bound slices, uniform buffer, bind group), the result
        and the buffers whose destruction would void them (None and the result when nothing
        can be reused: under the sanitizer). The block map's programs are left out when the
        op's map was built by the op's previous submission from the same host data
        (`previous_map`, see _map_digest_of)."""
        unknown = sorted(set(tensors) - self.option_names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a tensor of this op (it takes q, k, v"
                             + "".join(f", {n}" for n in sorted(self.option_names)) + ")")
        gpu = on_gpu(q) or on_gpu(k) or on_gpu(v) or out is not None
        if q is None and k is None and v is None:  # a custom kernel's call: every param by name
            gpu = gpu or any(on_gpu(x) for x in tensors.values())
        if output is None:
            output = "tensor" if gpu else "numpy"
        elif output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES} or None, got {output!r}")
        if encoder is not None and output == "numpy":
            raise ValueError("output='numpy' reads the result back, which a call with encoder= cannot do "
                             "(the caller submits the encoder)")
        if out_lse is not None and not self.has_lse:
            raise ValueError("out_lse: this op was prepared without return_lse")
        values = {n: x for n, x in tensors.items() if n not in self.scalar_inputs}
        for n, x in (("q", q), ("k", k), ("v", v)):
            if x is not None:
                values[n] = x
        scalars = self._call_scalars(tensors)
        hosts: dict[str, np.ndarray] = {}
        bound, strides = self._resolve(values, fresh=False, recorded=encoder is not None, hosts=hosts)
        o, lse = self._outputs(out, out_lse, list(bound.values()), fresh=not keep_groups)
        owners = (out, out_lse, *values.values())  # the tensors the call's bind groups live with
        o_strides = self._kernel_out_strides(o.strides, "out")
        lse_strides = None if lse is None else self._kernel_out_strides(lse.strides, "out_lse")
        bound["o"] = o.binding("out" if out is not None else "o (the output attnc allocates)")
        if lse is not None:
            bound["lse"] = lse.binding("out_lse" if out_lse is not None else "lse (the output attnc allocates)")
        bound.update(self._scratch)
        key = (tuple(strides), o_strides, lse_strides, tuple(sorted(scalars.items())))
        digest = self._map_digest_of(hosts, key)
        map_is_current = digest is not None and digest == previous_map
        parts = None
        if rt.sanitizing():
            if encoder is not None:
                raise ValueError("ATTNC_SANITIZE=bounds reads its records after the run: call without encoder=")
            rt.run(self.dev, self._dispatches(bound, strides, o_strides, lse_strides, scalars))
        else:
            compiled, logged = self._compile()
            uniforms = self._uniform_buffers(key, strides, o_strides, lse_strides, scalars)
            parts, items = [], []
            for i, (names, ub) in enumerate(zip(self._storage, uniforms, strict=True)):
                slices = tuple(bound[n] for n in names)
                gkey = (i, ub, slices)
                kept = self._groups.get(gkey)
                if kept is not None:
                    group = kept[0]
                else:
                    group = rt.create_bind_group(self.dev, self.progs[i], compiled[i], dict(zip(names, slices,
                                                                                              strict=True)), ub)
                    refs = self._held_while(owners, self._groups, gkey) if keep_groups else None
                    if refs is not None:
                        self._groups.put(gkey, (group, refs))
                parts.append((i, names, slices, ub, group))
                if not (map_is_current and i in self._map_programs):
                    items.append((compiled[i], group, self._folded[i]))
            self._run(self._pass(items), encoder, before, keep=False)
            if logged is not None:
                rt.wait_idle(self.dev)
                rt.log_compile(self.dev, self.progs, logged[0], time.perf_counter() - logged[1])
            self._map_digest = digest
        buffers = tuple({id(rt.buffer_of(b)): rt.buffer_of(b) for b in bound.values()}.values())
        if output == "numpy":
            o_host = o.numpy()  # in q's dtype, as the kernel wrote it
            return parts, ((o_host, lse.numpy()) if lse is not None else o_host), buffers
        return parts, ((o, lse) if self.has_lse else o), buffers

    def _map_digest_of(self, hosts: Mapping[str, np.ndarray], key: Any) -> bytes | None:
        """What the block map depends on when every tensor it reads is host data: their bytes,
        dtypes and shapes and the call's uniforms (`key`); None when it reads a GPU tensor (whose
        contents the application may change unseen: the map is then built at every call), when
        the op has no map, and under the sanitizer (every program runs checked)."""
        if not self._map_programs or set(hosts) != self._map_reads or rt.sanitizing():
            return None
        h = hashlib.blake2b(repr(key).encode(), digest_size=16)
        for name in sorted(hosts):
            a = hosts[name]
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.digest()

    def _outputs(self, out: Tensor | None, out_lse: Tensor | None, inputs: list[Any], fresh: bool
                 ) -> tuple[Tensor, Tensor | None]:
        """o and lse: the given tensors, new ones (`fresh`), or the op's own."""
        for name, size in self._scratch_bytes().items():
            if name not in self._scratch:
                buf = rt.empty(self.dev, size)
                self._scratch[name] = rt.BufferSlice(buf, 0, buf.size)
        lse_shape = self.out_shape[:-1]
        if fresh:  # new tensors for what is not given
            o = out if out is not None else self._new_o()
            lse = out_lse if out_lse is not None or not self.has_lse else zeros_on(self.dev, lse_shape)
        else:
            own_gone = self._own_out is not None and any(t is not None and t.destroyed for t in self._own_out)
            if (self._own_out is None or own_gone) and (out is None or (self.has_lse and out_lse is None)):
                # (made again when the caller destroyed the one it was handed)
                self._own_out = (self._new_o(),
                                 zeros_on(self.dev, lse_shape) if self.has_lse else None)
            o = out if out is not None else self._own_out[0]  # type: ignore[index]
            lse = out_lse if out_lse is not None or not self.has_lse else self._own_out[1]  # type: ignore[index]
        if out is not None:
            self._out_arg("out", out, self.out_shape, inputs)
        if out_lse is not None:
            self._out_arg("out_lse", out_lse, lse_shape, inputs)
            if out is not None and out.buffer is out_lse.buffer:
                a, b = out.binding("out"), out_lse.binding("out_lse")
                if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                    raise ValueError(f"out_lse: bytes {b.offset}..{b.offset + b.size} of its buffer overlap out's "
                                     f"{a.offset}..{a.offset + a.size}; o and lse would overwrite each other (and "
                                     "WebGPU does not let a dispatch write overlapping ranges): give them disjoint "
                                     "ranges or buffers")
        return o, lse

    def _compile(self) -> tuple[list[rt.CompiledProgram], tuple[float, float] | None]:
        """The op's pipelines (compiled at the first call) and, when ATTNC_COMPILE_LOG is set
        and this call compiled them, (creation seconds, time the compile ended)."""
        if self._compiled is not None:
            return self._compiled, None
        known, start = len(self.dev.pipelines), time.perf_counter()
        self._compiled = [self.dev.pipelines.get(self.dev, p) for p in self.progs]
        per_dim = int(self.dev.gpu.limits["max-compute-workgroups-per-dimension"])
        self._folded = [rt.fold_grid(n, per_dim) for n in self.grids]
        end = time.perf_counter()
        logged = (end - start, end) if os.environ.get("ATTNC_COMPILE_LOG") and len(self.dev.pipelines) > known \
            else None
        return self._compiled, logged

    def _call_scalars(self, given: Mapping[str, Any]) -> dict[str, float | int]:
        """The scalar params a call sets by name, checked (the others keep their prepared values)."""
        return {n: scalar_value(x, self.kern.param(n).type.dtype, self._what(n))
                for n, x in given.items() if n in self.scalar_inputs}

    def _uniform_values(self, i: int, strides: list[tuple[int, ...]], o_strides: tuple[int, ...],
                        lse_strides: tuple[int, ...] | None,
                        scalars: Mapping[str, float | int] | None = None) -> dict[str, float | int]:
        values = dict(self._base_uniforms[i])
        fields = {f.name for f in self.progs[i].uniforms}
        for n, x in (scalars or {}).items():
            if f"p_{n}" in fields:
                values[f"p_{n}"] = x
        named = [(p.name, st) for p, st in zip(self.params, strides, strict=True)] + [("o", o_strides)]
        if lse_strides is not None:
            named.append(("lse", lse_strides))
        for name, st in named:
            for j, s in enumerate(st):
                if f"s_{name}_{j}" in fields:
                    values[f"s_{name}_{j}"] = s
        return values

    def _uniform_buffers(self, key: Any, strides: list[tuple[int, ...]], o_strides: tuple[int, ...],
                         lse_strides: tuple[int, ...] | None,
                         scalars: Mapping[str, float | int] | None = None) -> list[Any]:
        """One uniform buffer per program for these strides: made once per distinct block (a
        call recorded into an encoder keeps the buffer it bound, whatever later calls bind)."""
        found = self._uniforms.get(key)
        if found is not None:
            self._uniforms.move_to_end(key)
            return found
        made = []
        for i, p in enumerate(self.progs):
            d = rt.Dispatch(p, {}, self._uniform_values(i, strides, o_strides, lse_strides, scalars), self.grids[i])
            made.append(rt.uniform_buffer(self.dev, rt.uniform_block(d, self._folded[i])))
        self._uniforms[key] = made
        if len(self._uniforms) > MAX_UNIFORM_BLOCKS:
            self._uniforms.popitem(last=False)
        return made

    def _dispatches(self, bound: Mapping[str, Any], strides: list[tuple[int, ...]], o_strides: tuple[int, ...],
                    lse_strides: tuple[int, ...] | None,
                    scalars: Mapping[str, float | int] | None = None) -> list[rt.Dispatch]:
        """The dispatches of one binding, for `dispatch.run` (timing, the sanitizer)."""
        out = []
        for i, p in enumerate(self.progs):
            names = set(self._storage[i])
            values = self._uniform_values(i, strides, o_strides, lse_strides, scalars)
            fields = {f.name for f in p.uniforms} - set(rt.AUTO_UNIFORMS)
            out.append(rt.Dispatch(p, {x: b for x, b in bound.items() if x in names},
                                   {x: values[x] for x in fields}, self.grids[i]))
        return out

    # ------------------------------------------------------------------ tuner / benchmark interface
    @serialized
    def bind(self, q: Any, k: Any, v: Any) -> Prepared:
        """Upload inputs into new buffers and create the output/scratch buffers and dispatches."""
        self.bufs, self.dispatches = self._binding(q, k, v)
        return self

    @serialized
    def bind_copy(self, q: Any, k: Any, v: Any) -> Bound:
        """Another set of inputs and outputs for `run(binding=...)`: benchmarks rotate over
        copies so that inputs smaller than the GPU's cache are not timed cache-resident."""
        return Bound(*self._binding(q, k, v))

    def _scratch_bytes(self) -> dict[str, int]:
        """Bytes of each scratch buffer the programs pass on: the split-KV partial states (per
        output row and split, Dv values, max, sum) and what a program declares (the block map)."""
        out = {}
        if any(b.name == "part" for p in self.progs for b in p.bindings):
            out["part"] = 4 * math.prod(self.out_shape[:-1]) * self.nsplit * (self.out_shape[-1] + 2)
        env = {**self.dims, **self.scalars}
        for p in self.progs:
            for name, factors in p.scratch:
                out[name] = 4 * workgroups(factors, env)
        return out

    def _binding(self, q: Any, k: Any, v: Any) -> tuple[dict[str, Any], list[rt.Dispatch]]:
        if self._default_sources:
            self._refresh_defaults()
        bound, strides = self._resolve({"q": q, "k": k, "v": v}, fresh=True, recorded=False)
        o = self._new_o()
        bound["o"] = o.buffer
        o_strides = self._kernel_out_strides(o.strides, "o")
        lse_strides = None
        if self.has_lse:
            bound["lse"] = rt.empty(self.dev, 4 * math.prod(self.out_shape[:-1]))
            lse_strides = self._kernel_out_strides(dense_strides(self.out_shape[:-1]), "lse")
        for name, size in self._scratch_bytes().items():
            bound[name] = rt.empty(self.dev, size)
        return bound, self._dispatches(bound, strides, o_strides, lse_strides)

    @serialized
    def run(self, timestamps: bool = False, binding: Bound | None = None) -> float | None:
        """Dispatch all programs in one submission; with timestamps, the GPU ms from the start
        of the first pass to the end of the last. With `binding` (from bind_copy), on those
        buffers; result() then reads them."""
        if binding is not None:
            self.bufs, self.dispatches = binding.bufs, binding.dispatches
        if not self.dispatches:
            raise RuntimeError("bind() inputs before run()")
        times = rt.run(self.dev, self.dispatches, timestamps=timestamps, span=True)
        return None if times is None else float(sum(times))

    @property
    def o_dtype(self) -> np.dtype:
        """The dtype the kernel writes o in: float16 for float16 inputs, else float32."""
        return self._o_dtype

    @property
    def o_row_stride(self) -> int:
        """Elements from one row of o to the next in its buffer: Dv, or for a float16 o with an
        odd Dv, Dv + 1 (the kernel stores halves in pairs, one u32 word each, so rows start on
        a word; the padding element holds 0)."""
        return self._o_row_stride

    @serialized
    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read o (in o_dtype, as the kernel wrote it: no conversion, the padding of odd rows
        dropped) and lse (float32) back, of the last `bind`/`run`."""
        Dv = self.out_shape[-1]
        o = rt.readback(self.dev, self.bufs["o"], self.o_dtype, self.out_shape[:-1] + (self.o_row_stride,))
        if self.o_row_stride != Dv:
            o = np.ascontiguousarray(o[..., :Dv])
        lse = rt.readback(self.dev, self.bufs["lse"], np.float32, self.out_shape[:-1]) if self.has_lse else None
        return o, lse


@dataclasses.dataclass(frozen=True)
class Bound:
    """One set of device buffers and the dispatches that use them (see Prepared.bind_copy)."""

    bufs: dict[str, Any]
    dispatches: list[rt.Dispatch]


def max_storage_buffers(dev: Device) -> int:
    """Storage buffers a shader stage may bind on this device."""
    return int(dev.gpu.limits.get("max-storage-buffers-per-shader-stage", 8))


def check_limits(dev: Device, progs: tuple[Program, ...], plan: Plan | None = None,
                 dims: dict[str, int] | None = None) -> None:
    """Refuse, with the numbers, a variant that needs more than the device granted."""
    if plan is not None and dims is not None and (plan.resident_query or plan.strategy is Strategy.STREAM) \
            and dims["D"] > plan.query_dim:
        raise LoweringError(f"the variant keeps queries of at most DQ={plan.query_dim} in workgroup memory; "
                            f"D={dims['D']}")
    if plan is not None and dims is not None and plan.strategy in (Strategy.LANES, Strategy.ROWS) \
            and dims["D"] > plan.query_dim:
        raise LoweringError(f"the variant keeps queries of at most DQ={plan.query_dim} in registers; D={dims['D']}")
    lim = dev.gpu.limits
    for p in progs:
        have = int(lim.get("max-compute-workgroup-storage-size", 16384))
        if p.workgroup_storage_bytes > have:
            raise LoweringError(f"variant {p.name} needs {p.workgroup_storage_bytes} B of workgroup storage; "
                                f"{dev.spec} grants {have} B", notes=("choose smaller tiles (BM, BN, DK)",))
        have = int(lim.get("max-compute-invocations-per-workgroup", 256))
        if p.workgroup_size > have:
            raise LoweringError(f"variant {p.name} needs {p.workgroup_size} invocations per workgroup; "
                                f"{dev.spec} grants {have}", notes=("choose a smaller WG",))
        nbuf = storage_buffers((p,))
        have = max_storage_buffers(dev)
        if nbuf > have:
            tensors = [b.name for b in p.bindings if b.access is not Access.UNIFORM]
            fold = " (e.g. alibi_slopes into bias)" if {"alibi_slopes", "bias"} & set(tensors) else ""
            raise DeviceError(f"these options need {nbuf} storage buffers per shader stage ({', '.join(tensors)}); "
                              f"{dev.spec} grants max-storage-buffers-per-shader-stage = {have}",
                              notes=(f"drop an option tensor or a table a mod captures, fold one into another{fold}, "
                                     "or use a device that grants more",))
