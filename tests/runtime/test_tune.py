"""Autotuning: candidates are timed and checked, the winner is stored per device and shape
bucket, and attention() then uses it (and stays correct)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import attnc
from attnc.lowering import schedule
from attnc.runtime import api, tune, tuning_cache
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
    stored = best["entry"]["plan"]
    assert prep.plan.workgroup_size == stored["workgroup_size"]
    assert prep.plan.rows_per_invocation == stored["rows_per_invocation"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 37, 32)).astype(np.float32)
    k = rng.standard_normal((1, 1, 90, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, 90, 32)).astype(np.float32)
    assert_close(attnc.attention(q, k, v, device=dev, causal=True), attention_ref(q, k, v, causal=True), 1e-5)


# one shape per branch of the heuristic: CPU rows (no GQA, many rows), one-row decode (lane
# groups), GQA decode (stream, packed rows), causal prefill (tiled), f16 storage
BASELINE_CASES = [
    (dict(B=1, Hq=2, Hkv=2, S=16, T=64, D=32, Dv=32), np.float32, False),
    (dict(B=1, Hq=2, Hkv=2, S=1, T=300, D=64, Dv=64), np.float32, False),
    (dict(B=1, Hq=4, Hkv=1, S=4, T=200, D=64, Dv=64), np.float16, False),
    (dict(B=1, Hq=2, Hkv=1, S=40, T=70, D=32, Dv=32), np.float32, True),
    (dict(B=1, Hq=2, Hkv=2, S=24, T=90, D=48, Dv=40), np.float16, True),
]


@pytest.mark.parametrize("dims,dtype,causal", BASELINE_CASES)
def test_the_tuners_baseline_is_the_plan_attention_takes(device, tmp_path, monkeypatch, dims, dtype, causal) -> None:
    """A tuned choice is stored only when it beats the heuristic, so the heuristic the tuner
    times first must be the plan attention() takes without a tuned entry, on every adapter and
    for every rule of the heuristic (the CPU rows rule applies only without a target: a
    baseline planned as for an explicit family stored slower plans over the default)."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    untuned = api.prepare(dims, dtype, device=device, causal=causal).variant  # (empty cache)
    res = tune.tune(dims, dtype, device=device, runs=1, max_candidates=1, progress=False, save=False, causal=causal)
    assert res["results"][0]["variant"] == untuned
    assert res["best"]["variant"] == untuned


def test_bucket_keys_exact_head_dims_and_power_of_two_lengths() -> None:
    a = tuning_cache.bucket(dict(B=1, Hq=8, Hkv=2, S=300, T=500, D=64, Dv=64))
    b = tuning_cache.bucket(dict(B=4, Hq=8, Hkv=2, S=400, T=300, D=64, Dv=64))
    c = tuning_cache.bucket(dict(B=1, Hq=8, Hkv=2, S=300, T=500, D=72, Dv=72))
    assert a == b != c
    assert tuning_cache.bucket(dict(B=1, Hq=8, Hkv=8, S=4, T=1500, D=64, Dv=64)).startswith("S4.")


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
    stop once one is within 10 % of it. Each submission holds WARM_BATCH warm dispatches
    (milliseconds of GPU work, so that the host's round trips leave the GPU busy)."""
    from attnc.runtime import dispatch

    assert dispatch.WARM_BATCH >= 16

    times = iter([5.0, 4.0, 1.0, 1.0, 1.05, 3.0, 2.5, 1.08, 1.0])
    calls = []
    clock = types.SimpleNamespace(now=0.0)

    def fake_run(device, dispatches, timestamps=False, span=False):
        calls.append(timestamps and span and len(dispatches) == dispatch.WARM_BATCH)
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


def test_32_row_decode_tiles_match_the_reference(require_adapters) -> None:
    """The GPU plan for many packed rows (loops kept: lavapipe compiles unrolled tiles slowly),
    split, with ragged KV lengths, on lavapipe."""
    import dataclasses

    from attnc.lowering.plan import Family
    from tests.forced_plan import check_forced_plan

    dev = require_adapters("wgpu:vulkan")[0]
    dims = dict(B=2, Hq=16, Hkv=2, S=4, T=700, D=64, Dv=64)
    plan, tun = schedule.plan_for(h200_like(), Family.SUBGROUPS, dict(dims, Hq=64, Hkv=8))
    check_forced_plan(dev, dims, dataclasses.replace(plan, unroll=1), tun, 3, {"kv_lens": "draw"}, 6)
