"""tinygrad baseline on its WEBGPU device: `Tensor.scaled_dot_product_attention`.

tinygrad's WEBGPU device loads a Dawn library named by the WEBGPU_PATH environment
variable; the `dawn-python` wheel ships one (pydawn/lib/libwebgpu_dawn_<arch>.so), which is
used when WEBGPU_PATH is not set. It is a separate Dawn instance on the same physical
adapter (tinygrad asks for the high-performance one).

Timing: tinygrad's own kernel timer. Each run builds the attention graph and executes its
schedule with `wait=True`, which makes tinygrad's WebGPU runtime time every kernel with GPU
timestamp queries (as DEBUG=2 does); the run's time is the sum over its kernels
(`GlobalCounters.time_sum_s`), so gaps between kernels do not count. tinygrad leaves Dawn's
timestamp quantization on (times in multiples of 65.536 us); this module turns it off by
chaining a toggles descriptor into tinygrad's device request, and flags results that are
still quantized. Without timestamps, the synchronized wall time is used instead.
Causal with S != T is given as an explicit mask aligned to the end of the keys
(tinygrad's `is_causal` aligns to the start); GQA uses `enable_gqa=True`.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnc.bench.cases import Case
from attnc.bench.impls import Inputs, Measured, RunOptions, Unavailable
from attnc.bench.timing import DAWN_QUANTUM_NS, Timing

INSTALL = "pip install tinygrad==0.14.0 dawn-python==0.3.0"


def dawn_library() -> str | None:
    """WEBGPU_PATH if set, else the Dawn library shipped by dawn-python, else None."""
    if os.environ.get("WEBGPU_PATH"):
        return os.environ["WEBGPU_PATH"]
    spec = importlib.util.find_spec("pydawn")
    if spec is None or spec.origin is None:
        return None
    arch = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    lib = Path(spec.origin).parent / "lib" / f"libwebgpu_dawn_{arch}.so"
    return str(lib) if lib.is_file() else None


_KEEP: list[Any] = []  # C structs chained into tinygrad's device descriptor must outlive it


def _disable_timestamp_quantization() -> bool:
    """Chain Dawn's toggle `timestamp_quantization` off into tinygrad's device request.

    tinygrad requests its WGPUDevice without toggles, so Dawn rounds every timestamp down
    to 65.536 us. This wraps tinygrad's `AdapterRequestDevice` to add a
    WGPUDawnTogglesDescriptor; it returns False (times stay quantized, and are flagged)
    when tinygrad's internals differ from 0.14's.
    """
    import ctypes

    try:
        ops = importlib.import_module("tinygrad.runtime.ops_webgpu")
        wg = importlib.import_module("tinygrad.runtime.autogen.webgpu")
        request = ops.AdapterRequestDevice
        if getattr(request, "_attnc_patched", False):
            return True

        def patched(adapter: Any, desc: Any) -> Any:
            names = (ctypes.c_char_p * 1)(b"timestamp_quantization")
            toggles = wg.struct_WGPUDawnTogglesDescriptor(
                chain=wg.WGPUChainedStruct(sType=wg.WGPUSType_DawnTogglesDescriptor),
                disabledToggleCount=1,
                disabledToggles=ctypes.cast(names, ctypes.POINTER(ctypes.POINTER(ctypes.c_char))),
            )
            _KEEP.extend([names, toggles])
            desc.nextInChain = ctypes.pointer(toggles.chain)
            return request(adapter, desc)

        patched._attnc_patched = True  # type: ignore[attr-defined]
        ops.AdapterRequestDevice = patched
        return True
    except (ImportError, AttributeError, TypeError):
        return False


def _open() -> tuple[Any, Any]:
    """Import tinygrad with a Dawn library and open its WEBGPU device: (tinygrad, device)."""
    lib = dawn_library()
    if lib is None:
        raise Unavailable(f"no Dawn library: set WEBGPU_PATH or {INSTALL}")
    os.environ["WEBGPU_PATH"] = lib  # read by tinygrad when it loads its WebGPU bindings
    try:
        import tinygrad
        from tinygrad import Device
    except ImportError:
        raise Unavailable(f"tinygrad is not installed ({INSTALL})") from None
    _disable_timestamp_quantization()
    try:
        dev = Device["WEBGPU"]
    except Exception as exc:  # the device's own error says what failed (library, adapter)
        raise Unavailable(f"tinygrad WEBGPU device failed with WEBGPU_PATH={lib}: {exc}") from None
    return tinygrad, dev


def _version(dist: str) -> str:
    """The installed version of a distribution, or '?'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def run(device: Any, case: Case, copies: Sequence[Inputs], opts: RunOptions) -> Measured:
    """Time tinygrad's scaled_dot_product_attention on WEBGPU; output of copy 0."""
    _, dev = _open()
    from tinygrad import Tensor
    from tinygrad.engine.realize import run_linear
    from tinygrad.helpers import GlobalCounters

    if opts.dtype == "f16" and "shader-f16" not in str(getattr(dev, "arch", "")):
        raise Unavailable("tinygrad's WEBGPU device has no shader-f16 here")
    tensors = [tuple(Tensor(x, device="WEBGPU").realize() for x in c) for c in copies]
    mask = None
    if case.causal and case.S != case.T:
        keep = np.arange(case.T)[None, :] < case.key_limits()[:, None]
        mask = Tensor(keep, device="WEBGPU").realize()

    def attend(i: int) -> Any:
        q, k, v = tensors[i % len(tensors)]
        causal = case.causal and mask is None
        return q.scaled_dot_product_attention(k, v, attn_mask=mask, is_causal=causal, enable_gqa=case.group > 1)

    gpu_ms: list[float] = []
    wall_ms: list[float] = []
    first = None
    for i in range(opts.warmup + opts.runs):
        o = attend(i)
        linear, var_vals = o.linear_with_vars()
        GlobalCounters.reset()
        t0 = time.perf_counter()
        run_linear(linear, var_vals, wait=True)
        dev.synchronize()
        wall_ms.append((time.perf_counter() - t0) * 1e3)
        gpu_ms.append(GlobalCounters.time_sum_s * 1e3)
        if i == 0:
            first = o.numpy()
    gpu, wall = gpu_ms[opts.warmup :], wall_ms[opts.warmup :]
    extra = {"tinygrad": _version("tinygrad"), "webgpu_path": dawn_library()}
    if all(t > 0 for t in gpu):
        quantum = DAWN_QUANTUM_NS / 1e6
        quantized = all(abs(t / quantum - round(t / quantum)) < 1e-6 for t in gpu)
        timing = Timing(
            statistics.median(gpu),
            tuple(gpu),
            (),
            "gpu-timestamps (tinygrad, sum of kernels)",
            quantized,
            len(copies),
        )
    else:
        timing = Timing(statistics.median(wall), tuple(wall), (), "wall", False, len(copies))
    return Measured(timing, np.asarray(first, dtype=np.float32), extra)
