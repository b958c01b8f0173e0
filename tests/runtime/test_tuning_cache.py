"""The tuning cache is the user's file: damaged, hand-edited or written by another attnc, it
never breaks attention(). Fuzzed cache files (not JSON, wrong top-level types, entries with
fields deleted, replaced by other values or garbage, unknown fields added) under the key the
call looks up: attention() returns the reference's answer and does not raise; an entry (or a
file) it cannot use is named in one TuningCacheWarning per process, and the call takes the
heuristic plan; an entry it can use (a valid plan, perhaps another than the one stored) gives
the right answer too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.lowering import candidates as cands
from attnc.lowering import schedule
from attnc.lowering.plan import Family, Plan, Strategy, layout
from attnc.runtime import api, tuning_cache
from attnc.runtime.tuning_cache import PLAN_SCHEMA, TuningCacheWarning
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])
PROBLEMS = {"decode_gqa": dict(B=1, Hq=4, Hkv=2, S=3, T=90, D=16, Dv=16),
            "prefill": dict(B=1, Hq=2, Hkv=1, S=20, T=45, D=12, Dv=8)}
GARBAGE = st.sampled_from([None, "x", "", -1, 0, 1, 3, 7, 2**40, 1.5, True, False, [], {}, [1, 2], {"a": 1},
                           "tiled", "subgroups", "portable", 4, 8, 64, 256, -(2**31)])


@st.composite
def mutated(draw, entry: dict):
    """A cache entry made from a valid one: fields deleted, replaced, added, or the whole thing garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(GARBAGE | st.text(max_size=5))
    e = json.loads(json.dumps(entry))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["plan", "plan", "plan", "tunables", "top"]))
        obj = e if where == "top" or not isinstance(e.get(where), dict) else e[where]
        action = draw(st.sampled_from(["delete", "replace", "replace", "add", "valid"]))
        names = sorted(obj)
        if action == "add" or not names:
            obj[draw(st.sampled_from(["extra", "BK", "unroll_factor", "DVC"]))] = draw(GARBAGE)
            continue
        name = draw(st.sampled_from(names))
        if action == "delete":
            del obj[name]
        elif action == "valid" and where == "plan" and name in PLAN_SCHEMA:
            field = PLAN_SCHEMA[name]  # another value of the field's own type
            obj[name] = draw(st.sampled_from(field.values) if field.kind == "enum" else st.booleans()
                             if field.kind == "bool" else st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128]))
        else:
            obj[name] = draw(GARBAGE)
    return e


@st.composite
def cache_files(draw, key: str, entry: dict):
    """The text of a tune.json: not JSON, JSON of another shape, or entries around the call's key."""
    kind = draw(st.sampled_from(["text", "shape", "intact", "entries", "entries", "entries", "entries"]))
    if kind == "intact":  # as `attnc tune` stores it
        return json.dumps({"version": 2, "entries": {key: entry}})
    if kind == "text":
        return draw(st.sampled_from(["", "{", "not json", "\x00\xff", '{"version": 2, "entries": {'])
                    | st.text(max_size=30))
    if kind == "shape":
        data = draw(st.sampled_from([[], 2, "tune", None, {}, {"version": 2}, {"version": 1, "entries": {}},
                                     {"version": "2", "entries": {key: entry}}, {"version": 2, "entries": []},
                                     {"version": 2, "entries": "x"}, {"entries": {key: entry}}]))
        return json.dumps(data)
    entries = {key: draw(mutated(entry))}
    if draw(st.booleans()):
        entries["another|key"] = draw(mutated(entry))
    return json.dumps({"version": 2, "entries": entries})


def _problem(dev, name: str, seed: int):
    sh = PROBLEMS[name]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((sh["B"], sh["Hq"], sh["S"], sh["D"])).astype(np.float32)
    k = rng.standard_normal((sh["B"], sh["Hkv"], sh["T"], sh["D"])).astype(np.float32)
    v = rng.standard_normal((sh["B"], sh["Hkv"], sh["T"], sh["Dv"])).astype(np.float32)
    return sh, (q, k, v)


def _valid_entries(dev, dims: dict) -> list[dict]:
    """Entries `attnc tune` could store for this problem: the heuristic plan and a few candidates."""
    caps = dev.capabilities
    fams = [Family.PORTABLE] + ([Family.SUBGROUPS] if "subgroups" in dev.features else [])
    base, tun = schedule.plan_for(caps, schedule.pick_family(caps, None), dims, causal=True)
    out = [tuning_cache.plan_to_entry(base, tun, None)]
    ns0 = schedule.split_count(caps, dims, 32, 64) if dims["S"] <= 16 else None
    for i, (plan, t, ns) in enumerate(cands.candidates(caps, dims, base, fams, ns0)):
        if i % 7 == 3:
            out.append(tuning_cache.plan_to_entry(plan, t, ns))
        if len(out) == 4:
            break
    return out


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "wgpu:opengl", "dawn:vulkan"])
@settings(RUN, max_examples=12)
@given(data=st.data())
def test_fuzzed_cache_files_never_break_attention(require_adapters, tmp_path_factory, monkeypatch, spec,
                                                  data) -> None:
    dev = require_adapters(spec)[0]
    name = data.draw(st.sampled_from(sorted(PROBLEMS)))
    sh, (q, k, v) = _problem(dev, name, data.draw(st.integers(0, 2**16)))
    okey = api.prepare(sh, np.float32, device=dev, causal=True).options_key
    key = tuning_cache.key(dev, okey, sh)
    entry = data.draw(st.sampled_from(_valid_entries(dev, sh)))
    text = data.draw(cache_files(key, entry))
    cache = tmp_path_factory.mktemp("cache")
    (cache / "tune.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    ref = attention_ref(q, k, v, causal=True)
    with monkeypatch.context() as mp:
        mp.setenv("ATTNC_CACHE_DIR", str(cache))
        mp.setattr(tuning_cache, "_WARNED", set())  # the warnings of this example only
        for call in range(2):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                o = attnc.attention(q, k, v, causal=True, device=dev)
            assert_close(o, ref, 1e-5, f"o (call {call + 1}, cache {text[:300]!r})")
            ours = [w for w in seen if issubclass(w.category, TuningCacheWarning)]
            assert len(ours) <= (1 if call == 0 else 0), [str(w.message) for w in ours]
            if text == json.dumps({"version": 2, "entries": {key: entry}}):  # a choice the tuner could store
                assert not ours, [str(w.message) for w in ours]
            for w in ours:  # naming the file, and the entry's key unless the whole file is ignored
                msg = str(w.message)
                assert str(cache / "tune.json") in msg, msg
                assert repr(key) in msg or msg.startswith("attnc: ignoring the tuning cache file"), msg


def test_the_plan_schema_names_every_plan_field() -> None:
    """PLAN_SCHEMA (whose digest is in every cache key) must follow the Plan: a field added to or
    removed from Plan without a schema change would make old entries load under a new meaning."""
    stored = {f.name for f in dataclasses.fields(Plan)} - set(tuning_cache.CALL_FIELDS)
    assert set(PLAN_SCHEMA) == stored
    for f in dataclasses.fields(Plan):
        if f.name in PLAN_SCHEMA:  # each default is a value the schema accepts
            PLAN_SCHEMA[f.name].check(f.name, getattr(f.default, "value", f.default))


@pytest.mark.parametrize("facts", [{}, {"dialect": "tint"}, {"adapter_type": "CPU", "subgroup_size": 8,
                                                             "subgroup_lanes_contiguous": 8},
                                   {"adapter_type": "CPU", "subgroup_size": None, "subgroup_min_size": None,
                                    "subgroup_lanes_contiguous": 0, "features": frozenset({"timestamps"})}],
                         ids=["h200-naga", "h200-tint", "cpu-subgroups", "cpu-portable"])
def test_every_plan_the_tuner_can_store_loads_back(facts) -> None:
    """What `attnc tune` may store (the heuristic plans and every candidate, over decode, GQA
    and prefill shapes, f32 and f16) passes PLAN_SCHEMA and loads back as the same plan: a
    schema narrower than the planner (SMX=3 was refused) loses tuned choices."""
    from tests.gpu_facts import h200_like

    caps = h200_like(**facts)
    fams = [Family.PORTABLE] + ([Family.SUBGROUPS] if "subgroups" in caps.features else [])
    shapes = [dict(B=1, Hq=8, Hkv=8, S=1, T=16384, D=128, Dv=128), dict(B=1, Hq=64, Hkv=8, S=1, T=7680, D=64, Dv=64),
              dict(B=1, Hq=8, Hkv=2, S=4, T=2048, D=64, Dv=64), dict(B=1, Hq=16, Hkv=16, S=576, T=576, D=72, Dv=72),
              dict(B=2, Hq=4, Hkv=4, S=128, T=128, D=32, Dv=32), dict(B=1, Hq=8, Hkv=8, S=1, T=4096, D=256, Dv=256)]
    seen = 0
    for dims in shapes:
        for f16 in (False, True):
            base, tun = schedule.plan_for(caps, fams[-1], dims, f16=f16)
            ns0 = schedule.split_count(caps, dims, 32, 64) if dims["S"] <= 16 else None
            for plan, t, ns in [(base, tun, ns0), *cands.candidates(caps, dims, base, fams, ns0)]:
                if plan.strategy is Strategy.TILED:  # within what one invocation may hold
                    layout(plan, t["BM"], t["BN"])
                entry = json.loads(json.dumps(tuning_cache.plan_to_entry(plan, t, ns)))
                back, t_back, ns_back = tuning_cache.entry_to_plan(entry, plan.dialect, plan.storage)
                assert (back, t_back, ns_back) == (plan, t, ns), entry
                seen += 1
    assert seen > 100


def test_plans_whose_key_lanes_pass_the_contiguous_lanes_are_refused() -> None:
    """A stored lane-group (SMX=3) or lane-sum (LS=1) plan whose KL lanes per key pass the lanes
    the device's subgroup probe found contiguous would write NaN (its lane check): the cache
    refuses it by name and the tuner never offers it; within the contiguous lanes both run."""
    from attnc.lowering.schedule import device_refuses
    from tests.gpu_facts import h200_like

    four = h200_like(subgroup_size=4, subgroup_lanes_contiguous=4)
    stream = dict(family=Family.SUBGROUPS, strategy=Strategy.STREAM, vector_width=4, query_dim=128,
                  value_columns=128, workgroup_size=128)
    for kw in (dict(softmax_phase=3, lanes_per_key=8), dict(lane_sum=1, lanes_per_key=8)):
        msg = device_refuses(four, Plan(**stream, **kw))
        assert msg is not None and "KL=8 lanes per key" in msg and "found 4 contiguous lanes" in msg
        assert device_refuses(four, Plan(**stream, **{**kw, "lanes_per_key": 4})) is None
    dims = dict(B=1, Hq=64, Hkv=8, S=1, T=8192, D=128, Dv=128)
    base, _ = schedule.plan_for(four, Family.SUBGROUPS, dims, f16=True)
    for plan, _t, _ns in cands.candidates(four, dims, base, [Family.PORTABLE, Family.SUBGROUPS], 8):
        assert device_refuses(four, plan) is None, plan


KEYED = dict(B=2, Hq=8, Hkv=2, S=40, T=70, D=32, Dv=64)  # G=4, S in (32, 64], T in (64, 128]


def _entry(marker: int) -> dict:
    """A stored record told apart by `marker` (lookup returns entries as stored, unchecked)."""
    return {"plan": {"marker": marker}, "tunables": {}, "nsplit": None}


@pytest.mark.parametrize("component", ["device", "version", "plan schema", "options", "G", "D", "Dv", "S bucket",
                                       "T bucket", "small S"])
def test_each_key_component_keeps_an_entry_to_its_own_problems(tmp_path, monkeypatch, component) -> None:
    """A tuned entry is taken only by problems equal in every component of the key: a neighbour
    differing only in the adapter, attnc version, plan schema, kernel options, GQA ratio G, D, Dv
    or the S or T bucket does not take it (a key without G, Dv or the options ran a plan tuned
    for one problem on another), while problems of the same bucket (other B, head counts of the
    same ratio, S and T rounding to the same power of two; S up to 16 exact) do."""
    from attnc import _version
    from attnc.runtime.build import Options, options_key

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    dev = types.SimpleNamespace(key="wgpu|Vulkan|0x10de|H200|NVIDIA H200|550.1")
    okey = options_key(Options(causal=True))
    dims = dict(KEYED, S=3) if component == "small S" else KEYED
    tuning_cache.store(dev, okey, dims, _entry(1))

    def takes(device=dev, opts=okey, **change) -> bool:
        return tuning_cache.lookup(device, opts, {**dims, **change}) == _entry(1)

    same_bucket = ([dict(S=3, B=1, Hq=4, Hkv=1, T=128)] if component == "small S" else
                   [{}, dict(B=7), dict(Hq=16, Hkv=4), dict(S=33), dict(S=64), dict(T=65), dict(T=128),
                    dict(S=63, T=100, B=1)])
    for change in same_bucket:
        assert takes(**change), change
    neighbours = {
        "device": [dict(device=types.SimpleNamespace(key=dev.key.replace("550.1", "550.2"))),
                   dict(device=types.SimpleNamespace(key=dev.key.replace("wgpu", "dawn")))],
        "options": [dict(opts=options_key(Options())), dict(opts=options_key(Options(causal=True, f16=True))),
                    dict(opts=options_key(Options(causal=True, window=(None, 0)))),
                    dict(opts=options_key(Options(causal=True, k_format="q8_0")))],
        "G": [dict(Hkv=4), dict(Hkv=8), dict(Hq=4), dict(Hq=16)],
        "D": [dict(D=16), dict(D=33), dict(D=64)],
        "Dv": [dict(Dv=32), dict(Dv=65), dict(Dv=128)],
        "S bucket": [dict(S=32), dict(S=65), dict(S=16), dict(S=1)],
        "T bucket": [dict(T=64), dict(T=129), dict(T=1)],
        "small S": [dict(S=1), dict(S=2), dict(S=4), dict(S=16), dict(S=17)],
    }
    if component == "version":
        monkeypatch.setattr(_version, "__version__", _version.__version__ + ".post1")
        assert not takes()
    elif component == "plan schema":
        monkeypatch.setattr(tuning_cache, "SCHEMA_ID", "0" * 12)
        assert not takes()
    else:
        for change in neighbours[component]:
            assert not takes(**change), change


def test_a_rewritten_tune_json_is_read_again(tmp_path, monkeypatch) -> None:
    """tune.json is read once per process and again when its path, modification time or size
    changed: a rewrite of the same byte size (another `attnc tune` storing a winner of as many
    digits, a hand edit of one digit) is seen, as are one of another size with the old mtime
    and another cache directory holding a file of the same size and mtime."""
    dev = types.SimpleNamespace(key="wgpu|Vulkan|cpu")
    okey = "causal=False"

    def write(path, marker: int, mtime_ns: int) -> None:
        path.parent.mkdir(exist_ok=True)
        key = tuning_cache.key(dev, okey, KEYED)
        path.write_text(json.dumps({"version": tuning_cache.VERSION, "entries": {key: _entry(marker)}}))
        os.utime(path, ns=(mtime_ns, mtime_ns))

    path = tmp_path / "a" / "tune.json"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(path.parent))
    t0 = 1_700_000_000 * 10**9
    write(path, 1, t0)
    assert tuning_cache.lookup(dev, okey, KEYED) == _entry(1)
    size = path.stat().st_size
    write(path, 2, t0 + 10**9)  # the same size, a new mtime
    assert path.stat().st_size == size
    assert tuning_cache.lookup(dev, okey, KEYED) == _entry(2)
    write(path, 34, t0 + 10**9)  # another size, the same mtime
    assert tuning_cache.lookup(dev, okey, KEYED) == _entry(34)
    other = tmp_path / "b" / "tune.json"
    write(other, 56, t0 + 10**9)  # another file of the same size and mtime
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(other.parent))
    assert tuning_cache.lookup(dev, okey, KEYED) == _entry(56)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(path.parent))
    assert tuning_cache.lookup(dev, okey, KEYED) == _entry(34)


def test_the_key_names_version_and_plan_schema(require_adapters) -> None:
    from attnc._version import __version__

    dev = require_adapters("wgpu:vulkan")[0]
    k = tuning_cache.key(dev, "opts", PROBLEMS["prefill"])
    assert f"attnc {__version__}" in k and f"plan schema {tuning_cache.SCHEMA_ID}" in k


@pytest.mark.parametrize("misfit", ["workgroup-memory", "registers"])
def test_an_entry_the_lowering_refuses_warns_once_and_falls_back(require_adapters, tmp_path, monkeypatch,
                                                                 misfit) -> None:
    """A well-formed entry whose plan does not fit the device: more workgroup memory than it
    grants, or a tile far larger than its workgroup (2 invocations over 64x64 keys: 2048 scores
    each, a 1.4 MB shader that lavapipe compiled for over ten minutes, as if attention hung)."""
    dev = require_adapters("wgpu:vulkan")[0]
    sh, (q, k, v) = _problem(dev, "prefill", 0)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_WARNED", set())
    api._OPS.clear()  # attention() looks the cache up when it makes an op
    api._CALLS.clear()
    heuristic = api.prepare(sh, np.float32, device=dev)
    tun = dict(heuristic.kern.tunables)
    if misfit == "workgroup-memory":
        plan = dataclasses.replace(heuristic.plan, value_columns=1024, value_stage_columns=1024)  # > 32 KiB
    else:
        plan = dataclasses.replace(heuristic.plan, strategy=Strategy.TILED, workgroup_size=2, rows_per_invocation=4)
        tun = {"BM": 64, "BN": 64}
    tuning_cache.store(dev, heuristic.options_key, sh, tuning_cache.plan_to_entry(plan, tun, None))
    with pytest.warns(TuningCacheWarning, match="cannot lower") as seen:
        o = attnc.attention(q, k, v, device=dev)
    assert len(seen) == 1 and str(tmp_path / "tune.json") in str(seen[0].message)
    assert_close(o, attention_ref(q, k, v), 1e-5)
    assert api.prepare(sh, np.float32, device=dev).variant == heuristic.variant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnc.attention(q, k, v, device=dev)  # once per entry and process


def test_attnc_tune_writes_entries_that_load(require_adapters, tmp_path, monkeypatch, capsys) -> None:
    """`attnc tune` end to end: what it stores follows PLAN_SCHEMA and is used without a warning."""
    from attnc import cli

    dev = require_adapters("wgpu:vulkan")[0]
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_WARNED", set())
    assert cli.main(["tune", "--shape", "1,2,1,20,45,12,8", "--max", "2", "--runs", "1", "--device", dev.spec]) == 0
    assert str(tmp_path / "tune.json") in capsys.readouterr().out
    sh = PROBLEMS["prefill"]
    okey = api.prepare(sh, np.float32, device=dev).options_key
    entries = tuning_cache.load()
    assert list(entries) == [tuning_cache.key(dev, okey, sh)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned = tuning_cache.tuned_plan(dev, okey, sh, False, None, None)
    assert tuned is not None and tuning_cache.plan_to_entry(tuned.plan, tuned.tunables, None)["plan"] == \
        next(iter(entries.values()))["plan"]



def _store_many(cache_dir: str, worker: int, n: int, barrier) -> list[str]:
    """Store n entries of worker's own into the cache at cache_dir, starting with the others."""
    import os

    os.environ["ATTNC_CACHE_DIR"] = cache_dir
    dev = attnc.get_device("wgpu:vulkan")
    barrier.wait()
    errors = []
    for i in range(n):
        dims = dict(B=1, Hq=1, Hkv=1, S=1, T=1 << (i % 16), D=8 + 4 * i, Dv=8 + 4 * worker)
        try:
            tuning_cache.store(dev, f"worker{worker}", dims, {"plan": {}, "tunables": {}, "nsplit": None})
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def test_concurrent_tuners_keep_every_entry(require_adapters, tmp_path) -> None:
    """Two processes storing winners into one cache at once (two `attnc tune` runs): every entry
    of both is in the file afterwards and neither raises (a shared temporary file and an
    unlocked read-modify-write lost two thirds of them and raised FileNotFoundError)."""
    import concurrent.futures
    import multiprocessing

    require_adapters("wgpu:vulkan")
    ctx = multiprocessing.get_context("spawn")
    n = 80
    with ctx.Manager() as manager, concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        barrier = manager.Barrier(2)
        runs = [pool.submit(_store_many, str(tmp_path), w, n, barrier) for w in range(2)]
        errors = [e for r in runs for e in r.result(timeout=300)]
    assert not errors, errors[:3]
    entries = json.loads((tmp_path / "tune.json").read_text())["entries"]
    assert len(entries) == 2 * n
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


UNREADABLE_FILES = {
    "nested too deep": "[" * 100000 + "]" * 100000,
    "another format": json.dumps({"version": 3, "entries": {"k": {"plan": {}}}}),
    "truncated": '{"version": 2, "entries": {"a',
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE_FILES))
def test_a_file_attnc_cannot_read_is_ignored_and_kept_aside_by_tune(require_adapters, tmp_path, monkeypatch,
                                                                   kind) -> None:
    """A tune.json nested past Python's recursion limit (a RecursionError from prepare, attention
    and `attnc tune`), of another attnc's format or truncated: calls warn once and take the
    heuristic plan; storing a tuned entry moves the file to tune.json.unreadable, saying so,
    instead of replacing it silently. clocks.json nested as deep reads as no reference."""
    from attnc.runtime import timing

    dev = require_adapters("wgpu:vulkan")[0]
    sh, (q, k, v) = _problem(dev, "prefill", 0)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_WARNED", set())
    api._OPS.clear()
    api._CALLS.clear()
    text = UNREADABLE_FILES[kind]
    (tmp_path / "tune.json").write_text(text)
    with pytest.warns(TuningCacheWarning, match="ignoring the tuning cache file"):
        o = attnc.attention(q, k, v, device=dev)
    assert_close(o, attention_ref(q, k, v), 1e-5)
    op = api.prepare(sh, np.float32, device=dev)
    with pytest.warns(TuningCacheWarning, match=r"moved to .*tune\.json\.unreadable, and a new one started"):
        tuning_cache.store(dev, op.options_key, sh, tuning_cache.plan_to_entry(op.plan, dict(op.kern.tunables), None))
    assert (tmp_path / "tune.json.unreadable").read_text() == text
    assert tuning_cache.lookup(dev, op.options_key, sh) is not None
    (tmp_path / timing.CLOCKS_FILE).write_text(UNREADABLE_FILES["nested too deep"])
    assert timing._reference("any device") is None
    timing._remember("any device", 1.0)
    assert timing._reference("any device") == 1.0


def test_a_wait_for_the_cache_lock_is_said(tmp_path, capfd) -> None:
    """A process waiting for another's lock on the cache file says so on stderr (`attnc tune`
    finished its measurements and then sat silent while another held tune.json.lock)."""
    import threading

    from attnc.runtime.cachedir import locked

    path = tmp_path / "tune.json"
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locked(path):
            held.set()
            release.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    with locked(path):
        pass
    other.join()
    assert f"attnc: waiting for {path}.lock, which another process holds" in capfd.readouterr().err
    with locked(path):  # no wait, nothing said
        pass
    assert capfd.readouterr().err == ""
