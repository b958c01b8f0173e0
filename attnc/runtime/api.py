"""The public API: `attnc.attention` and `attnc.prepare`: validate the inputs, choose the
variant (tuned, else the heuristic of lowering/schedule.py), prepare it on the device, run it.

Inputs are host data (numpy, or anything numpy reads through `__array__` or DLPack) or GPU
tensors (`runtime/tensor.py`). `attention()` keeps the ops it prepared (by device, shapes,
dtype and options), so a repeated call runs one it made before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np

from attnc.errors import AttncError, DeviceError, LoweringError
from attnc.ir.verify import F32_MAX, F32_MAX_ROUNDING
from attnc.lowering import Plan
from attnc.lowering.plan import Storage, Strategy
from attnc.lowering.schedule import (
    F16_MATH_TARGETS,
    check_target_inputs,
    kv_splits,
    packs_gqa,
    pick_family,
    plan_for,
    with_combine,
)
from attnc.quant import QuantTensor, check_format, check_head_dim
from attnc.runtime.build import Options, build_kernel_with_captures, mods_scan, options_key, programs_within
from attnc.runtime.chunking import binding_limit, binding_sizes, chunked, largest_binding, split_limit, whole_problem
from attnc.runtime.devices import Device, get_device
from attnc.runtime.locking import serialized
from attnc.runtime.lru import LRU
from attnc.runtime.params import bind_params
from attnc.runtime.prepared import (
    BROADCAST,
    Prepared,
    broadcast_shape,
    check_host_option,
    check_limits,
    gives_new_output,
    max_storage_buffers,
)
from attnc.runtime.tensor import QuantGPUTensor, Tensor, host_array, on_gpu
from attnc.runtime.tuning_cache import ignore, tuned_plan

OPTION_TENSORS = ("bias", "alibi_slopes", "sinks", "kv_lens")
MAX_CACHED_OPS = 32


def _check(cond: bool, msg: str | Callable[[], str]) -> None:
    """Raise ValueError(msg) unless `cond`; a message given as a function is only formatted then."""
    if not cond:
        raise ValueError(msg if isinstance(msg, str) else msg())


QUANTIZED = (QuantTensor, QuantGPUTensor)  # K/V stored in a format of attnc.quant (host or GPU)


def check_shared_dtype(named: dict[str, Any], quantized: str) -> None:
    """The float tensors among `named` (q first) share q's dtype; quantized ones (any format)
    are exempt. The message names them all, and `quantized` says which may be quantized."""
    q, *rest = named.values()
    _check(all(x.dtype == q.dtype for x in rest if not isinstance(x, QUANTIZED)),
           lambda: f"{', '.join(named)} must share a dtype (or {quantized} be quantized), got "
           + ", ".join(x.fmt if isinstance(x, QUANTIZED) else str(x.dtype) for x in named.values()))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def as_input(name: str, x: Any) -> Tensor | np.ndarray:
    """A GPU tensor or a quantized tensor (host or GPU) as it is, host data as a numpy array;
    anything else a ValueError."""
    if isinstance(x, (Tensor, QuantTensor, QuantGPUTensor)):
        return x
    arr = host_array(name, x)
    if arr is None:
        raise ValueError(f"{name}: expected a numpy array, an attnc.Tensor or host data with __array__ or "
                         f"__dlpack__, got {type(x).__name__}")
    return arr


def validate(q: Any, k: Any, v: Any) -> dict[str, int]:
    """Check q/k/v (numpy arrays or GPU tensors) against the contract; return the dims B, Hq,
    Hkv, S, T, D, Dv. k and v may each be quantized (a host QuantTensor or a QuantGPUTensor of
    4 dims; attnc/quant.py)."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        if n != "q" and isinstance(x, QUANTIZED):
            _check(len(x.shape) == 4, lambda n=n, x=x: f"{n}: expected 4 dims, got {len(x.shape)} "
                                                       f"(shape {tuple(x.shape)})")
            continue
        if not isinstance(x, (np.ndarray, Tensor, InputSpec)):
            raise ValueError(f"{n}: expected a numpy array or an attnc.Tensor, got {type(x).__name__}")
        _check(len(x.shape) == 4, lambda n=n, x=x: f"{n}: expected 4 dims, got {len(x.shape)} "
                                                   f"(shape {tuple(x.shape)})")
        _check(x.dtype in (np.float32, np.float16),
               lambda n=n, x=x: f"{n}: dtype must be float32 or float16, got {x.dtype}")
        _check(x.size > 0, lambda n=n, x=x: f"{n}: empty array (shape {tuple(x.shape)})")
    check_shared_dtype({"q": q, "k": k, "v": v}, "k, v")
    B, Hq, S, D = q.shape
    _, Hkv, T, Dk = k.shape
    _check(k.shape[0] == v.shape[0] and k.shape[0] in (1, B),
           lambda: f"batch dims differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]} (k and v share "
           f"one, which is q's or 1 for K/V shared by the batch)")
    _check(Dk == D, lambda: f"head dim D differs: q has {D}, k has {Dk}")
    _check(v.shape[1] == Hkv and v.shape[2] == T,
           lambda: f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in (B, Hkv, T)")
    validate_dims(dict(B=B, Hq=Hq, S=S, D=D, Hkv=Hkv, T=T, Dv=v.shape[3]))
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v.shape[3])


# The attention dims in the order q, k and v introduce them (the order of a compiled manifest's dims).
DIMS = ("B", "Hq", "S", "D", "Hkv", "T", "Dv")


def validate_dims(dims: Mapping[str, Any]) -> dict[str, int]:
    """Check attention dims (what `validate` reads off q, k, v; js/attnc.js applies the same
    rules to the shapes a caller passes): each a positive integer (q, k, v must not be empty),
    no other names, Hq a multiple of Hkv (so Hkv <= Hq). The first problem, in DIMS order, is
    a ValueError whose message starts with the dim's name."""
    for name in DIMS:
        if name not in dims:
            raise ValueError(f"{name}: missing")
        x = dims[name]
        if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
            raise ValueError(f"{name}: expected a positive integer, got {x!r}")
        if x < 1:
            raise ValueError(f"{name}={x}: expected a positive integer (q, k and v must not be empty)")
    for name in dims:
        if name not in DIMS:
            raise ValueError(f"{name}: not an attention dim (the dims: {', '.join(DIMS)})")
    _check(dims["Hq"] % dims["Hkv"] == 0,
           lambda: f"Hq={dims['Hq']} query heads is not a multiple of Hkv={dims['Hkv']} kv heads")
    return {n: int(dims[n]) for n in DIMS}


def kv_formats(k: Any, v: Any) -> dict[str, str]:
    """The k_format / v_format options of quantized k and v (none for float ones)."""
    return {f"{n}_format": x.fmt for n, x in (("k", k), ("v", v)) if isinstance(x, QUANTIZED)}


def vector_readable(*xs: Any) -> bool:
    """Whether vec4 loads can read these q/k/v: host arrays (uploaded dense) always, GPU
    tensors when their head dim is contiguous and their other strides are multiples of 4."""
    return all(not isinstance(x, Tensor) or (x.strides[-1] == 1 and all(s % 4 == 0 for s in x.strides[:-1]))
               for x in xs)


def rows_packable(dims: dict[str, int], *outs: Any) -> bool:
    """Whether outputs with these tensors' strides can be written by a variant that packs the
    query heads of a KV head into rows (GQA decoding): the rows of a head must follow one
    another (head stride = S x row stride), or S = 1."""
    return all(not isinstance(t, Tensor) or t.ndim < 3 or dims["S"] == 1 or t.strides[1] == dims["S"] * t.strides[2]
               for t in outs)  # (a tensor of another shape is refused by the op, naming it)


def scalar_options(dims: dict[str, int], window: Any, softcap: Any, scale: Any,
                   score_mod: Any, mask_mod: Any, causal: Any = False, return_lse: Any = False
                   ) -> dict[str, float | int]:
    """Check the scalar options and return the uniform values they set (window sides, cap)."""
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        # (a string is refused: causal="False" from a config file would mean True)
        if not (isinstance(flag, bool | np.bool_) or (type(flag) is int and flag in (0, 1))):
            raise ValueError(f"{name} must be True or False, got {flag!r} ({type(flag).__name__})")
    scalars: dict[str, float | int] = {}
    if window is not None:
        if not (isinstance(window, tuple) and len(window) == 2):
            raise ValueError(f"window must be a (left, right) tuple, got {window!r}")
        for side, val in zip(("left", "right"), window, strict=True):
            if val is not None:
                if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 0:
                    raise ValueError(f"window {side} must be a non-negative int or None, got {val!r}")
                scalars[f"window_{side}"] = int(min(val, 2**31 - 1))
    if softcap is not None:
        if not (_is_real(softcap) and 0 < float(softcap) < F32_MAX_ROUNDING):
            raise ValueError(f"softcap must be a positive number, finite in float32 (at most {F32_MAX:.7g}), "
                             f"got {softcap!r}")
        scalars["softcap"] = float(softcap)
    if scale is not None and not (_is_real(scale) and abs(float(scale)) < F32_MAX_ROUNDING):
        raise ValueError(f"scale must be a number finite in float32 (|scale| at most {F32_MAX:.7g}), got {scale!r}")
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a function of (score, b, h, q_idx, kv_idx), got {type(fn).__name__}"
                             if name == "score_mod" else
                             f"{name} must be a function of (b, h, q_idx, kv_idx), got {type(fn).__name__}")
    return scalars


def _check_option_value(name: str, x: Any, dims: dict[str, int], total_keys: int | None) -> Any:
    """An option tensor's value checked before anything is traced: host data against the
    contract, a GPU tensor's dtype and shape (the prepared op checks the rest). A GPU tensor's
    errors read as the prepared op's (Prepared._gpu_arg): attention() and KVCache.attend check
    here only when they prepare an op, and call an op they prepared before, so the same misuse
    must give the same message either way."""
    if not isinstance(x, Tensor):
        arr = check_host_option(name, x, dims, total_keys)
        if name in BROADCAST:
            broadcast_shape(name, arr.shape, (dims["B"], dims["Hq"], dims["S"], dims["T"]))
        return x
    want = np.int32 if name == "kv_lens" else np.float32
    _check(x.dtype == want, lambda: f"{name}: dtype {x.dtype}; this op takes {np.dtype(want)}")
    full = {"kv_lens": (dims["B"],), "bias": (dims["B"], dims["Hq"], dims["S"], dims["T"])}.get(name, (dims["Hq"],))
    if name in BROADCAST:
        broadcast_shape(name, tuple(x.shape), full)
    else:
        _check(tuple(x.shape) == full, lambda: f"{name}: shape {tuple(x.shape)}; this op takes {full}")
    return x


@serialized
def prepare_dims(dims: dict[str, int], dtype: Any = np.float32, *, causal: bool = False,
                 scale: float | None = None, window: tuple[int | None, int | None] | None = None,
                 bias: Any = None, alibi_slopes: Any = None, softcap: float | None = None, sinks: Any = None,
                 kv_lens: Any = None, return_lse: bool = False, device: Any = None, target: str | None = None,
                 score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
                 plan: Plan | None = None, tunables: dict[str, int] | None = None,
                 nsplit: int | None = None, pack_gqa: bool | None = None,
                 offsets: tuple[int, int, int, int] | dict[str, int] | None = None,
                 vector_loads: bool = True, inputs: Mapping[str, Any] | None = None, paged: bool = False,
                 k_format: str | None = None, v_format: str | None = None) -> Prepared:
    """Validate options, choose the variant (tuned, heuristic or the given plan) and lower it,
    for the dims B, Hq, Hkv, S, T, D, Dv. Option tensors (host data or GPU tensors) become the
    op's defaults, as do `inputs` (the values of what the mods declare with attnc.input /
    attnc.scalar) and what the mods capture. `vector_loads=False` plans scalar loads of q/k/v
    (for views whose head dim is not contiguous). `paged=True`: K/V are pools of pages read
    through inputs["block_table"] (runtime/paged.py; dims also NP, P, NB, and T = NB * P).
    k_format / v_format: K / V stored quantized (q8_0, q4_0, int8: attnc/quant.py); calls
    then take QuantTensors or QuantGPUTensors of that format for them.

    offsets: the problem is one piece of a larger one (runtime/chunking.py), given as
    (q_offset, q_total, kv_offset, kv_total) or a dict of those and b_offset, b_total,
    h_offset, hq_total, hkv_total (whole_problem()): masks and mods see the whole problem."""
    for name, fmt, d in (("k", k_format, "D"), ("v", v_format, "Dv")):
        if fmt is not None:
            check_format(fmt)
            check_head_dim(fmt, name, dims[d])
    dev = get_device(device)
    fam = pick_family(dev.capabilities, target)
    f16_math = target in F16_MATH_TARGETS
    check_target_inputs(target, str(np.dtype(dtype)), {n: f for n, f in (("k", k_format), ("v", v_format)) if f})
    scalars = scalar_options(dims, window, softcap, scale, score_mod, mask_mod, causal, return_lse)
    if inputs is not None and not isinstance(inputs, Mapping):
        raise ValueError(f"inputs must be a dict of name -> array or number, got {type(inputs).__name__}")
    inputs = dict(inputs or {})
    if offsets is not None:
        offsets = whole_problem(dims, offsets)
    total_keys = None if offsets is None else offsets["kv_total"]
    given = {n: x for n, x in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("kv_lens", kv_lens),
                               ("bias", bias)) if x is not None}
    for name, x in given.items():
        _check_option_value(name, x, dims, total_keys)
    if scale is None:
        scale = 1.0 / math.sqrt(dims["D"])
    sides = None if window is None else tuple(None if w is None else 0 for w in window)
    opts = Options(causal=bool(causal), window=sides,  # type: ignore[arg-type]
                   softcap=softcap is not None, alibi=alibi_slopes is not None,
                   bias=bias is not None, sinks=sinks is not None, kv_lens=kv_lens is not None,
                   lse=return_lse, f16=np.dtype(dtype) == np.float16, score_mod=score_mod,
                   mask_mod=mask_mod, paged=paged, k_format=k_format, v_format=v_format)
    if offsets is not None:  # one chunk of a larger problem: absolute positions
        opts = Options(**{**opts.__dict__, "offsets": True})
        scalars.update(offsets)
    okey = options_key(opts)
    caps = dev.capabilities
    tuned = None
    if plan is None and tunables is None and score_mod is None and mask_mod is None and not f16_math and not paged:
        # (f16-math plans are never tuned: `attnc tune` stores f16-storage plans)
        tuned = tuned_plan(dev, okey, dims, opts.f16, fam if target is not None else None, nsplit)
        if tuned is not None and tuned.plan.vector_width == 4 and not vector_loads:
            if tuned.plan.strategy is Strategy.TILED:
                tuned = dataclasses.replace(tuned, plan=dataclasses.replace(tuned.plan, vector_width=1))
            else:
                tuned = None
    hplan, htun = plan_for(caps, fam, dims, causal=opts.causal, f16=opts.f16, explicit_family=target is not None,
                           f16_math=f16_math, vector_loads=vector_loads, k_format=k_format)
    if f16_math:
        hplan = dataclasses.replace(hplan, storage=Storage.F16A)
    if tuned is not None:
        try:
            prep = _lowered(dev, dims, opts, scalars, float(scale), given, tuned.plan, tuned.tunables, tuned.nsplit,
                            pack_gqa, okey, total_keys, inputs)
            for prog in prep.progs:  # (a WGSL compiler's refusal is a LoweringError too)
                dev.pipelines.get(dev, prog)
            return prep
        except LoweringError as exc:
            # an application's device may grant less than the adapter the entry was tuned on
            if not dev.external:
                ignore(tuned.key, f"attnc cannot lower its plan ({exc.message})")
        except AttncError:
            pass  # the heuristic plan says what is wrong, if it is not the tuned plan
    return _lowered(dev, dims, opts, scalars, float(scale), given, plan or hplan, tunables or htun, nsplit,
                    pack_gqa, okey, total_keys, inputs)


def _lowered(dev: Device, dims: dict[str, int], opts: Options, scalars: dict[str, float | int], scale: float,
             given: dict[str, Any], plan: Plan, tun: dict[str, int], nsplit: int | None, pack_gqa: bool | None,
             okey: str, total_keys: int | None, inputs: dict[str, Any]) -> Prepared:
    """Split count, GQA packing, trace, bind what the mods capture and the named inputs,
    lower, check the device's limits: the op."""
    caps = dev.capabilities
    scalars = dict(scalars)
    if pack_gqa is None:
        pack_gqa = packs_gqa(dims, plan)
    if nsplit is None:
        nsplit = kv_splits(caps, dims, plan, tun, pack_gqa)
    nsplit = min(nsplit, split_limit(dev, dims))  # the splits' partial states fit one binding
    if nsplit > 1:
        opts = dataclasses.replace(opts, split=True)
        scalars["NSPLIT"] = nsplit
        plan = with_combine(plan, nsplit)
    if pack_gqa:
        opts = dataclasses.replace(opts, pack_gqa=True)
        dims = {**dims, "R": (dims["Hq"] // dims["Hkv"]) * dims["S"]}
    kern, captured, paths = build_kernel_with_captures(opts, tun)
    # what the mods capture and the inputs passed by name: bindings, uniforms and their dims
    own = {"q", "k", "v", "scale", *given, *scalars}
    declared = sorted({p.name for p in kern.params} - own - set(captured))
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise ValueError(f"inputs: the kernel has no input {', '.join(map(repr, unknown))}; its inputs declared "
                         f"with attnc.input/attnc.scalar are {declared or 'none'}")
    sources = {n: f"the value a mod captures as {n!r}" for n in captured} | \
        {n: n if n == "block_table" else f"inputs[{n!r}]" for n in inputs}
    bound = bind_params(kern, dims, {**captured, **inputs}, skip=own, sources=sources)
    plan, progs = programs_within(kern, plan, max_storage_buffers(dev))
    check_limits(dev, progs, plan, bound.dims)
    prep = Prepared(dev, kern, plan, progs, bound.dims, scalars | bound.scalars | {"scale": scale},
                    {**given, **bound.tensors}, total_keys, generic=frozenset(sources), sources=sources)
    prep.options_key = okey
    prep.capture_paths = paths
    return prep


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """An input given to `prepare` by its shape and dtype only."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _example(name: str, x: Any, dtype: Any) -> Tensor | np.ndarray | InputSpec:
    """What `prepare` reads of an example input: a tensor or array, or a shape tuple (with
    `dtype`, float32 by default)."""
    if isinstance(x, (tuple, list)) and all(isinstance(n, (int, np.integer)) for n in x):
        return InputSpec(tuple(int(n) for n in x), np.dtype(np.float32 if dtype is None else dtype))
    return as_input(name, x)


def _tensors_device(device: Any, named: dict[str, Any]) -> Device:
    """The device of the call: that of its GPU tensors (all on one), which `device=` must name
    if given; else the device `device=` resolves to."""
    on = {n: x.device for n, x in named.items() if on_gpu(x)}
    if not on:
        return get_device(device)
    first, dev = next(iter(on.items()))
    for n, d in on.items():
        if d is not dev:
            raise ValueError(f"{n}: the tensor is on {d!r}, but {first} is on {dev!r}")
    if device is not None and get_device(device) is not dev:
        raise ValueError(f"device: {device!r} is not the device of the GPU tensors ({dev!r})")
    return dev


@serialized
def prepare(q: Any, k: Any = None, v: Any = None, *, dtype: Any = None, causal: bool = False,
            scale: float | None = None, window: tuple[int | None, int | None] | None = None, bias: Any = None,
            alibi_slopes: Any = None, softcap: float | None = None, sinks: Any = None, kv_lens: Any = None,
            return_lse: bool = False, device: Any = None, target: str | None = None,
            score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
            out: Tensor | None = None, out_lse: Tensor | None = None, inputs: Mapping[str, Any] | None = None,
            **planning: Any) -> Prepared:
    """A prepared attention op for inputs like q, k, v (GPU tensors, host arrays, or shape
    tuples with `dtype`) and these options; call it with new tensors of the same shapes:
    `op(q, k, v, out=..., encoder=..., kv_lens=...)` (Prepared.__call__). Option tensors given
    here are the op's defaults; a call may pass others. GPU tensors fix the device (`device=`
    otherwise: a Device, an application's GPUDevice or a spec string) and, by their strides,
    the variant: whether it reads q, k, v with vec4 loads, and (`out`, `out_lse`: examples of
    the outputs the calls will write) whether it may pack GQA heads into rows. What the mods
    capture (and `inputs`, by name) are the op's defaults too; a call may pass new values by
    name: tensors of the same shapes, numbers (uniforms).

    `prepare(dims, dtype, **options)`, a dict of the dims B, Hq, Hkv, S, T, D, Dv first, is
    `prepare_dims` (what the tuner, the benchmarks and the tests use; it also takes `plan`,
    `tunables`, `nsplit`, `pack_gqa`, `offsets` and `vector_loads`)."""
    options = dict(causal=causal, scale=scale, window=window, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
                   sinks=sinks, kv_lens=kv_lens, return_lse=return_lse, device=device, target=target,
                   score_mod=score_mod, mask_mod=mask_mod, inputs=inputs)
    if isinstance(q, Mapping):
        dt = dtype if k is None else k
        return prepare_dims(dict(q), np.float32 if dt is None else dt, **options, **planning)
    given_formats = {n: planning.pop(n) for n in ("k_format", "v_format") if planning.get(n) is not None}
    planning = {n: x for n, x in planning.items() if n not in ("k_format", "v_format")}
    if planning:
        raise TypeError(f"prepare() got unexpected keyword arguments {sorted(planning)} (they go with the dims form)")
    if k is None or v is None:
        raise ValueError("prepare: pass q, k and v (tensors, arrays or shapes), or a dict of the dims")
    examples = [_example(n, x, dtype) for n, x in (("q", q), ("k", k), ("v", v))]
    dims = validate(*examples)
    formats = kv_formats(examples[1], examples[2])
    for n, fmt in given_formats.items():
        if formats.get(n, fmt) != fmt:
            raise ValueError(f"{n}: {fmt!r}, but the example {n[0]} is stored as {formats[n]}")
    formats.update(given_formats)
    named = {"q": q, "k": k, "v": v, "bias": bias, "alibi_slopes": alibi_slopes, "sinks": sinks, "kv_lens": kv_lens}
    dev = _tensors_device(device, named)
    return prepare_dims(dims, examples[0].dtype, causal=causal, scale=scale, window=window, bias=bias,
                        alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, kv_lens=kv_lens,
                        return_lse=return_lse, device=dev, target=target, score_mod=score_mod, mask_mod=mask_mod,
                        vector_loads=vector_readable(*examples), pack_gqa=None if rows_packable(dims, out, out_lse)
                        else False, inputs=inputs, **formats)


# ops attention() prepared, least recently used dropped first
_OPS: LRU[Hashable, Prepared] = LRU(MAX_CACHED_OPS)
# the keys in _OPS of calls with GPU tensors and no mods, by `_signature`
_CALLS: LRU[Hashable, Hashable] = LRU(4 * MAX_CACHED_OPS)


def _signature(q: Any, k: Any, v: Any, options: dict[str, Any], out: Any, out_lse: Any,
               scalars: tuple[Any, ...]) -> Hashable | None:
    """What attention() reads of a call whose tensors are all attnc.Tensors (else None) to
    check it and find its op: each tensor's shape, strides, dtype and device, and the scalar
    options with their types (True and 1 are checked differently); None when one of them
    cannot be hashed. A call with the signature of one that passed those checks passes them
    and has its op."""
    for x in (q, k, v, *options.values()):
        if type(x) is not Tensor:
            return None
    if (out is not None and type(out) is not Tensor) or (out_lse is not None and type(out_lse) is not Tensor):
        return None
    sig = ((q.shape, q.strides, q.dtype, q.device), (k.shape, k.strides, k.dtype, k.device),
           (v.shape, v.strides, v.dtype, v.device),
           tuple((n, x.shape, x.strides, x.dtype, x.device) for n, x in options.items()),
           None if out is None else (out.shape, out.strides, out.dtype, out.device),
           None if out_lse is None else (out_lse.shape, out_lse.strides, out_lse.dtype, out_lse.device),
           tuple((type(x), tuple((type(y), y) for y in x) if type(x) is tuple else x) for x in scalars))
    try:
        hash(sig)
    except TypeError:
        return None
    return sig


@serialized
def attention(q: Any, k: Any, v: Any, *, causal: bool = False,
              scale: float | None = None, window: tuple[int | None, int | None] | None = None,
              bias: Any = None, alibi_slopes: Any = None, softcap: float | None = None, sinks: Any = None,
              kv_lens: Any = None, return_lse: bool = False, device: Any = None, target: str | None = None,
              score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
              out: Tensor | None = None, out_lse: Tensor | None = None, output: str | None = None,
              inputs: Mapping[str, Any] | None = None) -> Any:
    """Scaled dot-product attention on a WebGPU device with the semantics of docs/API.md.

    q [B,Hq,S,D], k [B or 1,Hkv,T,D], v [B or 1,Hkv,T,Dv] -> o [B,Hq,S,Dv] in q's dtype
    (and lse [B,Hq,S] float32 with return_lse). Inputs are host data or GPU tensors
    (attnc.Tensor); k and v may each be quantized (attnc.quant.quantize's QuantTensor on the
    host, or a QuantGPUTensor: q8_0, q4_0, int8), read by the kernels in that format. With a
    GPU q, k or v the result is a new GPU tensor (o in q's dtype, as the kernel wrote it:
    float16 inputs give a float16 o, rows Dv + 1 apart for an odd Dv) unless
    `output="numpy"`, and `out=` (of q's dtype) / `out_lse=` write into given tensors.
    score_mod(s, b, h, q_idx, kv_idx) and mask_mod(b, h, q_idx, kv_idx) are traced into the
    kernel (once per distinct function; q_idx is the raw query index); the tensors (numpy or GPU) and numbers
    they close over become the kernel's inputs (bindings and uniforms: new values run the same
    kernel), and `inputs` gives, by name, the values of the ones they declare with
    attnc.input(name, type) / attnc.scalar(name). target: "portable", "subgroups", or
    (float16 inputs, shader-f16) "portable-f16" / "subgroups-f16" for f16 workgroup tiles; None picks
    the tuned or heuristic variant.
    sinks [Hq]: one more logit per head in the softmax denominator, with no value. A sink of
    +inf takes all the weight: o = 0 and lse = +inf on that head's rows, fully masked rows
    too; -inf is the same as no sink (a fully masked row: o = 0, lse = -inf); NaN makes that
    head's o and lse NaN.
    """
    options = {n: x for n, x in (("bias", bias), ("alibi_slopes", alibi_slopes), ("sinks", sinks),
                                 ("kv_lens", kv_lens)) if x is not None}
    sig = None
    if score_mod is None and mask_mod is None and inputs is None and device is None:
        sig = _signature(q, k, v, options, out, out_lse, (causal, scale, window, softcap, return_lse, target))
        op = None if sig is None else _OPS.get(_CALLS.get(sig))
        if op is not None:  # everything below up to the op's call is a function of `sig`
            new_output = gives_new_output(out, output, on_gpu(q) or on_gpu(k) or on_gpu(v))
            return op._call(q, k, v, out, out_lse, None, output, options, keep_groups=not new_output)
    q, k, v = as_input("q", q), as_input("k", k), as_input("v", v)
    dims = validate(q, k, v)
    dev = _tensors_device(device, {"q": q, "k": k, "v": v, **options, "out": out, "out_lse": out_lse})
    gpu = any(on_gpu(x) for x in (q, k, v, *options.values(), out, out_lse))
    formats = kv_formats(k, v)
    if formats and not gpu and largest_binding(q, k, v, bias) > binding_limit(dev):
        name, big = max(binding_sizes(q, k, v, bias).items(), key=lambda item: item[1])
        raise DeviceError(f"{name}: {big} bytes, more than {dev.spec}'s largest storage binding "
                          f"({binding_limit(dev)} B); a call over a quantized K/V "
                          f"({', '.join(n.removesuffix('_format') + ' ' + f for n, f in sorted(formats.items()))}) "
                          "is not split into pieces",
                          notes=("call attention on fewer batch entries or heads at a time",))
    if not gpu and largest_binding(q, k, v, bias) > binding_limit(dev):
        kw = dict(causal=causal, scale=scale, window=window, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
                  sinks=sinks, kv_lens=kv_lens, return_lse=return_lse, device=dev, target=target,
                  score_mod=score_mod, mask_mod=mask_mod)
        if inputs:
            kw["inputs"] = dict(inputs)
        if output == "tensor":  # (said before the pieces run, not after)
            raise ValueError("output='tensor': this problem is larger than a binding and runs in pieces on the "
                             "host; pass GPU tensors small enough to bind")
        return chunked(q, k, v, kw, binding_limit(dev), attention, prepare_dims)
    scalars = scalar_options(dims, window, softcap, scale, score_mod, mask_mod, causal, return_lse)
    vec = vector_readable(q, k, v)
    packable = rows_packable(dims, out, out_lse)
    if inputs is not None and not isinstance(inputs, Mapping):
        raise ValueError(f"inputs must be a dict of name -> array or number, got {type(inputs).__name__}")
    named = dict(inputs or {})
    scan = mods_scan(score_mod, mask_mod)
    # the op depends on the mods' code and constants and on the dtypes and shapes of what
    # they capture and of the named inputs, not on those values (bindings and uniforms)
    shapes = tuple(sorted((n, _input_key(x)) for n, x in named.items()))
    key = None if scan is not None and scan.key is None else \
        (id(dev), tuple(sorted(dims.items())), q.dtype, str(k.shape[0]), vec, packable, bool(causal), scale,
         None if window is None else tuple(window), tuple(sorted(scalars.items())), tuple(sorted(options)),
         bool(return_lse), target, tuple(sorted(formats.items())), None if scan is None else scan.key, shapes)

    def make() -> Prepared:
        op = prepare_dims(dims, q.dtype, causal=causal, scale=scale, window=window, softcap=softcap, device=dev,
                          target=target, return_lse=return_lse, score_mod=score_mod, mask_mod=mask_mod,
                          vector_loads=vec, pack_gqa=None if packable else False, inputs=named, **options,
                          **formats)
        op.defaults.clear()  # every call passes its own option tensors and captures: keep no data
        return op

    op = _OPS.get_or_make(key, make)
    if sig is not None and key is not None:
        _CALLS.put(sig, key)
    if scan is not None:
        named.update(op.captured_values(scan))
    new_output = gives_new_output(out, output, on_gpu(q) or on_gpu(k) or on_gpu(v))
    return op._call(q, k, v, out, out_lse, None, output, {**options, **named}, keep_groups=not new_output)


def _input_key(x: Any) -> Hashable:
    """What a named input contributes to an op's key: a tensor's dtype and shape, a number's type."""
    if isinstance(x, Tensor):
        return ("tensor", str(x.dtype), x.shape)
    if isinstance(x, (bool, int, float, np.number)):
        return ("number", type(x).__name__)
    arr = host_array("inputs", x)
    return ("array", str(arr.dtype), arr.shape) if arr is not None else ("object", id(x))


def prepare_attention(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...],
                      dtype: Any = np.float32, **options: Any) -> Prepared:
    """`prepare_dims` from array shapes (what the benchmark harness and the tuner use)."""
    B, Hq, S, D = q_shape
    _, Hkv, T, _ = k_shape
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v_shape[3])
    return prepare_dims(dims, dtype, **options)
