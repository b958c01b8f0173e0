"""`attnc.build`: a kernel written with `@attnc.kernel` made callable from Python on a device.

`op = attnc.build(my_kernel, device="dawn", causal=True)` fixes the kernel's options; `op(q=...,
k=..., v=..., scale=0.125, table=...)` binds every param by name (tensors with any named dims,
scalars as uniforms, what the kernel's mods capture), binds each dim from the shapes (a dim
seen with two sizes is a ValueError naming both tensors; a size-1 axis broadcasts), picks the
variant with the same heuristics as `attention()` (tiles sized for the kernel's query-row and
key dims), and returns the output (and the lse when the kernel returns it) as numpy arrays.
Traced kernels and lowered programs are cached as for `attention()`: new values of the
tensors and numbers are new bindings and uniforms, not new kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from attnc.frontend import capture
from attnc.frontend.dsl import KernelDef, Tunable
from attnc.ir import nodes as ir
from attnc.lowering import Storage, analyze
from attnc.lowering.retype import operand_tensors, retype
from attnc.lowering.schedule import (
    F16_MATH_TARGETS,
    check_target_inputs,
    fit_workgroup,
    kv_splits,
    pick_family,
    plan_for,
    with_combine,
)
from attnc.runtime.build import programs_within
from attnc.runtime.devices import Device, get_device
from attnc.runtime.locking import serialized
from attnc.runtime.params import bind_params
from attnc.runtime.prepared import Prepared, check_limits, gives_new_output, max_storage_buffers
from attnc.runtime.tensor import Tensor, host_array


class Op:
    """A custom kernel built for a device (see attnc.build); call it with its params by name."""

    def __init__(self, kernel: KernelDef, device: Device | str | None, target: str | None,
                 options: dict[str, Any]):
        if not isinstance(kernel, KernelDef):
            raise ValueError(f"attnc.build takes a kernel written with @attnc.kernel, got {type(kernel).__name__}")
        unknown = sorted(set(options) - kernel.option_names)
        if unknown:
            raise ValueError(f"attnc.build: kernel {kernel.name} has no option {', '.join(map(repr, unknown))}; its "
                             f"options are {sorted(kernel.option_names)}")
        for name in sorted(set(options) & kernel.tunable_names):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"attnc.build: tunable {name} of kernel {kernel.name} is a positive integer, "
                                 f"got {value!r}")
        self.kernel, self.target, self.options = kernel, target, dict(options)
        self.device = get_device(device)
        self.family = pick_family(self.device.capabilities, target)
        self.last: Prepared | None = None  # the last call's prepared op (its IR, plan and variant)
        self._dims: dict[str, int] = {}
        self._optional: set[str] = set()
        self._kernels: dict[Any, tuple[ir.Kernel, dict[str, capture.Path]]] = {}
        self._ops: dict[Any, Prepared] = {}
        self.traces = 0
        self._paths: dict[str, capture.Path] = {}

    def __repr__(self) -> str:
        return f"<attnc op {self.kernel.name} on {self.device.spec}>"

    # ------------------------------------------------------------------ tracing (cached)
    def _trace(self, options: dict[str, Any]) -> tuple[ir.Kernel, dict[str, Any]]:
        """The kernel traced with these options, and the objects its mods capture now."""
        mods = {n: f for n, f in options.items() if callable(f) and not isinstance(f, Tunable)}
        scan = capture.scan(mods) if mods else None
        key = self._key(options, mods, scan)
        hit = self._kernels.get(key) if key is not None else None
        if hit is not None:
            kern, paths = hit
            self._paths = dict(paths)
            return kern, {n: scan.slots[p].obj for n, p in paths.items()} if scan else {}
        self.traces += 1
        kern, captured = self.kernel.trace_with_captures(**options)
        self._paths = {n: s.path for n, s in captured.items()}
        key = self._key(options, mods, capture.scan(mods) if mods else None)
        if key is not None and all(s.path[0] in mods for s in captured.values()):
            self._kernels[key] = (kern, {n: s.path for n, s in captured.items()})
        return kern, {n: s.obj for n, s in captured.items()}

    @staticmethod
    def _key(options: dict[str, Any], mods: dict[str, Any], scan: capture.Scan | None) -> Any:
        if scan is not None and scan.key is None:
            return None
        rest = []
        for n, v in sorted(options.items()):
            if n in mods:
                continue
            try:
                hash(v)
            except TypeError:
                return None
            rest.append((n, v))
        return tuple(rest), None if scan is None else scan.key

    # ------------------------------------------------------------------ calls
    def prepare(self, values: dict[str, Any], dims: dict[str, int] | None = None) -> Prepared:
        """Trace (cached), bind the values, choose the variant and lower it; ready to run."""
        self._dims = dict(dims or {})
        for d, n in self._dims.items():
            if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
                raise ValueError(f"dims[{d!r}]: expected a positive int, got {n!r}")
        kern, captured = self._trace(self.options)
        paths = self._paths
        # the kernel's tunables that size its query-row and key tiles, and those the options fix
        tiles = {ours: name for ours, name in (("BM", _tile_tunable(kern)), ("BN", _loop_tunable(kern)))
                 if name is not None}
        fixed = {ours: self.options[name] for ours, name in tiles.items() if name in self.options}
        for ours, value in fixed.items():
            if value & (value - 1):
                raise ValueError(f"attnc.build: tunable {tiles[ours]}={value} of kernel {self.kernel.name} sizes its "
                                 f"{'query-row' if ours == 'BM' else 'key'} tiles, which are powers of two")
        spec = analyze(kern)
        # the split count (a kernel with a split KV axis) is chosen here unless given
        self._optional = {spec.split_count} - set(values) if spec.split_count else set()
        f16 = self._f16(kern, values)
        f16_math = self.target in F16_MATH_TARGETS
        check_target_inputs(self.target, "float16" if f16 else "float32",
                            {p.name: p.type.dtype.value for p in kern.params if p.type.dtype.is_quant})
        storage = Storage.F16 if f16 else Storage.F32  # bound as retyped: float16 GPU tensors are f16 operands
        pdims = self._plan_dims(kern, spec, self._bind(retype(kern, storage), values, captured).dims)
        caps = self.device.capabilities
        plan, htun = plan_for(caps, self.family, pdims, f16=f16, explicit_family=self.target is not None,
                              f16_math=f16_math, strategy="tiled" if fixed else "")
        if f16_math:
            plan = dataclasses.replace(plan, storage=Storage.F16A)
        # the kernel's own tile tunables take the plan's sizes unless the options fix them
        tun = {name: htun[ours] for ours, name in tiles.items() if name not in self.options}
        if fixed:
            plan = fit_workgroup(plan, int(fixed.get("BM", htun["BM"])), int(fixed.get("BN", htun["BN"])))
        if tun:
            kern, captured = self._trace({**self.options, **tun})
            paths = self._paths
        kern = retype(kern, storage)
        bound = self._bind(kern, values, captured)
        spec = analyze(kern)
        if spec.split_count is not None:
            if spec.split_count not in values:
                bound.scalars[spec.split_count] = kv_splits(caps, pdims, plan, {"BM": spec.BM, "BN": spec.BN}, False)
            plan = with_combine(plan, int(bound.scalars[spec.split_count]))
        plan, progs = programs_within(kern, plan, max_storage_buffers(self.device))
        check_limits(self.device, progs, plan, pdims)
        sources = {n: f"the value a mod captures as {n!r}" for n in captured} | {n: repr(n) for n in values}
        prep = Prepared(self.device, kern, plan, progs, bound.dims, bound.scalars, bound.tensors,
                        generic=frozenset(p.name for p in kern.params) - {spec.split_count}, sources=sources)
        prep.capture_paths = paths
        self.last = prep
        return prep

    @serialized
    def __call__(self, *, dims: dict[str, int] | None = None, out: Tensor | None = None,
                 out_lse: Tensor | None = None, encoder: Any = None, output: str | None = None,
                 **values: Any) -> Any:
        """Run the kernel on these params (by name); returns o, or (o, lse) when it returns the lse.

        `dims` gives the sizes of dims no tensor has (the logical length of paged keys). Params
        are host data or GPU tensors (attnc.Tensor); as for a prepared attention op, the result
        is numpy (o in the operands' dtype, lse float32) for host inputs, else GPU tensors
        (the same dtypes), and `out=`, `out_lse=`, `encoder=`, `output=` work the same. An op prepared
        before for the same shapes, dtypes and options is reused: new values are new bindings
        and uniforms."""
        prep = self._prepared(values, dims)
        new_output = gives_new_output(out, output, any(isinstance(x, Tensor) for x in values.values()))
        if prep.split_param is not None:  # the split count shapes the grid: fixed when prepared
            values.pop(prep.split_param, None)
        return prep._call(None, None, None, out, out_lse, encoder, output, values, keep_groups=not new_output)

    def _prepared(self, values: dict[str, Any], dims: dict[str, int] | None) -> Prepared:
        """The op for these values' shapes and dtypes and `dims` (prepared once, then reused)."""
        mods = {n: f for n, f in self.options.items() if callable(f) and not isinstance(f, Tunable)}
        scan = capture.scan(mods) if mods else None
        key = None if scan is not None and scan.key is None else (
            tuple(sorted((n, _value_key(x)) for n, x in values.items())), self._split_value(values),
            tuple(sorted((dims or {}).items())), None if scan is None else scan.key)
        prep = self._ops.get(key) if key is not None else None
        if prep is None:
            prep = self.prepare(values, dims)
            if key is not None:
                self._ops[key] = prep
                if len(self._ops) > 16:
                    self._ops.pop(next(iter(self._ops)))
        self.last = prep
        if scan is not None:
            values.update(prep.captured_values(scan))
        return prep

    # ------------------------------------------------------------------ helpers
    def _bind(self, kern: ir.Kernel, values: dict[str, Any], captured: dict[str, Any]):
        names = {p.name for p in kern.params}
        unknown = sorted(set(values) - names)
        if unknown:
            declared = [p.name for p in kern.params if p.name not in captured]
            raise ValueError(f"kernel {kern.name} has no param {', '.join(map(repr, unknown))}; its params "
                             f"are {declared}")
        clash = sorted(set(values) & set(captured))
        if clash:
            raise ValueError(f"{', '.join(map(repr, clash))}: a mod of kernel {kern.name} captures "
                             "this value itself; it is not passed by name")
        sources = {n: f"the value a mod captures as {n!r}" for n in captured} | {n: repr(n) for n in values}
        bound = bind_params(kern, {d: int(n) for d, n in self._dims.items()}, {**captured, **values},
                            skip=self._optional, sources=sources, dims_from="dims=",
                            how="by name: op(name=value, ...)")
        missing = [d for d in kern.dims if d not in bound.dims]
        if missing:
            raise ValueError(f"kernel {kern.name}: no tensor has dim {', '.join(map(repr, missing))}: pass its "
                             f"size with dims={{{missing[0]!r}: n}}")
        return bound

    def _split_value(self, values: dict[str, Any]) -> Any:
        """The split count a call gives (part of the op's key: it shapes the grid), if any."""
        kern = next(iter(self._kernels.values()), (None,))[0] if self._kernels else None
        split = None if kern is None else analyze(kern).split_count
        return None if split is None else values.get(split)

    @staticmethod
    def _f16(kern: ir.Kernel, values: dict[str, Any]) -> bool:
        """Whether the operands (the dot's and the value slice's tensors) come as float16; they
        must be float32 or float16 (as attention() takes them, nothing converted), and float16
        where the kernel declares them f16."""
        ops = sorted(operand_tensors(kern))
        given = {n: np.dtype(values[n].dtype) for n in ops if n in values and hasattr(values[n], "dtype")}
        for n, dt in given.items():
            if dt not in (np.float32, np.float16):
                raise ValueError(f"{n}: dtype {dt}; the operands {ops} of kernel {kern.name} are float32 or "
                                 "float16 arrays or tensors")
            if dt == np.float32 and kern.param(n).type.dtype is ir.DType.F16:
                raise ValueError(f"{n}: float32 values; kernel {kern.name} declares {n} f16: pass float16 data")
        halves = [dt == np.float16 for dt in given.values()]
        if any(halves) and not all(halves):
            raise ValueError(f"the operands {ops} of kernel {kern.name} must all be float16 or all float32")
        return bool(halves) and all(halves)

    @staticmethod
    def _plan_dims(kern: ir.Kernel, spec: Any, dims: dict[str, int]) -> dict[str, int]:
        """The shape the planning heuristics read: query rows S, keys T, head dims D and Dv, and
        every other grid axis as the batch. The heuristics load q/k/v as vec4 when D and Dv are
        multiples of 4, which needs the slices to run along their tensors' last axis."""
        others = math.prod(dims[a.dim] for a in spec.axes if a is not spec.row)
        d, dv = dims[spec.head_dim], dims[spec.width]
        last = all(sl.axis == len(kern.param(sl.tensor).type.dims) - 1
                   for sl in (spec.dot.a, spec.dot.b, spec.value))
        if not last:  # a slice across a tensor's inner axis: element loads, not vec4
            d, dv = d + (d % 4 == 0), dv + (dv % 4 == 0)
        return dict(B=others, Hq=1, Hkv=1, S=dims[spec.row.dim], T=dims[spec.kv_dim], D=d, Dv=dv)


def _value_key(x: Any) -> Any:
    """What a param's value contributes to the op's key: a tensor's kind, dtype and shape, a
    number's type (its value is a uniform)."""
    if isinstance(x, Tensor):
        return ("tensor", str(x.dtype), x.shape)
    if isinstance(x, (bool, int, float, np.number)):
        return ("number", type(x).__name__)
    arr = host_array("value", x)
    return ("array", str(arr.dtype), arr.shape) if arr is not None else ("object", type(x).__name__)


def _tile_tunable(kern: ir.Kernel) -> str | None:
    """The tunable that sizes the kernel's query-row tiles."""
    grid = kern.body[0]
    return next((a.extent.size for a in grid.axes if isinstance(a.extent, ir.TileExtent)), None)  # type: ignore[union-attr]


def _loop_tunable(kern: ir.Kernel) -> str | None:
    """The tunable that sizes the kernel's KV tiles."""
    return next((s.size for s in ir.walk_stmts(kern.body) if isinstance(s, ir.Loop)), None)


@serialized
def build(kernel: KernelDef, *, device: Device | str | None = None, target: str | None = None,
          **options: Any) -> Op:
    """Make a kernel written with @attnc.kernel callable on a device: `op = attnc.build(k,
    device="dawn", causal=True)`, then `o = op(q=q, k=k, v=v, scale=0.125, ...)` (every param by
    name). `options` are the kernel's keyword options (a tunable given here stays fixed; the
    others are chosen per shape); `target` a variant family as for attention()."""
    return Op(kernel, device, target, options)
