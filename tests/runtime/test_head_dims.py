"""Head dims above 256, D and Dv apart (DeepSeek MLA decodes with D = 576, Dv = 512), for short
and long query rows, against the textbook reference on every adapter; the plans the heuristic
gives them on the H200 (lowered only); and the one limit that remains, a single row per binding.

Per strategy (lowering/schedule.py): stream takes D <= STREAM_MAX_D (its shader grows with D)
and covers any Dv in chunks of at most 4 x WG value columns; rows takes a query row and its
value columns within the 8 KiB WGSL promises a function's variables (D <= 1024); lanes D <= 96;
tiled any D (head-dim chunks in a loop) and any Dv (value chunks over a grid axis), and serves
short rows above the others' limits.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.errors import DeviceError
from attnc.lowering import schedule
from attnc.lowering.plan import Family, Strategy
from attnc.runtime.build import Options, build_kernel, programs_for
from tests.gpu_facts import h200_like
from tests.textbook import assert_close, attention_ref

RUN = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])
HEAD_DIMS = (72, 80, 96, 128, 192, 256, 320, 512, 576)
ODD_DIMS = (33, 100, 257, 385)
SPECS = ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"]


def _check(dev, B, Hq, Hkv, S, T, D, Dv, seed, **opts) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, Dv)).astype(np.float32)
    out = attnc.attention(q, k, v, device=dev, **opts)
    ref = attention_ref(q, k, v, **opts)
    if opts.get("return_lse"):
        assert_close(out[0], ref[0], 1e-5, "o")
        assert_close(out[1], ref[1], 1e-5, "lse")
    else:
        assert_close(out, ref, 1e-5, "o")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
@settings(RUN, max_examples=3)
@given(D=st.sampled_from(HEAD_DIMS + ODD_DIMS), Dv=st.sampled_from(HEAD_DIMS + ODD_DIMS),
       S=st.sampled_from([1, 4, 16, 17]), group=st.sampled_from([1, 2, 4, 16]), Hkv=st.integers(1, 2),
       T=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_head_dims_d_and_dv_apart(require_adapters, spec, D, Dv, S, group, Hkv, T, seed) -> None:
    """D and Dv drawn apart from 33 to 576 (the usual ones, above 256 and odd), decode and
    prefill rows, GQA ratios up to 16, causal with lse."""
    dev = require_adapters(spec)[0]
    _check(dev, 1, Hkv * group, Hkv, S, T, D, Dv, seed, causal=True, return_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
def test_mla_decode_shapes(require_adapters, spec) -> None:
    """DeepSeek MLA as ggml's FLASH_ATTN_EXT tests it: 16 query heads on one KV head of D = 576,
    Dv = 512, 1 and 16 new rows (one plan) and 17 (prefill), a few thousand keys."""
    dev = require_adapters(spec)[0]
    for S, T in ((1, 2500), (16, 700), (17, 300)):
        _check(dev, 1, 16, 1, S, T, 576, 512, S, causal=True)


@pytest.mark.parametrize("dialect", ["naga", "tint"])
def test_gpu_plans_of_large_head_dims_fit_the_h200(dialect) -> None:
    """The H200's heuristic plans for head dims above 256, short and long rows, GQA: they lower,
    fit its workgroup memory and invocations, and are never the stream plan above STREAM_MAX_D."""
    caps = h200_like(dialect=dialect)
    for D, Dv, S, group in itertools.product((257, 320, 576, 1024), (129, 320, 512, 1024), (1, 4, 16, 17),
                                             (1, 16)):
        dims = dict(B=1, Hq=group, Hkv=1, S=S, T=4000, D=D, Dv=Dv)
        plan, tun = schedule.plan_for(caps, Family.SUBGROUPS, dims, causal=True)
        assert plan.strategy is not Strategy.STREAM or D <= schedule.STREAM_MAX_D
        packed = schedule.packs_gqa(dims, plan)
        ns = schedule.kv_splits(caps, dims, plan, tun, packed)
        plan = schedule.with_combine(plan, ns) if ns > 1 else plan
        progs = programs_for(build_kernel(Options(causal=True, split=ns > 1, pack_gqa=packed), tun), plan)
        for p in progs:
            assert p.workgroup_storage_bytes <= caps.limit("max-compute-workgroup-storage-size"), (dims, p.name)
            assert p.workgroup_size <= caps.limit("max-compute-invocations-per-workgroup"), (dims, p.name)


def test_cpu_plans_keep_their_strategies_within_limits() -> None:
    """On a CPU adapter: rows plans within the 8 KiB of function variables, stream within
    STREAM_MAX_D, value columns of a stream plan at most 4 per invocation (the old failure:
    DVC=512 gave 128 column groups for 64 invocations)."""
    for gl, D, Dv, S, group in itertools.product((False, True), (64, 256, 257, 576, 1024, 1025, 4096),
                                                 (64, 256, 512, 1024), (1, 4, 16), (1, 2, 16)):
        caps = h200_like(adapter_type="CPU", limits={"max-compute-workgroup-storage-size": 32768,
                                                     "max-compute-invocations-per-workgroup": 1024},
                         **(dict(features=frozenset(), subgroup_size=None, subgroup_min_size=None,
                                 subgroup_lanes_contiguous=0) if gl else {}))
        dims = dict(B=1, Hq=group, Hkv=1, S=S, T=500, D=D, Dv=Dv)
        plan, tun = schedule.plan_for(caps, schedule.pick_family(caps, None), dims)
        if plan.strategy is Strategy.ROWS:
            assert schedule.rows_fit(plan) and D <= 1024, dims
        if plan.strategy is Strategy.STREAM:
            assert D <= schedule.STREAM_MAX_D and plan.value_columns <= 4 * plan.workgroup_size, dims
        programs_for(build_kernel(Options(pack_gqa=schedule.packs_gqa(dims, plan)), tun), plan)  # lowers


@pytest.mark.gpu
def test_a_row_beyond_the_binding_limit_names_the_limit(require_adapters, monkeypatch) -> None:
    """What remains of a head-dim limit: one key (D or Dv floats) or one query row of a KV
    group must fit a storage binding, since attnc splits problems over rows and keys, not
    head dims. Beyond it: a DeviceError naming max-storage-buffer-binding-size."""
    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setitem(dev.gpu.limits, "max-storage-buffer-binding-size", 1024)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 2, 512)).astype(np.float32)  # a 2 KiB key
    k = rng.standard_normal((1, 1, 3, 512)).astype(np.float32)
    with pytest.raises(DeviceError, match="max-storage-buffer-binding-size = 1024"):
        attnc.attention(q, k, k, device=dev)
