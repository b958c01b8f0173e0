"""A prepared attention op: its kernel, programs, uniforms and device buffers, ready to run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from attnc.errors import DeviceError, LoweringError
from attnc.ir import nodes as ir
from attnc.lowering import Plan, Strategy
from attnc.lowering.plan import fast_reduce, layout
from attnc.lowering.program import Access, Program
from attnc.quant import QuantTensor
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import Device


def workgroups(factors: tuple[str, ...], env: dict[str, float | int]) -> int:
    """Evaluate a product of grid factors (`X`, `ceil_div(X,n)`, `ceil_div(A*B,n)`)."""
    total = 1
    for f in factors:
        if f.startswith("ceil_div("):
            num, den = f[len("ceil_div("):-1].split(",")
            n = math.prod(int(env[x]) for x in num.split("*"))
            total *= -(-n // int(den))
        else:
            total *= int(env[f])
    return total


def dense_strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def broadcast_strides(name: str, x: np.ndarray, full: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """A compact array and element strides that read it broadcast to `full` (0 on size-1 dims)."""
    if x.ndim > len(full):
        raise ValueError(f"{name}: shape {x.shape} has more dims than {full}")
    shape = (1,) * (len(full) - x.ndim) + x.shape
    for n, f in zip(shape, full, strict=True):
        if n not in (1, f):
            raise ValueError(f"{name}: shape {x.shape} is not broadcastable to {full}")
    arr = np.ascontiguousarray(x.reshape(shape))
    st = dense_strides(shape)
    return arr, [0 if n == 1 and f != 1 else s for s, n, f in zip(st, shape, full, strict=True)]


@dataclasses.dataclass(frozen=True)
class Bound:
    """One set of device buffers and the dispatches that use them (see Prepared.bind_copy)."""

    bufs: dict[str, Any]
    dispatches: list[rt.Dispatch]


class Prepared:
    """One attention problem made ready on a device: kernel, programs, uniforms, buffers.

    `bind` uploads q/k/v (and the option tensors), `run` dispatches every program in one
    submission (optionally returning the GPU time in ms), `result` reads o (and lse) back.
    """

    def __init__(self, dev: Device, kern: ir.Kernel, plan: Plan, progs: tuple[Program, ...],
                 dims: dict[str, int], scalars: dict[str, float | int], extra: dict[str, np.ndarray],
                 strides: dict[str, list[int]]):
        self.dev, self.kern, self.plan, self.progs, self.dims = dev, kern, plan, progs, dims
        self.scalars, self.extra, self.strides = scalars, extra, strides
        self.bufs: dict[str, Any] = {}
        self.dispatches: list[rt.Dispatch] = []
        self.has_lse = any(b.name == "lse" for p in progs for b in p.bindings)
        self.options_key = ""

    @property
    def variant(self) -> str:
        """A readable name of the variant: family, storage, tile sizes and plan tunables."""
        pl = self.progs[0]
        tun = ",".join(f"{k}={v}" for k, v in self.kern.tunables)
        split = f",NSPLIT={self.scalars['NSPLIT']},CSG={self.plan.combine_groups}" if "NSPLIT" in self.scalars else ""
        pn = self.plan
        tiled = (f"WG={pl.workgroup_size},TM={pn.rows_per_invocation},DK={pn.head_chunk},"
                 f"DVS={pn.value_stage_columns},VK={pn.value_block_keys},UN={pn.unroll},PF={pn.prefetch}")
        tiled += f",PC={pn.p_chunk_keys}" if pn.p_chunk_keys else ""
        tiled += f",QO={pn.last_tile_first}" if pn.last_tile_first else ""
        kt = dict(self.kern.tunables)
        if pn.strategy is Strategy.TILED and fast_reduce(pn, layout(pn, kt["BM"], kt["BN"])):
            tiled += f",SGFAST={pn.shuffle_only_lanes}"
        stream = f"WG={pl.workgroup_size},KL={pn.lanes_per_key},KC={pn.keys_per_step},SMX={pn.softmax_phase}"
        knobs = {Strategy.ROWS: f"KC={pn.keys_per_step},DQ={pn.query_dim}",
                 Strategy.LANES: f"TM={pn.rows_per_invocation},SGB={pn.subgroup_width},DQ={pn.query_dim}",
                 Strategy.STREAM: stream}.get(pn.strategy, tiled)
        kv = "".join(f",{n.upper()}={self.kern.param(n).type.dtype.value}" for n in ("k", "v")
                     if self.kern.param(n).type.dtype.is_quant)
        return f"{pl.name}:{pn.name}[{tun},{knobs},DVC={pn.value_columns},VEC={pn.vector_width}{split}{kv}]"

    @property
    def plan_grid(self) -> list[int]:
        env = {**self.dims, **self.scalars}
        return [workgroups(p.grid, env) for p in self.progs]

    def bind(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Prepared:
        """Upload inputs and create the output/scratch buffers and the dispatches."""
        self.bufs, self.dispatches = self._binding(q, k, v)
        return self

    def bind_copy(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Bound:
        """Another set of inputs and outputs for `run(binding=...)`: benchmarks rotate over
        copies so that inputs smaller than the GPU's cache are not timed cache-resident."""
        return Bound(*self._binding(q, k, v))

    def _binding(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[dict[str, Any], list[rt.Dispatch]]:
        dims = self.dims
        B, Hq, S, Dv = dims["B"], dims["Hq"], dims["S"], dims["Dv"]
        arrays = {"q": np.ascontiguousarray(q), "k": k, "v": v, **self.extra}
        for name in ("k", "v"):
            arrays[name] = self._operand(name, arrays[name])
        uni: dict[str, float | int] = {f"d_{d}": dims[d] for d in self.kern.dims}
        bufs: dict[str, Any] = {}
        for p in self.kern.params:
            if not p.type.dims:
                if p.name not in self.scalars:
                    raise ValueError(f"no value for kernel scalar {p.name!r}")
                uni[f"p_{p.name}"] = self.scalars[p.name]
                continue
            arr = arrays[p.name]
            if isinstance(arr, QuantTensor):  # element strides of the dense logical tensor
                for i, stride in enumerate(dense_strides(arr.shape)):
                    uni[f"s_{p.name}_{i}"] = stride
                bufs[p.name] = rt.upload(self.dev, arr.words)
                continue
            st = self.strides.get(p.name) or dense_strides(arr.shape)
            for i, stride in enumerate(st):
                uni[f"s_{p.name}_{i}"] = stride
            if arr.dtype == np.float16 and arr.size % 2:
                arr = np.concatenate([arr.reshape(-1), np.zeros(1, np.float16)])
            bufs[p.name] = rt.upload(self.dev, arr)
        o_shape = tuple(dims[d] for d in self.kern.output.dims)  # [B, Hq, S, Dv] or packed [B, Hkv, R, Dv]
        for i, stride in enumerate(dense_strides(o_shape)):
            uni[f"s_o_{i}"] = stride
        if self.has_lse:
            for i, stride in enumerate(dense_strides(o_shape[:-1])):
                uni[f"s_lse_{i}"] = stride
            bufs["lse"] = rt.empty(self.dev, 4 * B * Hq * S)
        bufs["o"] = rt.empty(self.dev, 4 * B * Hq * S * Dv)
        if len(self.progs) > 1:
            bufs["part"] = rt.empty(self.dev, 4 * B * Hq * S * int(self.scalars["NSPLIT"]) * (Dv + 2))
        dispatches = []
        for p, n in zip(self.progs, self.plan_grid, strict=True):
            names = {b.name for b in p.bindings}
            fields = {f.name for f in p.uniforms} - {"grid_total", "grid_stride_x"}
            dispatches.append(rt.Dispatch(p, {x: b for x, b in bufs.items() if x in names},
                                          {x: uni[x] for x in fields}, n))
        return bufs, dispatches

    def _operand(self, name: str, x: Any) -> Any:
        """k or v as bound: a QuantTensor of the format the kernel reads, else a contiguous array."""
        want = self.kern.param(name).type.dtype
        shape = tuple(self.dims[d] for d in self.kern.param(name).type.dims)
        if want.is_quant:
            if not isinstance(x, QuantTensor) or x.fmt != want.value:
                got = f"a {x.fmt} QuantTensor" if isinstance(x, QuantTensor) else f"a {type(x).__name__}"
                raise ValueError(f"{name}: this op reads {name} stored as {want.value}; got {got}")
            if x.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
            return x
        if isinstance(x, QuantTensor):
            raise ValueError(f"{name}: this op reads {name} as {want.value} values; got a {x.fmt} QuantTensor "
                             f"(prepare it with {name}_format={x.fmt!r})")
        return np.ascontiguousarray(x)

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

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read o (float32) and lse back."""
        B, Hq, S, Dv = (self.dims[x] for x in ("B", "Hq", "S", "Dv"))
        o = rt.readback(self.dev, self.bufs["o"], np.float32, (B, Hq, S, Dv))
        lse = rt.readback(self.dev, self.bufs["lse"], np.float32, (B, Hq, S)) if self.has_lse else None
        return o, lse


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
        nbuf = sum(b.access is not Access.UNIFORM for b in p.bindings)
        have = int(lim.get("max-storage-buffers-per-shader-stage", 8))
        if nbuf > have:
            raise DeviceError(f"these options need {nbuf} storage buffers per shader stage; {dev.spec} grants "
                              f"max-storage-buffers-per-shader-stage = {have}",
                              notes=("drop an option (e.g. fold alibi_slopes into bias) or use a device "
                                     "that grants more",))
