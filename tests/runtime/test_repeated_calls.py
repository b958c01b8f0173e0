"""Repeated calls: what a call reuses of an earlier one never shows in its results.

attention() and prepared ops remember what they checked and bound for the tensors of a call
(bind groups, uniforms, the recorded pass) and record it through the native WebGPU library
where they reach it. Whatever the mode of a call (a new result tensor, a numpy result, out=,
an application's encoder) and whichever path records it, a later call never changes an
earlier call's result, a destroyed input is still an error naming it, and attention() keeps
no input of a call alive once the caller has let it go.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.kernels.flash import flash_attention
from attnc.runtime import api, dispatch
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

DIMS = dict(B=2, Hq=4, Hkv=2, S=3, T=40, D=16, Dv=8)


def qkv(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B, Hq, Hkv, S, T, D, Dv = (DIMS[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    return (rng.standard_normal((B, Hq, S, D)).astype(np.float32),
            rng.standard_normal((B, Hkv, T, D)).astype(np.float32),
            rng.standard_normal((B, Hkv, T, Dv)).astype(np.float32))


@pytest.fixture(params=["native", "api"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way of recording: the native library's C calls, and wgpu-py's API (fresh ops and
    an empty cache of attention()'s ops either way)."""
    if request.param == "api":
        monkeypatch.setattr(dispatch, "native", lambda device: None)
    api._OPS.clear()
    api._CALLS.clear()
    yield request.param
    api._OPS.clear()
    api._CALLS.clear()


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_a_later_call_never_changes_an_earlier_result(require_adapters, spec, path) -> None:
    """Two input sets, called in turn and again (the second round takes every fast path), in
    every mode; each result is checked after all calls are made."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(3)
    hosts = [qkv(rng) for _ in range(2)]
    sets = [tuple(attnc.tensor(x, dev) for x in h) for h in hosts]
    refs = [attention_ref(*h, return_lse=True) for h in hosts]
    op = attnc.prepare(*sets[0], return_lse=True)
    encoder = dev.gpu.create_command_encoder()
    results = []  # (reference index, o, lse) with o/lse GPU tensors or numpy arrays
    for _ in range(2):
        for i, (q, k, v) in enumerate(sets):
            results.append((i, *attnc.attention(q, k, v, return_lse=True)))
            results.append((i, attnc.attention(q, k, v), None))
            results.append((i, *attnc.attention(q, k, v, return_lse=True, output="numpy")))
            outs = attnc.zeros((2, 4, 3, 8), device=dev), attnc.zeros((2, 4, 3), device=dev)
            results.append((i, *attnc.attention(q, k, v, return_lse=True, out=outs[0], out_lse=outs[1])))
            outs = attnc.zeros((2, 4, 3, 8), device=dev), attnc.zeros((2, 4, 3), device=dev)
            results.append((i, *op(q, k, v, out=outs[0], out_lse=outs[1])))
            outs = attnc.zeros((2, 4, 3, 8), device=dev), attnc.zeros((2, 4, 3), device=dev)
            results.append((i, *op(q, k, v, out=outs[0], out_lse=outs[1], encoder=encoder)))
    dev.gpu.queue.submit([encoder.finish()])
    gpu_outputs = [t for _, o, lse in results for t in (o, lse) if isinstance(t, attnc.Tensor)]
    assert len({id(t.buffer) for t in gpu_outputs}) == len(gpu_outputs)  # no result shares another's buffer
    for n, (i, o, lse) in enumerate(results):
        o = o.numpy() if isinstance(o, attnc.Tensor) else o
        assert_close(o, refs[i][0], 1e-5, f"o of call {n}")
        if lse is not None:
            assert_close(lse.numpy() if isinstance(lse, attnc.Tensor) else lse, refs[i][1], 1e-5, f"lse of call {n}")


def _entry_points(dev):
    """attention(), paged_attention() and a built kernel, each as f(q, k, v, placed, **call
    options): the host arrays q, k, v (K/V of Hkv heads), passed as `placed(i, array)` gives
    the i-th operand (the array or a GPU tensor of it)."""
    built = attnc.build(flash_attention, device=dev)

    def paged(q, k, v, placed, **kw):
        B, Hkv, T, _ = k.shape  # (pages of T // 4 keys, row b's in its own pages)
        pages = lambda x: np.ascontiguousarray(x.reshape(B, Hkv, 4, T // 4, x.shape[-1])  # noqa: E731
                                               .transpose(0, 2, 1, 3, 4).reshape(B * 4, Hkv, T // 4, x.shape[-1]))
        table = np.arange(B * 4, dtype=np.int32).reshape(B, 4)
        return attnc.paged_attention(placed(0, q), placed(1, pages(k)), placed(2, pages(v)), table, device=dev, **kw)

    def kernel(q, k, v, placed, **kw):
        group = q.shape[1] // k.shape[1]  # (a built kernel takes K/V with q's heads)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        return built(q=placed(0, q), k=placed(1, k), v=placed(2, v), scale=q.shape[-1] ** -0.5, **kw)

    return {"attention": lambda q, k, v, placed, **kw: attnc.attention(placed(0, q), placed(1, k), placed(2, v),
                                                                       device=dev, **kw),
            "paged_attention": paged, "build": kernel}


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("entry", ["attention", "paged_attention", "build"])
@pytest.mark.parametrize("inputs", ["host", "gpu", "host_q"])
def test_a_result_handed_to_the_caller_is_never_written_by_a_later_call(require_adapters, spec, path, entry,
                                                                        inputs) -> None:
    """Every GPU tensor attention(), paged_attention() or a built kernel hands its caller
    (output="tensor" over host inputs, GPU inputs, a mix) is its own: calls with other data
    through the same cached op leave it as it was."""
    dev = require_adapters(spec)[0]
    call = _entry_points(dev)[entry]
    rng = np.random.default_rng(7)
    hosts = [qkv(rng) for _ in range(3)]

    def placed(i, x):
        return x if inputs == "host" or (inputs == "host_q" and i == 0) else attnc.tensor(x, dev)

    results = []
    for i in (0, 1, 2, 0, 1):
        o = call(*hosts[i], placed, output="tensor")
        assert isinstance(o, attnc.Tensor)
        results.append((i, o))
    assert len({id(o.buffer) for _, o in results}) == len(results)
    for n, (i, o) in enumerate(results):
        assert_close(o.numpy(), attention_ref(*hosts[i]), 1e-5, f"o of call {n}")


def test_attention_keeps_no_input_alive_and_checks_destroyed_ones(require_adapters, path) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(4))
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    for _ in range(3):
        o = attnc.attention(qt, kt, vt)
    assert_close(o.numpy(), attention_ref(q, k, v), 1e-5)
    buffers = [weakref.ref(t.buffer) for t in (qt, kt, vt)]
    del qt, kt, vt
    gc.collect()
    assert [b() for b in buffers] == [None, None, None]
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    for _ in range(2):
        attnc.attention(qt, kt, vt)
    vt.buffer.destroy()
    with pytest.raises(ValueError, match="^v: its GPU buffer was destroyed"):
        attnc.attention(qt, kt, vt)


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("mode", ["op_out", "op_encoder", "attention_out", "op_new_inputs"])
def test_no_call_keeps_a_tensor_alive_once_the_caller_lets_it_go(require_adapters, spec, path, mode) -> None:
    """What an op remembers of a call (its bind groups and recorded pass) goes with the
    call's tensors: a loop that passes new tensors at every call (a new out=, new inputs)
    frees each set once it drops it, and the op still answers right afterwards."""
    dev = require_adapters(spec)[0]
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng)
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    op = attnc.prepare(qt, kt, vt)
    dropped = []
    for _ in range(3):
        out = attnc.zeros((2, 4, 3, 8), device=dev)
        ins = tuple(attnc.tensor(x, dev) for x in (q, k, v)) if mode == "op_new_inputs" else (qt, kt, vt)
        if mode == "op_out":
            op(*ins, out=out)
        elif mode == "op_encoder":
            encoder = dev.gpu.create_command_encoder()
            op(*ins, out=out, encoder=encoder)
            dev.gpu.queue.submit([encoder.finish()])
            del encoder
        elif mode == "attention_out":
            attnc.attention(*ins, out=out)
        else:
            out = op(*ins)
        assert_close(out.numpy(), attention_ref(q, k, v), 1e-5, mode)
        mine = () if mode == "op_new_inputs" else (out,)  # (a prepared op's own output is its to keep)
        dropped += [weakref.ref(t.buffer) for t in (*mine, *ins) if t not in (qt, kt, vt)]
        del out, ins, mine
    gc.collect()
    assert [b() for b in dropped] == [None] * len(dropped)
    out = attnc.zeros((2, 4, 3, 8), device=dev)
    op(qt, kt, vt, out=out)
    assert_close(out.numpy(), attention_ref(q, k, v), 1e-5, "after the dropped calls")


def test_errors_of_the_recorded_commands_are_raised(require_adapters, path) -> None:
    """Recording into an encoder that was finished already is WebGPU's validation error,
    raised by the call whichever path recorded it."""
    dev = require_adapters("wgpu:vulkan")[0]
    qt, kt, vt = (attnc.tensor(x, dev) for x in qkv(np.random.default_rng(5)))
    op = attnc.prepare(qt, kt, vt)
    out = attnc.zeros((2, 4, 3, 8), device=dev)
    finished = dev.gpu.create_command_encoder()
    finished.finish()
    with pytest.raises(dev.wgpu.GPUValidationError):  # a call that binds
        op(qt, kt, vt, out=out, encoder=finished)
    op(qt, kt, vt, out=out, encoder=dev.gpu.create_command_encoder())
    with pytest.raises(dev.wgpu.GPUValidationError):  # a call that records what it remembered
        op(qt, kt, vt, out=out, encoder=finished)


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@pytest.mark.parametrize("compile_log", [False, True], ids=["", "compile_log"])
def test_repeated_calls_rebuild_the_block_map_from_new_mask_data(require_adapters, spec, path, compile_log,
                                                                 tmp_path, monkeypatch) -> None:
    """A mask reading document ids from a GPU tensor has a block map (classify and compact
    before the attention pass, lowering/blocks.py). The ids are rewritten in place between
    calls that reuse what an earlier call bound (attention()'s remembered call, a prepared
    op's recorded pass submitted on its own or into the application's encoder): each call
    gives the result of the ids it ran with, so the map is made anew each time. Tiles empty
    under one set of ids are live or full under the other, and documents end inside tiles."""
    if compile_log:  # a diagnostic log changes nothing of what a repeated call reuses
        monkeypatch.setenv("ATTNC_COMPILE_LOG", str(tmp_path / "compile.jsonl"))
    dev = require_adapters(spec)[0]
    B, H, T = 2, 2, 256
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((B, H, T, 16)).astype(np.float32) for _ in range(3))
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    ids = [np.stack([np.repeat(np.arange(4), 64), np.repeat(np.arange(2), 128)]).astype(np.int32),
           np.stack([np.zeros(T), np.repeat(np.arange(3), [50, 100, 106])]).astype(np.int32)]
    doc = attnc.tensor(ids[0], dev)

    def mask_mod(b, h, i, j):
        return doc[b, i] == doc[b, j]
    op = attnc.prepare(qt, kt, vt, mask_mod=mask_mod)
    assert [p.name for p in op.progs][:3] == ["classify", "compact", "main"]
    out, recorded = attnc.zeros((B, H, T, 16), device=dev), attnc.zeros((B, H, T, 16), device=dev)
    for n in range(4):
        d = ids[n % 2]
        doc.write(d)
        groups = dev.counters.bind_groups_created
        got = {"attention()": attnc.attention(qt, kt, vt, mask_mod=mask_mod).numpy(),
               "op": op(qt, kt, vt).numpy(), "op with out=": op(qt, kt, vt, out=out).numpy()}
        encoder = dev.gpu.create_command_encoder()
        op(qt, kt, vt, out=recorded, encoder=encoder)
        dev.gpu.queue.submit([encoder.finish()])
        got["op with encoder="] = recorded.numpy()
        if n:  # every call reused an earlier one's: only attention()'s new output was bound
            assert dev.counters.bind_groups_created - groups == 1
        ref = attention_ref(q, k, v, mask_mod=lambda b, h, i, j, d=d: d[b, i] == d[b, j])
        for name, o in got.items():
            assert_close(o, ref, 1e-5, f"{name}, call {n}")


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
@settings(deadline=None, max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.sampled_from(["host", "gpu", "attention"]), st.integers(0, 2),
                                st.sampled_from([0, 5])), min_size=3, max_size=7))
def test_the_block_map_is_kept_only_while_its_host_data_is_unchanged(require_adapters, spec, calls) -> None:
    """A prepared op whose mask reads host arrays keeps its block map between calls with the
    same bytes and uniforms (the map's passes are left out), and builds it again when the data,
    a captured number (a uniform) or the kind of tensor changes (a GPU tensor's contents may
    change unseen: such calls always build it, and the next host call builds it again). Every
    call of a drawn sequence matches float64; the map's passes run exactly when the map of the
    op's scratch was not made from this call's host data by the op's previous call."""
    dev = require_adapters(spec)[0]
    B, H, T = 1, 2, 96
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((B, H, T, 16)).astype(np.float32) for _ in range(3))
    ids = [np.repeat(np.arange(3), [20, 40, 36])[None].astype(np.int32),
           np.repeat(np.arange(2), [70, 26])[None].astype(np.int32),
           np.zeros((1, T), np.int32)]
    holder = {"doc": ids[0], "shift": 0}

    def mask_mod(b, h, i, j):
        return (holder["doc"][b, i] == holder["doc"][b, j]) & (j <= i + holder["shift"])
    op = api.prepare_dims(dict(B=B, Hq=H, Hkv=H, S=T, T=T, D=16, Dv=16), mask_mod=mask_mod, device=dev)
    assert [p.name for p in op.progs][:2] == ["classify", "compact"]
    ran: list[int] = []
    real_pass = op._pass
    op._pass = lambda items: (ran.append(len(items)), real_pass(items))[1]
    full = len(op.progs)
    last = None  # (ids index, shift) the op's map was made from by a host call, if the previous call
    kept = 0
    # a host call repeated, a GPU call between two of the same host data, a changed uniform,
    # then a drawn sequence
    fixed = [("host", 0, 0), ("host", 0, 0), ("gpu", 1, 0), ("host", 0, 0), ("host", 0, 5), ("host", 0, 5)]
    for kind, which, shift in [*fixed, *calls]:
        holder["doc"], holder["shift"] = ids[which], shift
        ran.clear()
        if kind == "attention":
            got = attnc.attention(q, k, v, mask_mod=mask_mod, device=dev)
        else:
            doc = ids[which] if kind == "host" else attnc.tensor(ids[which], dev)
            got = op(q, k, v, doc=doc, shift=shift)
        want = attention_ref(q, k, v, mask_mod=lambda b, h, i, j, d=ids[which], s=shift: (d[b, i] == d[b, j])
                             & (j <= i + s))
        assert_close(got, want, 1e-5, f"{kind} call with ids {which}, shift {shift}")
        if kind != "attention":
            assert ran == [full - 2 if kind == "host" and last == (which, shift) else full], (kind, last)
            kept += ran == [full - 2]
            last = (which, shift) if kind == "host" else None
    assert kept  # the repeated host call at least


@pytest.mark.parametrize("spec", ["wgpu:vulkan"])  # host-side logic: one adapter, both recording paths
def test_host_arrays_a_prepared_op_holds_are_read_at_every_call(require_adapters, spec, path) -> None:
    """Host arrays given to attnc.prepare (kv_lens, bias, sinks) and the ones its mods capture (a
    table a score_mod gathers from, document ids a mask reads, which get a block map) are edited
    in place between calls: every call in every mode (numpy result; GPU tensors again, which
    replays the recorded pass; out=; the application's encoder; bind/run) computes with the
    values they hold then, as attention() does (a prepared op once kept the values it was
    prepared with). A repeated GPU call binds nothing new, changed data or not."""
    dev = require_adapters(spec)[0]
    B, Hq, Hkv, S, T, D = 2, 4, 2, 40, 64, 16
    rng = np.random.default_rng(14)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, T, D)).astype(np.float32) for _ in range(2))
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    lens = np.array([T, 30], np.int32)
    bias = rng.standard_normal((Hq, 1, T)).astype(np.float32)
    sinks = np.zeros(Hq, np.float32)
    table = rng.standard_normal((Hq, 8)).astype(np.float32)
    doc = np.repeat(np.arange(4), 16)[None].repeat(B, 0).astype(np.int32)

    def score_mod(s, b, h, i, j):
        return s + table[h, j % 8]

    def mask_mod(b, h, i, j):
        return doc[b, i] == doc[b, j]
    options = dict(kv_lens=lens, bias=bias, sinks=sinks)
    op = attnc.prepare(qt, kt, vt, score_mod=score_mod, mask_mod=mask_mod, **options)
    out = attnc.zeros((B, Hq, S, D), device=dev)
    for n in range(4):
        if n:  # every array changed in place (the op holds the same objects)
            lens[1] = (lens[1] + 13) % (T + 1)
            bias *= -1.5
            sinks[:] = rng.standard_normal(Hq)
            table[:, n] += 2.0
            doc[1] = np.repeat(np.arange(2 + n), [T // (2 + n)] * (1 + n) + [T - T // (2 + n) * (1 + n)])
        ref = attention_ref(q, k, v, **options, score_mod=lambda s, b, h, i, j: s + table[h, j % 8],
                            mask_mod=lambda b, h, i, j: doc[b, i] == doc[b, j])
        groups = dev.counters.bind_groups_created
        got = {"op (GPU tensors)": op(qt, kt, vt).numpy(), "op (numpy)": op(q, k, v),
               "op with out=": op(qt, kt, vt, out=out).numpy()}
        if n:
            assert dev.counters.bind_groups_created == groups  # the replays and the host call's groups
        encoder = dev.gpu.create_command_encoder()
        op(qt, kt, vt, out=out, encoder=encoder)
        dev.gpu.queue.submit([encoder.finish()])
        got["op with encoder="] = out.numpy()
        op.bind(q, k, v).run()
        got["bind/run"] = op.result()[0]
        for name, o in got.items():
            assert_close(o, ref, 1e-5, f"{name}, call {n}")


@pytest.mark.parametrize("inputs", ["host", "gpu"])
def test_a_call_without_an_argument_takes_the_prepared_value_again(require_adapters, path, inputs) -> None:
    """Calls that pass an option array or a mod's capture by name, then leave it out, then pass a
    scalar input by name with another value over the same tensors: each call computes with
    what it was given, or else with what the op was prepared with, never with what an earlier
    call passed (a prepared default's buffer that an override wrote, or a remembered call that
    told scalar values apart by their type only, would return the earlier call's result)."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(23)
    q, k, v = qkv(rng)
    Hq, T = DIMS["Hq"], DIMS["T"]
    lens, bias = np.array([T, 17], np.int32), rng.standard_normal((Hq, 1, T)).astype(np.float32)
    sinks, slopes = rng.standard_normal(Hq).astype(np.float32), rng.uniform(0.1, 1.0, Hq).astype(np.float32)
    table, mult = rng.standard_normal((Hq, 8)).astype(np.float32), 1.5

    def score_mod(s, b, h, i, j):
        return s * mult + table[h, j % 8]

    prepared = dict(kv_lens=lens, bias=bias, sinks=sinks, alibi_slopes=slopes)
    others = dict(kv_lens=np.array([5, 40], np.int32), bias=-3.0 * bias, sinks=sinks + 2.0, alibi_slopes=slopes / 4,
                  table=rng.standard_normal((Hq, 8)).astype(np.float32))
    args = (q, k, v) if inputs == "host" else tuple(attnc.tensor(x, dev) for x in (q, k, v))
    op = attnc.prepare(*args, score_mod=score_mod, **prepared)

    def ref(m: float = mult, tab: np.ndarray = table, **given: np.ndarray) -> np.ndarray:
        return attention_ref(q, k, v, **{**prepared, **given}, score_mod=lambda s, b, h, i, j: s * m + tab[h, j % 8])

    def call(**named):
        o = op(*args, **named)
        return o if inputs == "host" else o.numpy()
    assert_close(call(), ref(), 1e-5, "prepared values")
    for name, other in others.items():
        given = {"tab": other} if name == "table" else {name: other}
        assert_close(call(**{name: other}), ref(**given), 1e-5, f"{name} passed")
        assert_close(call(), ref(), 1e-5, f"{name} left out after it was passed")
    for m in (4.0, 1.5, 4.0, -2.0):
        assert_close(call(mult=m), ref(m), 1e-5, f"mult={m} by name")
    assert_close(call(mult=1), ref(1.0), 1e-5, "an int for the f32 input")


def test_captures_rebound_after_prepare_are_passed_by_name(require_adapters) -> None:
    """A mod's variables rebound after attnc.prepare (a new table, a new number): the op keeps
    what it captured (as docs/API.md says), attention() scans the mods again and sees the new
    ones, and the op takes them by the variables' names, host array, GPU tensor or number."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
    alpha, tab = 3.0, np.zeros(2, np.float32)

    def score_mod(s, b, h, i, j):
        return s * alpha + tab[h]

    def ref(a, t):
        return attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s * a + t[h])
    op = attnc.prepare(q, k, v, score_mod=score_mod, device=dev)
    assert_close(op(q, k, v), ref(3.0, tab), 1e-5)
    old = tab
    alpha, tab = 0.5, np.array([1.0, -1.0], np.float32)
    assert_close(op(q, k, v), ref(3.0, old), 1e-5, "the op's own captures")
    assert_close(attnc.attention(q, k, v, score_mod=score_mod, device=dev), ref(0.5, tab), 1e-5, "attention()")
    assert_close(op(q, k, v, tab=tab, alpha=alpha), ref(0.5, tab), 1e-5, "by name")
    assert_close(op(q, k, v, tab=attnc.tensor(tab, dev), alpha=alpha), ref(0.5, tab), 1e-5, "a GPU tensor by name")


def test_traced_kernels_programs_and_pipelines_are_bounded(require_adapters, monkeypatch) -> None:
    """An application making new mods keeps at most the most recently used traced kernels,
    program sets and pipelines (they grew without bound, about 2 MB a mod): with the caches
    shrunk to 2 (3 pipelines past the ones already compiled), four mods that trace to four
    kernels leave the caches at their size, and the first mod again traces anew and is right."""
    from attnc.runtime import build

    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setattr(build._CACHE.kernels, "size", 2)
    monkeypatch.setattr(build._CACHE.programs, "size", 2)
    monkeypatch.setattr(dev.pipelines._entries, "size", len(dev.pipelines) + 3)
    rng = np.random.default_rng(16)
    q, k, v = (rng.standard_normal((1, 2, 5, 16)).astype(np.float32) for _ in range(3))
    mods = [lambda s, b, h, i, j: s * 0.5,
            lambda s, b, h, i, j: s + attnc.f32(j - i) * 0.01,
            lambda s, b, h, i, j: attnc.where(j <= i, s, s - 1.0),
            lambda s, b, h, i, j: s - attnc.f32(h) * 0.1]
    refs = [lambda s, b, h, i, j: s * 0.5, lambda s, b, h, i, j: s + (j - i) * 0.01,
            lambda s, b, h, i, j: np.where(j <= i, s, s - 1.0), lambda s, b, h, i, j: s - h * 0.1]
    for n in (0, 1, 2, 3, 0):
        api._OPS.clear()  # attention()'s own ops (the 32 most recent) would keep the kernel alive
        api._CALLS.clear()
        traces = build._CACHE.traces
        o = attnc.attention(q, k, v, score_mod=mods[n], device=dev)
        assert_close(o, attention_ref(q, k, v, score_mod=refs[n]), 1e-5, f"mod {n}")
        assert build._CACHE.traces == traces + 1  # the first mod's kernel was dropped by the others
        assert len(build._CACHE.kernels) <= 2 and len(build._CACHE.programs) <= 2
        assert len(dev.pipelines) <= dev.pipelines._entries.size
    api._OPS.clear()
