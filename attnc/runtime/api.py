"""The public API: `attnc.attention` and `prepare`: validate the inputs, choose the variant
(tuned, else the heuristic of lowering/schedule.py), prepare it on the device, run it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from attnc.errors import DeviceError, LoweringError
from attnc.lowering import Plan
from attnc.lowering.plan import Storage
from attnc.lowering.schedule import F16_MATH_TARGETS, kv_splits, packs_gqa, pick_family, plan_for, with_combine
from attnc.quant import QuantTensor, check_format, check_head_dim
from attnc.runtime.build import Options, build_kernel, options_key, programs_for
from attnc.runtime.chunking import binding_limit, chunked, largest_binding, split_limit, whole_problem
from attnc.runtime.devices import Device, get_device
from attnc.runtime.prepared import Prepared, broadcast_strides, check_limits
from attnc.runtime.tuning_cache import ignore, tuned_plan


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _array(name: str, x: Any, ndim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {x.ndim} (shape {x.shape})")
    return x


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _real_array(name: str, x: Any, ndim: int | None = None) -> np.ndarray:
    """A numpy array of real numbers (ints or floats), else a ValueError naming the argument."""
    x = _array(name, x, ndim)
    _check(x.dtype.kind in "iuf", f"{name}: expected real numbers, got dtype {x.dtype}")
    return x


def validate(q: np.ndarray, k: np.ndarray | QuantTensor, v: np.ndarray | QuantTensor) -> dict[str, int]:
    """Check q/k/v against the contract; return the dims B, Hq, Hkv, S, T, D, Dv. k and v may
    each be a QuantTensor (attnc.quant.quantize) of 4 dims instead of an array."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, QuantTensor):
            _check(x.ndim == 4, f"{n}: expected 4 dims, got {x.ndim} (shape {x.shape})")
            _check(min(x.shape) > 0, f"{n}: empty tensor (shape {x.shape})")
            continue
        _array(n, x, 4)
        _check(x.dtype in (np.float32, np.float16),
               f"{n}: dtype must be float32 or float16, got {x.dtype}")
        _check(x.size > 0, f"{n}: empty array (shape {x.shape})")
    floats = [x for x in (k, v) if not isinstance(x, QuantTensor)]
    _check(all(x.dtype == q.dtype for x in floats),
           f"q, k, v must share a dtype (or k, v be quantized), got "
           f"{', '.join(x.fmt if isinstance(x, QuantTensor) else str(x.dtype) for x in (q, k, v))}")
    B, Hq, S, D = q.shape
    _, Hkv, T, Dk = k.shape
    _check(k.shape[0] == B and v.shape[0] == B,
           f"batch dims differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    _check(Dk == D, f"head dim D differs: q has {D}, k has {Dk}")
    _check(v.shape[1] == Hkv and v.shape[2] == T,
           f"v shape {v.shape} does not match k shape {k.shape} in (B, Hkv, T)")
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
           f"Hq={dims['Hq']} query heads is not a multiple of Hkv={dims['Hkv']} kv heads")
    return {n: int(dims[n]) for n in DIMS}


def prepare(dims: dict[str, int], dtype: Any = np.float32, *, causal: bool = False,
            scale: float | None = None, window: tuple[int | None, int | None] | None = None,
            bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
            softcap: float | None = None, sinks: np.ndarray | None = None,
            kv_lens: np.ndarray | None = None, return_lse: bool = False,
            device: Device | str | None = None, target: str | None = None,
            score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
            plan: Plan | None = None, tunables: dict[str, int] | None = None,
            nsplit: int | None = None, pack_gqa: bool | None = None,
            offsets: tuple[int, int, int, int] | dict[str, int] | None = None,
            k_format: str | None = None, v_format: str | None = None) -> Prepared:
    """Validate options, choose the variant (tuned, heuristic or the given plan) and lower it.

    k_format / v_format: K / V stored quantized (q8_0, q4_0, int8: attnc/quant.py); bind()
    then takes QuantTensors for them.

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
    if f16_math and np.dtype(dtype) != np.float16:
        raise ValueError(f"target {target!r} computes products in f16: pass float16 q, k, v (got {np.dtype(dtype)})")
    B, Hq, S, T = dims["B"], dims["Hq"], dims["S"], dims["T"]
    if offsets is not None:
        offsets = whole_problem(dims, offsets)
    extra: dict[str, np.ndarray] = {}
    strides: dict[str, list[int]] = {}
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
        if not (_is_real(softcap) and 0 < softcap < math.inf):
            raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
        scalars["softcap"] = float(softcap)
    if scale is not None and not (_is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a function of (score, b, h, q_idx, kv_idx), got {type(fn).__name__}"
                             if name == "score_mod" else
                             f"{name} must be a function of (b, h, q_idx, kv_idx), got {type(fn).__name__}")
    for name, x, shape in (("alibi_slopes", alibi_slopes, (Hq,)), ("sinks", sinks, (Hq,))):
        if x is not None:
            x = _real_array(name, x, 1)
            _check(x.shape == shape, f"{name}: expected shape {shape} (Hq), got {x.shape}")
            extra[name] = np.ascontiguousarray(x, dtype=np.float32)
            strides[name] = [1]
    if kv_lens is not None:
        x = _array("kv_lens", kv_lens, 1)
        _check(x.shape == (B,), f"kv_lens: expected shape ({B},) (B), got {x.shape}")
        _check(np.issubdtype(x.dtype, np.integer), f"kv_lens: expected integers, got {x.dtype}")
        total = T if offsets is None else offsets["kv_total"]
        _check(bool(np.all((x >= 0) & (x <= total))), f"kv_lens: values must be in [0, T={total}]")
        extra["kv_lens"] = np.ascontiguousarray(x, dtype=np.int32)
        strides["kv_lens"] = [1]
    if bias is not None:
        _real_array("bias", bias)
        arr, st = broadcast_strides("bias", bias, (B, Hq, S, T))
        extra["bias"] = arr.astype(np.float32, copy=False)
        strides["bias"] = st
    if scale is None:
        scale = 1.0 / math.sqrt(dims["D"])
    sides = None if window is None else tuple(None if w is None else 0 for w in window)
    opts = Options(causal=bool(causal), window=sides,  # type: ignore[arg-type]
                   softcap=softcap is not None, alibi=alibi_slopes is not None,
                   bias=bias is not None, sinks=sinks is not None, kv_lens=kv_lens is not None,
                   lse=return_lse, f16=np.dtype(dtype) == np.float16, score_mod=score_mod,
                   mask_mod=mask_mod, k_format=k_format, v_format=v_format)
    if offsets is not None:  # one chunk of a larger problem: absolute positions
        opts = Options(**{**opts.__dict__, "offsets": True})
        scalars.update(offsets)
    okey = options_key(opts)
    caps = dev.capabilities
    tuned = None
    if plan is None and tunables is None and score_mod is None and mask_mod is None and not f16_math:
        # (f16-math plans are never tuned: `attnc tune` stores f16-storage plans)
        tuned = tuned_plan(dev, okey, dims, opts.f16, fam if target is not None else None, nsplit)
    hplan, htun = plan_for(caps, fam, dims, causal=opts.causal, f16=opts.f16, explicit_family=target is not None,
                           f16_math=f16_math)
    if f16_math:
        hplan = dataclasses.replace(hplan, storage=Storage.F16A)

    def lowered(plan: Plan, tun: dict[str, int], nsplit: int | None) -> Prepared:
        op, sc, d, pack = opts, dict(scalars), dims, pack_gqa
        if pack is None:
            pack = packs_gqa(d, plan)
        if nsplit is None:
            nsplit = kv_splits(caps, d, plan, tun, pack)
        nsplit = min(nsplit, split_limit(dev, d))  # the splits' partial states fit one binding
        if nsplit > 1:
            op = dataclasses.replace(op, split=True)
            sc["NSPLIT"] = nsplit
            plan = with_combine(plan, nsplit)
        if pack:
            op = dataclasses.replace(op, pack_gqa=True)
            d = {**d, "R": (d["Hq"] // d["Hkv"]) * S}
        kern = build_kernel(op, tun)
        progs = programs_for(kern, plan)
        check_limits(dev, progs, plan, d)
        prep = Prepared(dev, kern, plan, progs, d, sc | {"scale": float(scale)}, extra, strides)
        prep.options_key = okey
        return prep

    if tuned is not None:
        try:
            prep = lowered(tuned.plan, tuned.tunables, tuned.nsplit)
            for prog in prep.progs:  # (a WGSL compiler's refusal is a LoweringError too)
                dev.pipelines.get(dev, prog)
            return prep
        except LoweringError as exc:
            ignore(tuned.key, f"attnc cannot lower its plan ({exc.message})")
    return lowered(plan or hplan, tunables or htun, nsplit)


def attention(q: np.ndarray, k: np.ndarray | QuantTensor, v: np.ndarray | QuantTensor, *, causal: bool = False,
              scale: float | None = None, window: tuple[int | None, int | None] | None = None,
              bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
              softcap: float | None = None, sinks: np.ndarray | None = None,
              kv_lens: np.ndarray | None = None, return_lse: bool = False,
              device: Device | str | None = None, target: str | None = None,
              score_mod: Callable[..., Any] | None = None,
              mask_mod: Callable[..., Any] | None = None) -> Any:
    """Scaled dot-product attention on a WebGPU device with the semantics of docs/API.md.

    q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv] -> o [B,Hq,S,Dv] in q's dtype
    (and lse [B,Hq,S] float32 with return_lse). k and v may each be a QuantTensor
    (attnc.quant.quantize: q8_0, q4_0, int8), read by the kernels in that format. score_mod(s, b, h, q_idx, kv_idx) and
    mask_mod(b, h, q_idx, kv_idx) are traced into the kernel (q_idx is the raw query index).
    target: "portable", "subgroups", or (float16 inputs, shader-f16) "portable-f16" /
    "subgroups-f16" for f16 products; None picks the tuned or heuristic variant.
    sinks [Hq]: one more logit per head in the softmax denominator, with no value. A sink of
    +inf takes all the weight: o = 0 and lse = +inf on that head's rows, fully masked rows
    too; -inf is the same as no sink (a fully masked row: o = 0, lse = -inf); NaN makes that
    head's o and lse NaN.
    """
    dims = validate(q, k, v)
    dev = get_device(device)
    fmts = {f"{n}_format": x.fmt for n, x in (("k", k), ("v", v)) if isinstance(x, QuantTensor)}
    if fmts:
        big = largest_binding(q, k, v, bias)
        if big > binding_limit(dev):
            raise DeviceError(f"a {big}-byte binding is larger than {dev.spec}'s largest storage binding "
                              f"({binding_limit(dev)} B); quantized K/V are not split into pieces",
                              notes=("call attention on fewer batch entries or heads at a time",))
    kw = dict(causal=causal, scale=scale, window=window, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
              sinks=sinks, kv_lens=kv_lens, return_lse=return_lse, device=dev, target=target,
              score_mod=score_mod, mask_mod=mask_mod)
    if largest_binding(q, k, v, bias) > binding_limit(dev):
        return chunked(q, k, v, kw, binding_limit(dev), attention, prepare)
    prep = prepare(dims, q.dtype, causal=causal, scale=scale, window=window, bias=bias,
                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, kv_lens=kv_lens,
                   return_lse=return_lse, device=dev, target=target, score_mod=score_mod,
                   mask_mod=mask_mod, **fmts)
    prep.bind(q, k, v).run()
    o, lse = prep.result()
    o = o.astype(q.dtype)
    return (o, lse) if return_lse else o


def prepare_attention(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...],
                      dtype: Any = np.float32, **options: Any) -> Prepared:
    """`prepare` from array shapes (what the benchmark harness and the tuner use)."""
    B, Hq, S, D = q_shape
    _, Hkv, T, _ = k_shape
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v_shape[3])
    return prepare(dims, dtype, **options)
