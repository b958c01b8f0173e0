"""Run attention with a forced plan on random inputs and check it against the textbook reference
(shared by the property tests of the strategies' knobs in tests/lowering)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from hypothesis import strategies as st

from attnc import quant
from attnc.lowering.plan import DEFAULT_LIMITS, Dialect, Plan, Storage, layout
from attnc.quant import QuantTensor
from attnc.runtime import api
from tests.strategies import draw_sinks
from tests.textbook import assert_close, attention_ref


def dialect(dev: Any) -> Dialect:
    """The WGSL dialect of `dev`'s shader compiler (a forced subgroups plan must name it)."""
    return Dialect.TINT if dev.dialect == "tint" else Dialect.NAGA


def fits_default_limits(plan: Plan, BM: int, BN: int) -> bool:
    """Whether a tiled plan stays inside WebGPU's default limits (workgroup memory, invocations)."""
    lay = layout(plan, BM, BN)
    return (4 * lay.smem_words <= DEFAULT_LIMITS["max-compute-workgroup-storage-size"]
            and lay.WG <= DEFAULT_LIMITS["max-compute-invocations-per-workgroup"])


# random option sets for check_forced_plan ("draw": random values made there from the seed)
OPTION_SETS = st.fixed_dictionaries({}, optional={
    "causal": st.just(True), "softcap": st.just(20.0), "return_lse": st.just(True),
    "window": st.tuples(st.integers(0, 50), st.none() | st.integers(0, 8)),
    "kv_lens": st.just("draw"), "sinks": st.just("draw"), "bias": st.sampled_from(["draw", "full"])})


def every_code(shape: tuple[int, ...], fmt: str, rng: np.random.Generator) -> QuantTensor:
    """A tensor of `fmt` whose stored bytes run through every value 0-255 in random order (for at
    least 256 of them): every code the format holds, int8's and q8_0's -128 included, which
    quantize() never writes but a runtime filling a cache may; scales random around 1/128. What a
    kernel reads must be what attnc.quant.dequantize gives for these exactly."""
    rows, D = int(np.prod(shape[:-1])), shape[-1]
    value_bytes = D // 2 if fmt == "q4_0" else D
    codes = np.resize(np.arange(256, dtype=np.uint8), rows * value_bytes)
    rng.shuffle(codes)
    if fmt == "int8":
        scales = (rng.uniform(0.5, 1.0, (rows, 1)) / 128).astype(np.float32).view(np.uint32)
        words = np.concatenate([scales, codes.reshape(rows, -1).view("<u4").astype(np.uint32)], axis=1)
    else:
        blocks = rows * D // quant.BLOCK
        scales = (rng.uniform(0.5, 1.0, (blocks, 1)) / 128).astype(np.float16).view(np.uint16).astype(np.uint32)
        words = np.concatenate([scales, codes.reshape(blocks, -1).view("<u4").astype(np.uint32)], axis=1)
    return QuantTensor(fmt, tuple(shape), words.reshape(-1))


def nan_rows(t: QuantTensor, lo: int) -> QuantTensor:
    """A copy of a quantized [B, H, T, D] tensor whose rows of batch 0 from key `lo` on
    dequantize to NaN (their scales are NaN); the other rows are untouched (every format's
    blocks lie within one row)."""
    B, H, T, D = t.shape
    words = t.words.reshape(B, H, T, -1).copy()
    if t.fmt == "int8":
        words[0, :, lo:, 0] = np.float32(np.nan).view(np.uint32)
    else:
        per = 9 if t.fmt == "q8_0" else 5
        words[0, :, lo:, ::per] = np.uint32(0x7E00)  # an f16 NaN scale in every block
    return QuantTensor(t.fmt, t.shape, words.reshape(-1))


def check_forced_plan(dev: Any, dims: dict[str, int], plan: Plan, tun: dict[str, int], nsplit: int | None,
                      opts: dict[str, Any], seed: int, dtype: Any = np.float32,
                      target: str | None = None,
                      kv_formats: tuple[str | None, str | None] = (None, None),
                      kv_codes: str = "quantized", shared_kv: bool = False) -> api.Prepared:
    """Standard-normal q/k/v of `dtype` (float32: within 1e-5 of the float64 reference;
    float16: the kernel's float16 o within 2e-3); options given as "draw" get random values
    (kv_lens, with NaN values past kv_lens[0]: masked keys add nothing; sinks, a third of them
    +-inf, NaN or huge, tests/strategies.py; a [Hq, 1, T] bias, or with "full" a [B, Hq, S, T]
    one, whose every index matters). `kv_formats` stores K and/or V quantized (attnc/quant.py);
    the reference then reads the dequantized values; with kv_codes="every" they hold every code
    of their format instead of the quantized normal values (`every_code`). With `shared_kv`, K and
    V have batch 1 and serve every query batch. Returns the op."""
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, S, T, D, Dv = (dims[x] for x in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    q = rng.standard_normal((B, Hq, S, D)).astype(dtype)
    k = rng.standard_normal((1 if shared_kv else B, Hkv, T, D)).astype(dtype)
    v = rng.standard_normal((1 if shared_kv else B, Hkv, T, Dv)).astype(dtype)
    kf, vf = kv_formats
    k_dev: Any = k
    v_dev: Any = v.copy()
    store = quant.quantize if kv_codes == "quantized" else lambda x, fmt: every_code(x.shape, fmt, rng)
    if kf is not None:
        k_dev = store(k, kf)
        k = quant.dequantize(k_dev)
    if vf is not None:
        v_dev = store(v, vf)
        v = quant.dequantize(v_dev)
    if "kv_lens" in opts:
        opts["kv_lens"] = rng.integers(0, T + 1, B).astype(np.int32)
        masked = int(opts["kv_lens"].max() if shared_kv else opts["kv_lens"][0])  # past every reader's length
        if vf is None:
            v_dev[0, :, masked:] = np.nan
        else:
            v_dev = nan_rows(v_dev, masked)
    if "sinks" in opts:
        opts["sinks"] = draw_sinks(rng, Hq)
    if "bias" in opts:
        shape = (B, Hq, S, T) if opts["bias"] == "full" else (Hq, 1, T)
        opts["bias"] = rng.standard_normal(shape).astype(np.float32)
    if dtype == np.float16 and plan.storage is Storage.F32:  # float16 q/k/v and o: f16 storage
        plan = dataclasses.replace(plan, storage=Storage.F16)
    op = api.prepare(dims, dtype, device=dev, plan=plan, tunables=tun, nsplit=nsplit, target=target, k_format=kf,
                     v_format=vf, **opts)
    op.bind(q, k_dev, v_dev)
    op.run()
    o, lse = op.result()
    assert o.dtype == dtype and o.shape == (B, Hq, S, Dv)
    if shared_kv:
        k, v = np.repeat(k, B, axis=0), np.repeat(v, B, axis=0)
    ref = attention_ref(q, k, v, **opts)
    o_ref, lse_ref = ref if opts.get("return_lse") else (ref, None)
    tol = 2e-3 if dtype == np.float16 else 1e-5
    assert_close(o, o_ref, tol, "o")
    if lse_ref is not None:
        assert lse.dtype == np.float32
        assert_close(lse, lse_ref, tol, "lse")
    return op
