"""The shipped flash kernel traced for a call's options, and lowered for a plan (both cached).

What the traced IR depends on is `Options` (which options are present, not their values:
those are uniforms); a kernel and a plan give the programs, whatever the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnc.ir import nodes as ir
from attnc.lowering import Plan, Storage, lower
from attnc.lowering.program import Program
from attnc.lowering.retype import retype, with_kv_formats


@dataclass(frozen=True)
class Options:
    """The kernel-shaping options of one attention call (what the traced IR depends on)."""

    causal: bool = False
    window: tuple[int | None, int | None] | None = None  # which sides are bounded (0); values are uniforms
    softcap: bool = False
    alibi: bool = False
    bias: bool = False
    sinks: bool = False
    kv_lens: bool = False
    offsets: bool = False
    lse: bool = False
    split: bool = False
    pack_gqa: bool = False
    f16: bool = False
    k_format: str | None = None  # a quantized K (attnc/quant.py: q8_0, q4_0, int8), else q's dtype
    v_format: str | None = None  # the same for V
    score_mod: Callable[..., Any] | None = None
    mask_mod: Callable[..., Any] | None = None


def options_key(opts: Options) -> str:
    """The kernel-shaping options as a stable string (the tuning cache keys on it)."""
    d = {k: v for k, v in opts.__dict__.items() if k not in ("split", "score_mod", "mask_mod")
         and not (k in ("k_format", "v_format") and v is None)}
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


class _Cache:
    """Traced kernels and lowered programs, keyed by everything that changes them."""

    def __init__(self) -> None:
        self.kernels: dict[Any, ir.Kernel] = {}
        self.programs: dict[Any, tuple[Program, ...]] = {}


_CACHE = _Cache()


def build_kernel(opts: Options, tunables: dict[str, int]) -> ir.Kernel:
    """Trace the shipped flash kernel for these options (cached) and set the storage dtype."""
    from attnc.kernels.flash import flash_attention

    key = (opts, tuple(sorted(tunables.items())))
    kern = _CACHE.kernels.get(key)
    if kern is None:
        kern = flash_attention.trace(
            causal=opts.causal, window=opts.window, softcap=opts.softcap, alibi=opts.alibi,
            bias=opts.bias, sinks=opts.sinks, kv_lens=opts.kv_lens, lse=opts.lse,
            split=opts.split, score_mod=opts.score_mod, mask_mod=opts.mask_mod, pack_gqa=opts.pack_gqa,
            offsets=opts.offsets, **tunables)
        kern = retype(kern, Storage.F16 if opts.f16 else Storage.F32)
        kern = with_kv_formats(kern, opts.k_format, opts.v_format)
        if opts.score_mod is None and opts.mask_mod is None:
            _CACHE.kernels[key] = kern
    return kern


def programs_for(kern: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower (cached by kernel and plan)."""
    key = (kern, plan)
    progs = _CACHE.programs.get(key)
    if progs is None:
        progs = lower(kern, plan)
        _CACHE.programs[key] = progs
    return progs
