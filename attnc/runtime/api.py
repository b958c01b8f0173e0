"""The public API: `attnc.attention` and `prepare`: validate the inputs, choose the variant
(tuned, else the heuristic of lowering/schedule.py), prepare it on the device, run it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from attnc.lowering import Plan
from attnc.lowering.plan import Storage
from attnc.lowering.schedule import F16_MATH_TARGETS, kv_splits, packs_gqa, pick_family, plan_for, with_combine
from attnc.runtime.build import Options, build_kernel, options_key, programs_for
from attnc.runtime.chunking import binding_limit, chunked, largest_binding
from attnc.runtime.devices import Device, get_device
from attnc.runtime.prepared import Prepared, broadcast_strides, check_limits
from attnc.runtime.tuning_cache import tuned_plan


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


def validate(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, int]:
    """Check q/k/v against the contract; return the dims B, Hq, Hkv, S, T, D, Dv."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        _array(n, x, 4)
        _check(x.dtype in (np.float32, np.float16),
               f"{n}: dtype must be float32 or float16, got {x.dtype}")
        _check(x.size > 0, f"{n}: empty array (shape {x.shape})")
    _check(q.dtype == k.dtype == v.dtype,
           f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, S, D = q.shape
    _, Hkv, T, Dk = k.shape
    _check(k.shape[0] == B and v.shape[0] == B,
           f"batch dims differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    _check(Dk == D, f"head dim D differs: q has {D}, k has {Dk}")
    _check(v.shape[1] == Hkv and v.shape[2] == T,
           f"v shape {v.shape} does not match k shape {k.shape} in (B, Hkv, T)")
    _check(Hq % Hkv == 0, f"Hq={Hq} query heads is not a multiple of Hkv={Hkv} kv heads")
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v.shape[3])


def prepare(dims: dict[str, int], dtype: Any = np.float32, *, causal: bool = False,
            scale: float | None = None, window: tuple[int | None, int | None] | None = None,
            bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
            softcap: float | None = None, sinks: np.ndarray | None = None,
            kv_lens: np.ndarray | None = None, return_lse: bool = False,
            device: Device | str | None = None, target: str | None = None,
            score_mod: Callable[..., Any] | None = None, mask_mod: Callable[..., Any] | None = None,
            plan: Plan | None = None, tunables: dict[str, int] | None = None,
            nsplit: int | None = None, pack_gqa: bool | None = None,
            offsets: tuple[int, int, int, int] | None = None) -> Prepared:
    """Validate options, choose the variant (tuned, heuristic or the given plan) and lower it."""
    dev = get_device(device)
    fam = pick_family(dev.capabilities, target)
    f16_math = target in F16_MATH_TARGETS
    if f16_math and np.dtype(dtype) != np.float16:
        raise ValueError(f"target {target!r} computes products in f16: pass float16 q, k, v (got {np.dtype(dtype)})")
    B, Hq, S, T = dims["B"], dims["Hq"], dims["S"], dims["T"]
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
        total = T if offsets is None else offsets[3]
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
                   mask_mod=mask_mod)
    if offsets is not None:  # one chunk of a larger problem: absolute positions
        opts = Options(**{**opts.__dict__, "offsets": True})
        scalars.update(q_offset=offsets[0], q_total=offsets[1], kv_offset=offsets[2], kv_total=offsets[3])
    okey = options_key(opts)
    caps = dev.capabilities
    if plan is None and tunables is None and score_mod is None and mask_mod is None:
        plan, tunables, nsplit = tuned_plan(dev, okey, dims, opts.f16, fam if target is not None else None, nsplit)
    hplan, htun = plan_for(caps, fam, dims, causal=opts.causal, f16=opts.f16, explicit_family=target is not None,
                           f16_math=f16_math)
    if f16_math:
        hplan = dataclasses.replace(hplan, storage=Storage.F16A)
        if plan is not None and plan.storage is not Storage.F16A:
            plan = None  # a tuned f16-storage plan is not an f16-math plan
    plan = plan or hplan
    tun = tunables or htun
    if pack_gqa is None:
        pack_gqa = packs_gqa(dims, plan)
    if nsplit is None:
        nsplit = kv_splits(caps, dims, plan, tun, pack_gqa)
    if nsplit > 1:
        opts = dataclasses.replace(opts, split=True)
        scalars["NSPLIT"] = nsplit
        plan = with_combine(plan, nsplit)
    if pack_gqa:
        opts = dataclasses.replace(opts, pack_gqa=True)
        dims = {**dims, "R": (dims["Hq"] // dims["Hkv"]) * S}
    kern = build_kernel(opts, tun)
    progs = programs_for(kern, plan)
    check_limits(dev, progs, plan, dims)
    prep = Prepared(dev, kern, plan, progs, dims, scalars | {"scale": float(scale)}, extra, strides)
    prep.options_key = okey
    return prep


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None, window: tuple[int | None, int | None] | None = None,
              bias: np.ndarray | None = None, alibi_slopes: np.ndarray | None = None,
              softcap: float | None = None, sinks: np.ndarray | None = None,
              kv_lens: np.ndarray | None = None, return_lse: bool = False,
              device: Device | str | None = None, target: str | None = None,
              score_mod: Callable[..., Any] | None = None,
              mask_mod: Callable[..., Any] | None = None) -> Any:
    """Scaled dot-product attention on a WebGPU device with the semantics of docs/API.md.

    q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv] -> o [B,Hq,S,Dv] in q's dtype
    (and lse [B,Hq,S] float32 with return_lse). score_mod(s, b, h, q_idx, kv_idx) and
    mask_mod(b, h, q_idx, kv_idx) are traced into the kernel (q_idx is the raw query index).
    target: "portable", "subgroups", or (float16 inputs, shader-f16) "portable-f16" /
    "subgroups-f16" for f16 products; None picks the tuned or heuristic variant.
    """
    dims = validate(q, k, v)
    dev = get_device(device)
    kw = dict(causal=causal, scale=scale, window=window, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
              sinks=sinks, kv_lens=kv_lens, return_lse=return_lse, device=dev, target=target,
              score_mod=score_mod, mask_mod=mask_mod)
    if largest_binding(q, k, v, bias) > binding_limit(dev):
        return chunked(q, k, v, kw, binding_limit(dev), attention, prepare)
    prep = prepare(dims, q.dtype, causal=causal, scale=scale, window=window, bias=bias,
                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, kv_lens=kv_lens,
                   return_lse=return_lse, device=dev, target=target, score_mod=score_mod,
                   mask_mod=mask_mod)
    prep.bind(q, k, v).run()
    o, lse = prep.result()  # o in q's dtype, as the kernel wrote it (float16 inputs: a float16 o)
    return (o, lse) if return_lse else o


def prepare_attention(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...],
                      dtype: Any = np.float32, **options: Any) -> Prepared:
    """`prepare` from array shapes (what the benchmark harness and the tuner use)."""
    B, Hq, S, D = q_shape
    _, Hkv, T, _ = k_shape
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=v_shape[3])
    return prepare(dims, dtype, **options)
