"""Autotuning: candidates are timed and checked, the winner is stored per device and shape
bucket, and attention() then uses it (and stays correct)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import attnc
from attnc.runtime import api, tune
from tests.gpu_facts import h200_like
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu


def test_tuned_choice_is_stored_and_used(require_adapters, tmp_path, monkeypatch) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    dims = dict(B=1, Hq=2, Hkv=1, S=40, T=70, D=32, Dv=32)
    heuristic = api.prepare(dims, np.float32, device=dev, causal=True).variant  # (empty cache)
    res = tune.tune(dims, device=dev, runs=2, max_candidates=3, progress=False, causal=True)
    assert res["results"][0]["variant"] == heuristic  # always a candidate, and timed again
    assert "ms_first" in res["results"][0]
    timed = [r for r in res["results"] if "ms" in r]
    assert timed and all(r["ok"] for r in timed), res["results"]
    best = res["best"]
    assert best["ms"] == min(r["ms"] for r in timed)
    stored = json.loads((tmp_path / "tune.json").read_text())["entries"]
    assert len(stored) == 1 and next(iter(stored)).startswith(dev.key)
    # a call in the same bucket (other S and T) takes the stored plan
    prep = api.prepare(dict(dims, S=37, T=90), np.float32, device=dev, causal=True)
    assert prep.variant.split("[")[0] == best["variant"].split("[")[0]
    assert prep.plan.WG == best["entry"]["plan"]["WG"] and prep.plan.TM == best["entry"]["plan"]["TM"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 37, 32)).astype(np.float32)
    k = rng.standard_normal((1, 1, 90, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, 90, 32)).astype(np.float32)
    assert_close(attnc.attention(q, k, v, device=dev, causal=True), attention_ref(q, k, v, causal=True), 1e-5)


def test_bucket_keys_exact_head_dims_and_power_of_two_lengths() -> None:
    a = tune.bucket(dict(B=1, Hq=8, Hkv=2, S=300, T=500, D=64, Dv=64))
    b = tune.bucket(dict(B=4, Hq=8, Hkv=2, S=400, T=300, D=64, Dv=64))
    c = tune.bucket(dict(B=1, Hq=8, Hkv=2, S=300, T=500, D=72, Dv=72))
    assert a == b != c
    assert tune.bucket(dict(B=1, Hq=8, Hkv=8, S=4, T=1500, D=64, Dv=64)).startswith("S4.")


def test_decode_candidates_start_with_valid_stream_plans(require_adapters) -> None:
    """Short rows: stream-strategy variants lead the list (a --max cut keeps them), each
    valid and within the device's limits; head dims that are not multiples of 4 get none."""
    from attnc.lowering.plan import Family, Strategy, stream_layout

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=1, Hq=16, Hkv=2, S=1, T=5000, D=64, Dv=64)
    base, _ = api.plan_for(dev, Family.PORTABLE, dims, api.Options(), explicit_family=True)
    cands = list(tune.candidates(dev, dims, base, [Family.PORTABLE], 8))
    kinds = [p.strategy for p, _, _ in cands]
    assert kinds[:6] == [Strategy.STREAM] * 6 and Strategy.TILED in kinds
    limit = int(dev.gpu.limits["max-compute-workgroup-storage-size"])
    for p, tun, ns in cands:
        if p.strategy is Strategy.STREAM:
            assert 4 * stream_layout(p, tun["BM"], tun["BN"]).smem_words <= limit and ns >= 1
    odd = dict(dims, D=30)
    assert Strategy.STREAM not in [p.strategy for p, _, _ in tune.candidates(dev, odd, base, [Family.PORTABLE], 8)]


def test_strategy_environment_variable_limits_the_heuristics(require_adapters, monkeypatch) -> None:
    from attnc.lowering.plan import Family, Strategy

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=1, Hq=8, Hkv=2, S=1, T=500, D=64, Dv=64)
    assert api.plan_for(dev, Family.PORTABLE, dims, api.Options())[0].strategy is Strategy.STREAM
    monkeypatch.setenv("ATTNC_STRATEGY", "tiled")
    assert api.plan_for(dev, Family.PORTABLE, dims, api.Options())[0].strategy is Strategy.TILED
    monkeypatch.setenv("ATTNC_STRATEGY", "fast")
    with pytest.raises(ValueError, match="ATTNC_STRATEGY must be one of"):
        api.plan_for(dev, Family.PORTABLE, dims, api.Options())


# --------------------------------------------------------------------------- GPU warm-up
class _FakeGPU:
    limits: dict[str, int] = {}


class _FakeDevice:
    """Just enough of a Device for warm_up: a GPU adapter with timestamps."""

    adapter_type = "DiscreteGPU"
    features = frozenset({"timestamps"})
    gpu = _FakeGPU()


def test_warm_up_runs_until_the_clocks_are_up(monkeypatch) -> None:
    """The first warm-up of a process runs RAMP_MS to learn the fastest submission time; later
    ones keep going while their submissions run slower than that (clocks still ramping) and
    stop once one is within 10 % of it."""
    from attnc.runtime import dispatch

    times = iter([5.0, 4.0, 1.0, 1.0, 1.05, 3.0, 2.5, 1.08, 1.0])
    calls = []
    clock = types.SimpleNamespace(now=0.0)

    def fake_run(device, dispatches, timestamps=False, span=False):
        calls.append(timestamps and span)
        clock.now += 0.004  # each warm-up submission takes 4 ms of wall time
        return [next(times)]

    monkeypatch.setattr(dispatch, "run", fake_run)
    monkeypatch.setattr(dispatch, "empty", lambda device, n: object())
    monkeypatch.setattr(dispatch, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(dispatch, "RAMP_MS", 14.0)
    monkeypatch.setattr(dispatch, "_WARM_BEST", {})
    dev = _FakeDevice()
    dispatch.warm_up(dev, ms=0.0)  # runs 14 ms at least (learning 1.0), then stops at 1.05
    assert len(calls) == 5 and all(calls)
    dispatch.warm_up(dev, ms=0.0)  # dropped clocks: 3.0 and 2.5 are too slow, 1.08 is not
    assert len(calls) == 8
    dispatch.warm_up(dev, ms=0.0)  # clocks up: one submission
    assert len(calls) == 9


# --------------------------------------------------------------------------- split counts
def test_prefill_splits_only_when_a_gpu_has_few_row_tiles() -> None:
    """Long rows split over KV on a GPU only when the row tiles make fewer than 96 workgroups
    (about 192 with the splits, >= 2 KV tiles each); never on a CPU adapter."""
    gpu = _FakeDevice()
    cpu = types.SimpleNamespace(adapter_type="CPU")
    gemma = dict(B=1, Hq=4, Hkv=1, S=512, T=512, D=256, Dv=256)
    phi = dict(B=1, Hq=32, Hkv=32, S=501, T=501, D=96, Dv=96)
    assert api.prefill_split_count(gpu, gemma, 32, 64) == 3  # 64 workgroups of 32 rows
    assert api.prefill_split_count(cpu, gemma, 32, 64) == 1
    assert api.prefill_split_count(gpu, phi, 128, 64) == 1  # 128 workgroups: no split
    assert api.prefill_split_count(gpu, dict(gemma, T=100), 32, 64) == 1  # 2 KV tiles: 1 split
    assert api.prefill_split_count(gpu, dict(gemma, Hq=1, S=40), 32, 64) == 4  # 2 workgroups, 8 tiles


# --------------------------------------------------------------------------- GPU heuristics
def test_gpu_decode_with_many_packed_rows_takes_32_row_tiles() -> None:
    """GQA decode with >= 32 query rows per KV head (dec4_gqa8: 8 heads x 4 queries): 32x64
    tiles of the tiled strategy, 4 rows per invocation, 8-key value blocks (a small workgroup),
    >= 2 KV tiles per split; fewer packed rows (dec_gqa8, whisper) stay with the stream strategy."""
    from attnc.lowering.plan import Family, Strategy, layout

    gpu = h200_like()
    dec4 = dict(B=1, Hq=64, Hkv=8, S=4, T=7680, D=64, Dv=64)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, dec4, api.Options())
    assert plan.strategy is Strategy.TILED and tun == {"BM": 32, "BN": 64}
    assert (plan.WG, plan.TM, plan.DVS, plan.VK, plan.UN, plan.PF) == (128, 4, 64, 8, 64, 1)
    assert 4 * layout(plan, 32, 64).smem_words <= 12 * 1024  # four per SM on the H200
    assert api.split_count(gpu, dec4, 32, 64, packed=True) == 60  # 120 KV tiles, 2 per split
    for dims in (dict(dec4, S=1), dict(B=1, Hq=6, Hkv=6, S=4, T=1500, D=64, Dv=64)):
        assert api.plan_for(gpu, Family.SUBGROUPS, dims, api.Options())[0].strategy is Strategy.STREAM
    cpu = h200_like(adapter_type="CPU")
    assert api.plan_for(cpu, Family.PORTABLE, dec4, api.Options())[0].strategy is not Strategy.TILED


def test_gpu_decode_with_8_packed_rows_takes_a_softmax_phase_and_long_splits() -> None:
    """8 query rows per KV head (dec_gqa8: S = 1, 8 heads per KV head): the stream strategy with
    its softmax phase (each probability computed once) and >= 2 KV tiles per split; 4 rows
    (whisper) and 1 row (dec_h128) keep every invocation's own softmax and 1 tile per split."""
    from attnc.lowering.plan import Family, Strategy

    gpu = h200_like()
    dec = dict(B=1, Hq=64, Hkv=8, S=1, T=7680, D=64, Dv=64)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, dec, api.Options())
    assert plan.strategy is Strategy.STREAM and plan.SMX == 1 and tun["BM"] == 8
    assert api.split_count(gpu, dec, 8, 64, packed=True, stream=True) == 60  # 120 KV tiles, 2 per split
    whisper = dict(B=1, Hq=6, Hkv=6, S=4, T=1500, D=64, Dv=64)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, whisper, api.Options())
    assert plan.strategy is Strategy.STREAM and plan.SMX == 0 and tun["BM"] == 4
    assert api.split_count(gpu, whisper, 4, 64, packed=True, stream=True) == 24  # one tile each
    h128 = dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128)
    assert api.split_count(gpu, h128, 1, 128, packed=True, stream=True) == 64  # 512 workgroups


def test_gpu_prefill_tiles_over_24_kib_write_p_in_chunks() -> None:
    """A 128x64 prefill tile with 32 outputs per invocation (vit: Dv = 64) takes the chunked-p
    plan, under SHARED_SMEM (the whole p tile needs 42 KiB); 48 outputs (Dv 72 or 96) with many
    row tiles only, through Naga with the prefetch registers; CPU adapters keep the whole p tile."""
    import dataclasses

    from attnc.lowering.plan import Family, layout

    gpu = h200_like()
    vit = dict(B=1, Hq=16, Hkv=16, S=4096, T=4096, D=64, Dv=64)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, vit, api.Options())
    assert tun == {"BM": 128, "BN": 64}
    assert (plan.WG, plan.TM, plan.PC, plan.VK, plan.DVS, plan.UN, plan.PF) == (256, 4, 32, 16, 64, 64, 0)
    whole = dataclasses.replace(plan, PC=0, VK=32, PF=1)
    assert 4 * layout(plan, 128, 64).smem_words <= api.SHARED_SMEM < 4 * layout(whole, 128, 64).smem_words
    for d in (72, 96):
        plan, tun = api.plan_for(gpu, Family.SUBGROUPS, dict(vit, D=d, Dv=d), api.Options())
        assert tun["BM"] == 128 and (plan.PC, plan.VK, plan.PF) == (32, 16, 1)
        plan, tun = api.plan_for(gpu, Family.SUBGROUPS, dict(vit, S=1024, T=1024, D=d, Dv=d), api.Options())
        assert tun["BM"] == 128 and (plan.PC, plan.VK, plan.PF) == (0, 32, 1)  # 128 row tiles
    # Tint's shaders take it with 48 outputs too (head-dim chunks of 16), given >= 256 row tiles
    tint = h200_like(dialect="tint")
    vision = dict(vit, S=5776, T=5776, D=72, Dv=72)
    plan, tun = api.plan_for(tint, Family.SUBGROUPS, vision, api.Options())
    assert tun["BM"] == 128 and (plan.PC, plan.VK, plan.PF, plan.DK) == (32, 16, 0, 16)
    assert 4 * layout(plan, 128, 64).smem_words <= api.SHARED_SMEM
    plan = api.plan_for(gpu, Family.SUBGROUPS, vision, api.Options())[0]  # Naga
    assert (plan.PC, plan.VK, plan.PF, plan.DK) == (32, 16, 1, 16)
    plan, tun = api.plan_for(tint, Family.SUBGROUPS, dict(vision, S=1024, T=1024), api.Options())  # 128 tiles
    assert tun["BM"] == 128 and plan.PC == 0
    cpu = h200_like(adapter_type="CPU")
    assert api.plan_for(cpu, Family.PORTABLE, vit, api.Options())[0].PC == 0


def test_gpu_causal_prefill_takes_long_tiles_first_in_64_row_tiles() -> None:
    """Causal prefill on a GPU takes the query tiles last first (QO=1); where 128-row tiles would
    make fewer than 256 workgroups (phi35: 128), 64-row tiles of 256 invocations. Non-causal
    problems and CPU adapters keep the index order, long causal prefill its 128-row tiles."""
    from attnc.lowering.plan import Family

    gpu = h200_like()
    phi = dict(B=1, Hq=32, Hkv=32, S=501, T=501, D=96, Dv=96)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, phi, api.Options(causal=True))
    assert (tun["BM"], plan.WG, plan.TM, plan.QO, plan.VK) == (64, 256, 4, 1, 32)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, phi, api.Options())
    assert (tun["BM"], plan.QO) == (128, 0)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, dict(phi, S=4096, T=4096), api.Options(causal=True))
    assert (tun["BM"], plan.QO) == (128, 1)
    cpu = h200_like(adapter_type="CPU")
    assert api.plan_for(cpu, Family.PORTABLE, phi, api.Options(causal=True))[0].QO == 0


def test_32_row_decode_tiles_match_the_reference(require_adapters) -> None:
    """The GPU plan for many packed rows (loops kept: lavapipe compiles unrolled tiles slowly),
    split, with ragged KV lengths, on lavapipe."""
    import dataclasses

    from attnc.lowering.plan import Family
    from tests.forced_plan import check_forced_plan

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=2, Hq=16, Hkv=2, S=4, T=700, D=64, Dv=64)
    plan, tun = api.plan_for(h200_like(), Family.SUBGROUPS, dict(dims, Hq=64, Hkv=8), api.Options())
    check_forced_plan(dev, dims, dataclasses.replace(plan, UN=1), tun, 3, {"kv_lens": "draw"}, 6)


def test_gpu_prefill_with_one_value_block_per_tile_unrolls_its_key_loop_16_times() -> None:
    """Dv <= 32 (minilm): P.V over the whole key tile in one block, its 64-key loop in 16 copies
    per iteration; wider value blocks keep their loops whole (UN=64), CPU adapters plain loops."""
    from attnc.lowering.plan import Family

    gpu = h200_like()
    minilm = dict(B=1, Hq=12, Hkv=12, S=128, T=128, D=32, Dv=32)
    plan, tun = api.plan_for(gpu, Family.SUBGROUPS, minilm, api.Options())
    assert (plan.VK, plan.DVS, plan.UN, plan.PF) == (0, 32, 16, 1) and tun == {"BM": 32, "BN": 64}
    assert api.plan_for(gpu, Family.SUBGROUPS, dict(minilm, D=64, Dv=64), api.Options())[0].UN == 64
    cpu = h200_like(adapter_type="CPU")
    assert api.plan_for(cpu, Family.PORTABLE, minilm, api.Options())[0].UN == 1
