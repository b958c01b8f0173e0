"""Limits and numerics: WebGPU default limits, grids past 65535 workgroups, storage-binding
limits, long rows, huge logits, ±inf bias, NaN at masked keys, fully masked rows.

Complements tests/runtime/test_attention_options.py (which already covers fully masked rows
by kv_lens/window, |s| ~ 5e3 logits and a NaN in one q row on every adapter x family).

Forcing small limits: the runtime reads `max-compute-workgroups-per-dimension` from the
GPUDevice's `limits` dict on every dispatch, so a monkeypatched value exercises grid folding
on the CPU adapters. The binding-size and storage-buffer-count limits are monkeypatched the
same way: attnc chunks over batch and heads past the binding limit, and refuses with a
DeviceError naming the limit what it cannot chunk (one head's K/V beyond it).
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest

import attnc
from attnc.errors import AttncError, DeviceError
from attnc.kernels.flash import flash_attention
from attnc.lowering import Family, Plan, Storage
from attnc.lowering.manifest import compile_kernel
from attnc.lowering.plan import DEFAULT_LIMITS, Dialect
from attnc.lowering.program import Access
from attnc.runtime import api
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import BACKEND_MODULES
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

DEFAULT_WG_STORAGE = DEFAULT_LIMITS["max-compute-workgroup-storage-size"]  # 16 KiB
DEFAULT_INVOCATIONS = DEFAULT_LIMITS["max-compute-invocations-per-workgroup"]  # 256
DEFAULT_STORAGE_BUFFERS = DEFAULT_LIMITS["max-storage-buffers-per-shader-stage"]  # 8


def qkv(rng, B, Hq, Hkv, S, T, D, Dv, dtype=np.float32):
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, Dv)).astype(dtype))


def all_options(rng, B, Hq, S, T) -> dict:
    return dict(causal=True, window=(T, None), softcap=30.0,
                alibi_slopes=(2.0 ** -np.arange(1, Hq + 1)).astype(np.float32),
                bias=rng.standard_normal((T,)).astype(np.float32),
                sinks=rng.uniform(-1, 1, Hq).astype(np.float32),
                kv_lens=np.full(B, T, np.int32), return_lse=True)


def storage_count(p) -> int:
    return sum(b.access is not Access.UNIFORM for b in p.bindings)


# --------------------------------------------------------------------------- default limits
SHAPES = [dict(B=1, Hq=4, Hkv=1, S=S, T=300, D=D, Dv=Dv)
          for S in (1, 9, 37, 200) for D, Dv in ((32, 32), (72, 72), (128, 96), (256, 256))]


@pytest.mark.parametrize("target", [None, "portable"])
@pytest.mark.parametrize("every_option", [False, True], ids=["plain", "all-options"])
def test_portable_plans_fit_webgpu_default_limits(require_adapters, target, every_option, monkeypatch) -> None:
    """On a device that grants only WebGPU's default limits, every plan the runtime picks for
    the portable family (heuristic, default or explicit) fits 16 KiB of workgroup storage and
    256 invocations (bigger tiles are chosen only where a device grants more); lowering only."""
    dev = require_adapters("dawn:vulkan")[0]
    monkeypatch.setitem(dev.gpu.limits, "max-compute-workgroup-storage-size", DEFAULT_WG_STORAGE)
    monkeypatch.setitem(dev.gpu.limits, "max-compute-invocations-per-workgroup", DEFAULT_INVOCATIONS)
    # planning reads the limits through Device.capabilities, cached once per process: drop it
    # for this test (whichever test ran on the device first), the original comes back after
    dev.capabilities  # noqa: B018 - cached, so that monkeypatch restores it
    monkeypatch.delitem(dev.__dict__, "capabilities")
    rng = np.random.default_rng(0)
    for sh in SHAPES:
        dims = dict(sh)
        opts = all_options(rng, dims["B"], dims["Hq"], dims["S"], dims["T"]) if every_option else {}
        # the default target on a subgroup adapter is the subgroup family: force portable there
        fam_target = target or ("portable" if "subgroups" in dev.features else None)
        prep = api.prepare(dims, np.float32, device=dev, target=fam_target, **opts)
        assert prep.plan.family is Family.PORTABLE
        for p in prep.progs:
            assert p.workgroup_storage_bytes <= DEFAULT_WG_STORAGE, (prep.variant, p.name)
            assert p.workgroup_size <= DEFAULT_INVOCATIONS, (prep.variant, p.name)
            assert "subgroups" not in p.features and "enable subgroups" not in p.wgsl


def test_storage_buffer_count_beyond_the_default_is_stated(tmp_path) -> None:
    """With every option on, the main pass binds 9 storage buffers (q k v kv_lens alibi bias
    sinks o lse) — one more than WebGPU's default 8. The manifest must state it in
    requires.limits.maxStorageBuffersPerShaderStage, for every variant and program."""
    kern = flash_attention.trace(causal=True, window=(0, 0), softcap=True, alibi=True, bias=True,
                                 sinks=True, kv_lens=True, lse=True)
    plans = [Plan(Family.PORTABLE, Storage.F32, Dialect.TINT, workgroup_size=64, rows_per_invocation=4, head_chunk=16,
                  value_columns=64, value_stage_columns=32),
             Plan(Family.SUBGROUPS, Storage.F16, Dialect.TINT, workgroup_size=64, rows_per_invocation=4, head_chunk=16,
                  value_columns=64, value_stage_columns=32)]
    manifest = compile_kernel(kern, plans, tmp_path)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["variants"] == manifest["variants"]
    for var in manifest["variants"]:
        counts = [sum(b["kind"] == "storage" for b in p["bindings"]) for p in var["programs"]]
        stated = var["requires"]["limits"]["maxStorageBuffersPerShaderStage"]
        assert stated == max(counts) == 9 > DEFAULT_STORAGE_BUFFERS, var["name"]
        assert var["requires"]["limits"]["maxComputeWorkgroupStorageSize"] <= DEFAULT_WG_STORAGE
        assert var["requires"]["limits"]["maxComputeInvocationsPerWorkgroup"] <= DEFAULT_INVOCATIONS


def test_all_options_run_where_the_device_grants_more_storage_buffers(require_adapters) -> None:
    dev = require_adapters("dawn:vulkan")[0]
    assert dev.gpu.limits["max-storage-buffers-per-shader-stage"] >= 9
    rng = np.random.default_rng(1)
    B, Hq, S, T = 2, 4, 20, 45
    q, k, v = qkv(rng, B, Hq, 2, S, T, 32, 32)
    opts = all_options(rng, B, Hq, S, T)
    prep = api.prepare(api.validate(q, k, v), q.dtype, device=dev, target="portable", **opts)
    assert max(storage_count(p) for p in prep.progs) == 9
    o, lse = attnc.attention(q, k, v, device=dev, target="portable", **opts)
    o_ref, lse_ref = attention_ref(q, k, v, **opts)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


def test_storage_buffer_limit_of_the_device_is_respected(require_adapters, monkeypatch) -> None:
    dev = require_adapters("dawn:vulkan")[0]
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffers-per-shader-stage", 8)
    compiled = []
    real = rt.compile_program
    monkeypatch.setattr(rt, "compile_program", lambda d, p: compiled.append(p) or real(d, p))
    dev.pipelines = rt.PipelineCache()  # force compiles through the spy
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 2, 1, 20, 30, 16, 16)
    opts = all_options(rng, 1, 2, 20, 30)
    try:
        o, _ = attnc.attention(q, k, v, device=dev, target="portable", **opts)
    except DeviceError as e:
        assert "storage" in e.message.lower() and "8" in e.message
        assert "(q, k, v, " in e.message  # the buffers, so the caller sees which options cost them
        return
    assert compiled and all(storage_count(p) <= 8 for p in compiled), \
        [storage_count(p) for p in compiled]
    assert_close(o, attention_ref(q, k, v, **opts)[0], 1e-5)


# --------------------------------------------------------------------------- dispatch grids
def test_grid_beyond_65535_workgroups_is_folded(device) -> None:
    """70000 heads of one query each: the rows program needs 70000 workgroups > 65535."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 70000, 70000, 1, 3, 4, 4)
    prep = api.prepare(api.validate(q, k, v), q.dtype, device=device)
    assert max(prep.plan_grid) > DEFAULT_LIMITS["max-compute-workgroups-per-dimension"]
    assert_close(attnc.attention(q, k, v, device=device), attention_ref(q, k, v), 1e-5)


FOLD_CASES = {
    "prefill_tiled": (dict(B=2, Hq=3, Hkv=3, S=70, T=40, D=16, Dv=16), {}),
    "decode_split_combine": (dict(B=1, Hq=4, Hkv=2, S=2, T=700, D=16, Dv=16),
                             dict(causal=True, return_lse=True)),
    "decode_rows": (dict(B=3, Hq=4, Hkv=4, S=5, T=90, D=8, Dv=8), dict(return_lse=True)),
    "decode_stream": (dict(B=1, Hq=3, Hkv=3, S=2, T=90, D=8, Dv=8), dict(return_lse=True)),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_grid_folding_under_a_small_forced_limit(require_adapters, monkeypatch, case) -> None:
    """max-compute-workgroups-per-dimension forced to 5: every program's grid is folded into
    (x, y) and the shaders' re-linearised workgroup ids still give the right answer."""
    dev = require_adapters("wgpu:vulkan")[0]
    sh, opts = FOLD_CASES[case]
    strategy = case.split("_")[1]
    monkeypatch.setenv("ATTNC_STRATEGY", "" if strategy in ("tiled", "split") else strategy)
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, **sh)
    target = None if case == "decode_rows" else "portable"
    prep = api.prepare(api.validate(q, k, v), q.dtype, device=dev, target=target, **opts)
    assert max(prep.plan_grid) > 5, prep.plan_grid
    grids = []
    real = rt.fold_grid
    monkeypatch.setattr(rt, "fold_grid", lambda n, m: grids.append(real(n, m)) or grids[-1])
    monkeypatch.setitem(dev.gpu.limits, "max-compute-workgroups-per-dimension", 5)
    out = attnc.attention(q, k, v, device=dev, target=target, **opts)
    assert grids and all(x <= 5 and y <= 5 for x, y, _ in grids) and any(y > 1 for _, y, _ in grids)
    ref = attention_ref(q, k, v, **opts)
    if opts.get("return_lse"):
        assert_close(out[0], ref[0], 1e-5, "o")
        assert_close(out[1], ref[1], 1e-5, "lse")
    else:
        assert_close(out, ref, 1e-5)


# --------------------------------------------------------------------------- binding size
def test_problem_larger_than_the_binding_limit_is_chunked(require_adapters, monkeypatch) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    limit = 16384  # bytes; every per-(b, h) slice below fits, no whole tensor does
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", limit)
    sizes: list[int] = []
    real_bg = rt.create_bind_group

    def spy(device, program, compiled, buffers, uniform):  # every bind group is made here
        sizes.extend(int(b.size) for b in buffers.values())  # GPUBuffers or bound BufferSlices
        return real_bg(device, program, compiled, buffers, uniform)

    monkeypatch.setattr(rt, "create_bind_group", spy)
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 4, 4, 2, 24, 40, 32, 32)  # k, v: 40 KiB each; one (b, hk) slice 5 KiB
    try:
        o = attnc.attention(q, k, v, device=dev)
    except DeviceError as e:  # acceptable too: a clear error naming the limit
        assert "max-storage-buffer-binding-size" in e.message or "binding" in e.message
        return
    assert sizes and max(sizes) <= limit, f"bound {max(sizes)} bytes > limit {limit}"
    assert_close(o, attention_ref(q, k, v), 1e-5)
    # output="tensor" cannot be given pieces run on the host: refused before any of them runs
    before = dataclasses.replace(dev.counters)
    with pytest.raises(ValueError, match="output='tensor': this problem is larger than a binding"):
        attnc.attention(q, k, v, device=dev, output="tensor")
    assert dev.counters == before


@pytest.mark.parametrize("nsplit", [64, 256])
def test_split_counts_past_what_a_binding_holds_are_capped(require_adapters, monkeypatch, nsplit) -> None:
    """The split-KV partial states ([B, Hq, S, splits, Dv + 2] f32) are one binding: a split count
    asked for (or tuned) past what the device's binding limit holds runs with the most splits
    that fit, every binding within the limit, and the same result."""
    dev = require_adapters("wgpu:vulkan")[0]
    B, Hq, Hkv, S, T, D = 1, 8, 1, 4, 2048, 64
    limit = 4 * T * D  # k and v fit exactly; the states of 32 splits fit, of 64 do not
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", limit)
    sizes: list[int] = []
    real_bg = rt.create_bind_group

    def spy(device, program, compiled, buffers, uniform):
        sizes.extend(int(b.size) for b in buffers.values())
        return real_bg(device, program, compiled, buffers, uniform)

    monkeypatch.setattr(rt, "create_bind_group", spy)
    q, k, v = qkv(np.random.default_rng(41), B, Hq, Hkv, S, T, D, D)
    op = attnc.prepare(dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=D, Dv=D), np.float32, device=dev, nsplit=nsplit)
    assert 1 < op.nsplit < nsplit
    assert_close(op(q, k, v), attention_ref(q, k, v), 1e-5)
    assert sizes and max(sizes) <= limit, f"bound {max(sizes)} bytes > limit {limit}"


def test_real_binding_limit_is_not_a_raw_webgpu_error(require_adapters) -> None:
    """K and V one row past the binding limit a real GPUDevice was created with (WebGPU's own
    validation enforces it, nothing monkeypatched): chunked, or a clear attnc error. wgpu-native
    grants a limit below WebGPU's default when asked (Dawn raises it to the default, 128 MiB)."""
    backend = importlib.import_module(BACKEND_MODULES[require_adapters("wgpu:vulkan")[0].backend])
    # a fresh adapter: Dawn's adapters create one device each, and attnc's own holds one
    adapter = next(a for a in backend.gpu.enumerate_adapters_sync()
                   if a.info.get("backend_type", "").lower() == "vulkan" and a.info.get("adapter_type") == "CPU")
    limit = 1 << 20
    gpu = adapter.request_device_sync(required_limits={"max-storage-buffer-binding-size": limit})
    dev = attnc.get_device(gpu)
    assert int(dev.gpu.limits["max-storage-buffer-binding-size"]) == limit
    T = limit // (4 * 32) + 1  # k, v: [1, 1, T, 32] f32 = limit + 128 bytes each
    k = np.full((1, 1, T, 32), 0.01, np.float32)
    v = np.ones((1, 1, T, 32), np.float32)
    v[0, 0, ::2] = -1.0
    q = np.ones((1, 1, 1, 32), np.float32)
    try:
        o = attnc.attention(q, k, v, device=dev)
    except AttncError:
        return  # a clear attnc error is acceptable
    expect = v[0, 0, :, 0].astype(np.float64).mean()  # every score equal: the plain mean
    np.testing.assert_allclose(o[0, 0, 0], expect, atol=1e-5)


# --------------------------------------------------------------------------- numerics
def test_long_rows_keep_f32_accuracy(device) -> None:
    """T = 100000 keys (one head, D = 32): split-KV plus the log-sum-exp combine, f32 accurate."""
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 1, 1, 1, 1, 100_000, 32, 32)
    q *= 3  # peaky enough that the max moves around in the row
    o, lse = attnc.attention(q, k, v, device=device, return_lse=True)
    o_ref, lse_ref = attention_ref(q, k, v, return_lse=True)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(lse, lse_ref, 1e-5, "lse")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("S", [2, 33])
def test_huge_logits_do_not_overflow(require_adapters, dtype, S) -> None:
    """|s| ~ 1e4 and ~ 1e30 (f32 range, far beyond f16's): the online max keeps exp() finite."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(7)
    q = rng.integers(-20, 21, (1, 2, S, 32)).astype(dtype)
    k = rng.integers(-20, 21, (1, 1, 50, 32)).astype(dtype)
    v = rng.standard_normal((1, 1, 50, 32)).astype(dtype)
    for scale in (8.0, 1e27):
        o, lse = attnc.attention(q, k, v, scale=scale, return_lse=True, device=dev)
        o_ref, lse_ref = attention_ref(q, k, v, scale=scale, return_lse=True)
        assert np.abs(lse_ref).max() > (5e3 if scale == 8.0 else 1e29)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        assert_close(o, o_ref, 1e-5 if dtype == np.float32 else 2e-3, f"o scale={scale}")
        assert_close(lse, lse_ref, 1e-5, f"lse scale={scale}")


INF_BIAS_CASES = [pytest.param(("wgpu:vulkan", 3), id="wgpu:vulkan-rows"),
                  pytest.param(("wgpu:opengl", 3), id="wgpu:opengl-rows"),
                  pytest.param(("dawn:vulkan", 3), id="dawn:vulkan-rows"),
                  pytest.param(("dawn:vulkan", 20), id="dawn:vulkan-tiled")]


@pytest.mark.parametrize("case", INF_BIAS_CASES)
def test_inf_in_bias(require_adapters, case) -> None:
    """-inf in bias is a mask: identical to masking those keys with mask_mod, a row of -inf
    gives o = 0 and lse = -inf (with sinks: o = 0, lse = the sink). +inf makes exactly its row
    NaN (inf - inf in the softmax, as in the float64 reference) and nothing else."""
    device, S = require_adapters(case[0])[0], case[1]
    rng = np.random.default_rng(8)
    T = 12
    q, k, v = qkv(rng, 1, 2, 1, S, T, 16, 16)
    bias = rng.standard_normal((S, T)).astype(np.float32)
    banned = (np.arange(T)[None, :] % 3 == 0) & (np.arange(S)[:, None] % 2 == 0)
    bias[banned] = -np.inf
    bias[1] = -np.inf  # row 1: everything masked
    sinks = np.array([0.5, -1.0], np.float32)
    o, lse = attnc.attention(q, k, v, bias=bias, return_lse=True, device=device)
    ref_o, ref_lse = attention_ref(q, k, v, bias=bias, return_lse=True)
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")
    assert np.all(o[:, :, 1] == 0) and np.all(np.isneginf(lse[:, :, 1]))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    # the same result as masking those keys (finite bias elsewhere)
    keep = bias.copy()
    keep[~np.isfinite(keep)] = 0.0
    o2 = attnc.attention(q, k, v, bias=keep, mask_mod=_allowed,
                         device=device)
    assert_close(o2, o, 1e-5, "o (mask_mod)")
    # sinks: a fully masked row gives o = 0 and lse = sink
    o, lse = attnc.attention(q, k, v, bias=bias, sinks=sinks, return_lse=True, device=device)
    assert np.all(o[:, :, 1] == 0)
    np.testing.assert_allclose(lse[0, :, 1], sinks, rtol=1e-6)
    # +inf: that row alone is NaN
    bias[S - 1, 4] = np.inf
    o = attnc.attention(q, k, v, bias=bias, device=device)
    assert np.isnan(o[:, :, S - 1]).all()
    assert not np.isnan(o[:, :, : S - 1]).any()


def _allowed(b, h, i, j):
    """The -inf pattern of test_inf_in_bias as a mask_mod: j % 3 == 0 on even rows, row 1."""
    return ((j % 3 != 0) | (i % 2 != 0)) & (i != 1)


@pytest.mark.parametrize("S", [3, 20])
def test_nan_in_v_at_masked_keys_does_not_propagate(device, S) -> None:
    """Masked keys add nothing (nodes.py: p = 0 keys add nothing even for NaN/inf values): NaN
    and inf in v at keys masked by causal, by kv_lens and by a -inf bias leave the rows that
    cannot see them exact; rows that do see a NaN key become NaN, and only those."""
    rng = np.random.default_rng(9)
    B, Hq, T = 2, 2, 24
    q, k, v = qkv(rng, B, Hq, 1, S, T, 16, 16)
    lens = np.array([T, 17], np.int32)
    bias = np.zeros((T,), np.float32)
    bias[5] = -np.inf
    v[:, :, 5] = np.nan  # masked by the bias everywhere
    v[1, :, 20] = np.inf  # beyond kv_lens[1] = 17
    v[1, :, 17] = np.nan  # beyond kv_lens[1]
    v[0, :, T - 1] = np.nan  # causal: only the last query row of batch 0 sees it
    opts = dict(causal=True, kv_lens=lens, bias=bias, return_lse=True)
    o, lse = attnc.attention(q, k, v, device=device, **opts)
    bad = np.zeros(o.shape[:3], bool)
    bad[0, :, S - 1] = True
    assert np.isnan(o[bad]).all()
    assert np.isfinite(o[~bad]).all(), "NaN/inf of a masked key leaked"
    assert not np.isnan(lse).any()  # rows of batch 1 before kv_lens' first key: -inf
    clean = v.copy()
    clean[~np.isfinite(clean)] = 0.0
    ref_o, ref_lse = attention_ref(q, k, clean, **opts)
    assert_close(np.where(bad[..., None], 0, o), np.where(bad[..., None], 0, ref_o), 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")


@pytest.mark.parametrize("S", [4, 20])
def test_rows_fully_masked_by_mask_mod(require_adapters, S) -> None:
    """mask_mod masking whole rows (and whole heads): o = 0, lse = -inf, never NaN."""
    dev = require_adapters("dawn:vulkan")[0]
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, 1, 2, 2, S, 30, 16, 16)

    def mask(b, h, i, j):
        return (h == 1) & (i % 2 == 1)

    o, lse = attnc.attention(q, k, v, mask_mod=mask, return_lse=True, device=dev)
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert np.all(o[:, 0] == 0) and np.all(np.isneginf(lse[:, 0]))
    assert np.all(o[:, 1, ::2] == 0) and np.all(np.isneginf(lse[:, 1, ::2]))
    ref_o, ref_lse = attention_ref(q, k, v, return_lse=True,
                                   mask_mod=lambda b, h, i, j: (h == 1) & (i % 2 == 1))
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_one_head_beyond_the_binding_limit_is_chunked_over_rows_and_keys(require_adapters, monkeypatch,
                                                                           spec) -> None:
    """A single (batch, head) whose q, k, v, bias and o all exceed a forced 8 KiB binding limit:
    blocks of rows x keys with absolute positions, merged by log-sum-exp on the host; every
    position-dependent option and a sink must come out as for the whole problem."""
    dev = require_adapters(spec)[0]
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", 8192)
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, 1, 1, 1, 50, 300, 16, 16)
    opts = dict(causal=True, window=(100, None), kv_lens=np.array([250]), sinks=np.array([0.5], np.float32),
                bias=rng.standard_normal((50, 300)).astype(np.float32), alibi_slopes=np.array([0.1], np.float32),
                softcap=20.0, return_lse=True)
    o, lse = attnc.attention(q, k, v, device=dev, **opts)
    ro, rl = attention_ref(q, k, v, **opts)
    assert_close(o, ro, 1e-5, "o")
    assert_close(lse, rl, 1e-5, "lse")
    o = attnc.attention(q, k, v, device=dev, score_mod=lambda s, b, h, i, j: s - 0.01 * attnc.f32(abs(i - j)))
    assert_close(o, attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.01 * np.abs(i - j)), 1e-5)


def test_binding_limit_errors_name_the_tensor_and_what_to_do(require_adapters) -> None:
    """On a device granted a 256 KiB binding: a KV cache past it is refused when it is made,
    naming k or v and the sizes (it was accepted, then the first append said "cache: spans ...");
    a call over a quantized K whose float V is too large names v (it said only "a 1280000-byte
    binding"); a prepared op's host q past it names q without the hint about mods' tables."""
    backend = importlib.import_module(BACKEND_MODULES[require_adapters("wgpu:vulkan")[0].backend])
    adapter = next(a for a in backend.gpu.enumerate_adapters_sync()
                   if a.info.get("backend_type", "").lower() == "vulkan" and a.info.get("adapter_type") == "CPU")
    limit = 1 << 18
    dev = attnc.get_device(adapter.request_device_sync(required_limits={"max-storage-buffer-binding-size": limit}))
    for fmt in (None, "q8_0"):
        with pytest.raises(ValueError, match=r"k: a cache of batch=1, kv_heads=2, capacity=2000 and head_dim=64 "
                                             rf"\({fmt or 'float32'}\) needs \d+ bytes, more than .*\({limit}\)"):
            attnc.KVCache(1, 2, 2000, 64, device=dev, k_format=fmt)
    attnc.KVCache(1, 2, 500, 64, device=dev)  # 256000 bytes: fits
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
    k = attnc.quant.quantize(rng.standard_normal((1, 2, 2500, 64)).astype(np.float32), "q8_0")
    v = rng.standard_normal((1, 2, 2500, 64)).astype(np.float32)
    with pytest.raises(AttncError, match=r"v: 1280000 bytes, more than .* a call over a quantized K/V \(k q8_0\)"):
        attnc.attention(q, k, v, device=dev)
    op = attnc.prepare((1, 2, 2500, 64), (1, 2, 4, 64), (1, 2, 4, 64), device=dev)
    small = rng.standard_normal((1, 2, 4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="q: 1280000 bytes, .*a prepared op binds each input whole") as e:
        op(rng.standard_normal((1, 2, 2500, 64)).astype(np.float32), small, small)
    assert "table" not in str(e.value)


def _lowered_device(require_adapters, limits: dict[str, int]):
    """A wgpu-native lavapipe device requested with `limits` below WebGPU's guaranteed minimums
    (wgpu-native grants such requests; Dawn raises them to the minimums)."""
    backend = importlib.import_module(BACKEND_MODULES[require_adapters("wgpu:vulkan")[0].backend])
    adapter = next(a for a in backend.gpu.enumerate_adapters_sync()
                   if a.info.get("backend_type", "").lower() == "vulkan" and a.info.get("adapter_type") == "CPU")
    gpu = adapter.request_device_sync(required_limits=limits)
    assert all(int(gpu.limits[n]) == v for n, v in limits.items())
    return attnc.get_device(gpu)


@pytest.mark.parametrize("smem", [8192, 12288])
def test_plans_fit_a_device_granting_less_workgroup_memory(require_adapters, smem) -> None:
    """Below WebGPU's 16 KiB of workgroup memory the heuristic picks smaller tiles (prefill
    with every head dim up to 256 failed to lower: "needs 13836 B"), for f32 and f16, GQA,
    decode, a KV cache and paged keys."""
    dev = _lowered_device(require_adapters, {"max-compute-workgroup-storage-size": smem})
    rng = np.random.default_rng(12)
    for S, T, D, Hq, Hkv, dtype in ((64, 128, 32, 2, 1, np.float32), (64, 128, 128, 4, 2, np.float32),
                                    (70, 200, 256, 2, 2, np.float32), (1, 256, 256, 2, 1, np.float32),
                                    (33, 90, 64, 4, 1, np.float16), (4, 300, 128, 8, 2, np.float16)):
        q = rng.standard_normal((1, Hq, S, D)).astype(dtype)
        k, v = (rng.standard_normal((1, Hkv, T, D)).astype(dtype) for _ in range(2))
        o = attnc.attention(q, k, v, causal=True, device=dev)
        assert_close(o, attention_ref(q, k, v, causal=True), 2e-3 if dtype == np.float16 else 1e-5, (S, T, D))
    cache = attnc.KVCache(1, 2, 256, 128, device=dev)
    cache.append(k[:, :, :200].astype(np.float32), v[:, :, :200].astype(np.float32))
    qt = attnc.tensor(q.astype(np.float32), dev)
    assert_close(cache.attend(qt, causal=True).numpy(),
                 attention_ref(q.astype(np.float32), k[:, :, :200], v[:, :, :200], causal=True), 1e-5)


def test_a_quantized_cache_appends_on_a_device_binding_four_storage_buffers(require_adapters) -> None:
    """With four storage buffers per stage the store kernel writes K and V in a dispatch each
    (the pair kernel binds six: Naga's error at the first append); attention over the cache
    is then a DeviceError naming the limit, as for every call that needs more."""
    dev = _lowered_device(require_adapters, {"max-storage-buffers-per-shader-stage": 4})
    rng = np.random.default_rng(13)
    k, v = (rng.standard_normal((1, 2, 40, 64)).astype(np.float32) for _ in range(2))
    cache = attnc.KVCache(1, 2, 64, 64, device=dev, k_format="q8_0", v_format="q4_0")
    cache.append(k[:, :, :25], v[:, :, :25])
    cache.append(k[:, :, 25:], v[:, :, 25:])
    for stored, x, fmt in ((cache.k, k, "q8_0"), (cache.v, v, "q4_0")):
        got = attnc.quant.dequantize(stored.numpy())[:, :, :40]
        np.testing.assert_array_equal(got, attnc.quant.dequantize(attnc.quant.quantize(x, fmt)), fmt)
    with pytest.raises(DeviceError, match="max-storage-buffers-per-shader-stage = 4"):
        cache.attend(rng.standard_normal((1, 2, 1, 64)).astype(np.float32))
