"""The shipped flash kernel traced for a call's options, and lowered for a plan (both cached).

What the traced IR depends on is `Options` (which options are present, not their values:
those are uniforms) and, for score_mod and mask_mod, their code and what they capture
(frontend/capture.py: the dtypes and shapes of captured tensors and the constants the mods
use, not the values of captured tensors and numbers, which are bindings and uniforms); a
kernel and a plan give the programs, whatever the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnc.frontend import capture
from attnc.ir import nodes as ir
from attnc.lowering import Plan, Storage, lower
from attnc.lowering.program import Program, storage_buffers
from attnc.lowering.retype import retype, with_kv_formats
from attnc.runtime.lru import LRU


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
    paged: bool = False  # K/V in pages read through a block table (kernels/flash.py)
    score_mod: Callable[..., Any] | None = None
    mask_mod: Callable[..., Any] | None = None


def options_key(opts: Options) -> str:
    """The kernel-shaping options as a stable string (the tuning cache keys on it)."""
    d = {k: v for k, v in opts.__dict__.items() if k not in ("split", "score_mod", "mask_mod")
         and not (k in ("k_format", "v_format") and v is None)}
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


# traced kernels and lowered program sets kept: an application making new mods at every call
# (new closures, numbers a mod branches on) would otherwise keep every kernel it ever traced
MAX_KERNELS = 256


class _Cache:
    """Traced kernels and lowered programs, keyed by everything that changes them (the
    MAX_KERNELS most recently used of each)."""

    def __init__(self) -> None:
        self.kernels: LRU[Any, tuple[ir.Kernel, dict[str, capture.Path]]] = LRU(MAX_KERNELS)
        self.programs: LRU[Any, tuple[Program, ...]] = LRU(MAX_KERNELS)
        self.traces = 0  # kernels traced (tests check that new captured values do not re-trace)


_CACHE = _Cache()


def build_kernel(opts: Options, tunables: dict[str, int]) -> ir.Kernel:
    """Trace the shipped flash kernel for these options (cached) and set the storage dtype."""
    return build_kernel_with_captures(opts, tunables)[0]


def mods_scan(score_mod: Callable[..., Any] | None, mask_mod: Callable[..., Any] | None) -> capture.Scan | None:
    """What score_mod and mask_mod reach (frontend/capture.py): the key of the kernel they
    trace to and their captured objects by path; None without mods."""
    mods = {n: f for n, f in (("score_mod", score_mod), ("mask_mod", mask_mod)) if f is not None}
    return capture.scan(mods) if mods else None


def build_kernel_with_captures(opts: Options, tunables: dict[str, int]
                               ) -> tuple[ir.Kernel, dict[str, Any], dict[str, capture.Path]]:
    """The traced kernel (cached), the objects its mods capture in this call by param name,
    and where each is found (its path, for looking up later calls' objects in their scan)."""
    mods = {n: f for n in ("score_mod", "mask_mod") if (f := getattr(opts, n)) is not None}
    scan = capture.scan(mods) if mods else None
    key = _key(opts, tunables, scan)
    hit = _CACHE.kernels.get(key) if key is not None else None
    if hit is not None:
        kern, paths = hit
        return kern, {name: scan.slots[path].obj for name, path in paths.items()} if scan else {}, paths
    from attnc.kernels.flash import flash_attention, paged_flash_attention

    _CACHE.traces += 1
    options = dict(causal=opts.causal, window=opts.window, softcap=opts.softcap, alibi=opts.alibi,
                   bias=opts.bias, sinks=opts.sinks, kv_lens=opts.kv_lens, lse=opts.lse, split=opts.split,
                   score_mod=opts.score_mod, mask_mod=opts.mask_mod, pack_gqa=opts.pack_gqa, **tunables)
    if opts.paged:
        kern, captured = paged_flash_attention.trace_with_captures(**options)
    else:
        kern, captured = flash_attention.trace_with_captures(offsets=opts.offsets, **options)
    kern = retype(kern, Storage.F16 if opts.f16 else Storage.F32)
    kern = with_kv_formats(kern, opts.k_format, opts.v_format)
    paths = {name: slot.path for name, slot in captured.items()}
    # the trace may have found numbers to hold constant: the key of later calls includes them
    key = _key(opts, tunables, capture.scan(mods) if mods else None)
    if key is not None and all(slot.path[0] in mods for slot in captured.values()):
        _CACHE.kernels.put(key, (kern, paths))
    return kern, {name: slot.obj for name, slot in captured.items()}, paths


def _key(opts: Options, tunables: dict[str, int], scan: capture.Scan | None) -> Any:
    """The kernel cache key: the options without the mods, the tunables and the mods' scan key
    (None when a mod reaches a value that cannot be part of a key: such calls trace again)."""
    if scan is not None and scan.key is None:
        return None
    base = Options(**{**opts.__dict__, "score_mod": None, "mask_mod": None})
    return base, tuple(sorted(tunables.items())), None if scan is None else scan.key


def programs_for(kern: ir.Kernel, plan: Plan) -> tuple[Program, ...]:
    """Lower (cached by kernel and plan)."""
    key = (kern, plan)
    progs = _CACHE.programs.get(key)
    if progs is None:
        progs = lower(kern, plan)
        _CACHE.programs.put(key, progs)
    return progs


def programs_within(kern: ir.Kernel, plan: Plan, max_storage_buffers: int) -> tuple[Plan, tuple[Program, ...]]:
    """The plan and its programs, without the block map (an optimisation: one more storage
    binding per pass) when with it a pass would bind more storage buffers than the device grants."""
    progs = programs_for(kern, plan)
    if plan.block_map and storage_buffers(progs) > max_storage_buffers:
        lean = dataclasses.replace(plan, block_map=0)
        lean_progs = programs_for(kern, lean)
        if storage_buffers(lean_progs) < storage_buffers(progs):
            return lean, lean_progs
    return plan, progs
