"""attnc.paged_attention: K/V in pages read through a block table (the shipped flash kernel with
indirect indexing), against the float64 reference on the same keys gathered contiguously."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, max_examples=2,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def paged_problem(rng, B, Hq, Hkv, S, D, P, NB, spare, dtype=np.float32):
    """q, the page pools, a block table of distinct pages in random order, and the contiguous
    k and v [B, Hkv, NB * P, D] that the table describes."""
    NP = B * NB + spare
    q = rng.standard_normal((B, Hq, S, D)).astype(dtype)
    kp = rng.standard_normal((NP, Hkv, P, D)).astype(dtype)
    vp = rng.standard_normal((NP, Hkv, P, D)).astype(dtype)
    table = rng.permutation(NP)[:B * NB].reshape(B, NB).astype(np.int32)
    k = kp[table].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, NB * P, D)
    v = vp[table].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, NB * P, D)
    return q, kp, vp, table, k, v


@RUN
@given(data=st.data())
def test_paged_matches_the_reference(device, data) -> None:
    """Random page sizes, tables, lengths, GQA ratios, prefill and decode rows, and options."""
    B, Hkv, group = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 4]))
    S, P, NB = data.draw(st.sampled_from([1, 5])), data.draw(st.sampled_from([1, 4, 16])), data.draw(st.integers(1, 4))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    q, kp, vp, table, k, v = paged_problem(rng, B, Hkv * group, Hkv, S, 16, P, NB, spare=3)
    T = NB * P
    opts: dict = {}
    if data.draw(st.booleans()):
        opts["kv_lens"] = rng.integers(0, T + 1, B).astype(np.int32)
        # entries past a row's length may hold anything: the kernel never needs them
        for b in range(B):
            table[b, -(-int(opts["kv_lens"][b]) // P):] = 10**6
    opts["causal"] = data.draw(st.booleans())
    if data.draw(st.booleans()):
        opts["window"] = (int(rng.integers(0, T)), None)
    if data.draw(st.booleans()):
        opts["softcap"] = 5.0
    if data.draw(st.booleans()):
        opts["sinks"] = rng.standard_normal(Hkv * group).astype(np.float32)
    if data.draw(st.booleans()):
        opts["alibi_slopes"] = rng.random(Hkv * group).astype(np.float32)
    keep = rng.random((B, T)) < 0.8  # a mask_mod reading a captured array

    def mask(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    o, lse = attnc.paged_attention(q, kp, vp, table, mask_mod=mask, return_lse=True, device=device, **opts)
    ref_o, ref_lse = attention_ref(q, k, v, mask_mod=lambda b, h, i, j: keep[b, j],
                                   return_lse=True, **opts)
    assert_close(o, ref_o, 1e-5)
    assert_close(lse, ref_lse, 1e-5, "lse")


@pytest.mark.sanitize
def test_paged_gpu_tensors_and_decode_split(device) -> None:
    """GPU tensors in and out, a long decode (split-KV), f16 pages; the table's padding past
    row 1's pages (-1) is never read outside the pool (the sanitizer run checks every index)."""
    rng = np.random.default_rng(3)
    q, kp, vp, table, k, v = paged_problem(rng, 2, 8, 2, 1, 32, 16, 24, spare=5, dtype=np.float16)
    lens = np.array([384, 150], np.int32)
    table[1, -(-150 // 16):] = -1
    gq, gk, gv = (attnc.tensor(x, device=device) for x in (q, kp, vp))
    gt, gl = attnc.tensor(table, device=device), attnc.tensor(lens, device=device)
    o = attnc.paged_attention(gq, gk, gv, gt, kv_lens=gl, causal=True).numpy()
    assert_close(o, attention_ref(q, k, v, kv_lens=lens, causal=True), 2e-3)


@pytest.mark.parametrize("length", [5, 6, 7, 8, 9])
def test_the_entry_of_a_partial_last_page_is_checked(length) -> None:
    """Rows whose length is not a multiple of the page size (P = 4) use ceil(length / P)
    entries: the last, partly filled page's entry is checked (just inside the pool: runs;
    just outside or negative: named), the entries after it are padding."""
    rng = np.random.default_rng(length)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    kp, vp = (rng.standard_normal((3, 2, 4, 8)).astype(np.float32) for _ in range(2))
    last = -(-length // 4) - 1  # the entry of the row's last page
    for entry, ok in ((2, True), (3, False), (-1, False)):
        table = np.array([[0, 1, 0]], np.int32)
        table[0, last] = entry
        table[0, last + 1:] = 99  # padding past the row's pages
        if ok:
            attnc.paged_attention(q, kp, vp, table, kv_lens=np.array([length]))
            continue
        with pytest.raises(ValueError, match=rf"block_table\[0, {last}\] = {entry} is outside the page pool"):
            attnc.paged_attention(q, kp, vp, table, kv_lens=np.array([length]))


def test_a_table_entry_past_the_pool_is_named(device) -> None:
    rng = np.random.default_rng(4)
    q, kp, vp, table, _, _ = paged_problem(rng, 2, 2, 1, 1, 8, 4, 3, spare=0)
    bad = table.copy()
    bad[1, 1] = kp.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6 is outside the page pool: .* hold 6 pages"):
        attnc.paged_attention(q, kp, vp, bad, device=device)
    with pytest.raises(ValueError, match=r"block_table: expected shape \(2, max_pages\)"):
        attnc.paged_attention(q, kp, vp, table[:1], device=device)
    with pytest.raises(ValueError, match=r"v_pages shape .* does not match k_pages"):
        attnc.paged_attention(q, kp, vp[:, :, :2], table, device=device)
    # a row longer than its table's pages hold (3 entries of 4 keys): the table is named
    with pytest.raises(ValueError, match=r"kv_lens\[1\] = 13 needs 4 pages of 4 keys, but block_table has 3 "
                                         r"entries per row \(12 keys\)"):
        attnc.paged_attention(q, kp, vp, table, kv_lens=np.array([5, 13]), device=device)


STREAM_PAGED = [  # (plan fields, BM, BN): the stream strategy with each softmax placement
    (dict(lanes_per_key=2, softmax_phase=0), 4, 32),
    (dict(lanes_per_key=1, softmax_phase=1), 8, 64),
    (dict(lanes_per_key=4, softmax_phase=0), 1, 32),
    (dict(lanes_per_key=1, softmax_phase=2), 2, 32),
    (dict(lanes_per_key=4, softmax_phase=1), 8, 32),
]


@pytest.mark.sanitize
@pytest.mark.parametrize("fields,BM,BN", STREAM_PAGED)
@RUN
@given(data=st.data())
def test_paged_stream_plans_share_each_keys_page(fields, BM, BN, device, data) -> None:
    """The stream strategy finds each key's V row through the table once per tile and shares
    it (workgroup memory), and its K row too where several lanes read a key (found for the
    next tile during this one): pages smaller and larger than a tile, tables in any order, GQA rows
    packed or not, split KV or not, lengths that end inside a page, with and without a mask
    that reads data (the loop over a block map's listed tiles)."""
    from attnc.lowering import Family, Plan, Strategy

    plan = Plan(Family.PORTABLE, strategy=Strategy.STREAM, workgroup_size=32, keys_per_step=4, query_dim=16,
                value_columns=16, vector_width=4, **fields)
    _check_paged_stream(device, plan, BM, BN, data)


@pytest.mark.sanitize
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("kl,BM", [(4, 1), (2, 2)])
@RUN
@given(data=st.data())
def test_paged_lane_groups(spec, kl, BM, data, require_adapters) -> None:
    """The stream strategy's lane groups (SMX=3, subgroups) find each key's K and V rows through
    the table in every lane of the key's group: the same pages, orders, lengths and masks."""
    from attnc.lowering import Family, Plan, Strategy
    from tests.forced_plan import dialect

    dev = require_adapters(spec)[0]
    plan = Plan(Family.SUBGROUPS, dialect=dialect(dev), workgroup_size=32,
                strategy=Strategy.STREAM, lanes_per_key=kl, keys_per_step=2, softmax_phase=3, query_dim=16,
                value_columns=16, vector_width=4, prefetch=data.draw(st.sampled_from([0, 1])))
    _check_paged_stream(dev, plan, BM, 32, data)


def _check_paged_stream(device, plan, BM: int, BN: int, data) -> None:
    """A paged problem (random pages, table order, lengths, GQA, splits, a data mask or not)
    through a forced stream plan, against the reference on the gathered K/V."""
    from attnc.lowering import Strategy
    from attnc.runtime import api

    B, Hkv, group = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 3]))
    S, P = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1, 5, 16, 128]))
    NB = data.draw(st.integers(1, max(1, 200 // P)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    q, kp, vp, table, k, v = paged_problem(rng, B, Hkv * group, Hkv, S, 16, P, NB, spare=2)
    T = NB * P
    lens = rng.integers(0, T + 1, B).astype(np.int32)
    dims = dict(B=B, Hq=Hkv * group, Hkv=Hkv, S=S, T=T, D=16, Dv=16, NP=kp.shape[0], P=P, NB=NB)
    keep = rng.random((B, T)) < 0.6
    mods = {"mask_mod": lambda b, h, i, j: keep[b, j]} if data.draw(st.booleans()) else {}  # a block map: listed tiles
    op = api.prepare_dims(dims, paged=True, kv_lens=lens, causal=True, return_lse=True, device=device, plan=plan,
                          tunables={"BM": BM, "BN": BN}, nsplit=data.draw(st.sampled_from([None, 1, 3])),
                          inputs={"block_table": table}, **mods)
    assert op.plan.strategy is Strategy.STREAM
    main = next(p for p in op.progs if p.name == "main")
    lane_groups = plan.softmax_phase == 3  # (each group finds its keys' rows itself)
    assert ("vb_sh" in main.wgsl) != lane_groups  # the gathered V row bases are shared
    assert ("kb_sh" in main.wgsl) == (plan.lanes_per_key > 1 and not lane_groups)  # and K's, where lanes share a key
    o, lse = op(q, kp, vp)
    ref_o, ref_lse = attention_ref(q, k, v, kv_lens=lens, causal=True, return_lse=True, **mods)
    assert_close(o, ref_o, 1e-5, "o")
    assert_close(lse, ref_lse, 1e-5, "lse")
