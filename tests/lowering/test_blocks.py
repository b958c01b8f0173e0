"""Block sparsity from data (attnc/lowering/blocks.py): which masks get a block map, the map's
lists against numpy's classification of the mask, and attention through it against float64,
over drawn masks that read tensors (documents whose boundaries fall anywhere in a tile,
boolean block tables, prefix lengths, random bits), tiled plans (prefetch, split KV, tile
sizes), the stream and lanes strategies, through Naga and Tint on lavapipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.errors import DeviceError
from attnc.lowering import blocks
from attnc.lowering.analyze import analyze
from attnc.lowering.plan import Family, Plan, Strategy
from attnc.runtime import api
from attnc.runtime import dispatch as rt
from attnc.runtime.build import Options, build_kernel
from tests.forced_plan import dialect
from tests.textbook import assert_close, attention_ref

RUN = settings(deadline=None, max_examples=3,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _spec(**mods):
    from attnc.kernels.flash import flash_attention

    return analyze(flash_attention.trace(**mods))


def test_only_masks_that_read_data_beyond_key_bounds_get_a_map() -> None:
    """Causal and window masks, and `kj < kv_lens[b]`, are key bounds (no map); a document
    mask, a block table, a prefix-LM mask get one; a mask reading the score gets none."""
    doc = np.zeros((1, 8), np.int32)
    lens = np.zeros(1, np.int32)
    table = np.zeros((2, 2), bool)
    assert blocks.block_mask(analyze(build_kernel(Options(causal=True, window=(3, 0)), {"BM": 16, "BN": 16}))) is None
    assert blocks.block_mask(_spec(mask_mod=lambda b, h, q, kv: kv < lens[b])) is None
    assert blocks.block_mask(_spec(mask_mod=lambda b, h, q, kv: (kv <= q) & (kv < lens[b]))) is None
    assert blocks.block_mask(_spec(mask_mod=lambda b, h, q, kv: doc[b, q] == doc[b, kv])) is not None
    assert blocks.block_mask(_spec(mask_mod=lambda b, h, q, kv: table[q // 4, kv // 4] & (kv <= q))) is not None
    assert blocks.block_mask(_spec(mask_mod=lambda b, h, q, kv: (kv < lens[b]) | (kv <= q))) is not None
    spec = _spec(score_mod=lambda s, b, h, q, kv: attnc.where((s > 0) & (doc[b, q] == doc[b, kv]), s, -math.inf))
    assert blocks.block_mask(spec) is None


def test_the_map_covers_only_the_axes_the_mask_reads() -> None:
    """A document mask over [B, S] has one record per batch and query tile, shared by heads."""
    doc = np.zeros((1, 8), np.int32)
    spec = _spec(mask_mod=lambda b, h, q, kv: doc[b, q] == doc[b, kv])
    mask = blocks.block_mask(spec)
    assert [a.var for a in blocks.map_axes(spec, mask)] == ["b"]
    assert blocks.scratch_factors(spec, mask)[0] == "B"


def _masks(draw, B: int, S: int, T: int):
    """A mask_mod reading drawn data and its dense [B, S, T] truth."""
    kind = draw(st.sampled_from(["document", "block_table", "prefix", "bits"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    qpos = np.arange(S)[:, None] + (T - S)
    kpos = np.arange(T)[None, :]
    if kind == "document":  # queries are the last S of the T tokens; boundaries anywhere
        ends = np.sort(rng.choice(np.arange(1, T), size=min(T - 1, draw(st.integers(0, 6))), replace=False))
        doc = np.stack([np.searchsorted(ends, np.arange(T), side="right") for _ in range(B)]).astype(np.int32)
        off = T - S

        def mm(b, h, q, kv):
            return (doc[b, q + off] == doc[b, kv]) & (kv <= q + off)
        truth = (doc[:, qpos] == doc[:, kpos]) & (kpos <= qpos)
        return mm, truth
    if kind == "block_table":
        bs = draw(st.sampled_from([4, 16, 24]))
        table = rng.random((-(-S // bs), -(-T // bs))) < 0.3

        def mm(b, h, q, kv):
            return table[q // bs, kv // bs]
        truth = table[np.arange(S)[:, None] // bs, kpos // bs]
        return mm, np.broadcast_to(truth, (B, S, T))
    if kind == "prefix":
        prefix = rng.integers(0, T + 1, size=B).astype(np.int32)

        def mm(b, h, q, kv):
            return (kv < prefix[b]) | (kv <= q + (T - S))
        return mm, (kpos[None] < prefix[:, None, None]) | (kpos <= qpos)[None]
    bits = rng.random((S, T)) < 0.5

    def mm(b, h, q, kv):
        return bits[q, kv]
    return mm, np.broadcast_to(bits, (B, S, T))


def _classes(truth: np.ndarray, BM: int, BN: int) -> list:
    """Per batch and query tile, the live KV tiles with their full flags, from the dense mask."""
    B, S, T = truth.shape
    out = []
    for b in range(B):
        for qt in range(-(-S // BM)):
            live = []
            for kt in range(-(-T // BN)):
                tile = truth[b, qt * BM:(qt + 1) * BM, kt * BN:(kt + 1) * BN]
                if tile.any():
                    live.append((kt, bool(tile.all())))
            out.append(live)
    return out


def _read_map(op, truth: np.ndarray, BM: int, BN: int) -> tuple[list, list]:
    """The map's lists, and numpy's for the batches it has records for (one shared by every
    batch where the mask does not read b)."""
    _B, S, T = truth.shape
    n_qt, n_kt = -(-S // BM), -(-T // BN)
    sl = op._scratch["blocks"]
    words = rt.readback(op.dev, sl.buffer, np.uint32, (sl.size // 4,))
    n_rec = len(words) // (n_kt + 1)
    out = []
    for r in range(n_rec):
        rec = words[r * (n_kt + 1):(r + 1) * (n_kt + 1)]
        out.append([(int(x) & (blocks.FULL_BIT - 1), bool(int(x) & blocks.FULL_BIT)) for x in rec[1:1 + rec[0]]])
    return out, _classes(truth[:n_rec // n_qt], BM, BN)


SANITIZED_PLANS = {
    "tiled": (Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=1, head_chunk=16, value_columns=32,
                   value_stage_columns=32, vector_width=4, prefetch=1), {"BM": 16, "BN": 16}),
    "stream": (Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=32, lanes_per_key=2, keys_per_step=4,
                    softmax_phase=1, query_dim=32, value_columns=32, vector_width=4), {"BM": 4, "BN": 32}),
}


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", list(SANITIZED_PLANS))
def test_block_map_programs_stay_in_bounds(strategy, require_adapters) -> None:
    """classify, compact, the listed main pass (tiled: prefetching past the list's end) and the
    combine, under the bounds sanitizer in its run: a document mask, 3 splits, ragged tiles."""
    dev = require_adapters("wgpu:vulkan")[0]
    doc = np.repeat(np.arange(4), [7, 30, 1, 32])[None].astype(np.int32)

    def mm(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)
    plan, tunables = SANITIZED_PLANS[strategy]
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 70, 32)).astype(np.float32) for _ in range(3))
    op = api.prepare_dims(dict(B=1, Hq=2, Hkv=2, S=70, T=70, D=32, Dv=32), mask_mod=mm, device=dev, plan=plan,
                          tunables=tunables, nsplit=3)
    assert [p.name for p in op.progs] == ["classify", "compact", "main", "combine"]
    assert_close(op(q, k, v), attention_ref(q, k, v, mask_mod=mm), 1e-5, "o")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])  # Naga and Tint (the GL adapter: Naga's WGSL)
@RUN
@given(data=st.data())
def test_tiled_plans_over_block_maps_match_the_reference(spec, data, require_adapters) -> None:
    """A forced tiled plan (tile sizes, prefetch, split KV) over a drawn data mask: o and lse
    within 1e-5 of float64, and the map's lists equal numpy's classification of the mask
    (every listed tile live, every live tile listed, full exactly where the mask keeps all)."""
    dev = require_adapters(spec)[0]
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    T = data.draw(st.integers(1, 150))
    S = data.draw(st.integers(1, T))
    BM, BN = data.draw(st.sampled_from([(16, 16), (32, 16), (16, 32)]))
    mm, truth = _masks(data.draw, B, S, T)
    plan = Plan(Family.PORTABLE, workgroup_size=64, rows_per_invocation=2 if BM == 32 else 1, head_chunk=16,
                value_columns=32, value_stage_columns=32, vector_width=4, prefetch=data.draw(st.integers(0, 1)))
    nsplit = data.draw(st.sampled_from([None, 1, 3]))
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, H, S, 32)).astype(np.float32)
    k = rng.standard_normal((B, H, T, 32)).astype(np.float32)
    v = rng.standard_normal((B, H, T, 24)).astype(np.float32)
    op = api.prepare_dims(dict(B=B, Hq=H, Hkv=H, S=S, T=T, D=32, Dv=24), mask_mod=mm, return_lse=True,
                          device=dev, plan=plan, tunables={"BM": BM, "BN": BN}, nsplit=nsplit)
    assert [p.name for p in op.progs][:3] == ["classify", "compact", "main"]
    o, lse = op(q, k, v)
    ref_o, ref_lse = attention_ref(q, k, v, mask_mod=mm, return_lse=True)
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")
    got, want = _read_map(op, truth, BM, BN)
    assert got == want


@pytest.mark.gpu
@pytest.mark.subgroup_sizes
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@RUN
@given(data=st.data())
def test_lanes_plans_over_block_maps_match_the_reference(spec, data, require_adapters) -> None:
    """The lanes strategy walks the listed tiles only, dropping the mask on full ones (at the
    device's subgroup size)."""
    dev = require_adapters(spec)[0]
    B = data.draw(st.integers(1, 2))
    T = data.draw(st.integers(1, 200))
    S = data.draw(st.integers(1, T))
    mm, truth = _masks(data.draw, B, S, T)
    rows = data.draw(st.sampled_from([1, 2]))
    BM, BN = max(16, rows * dev.subgroup_size), data.draw(st.sampled_from([16, 32]))
    plan = Plan(Family.SUBGROUPS, dialect=dialect(dev), strategy=Strategy.LANES, rows_per_invocation=rows,
                subgroup_width=dev.subgroup_size, query_dim=16, value_columns=16, vector_width=4)
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((B, 2, n, 16)).astype(np.float32) for n in (S, T, T))
    op = api.prepare_dims(dict(B=B, Hq=2, Hkv=2, S=S, T=T, D=16, Dv=16), mask_mod=mm, device=dev, plan=plan,
                          tunables={"BM": BM, "BN": BN})
    assert [p.name for p in op.progs] == ["classify", "compact", "main"]
    assert_close(op(q, k, v), attention_ref(q, k, v, mask_mod=mm), 1e-5, "o")
    got, want = _read_map(op, truth, BM, BN)
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@RUN
@given(data=st.data())
def test_stream_plans_over_block_maps_match_the_reference(spec, data, require_adapters) -> None:
    """The stream strategy (short rows: decoding) walks the listed tiles only, each softmax
    placement (per column group, a softmax phase, the dot phase against a shared maximum, lane
    groups with the next step's loads issued early or not),
    split or not, GQA rows packed, dropping the mask on full tiles."""
    dev = require_adapters(spec)[0]
    B, Hkv = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    Hq = Hkv * data.draw(st.sampled_from([1, 2]))
    T = data.draw(st.integers(1, 200))
    S = data.draw(st.integers(1, min(T, 4)))
    mm, truth = _masks(data.draw, B, S, T)
    BM, BN = data.draw(st.sampled_from([(4, 32), (8, 64)]))
    smx = data.draw(st.integers(0, 3))  # 3: lane groups (subgroups), each visiting its keys of the listed tiles
    plan = Plan(Family.SUBGROUPS if smx == 3 else Family.PORTABLE, dialect=dialect(dev), strategy=Strategy.STREAM,
                workgroup_size=32, lanes_per_key=1 if smx == 2 else 2, keys_per_step=2 if smx == 3 else 4,
                softmax_phase=smx, query_dim=16, value_columns=16, vector_width=4,
                prefetch=data.draw(st.sampled_from([0, 1])))
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, Hq, S, 16)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, T, 16)).astype(np.float32) for _ in range(2))
    op = api.prepare_dims(dict(B=B, Hq=Hq, Hkv=Hkv, S=S, T=T, D=16, Dv=16), mask_mod=mm, return_lse=True,
                          device=dev, plan=plan, tunables={"BM": BM, "BN": BN},
                          nsplit=data.draw(st.sampled_from([None, 1, 3])))
    assert op.plan.strategy is Strategy.STREAM and [p.name for p in op.progs][:3] == ["classify", "compact", "main"]
    o, lse = op(q, k, v)
    ref_o, ref_lse = attention_ref(q, k, v, mask_mod=mm, return_lse=True)
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")


def _reading_mods(n_tables: int, T: int):
    """A document mask and a score_mod adding n_tables captured [T] f32 tables (each one more
    storage binding), with their numpy meaning."""
    doc = (np.arange(T) // 5)[None].astype(np.int32)
    tables = [np.linspace(-1, 1, T, dtype=np.float32) * (i + 1) for i in range(n_tables)]

    def mm(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    def sm(s, b, h, q, kv):
        for t in tables:
            s = s + t[kv]
        return s
    return mm, sm if tables else None


@pytest.mark.gpu
@pytest.mark.parametrize("n_tables,lse", [(2, False), (3, False), (2, True), (4, False)])
def test_devices_with_default_limits_run_data_masks_with_or_without_the_map(n_tables, lse, require_adapters) -> None:
    """On a GPUDevice created with WebGPU's default limits (8 storage buffers per stage), a
    kernel whose block map would bind one buffer too many runs without the map (BMAP=0) and
    one that fits keeps it; both match float64; one that needs too many even without the map is
    refused naming the limit. attnc's own device (larger limits) keeps the map."""
    backend = require_adapters("wgpu:vulkan")[0].backend
    import importlib

    from attnc.runtime.devices import BACKEND_MODULES

    gpu_mod = importlib.import_module(BACKEND_MODULES[backend])
    adapter = next(a for a in gpu_mod.gpu.enumerate_adapters_sync()
                   if a.info.get("backend_type", "").lower() == "vulkan" and a.info.get("adapter_type") == "CPU")
    dev = attnc.get_device(adapter.request_device_sync(required_limits={"max-storage-buffers-per-shader-stage": 8}))
    assert int(dev.gpu.limits["max-storage-buffers-per-shader-stage"]) == 8
    T = 40
    mm, sm = _reading_mods(n_tables, T)
    rng = np.random.default_rng(n_tables)
    q, k, v = (rng.standard_normal((1, 2, T, 16)).astype(np.float32) for _ in range(3))
    want = attention_ref(q, k, v, mask_mod=mm, score_mod=sm, return_lse=lse)
    buffers = 4 + 1 + n_tables + lse  # q k v o, doc, the tables, lse
    for device, limit in ((dev, 8), (require_adapters("wgpu:vulkan")[0], None)):
        if limit is not None and buffers > limit:
            with pytest.raises(DeviceError, match="max-storage-buffers-per-shader-stage = 8"):
                api.prepare_dims(dict(B=1, Hq=2, Hkv=2, S=T, T=T, D=16, Dv=16), mask_mod=mm, score_mod=sm,
                                 return_lse=lse, device=device, tunables={"BM": 16, "BN": 16})
            continue
        op = api.prepare_dims(dict(B=1, Hq=2, Hkv=2, S=T, T=T, D=16, Dv=16), mask_mod=mm, score_mod=sm,
                              return_lse=lse, device=device, tunables={"BM": 16, "BN": 16})
        mapped = limit is None or buffers + 1 <= limit
        assert ("classify" in [p.name for p in op.progs]) == mapped, op.variant
        assert f"BMAP={int(mapped)}" in op.variant
        got = op(q, k, v)
        for g, w, what in zip(got if lse else (got,), want if lse else (want,), ("o", "lse"), strict=False):
            assert_close(g, w, 1e-5, what)


@pytest.mark.parametrize("n_tables", [0, 2, 3, 4])
def test_compiled_manifests_fit_default_limits_in_every_family_and_dtype(n_tables, tmp_path) -> None:
    """`attnc compile` output: every (family, dtype) has a variant within WebGPU's default 8
    storage buffers whenever the kernel without a block map fits them; where only the map
    needs more, the map variant comes first (best first) and the one without it second."""
    from attnc.lowering.manifest import compile_kernel
    from attnc.lowering.plan import Storage

    mm, sm = _reading_mods(n_tables, 40)
    kern = build_kernel(Options(mask_mod=mm, score_mod=sm), {"BM": 16, "BN": 16})
    plans = [Plan(f, s) for f in (Family.PORTABLE, Family.SUBGROUPS) for s in (Storage.F32, Storage.F16)]
    manifest = compile_kernel(kern, plans, tmp_path)
    names = [v["name"] for v in manifest["variants"]]
    assert len(names) == len(set(names))
    for f in (Family.PORTABLE, Family.SUBGROUPS):
        for s in (Storage.F32, Storage.F16):
            group = [v for v in manifest["variants"] if (v["family"], v["dtype"]) == (f.value, s.value)]
            need = [v["requires"]["limits"]["maxStorageBuffersPerShaderStage"] for v in group]
            lean = 5 + n_tables  # q k v o, doc, the tables: the kernel without the map
            assert group[0]["tunables"]["BMAP"] == 1  # the map first
            if lean + 1 <= 8:
                assert need == [lean + 1]
            elif lean <= 8:
                assert need == [lean + 1, lean] and group[1]["tunables"]["BMAP"] == 0
                assert group[1]["name"] + ".block-map" == group[0]["name"]
            else:  # nothing fits the defaults: the best variant, for devices that grant more
                assert need == [lean + 1]
