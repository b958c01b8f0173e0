"""Autotuning: time the valid variants of a problem on a device and remember the fastest.

Candidates are plans (strategy, family, tunables, split count) that fit the device's own
limits; each is compiled, checked against the float64 reference on the tuning inputs, and
timed with GPU timestamps (median). The winner is stored in a JSON file in the user cache
directory, keyed by adapter identity and driver, attnc version, kernel options and a shape
bucket, and `attnc.attention` uses it for every later call in that bucket. No vendor names
are involved: the choice is whatever measured fastest on that adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnc.bench.timing import rotation_count
from attnc.errors import AttncError
from attnc.lowering.plan import DEFAULT_LIMITS, Dialect, Family, Plan, Storage, Strategy, layout, stream_layout
from attnc.runtime.api import chunked_p, lanes_widths, pow2ceil, row_tiles, stream_plan, wide_value_block
from attnc.runtime.devices import Device
from attnc.runtime.dispatch import warm_up

VERSION = 1


def cache_path() -> Path:
    """The tuning cache file: $ATTNC_CACHE_DIR, else $XDG_CACHE_HOME/attnc, else ~/.cache/attnc."""
    base = os.environ.get("ATTNC_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / "attnc")
    return Path(base) / "tune.json"


def bucket(dims: dict[str, int]) -> str:
    """Shapes that share a tuned choice: exact head dims and GQA ratio, S and T by power of two."""
    S, T = dims["S"], dims["T"]
    s = str(S) if S <= 16 else f"~{pow2ceil(S)}"
    return f"S{s}.T~{pow2ceil(T)}.D{dims['D']}.Dv{dims['Dv']}.G{dims['Hq'] // dims['Hkv']}"


def key(device: Device, options_key: str, dims: dict[str, int]) -> str:
    """The cache key: adapter identity and driver, attnc version, kernel options, shape bucket."""
    from attnc._version import __version__

    return f"{device.key}|attnc {__version__}|{options_key}|{bucket(dims)}"


def load() -> dict[str, Any]:
    """The whole cache (empty when missing or unreadable)."""
    p = cache_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("version") == VERSION else {}


def lookup(device: Device, options_key: str, dims: dict[str, int]) -> dict[str, Any] | None:
    """The tuned choice for this problem, if one was stored."""
    return load().get(key(device, options_key, dims))


def store(device: Device, options_key: str, dims: dict[str, int], entry: dict[str, Any]) -> None:
    """Record a tuned choice (atomically replacing the cache file)."""
    entries = load()
    entries[key(device, options_key, dims)] = entry
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "entries": entries}, indent=1, sort_keys=True))
    tmp.replace(p)


def plan_to_entry(plan: Plan, tunables: dict[str, int], nsplit: int | None) -> dict[str, Any]:
    """A JSON-able record of a plan choice (dialect and storage come from the call)."""
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
         if f.name not in ("dialect", "storage", "overrides")}
    d["family"] = plan.family.value
    d["strategy"] = plan.strategy.value
    return {"plan": d, "tunables": tunables, "nsplit": nsplit}


def entry_to_plan(entry: dict[str, Any], dialect: Dialect, storage: Storage) -> tuple[Plan, dict[str, int], int | None]:
    """The plan, kernel tunables and split count a cache entry describes."""
    d = dict(entry["plan"])
    d["family"] = Family(d["family"])
    d["strategy"] = Strategy(d["strategy"])
    return Plan(dialect=dialect, storage=storage, **d), dict(entry["tunables"]), entry.get("nsplit")


RETIME = 6  # candidates timed again, interleaved, before the choice

# (BN, WG, KL, KC) of the stream strategy, most promising first
STREAM_SHAPES = [(64, 128, 2, 4), (128, 128, 2, 4), (64, 64, 2, 4), (128, 256, 2, 4), (64, 128, 1, 4),
                 (32, 64, 2, 4)]


def fits(device: Device, plan: Plan, tun: dict[str, int]) -> bool:
    """Whether a candidate is valid and fits the device's limits (and default limits if portable-only)."""
    lim = device.gpu.limits
    if plan.strategy is Strategy.ROWS:
        return tun["BM"] <= int(lim.get("max-compute-invocations-per-workgroup", 256))
    if plan.strategy is Strategy.LANES:
        return tun["BM"] // plan.TM <= int(lim.get("max-compute-invocations-per-workgroup", 256))
    if plan.strategy is Strategy.STREAM:
        try:
            slay = stream_layout(plan, tun["BM"], tun["BN"])
        except AttncError:
            return False
        smem = int(lim.get("max-compute-workgroup-storage-size", DEFAULT_LIMITS["max-compute-workgroup-storage-size"]))
        return 4 * slay.smem_words <= smem and plan.WG <= int(lim.get("max-compute-invocations-per-workgroup", 256))
    try:
        lay = layout(plan, tun["BM"], tun["BN"])
    except AttncError:
        return False
    smem = int(lim.get("max-compute-workgroup-storage-size", DEFAULT_LIMITS["max-compute-workgroup-storage-size"]))
    wg = int(lim.get("max-compute-invocations-per-workgroup", 256))
    return 4 * lay.smem_words <= smem and lay.WG <= wg and lay.TN >= 1 and lay.TD >= 1


def candidates(device: Device, dims: dict[str, int], base: Plan, families: list[Family],
               nsplit: int | None) -> Iterator[tuple[Plan, dict[str, int], int | None]]:
    """Valid plans to time for a problem, the likeliest first (a `--max` cut keeps variety):
    every tile shape with default knobs, then each with one knob changed, then two, ...
    Knobs: split count, family, head-dim chunk DK, value blocks (DVC, DVS, VK), unrolling and
    prefetching (UN, PF) where the heuristic unrolls, and there p in chunks (api.chunked_p)."""
    dq = max(pow2ceil(dims["D"]), 4)
    dv = min(max(pow2ceil(dims["Dv"]), 32), 256)
    dv32 = min(-(-dims["Dv"] // 32) * 32, 128)
    short = dims["S"] <= 16
    splits = [nsplit] if nsplit is None else list(dict.fromkeys([nsplit, nsplit * 2, max(1, nsplit // 2), nsplit * 4]))
    dks = [16, 64] if short else list(dict.fromkeys([base.DK, 16, 32] + ([24] if dims["D"] % 24 == 0 else [])))
    # value chunks that cover Dv exactly (72 = 3 x 24, 80 = 2 x 40) instead of padding to 32s
    dv8 = -(-dims["Dv"] // 8) * 8
    exact = {(dv8, dv8 // k) for k in (2, 3) if dv8 % k == 0 and (dv8 // k) % 8 == 0 and dv8 <= 128}
    # (DVC, DVS, key tile / VK): the heuristic's first, value blocks of half the key tile too
    wide = wide_value_block(dv32)
    dvs_opts = [(dv32, 32, 1)] if short else list(dict.fromkeys(
        [(dv32, base.DVS, 2 if base.VK else 1), (dv32, 32, 1), (dv32, wide, 2), (64, 32, 1)]
        + ([(dv32, 64, 1)] if dv32 % 64 == 0 else []) + sorted((c, x, 1) for c, x in exact)))
    if short:  # decoding is memory bound: the family matters little, try the device's default only
        families = families[-1:]
    few = row_tiles(dims, 64) < 512  # prefill with few 64-row tiles
    if short:  # few rows: small row tiles, long key tiles, many splits
        shapes = [(4, 64, 128, 1), (4, 64, 64, 1), (8, 64, 128, 1), (4, 128, 128, 1), (4, 32, 64, 1),
                  (16, 64, 128, 1), (16, 64, 64, 2), (4, 128, 256, 1), (4, 64, 256, 1), (8, 128, 256, 1)]
    elif few:  # more, smaller workgroups
        shapes = [(32, 32, 64, 2), (16, 32, 64, 1), (32, 64, 128, 2), (64, 32, 64, 4), (64, 64, 128, 4),
                  (64, 64, 64, 8), (128, 64, 256, 4)]
    else:
        shapes = [(128, 64, 256, 4), (64, 64, 256, 4), (128, 32, 128, 8), (128, 32, 256, 4), (128, 64, 128, 8),
                  (64, 64, 64, 8), (64, 64, 128, 4), (128, 32, 128, 4),
                  (64, 32, 64, 4), (128, 64, 128, 4), (64, 64, 64, 4), (64, 64, 256, 2)]
    # loop unrolling and prefetching: the heuristic's, then partial unrolling, then the other prefetch setting
    loops = list(dict.fromkeys([(base.UN, base.PF)] + ([(16, base.PF), (base.UN, 1 - base.PF)] if base.UN > 1 else [])))
    found: list[tuple[int, int, Plan, dict[str, int], int | None]] = []
    seen = set()

    def add(rank: int, plan: Plan, tun: dict[str, int], ns: int | None) -> None:
        sig = (plan, tuple(tun.items()), ns)
        if sig not in seen and fits(device, plan, tun):
            seen.add(sig)
            found.append((rank, len(found), plan, tun, ns))

    if short and dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0:  # K/V streamed from storage (decoding)
        from attnc.runtime.api import split_count

        group = dims["Hq"] // dims["Hkv"]
        bm0 = min(32, max(1, pow2ceil(dims["S"] * group)))
        for bi, bm in enumerate(dict.fromkeys([bm0, max(1, bm0 // 2), max(1, bm0 // 4)])):
            for bn, wg, kl, kc in STREAM_SHAPES:
                ns0 = split_count(device, dims, bm, bn, group > 1, stream=True)
                for si, ns in enumerate(dict.fromkeys([ns0, 2 * ns0, max(1, ns0 // 2)])):
                    for smx in (1, 0) if bm >= 4 else (0,):
                        add(si + bi, stream_plan(base, dims, WG=wg, KL=kl, KC=kc, SMX=smx), {"BM": bm, "BN": bn}, ns)
    for si, ns in enumerate(splits):
        for fi, fam in enumerate(reversed(families)):
            for bm, bn, wg, tm in shapes:
                for ki, dk in enumerate(dks):
                    for vi, (dvc, dvs, vkd) in enumerate(dvs_opts):
                        for ui, (un, pf) in enumerate(loops):
                            plan = dataclasses.replace(base, family=fam, strategy=Strategy.TILED, WG=wg, TM=tm,
                                                       DVC=dvc, DK=dk, DVS=dvs, VK=bn // vkd if vkd > 1 else 0,
                                                       UN=un, PF=pf, PC=0)
                            rank = (si > 0) + (fi > 0) + (ki > 0) + (vi > 0) + (ui > 0)
                            add(rank, plan, {"BM": bm, "BN": bn}, ns)
                            for small_pf in (0, 1) if ui == 0 and base.UN > 1 else ():
                                small = chunked_p(plan, bm, bn, small_pf)
                                if small is not None:  # (GPUs) half the workgroup memory, p in chunks
                                    add(rank + (base.PC == 0) + small_pf, small, {"BM": bm, "BN": bn}, ns)
        sg = device.subgroup_size
        if not short and Family.SUBGROUPS in families and sg and dims["D"] % 4 == 0 and dims["Dv"] % 4 == 0:
            # query rows in registers, keys shared across the subgroup (lowering/lanes.py)
            d8, dv8 = lanes_widths(dims)
            for tm in (2, 1):
                plan = dataclasses.replace(base, family=Family.SUBGROUPS, strategy=Strategy.LANES, TM=tm, SGB=sg,
                                           DQ=d8, DVC=dv8, VEC=4)
                add(1, plan, {"BM": max(64, tm * sg), "BN": 64}, ns)
        if not short:  # the query tile resident in workgroup memory (no restaging per KV tile)
            dqr = -(-dims["D"] // 16) * 16
            for fam in families:
                for bm, bn, wg, tm in [(64, 64, 128, 4), (64, 32, 64, 4), (64, 64, 256, 2), (128, 32, 256, 4)]:
                    plan = dataclasses.replace(base, family=fam, strategy=Strategy.TILED, WG=wg, TM=tm, DVC=dv32,
                                               DK=16, DVS=32, VK=0, QRES=True, DQ=dqr)
                    add(3, plan, {"BM": bm, "BN": bn}, ns)
        for bm in (8, 32):
            plan = dataclasses.replace(base, family=Family.PORTABLE, strategy=Strategy.ROWS, KC=4, DQ=dq, DVC=dv)
            add(2, plan, {"BM": bm, "BN": 64}, ns)
    for _, _, plan, tun, ns in sorted(found, key=lambda f: (f[0], f[1])):
        yield plan, tun, ns


def tune(dims: dict[str, int], dtype: Any = np.float32, *, device: Device | str | None = None,
         runs: int = 7, max_candidates: int = 64, progress: bool = True, save: bool = True,
         **options: Any) -> dict[str, Any]:
    """Time the candidates for one problem on a device; store and return the fastest valid one."""
    from attnc.runtime.api import Options, pick_family, plan_for, prepare, split_count
    from attnc.runtime.devices import get_device

    dev = get_device(device)
    rng = np.random.default_rng(0)
    B, Hq, Hkv, S, T, D, Dv = (dims[x] for x in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    q = rng.standard_normal((B, Hq, S, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, T, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, T, Dv)).astype(dtype)
    # inputs smaller than the cache are rotated over copies, as in attnc bench (copy 0 checked)
    nbytes = q.nbytes + k.nbytes + v.nbytes + 4 * B * Hq * S * Dv
    copies = [(q, k, v)] + [(q + 0, k + 0, v + 0) for _ in range(rotation_count(nbytes, max_copies=8) - 1)]
    fam = pick_family(dev, None)
    opts = Options(causal=bool(options.get("causal", False)), f16=np.dtype(dtype) == np.float16)
    base, htun = plan_for(dev, fam, dims, opts, explicit_family=True)
    families = [Family.PORTABLE] + ([Family.SUBGROUPS] if "subgroups" in dev.features else [])
    ns0 = split_count(dev, dims, 32, 64) if S <= 16 else None
    ref = None
    results = []
    # the heuristic plan first, always timed again with the fastest few: a choice is stored
    # only when it beats the heuristic under the same conditions
    heur = (base, htun, None)
    cands = [heur] + [c for c in candidates(dev, dims, base, families, ns0) if c[:2] != heur[:2]]
    cands = cands[:max_candidates]
    ops: dict[int, tuple[Any, list[Any]]] = {}

    def timed(op: Any, handles: list[Any]) -> float:
        warm_up(dev)  # timed on a busy GPU after 3 untimed runs, as attnc bench does
        times = [op.run(timestamps=True, binding=handles[(j + 1) % len(handles)]) for j in range(runs + 3)][3:]
        return statistics.median(t for t in times if t is not None)

    # every candidate's pipelines compiled first: timing then runs without long idle gaps,
    # in which the GPU would lower its clocks (see dispatch.warm_up)
    compiled: list[Any] = []
    if progress:
        print(f"  compiling {len(cands)} candidates", file=sys.stderr, flush=True)
    for plan, tun, ns in cands:
        try:
            op = prepare(dims, dtype, device=dev, plan=plan, tunables=tun, nsplit=ns, **options)
            for prog in op.progs:
                dev.pipelines.get(dev, prog)
            compiled.append(op)
        except AttncError as exc:
            compiled.append(exc)
    for i, (plan, tun, ns) in enumerate(cands):
        try:
            op = compiled[i]
            if isinstance(op, AttncError):
                raise op
            handles = [op.bind_copy(*c) for c in copies]
            op.run(timestamps=True, binding=handles[0])
            ms = timed(op, handles)
            op.run(binding=handles[0])
            o, _ = op.result()
        except AttncError as exc:
            results.append({"variant": repr(plan), "error": str(exc).splitlines()[0]})
            continue
        if ref is None:
            from attnc.ir.interp import interpret

            args = {"q": q, "k": k, "v": v, "scale": op.scalars["scale"]}
            args.update({n: val for n, val in op.scalars.items() if n != "scale"})
            ref, _ = interpret(op.kern, args, op.dims)
            ref = ref.reshape(o.shape)
        err = float(np.linalg.norm(o - ref) / max(np.linalg.norm(ref), 1e-300))
        ok = err <= (2e-3 if np.dtype(dtype) == np.float16 else 1e-5)
        results.append({"variant": op.variant, "ms": ms, "relerr": err, "ok": ok,
                        "entry": plan_to_entry(plan, tun, ns), "options_key": op.options_key})
        if ok:  # keep the buffers of the current fastest few only
            ops[len(results) - 1] = (op, handles)
            for j in sorted(ops, key=lambda j: results[j]["ms"])[RETIME:]:
                if j != 0:  # (the heuristic's)
                    del ops[j]
        if progress:
            print(f"\r  [{i + 1}/{len(cands)}] {op.variant}: {ms:.3f} ms{'' if ok else ' WRONG'}",
                  file=sys.stderr, flush=True)
    good = [r for r in results if r.get("ok")]
    if not good:
        raise AttncError("no candidate variant ran correctly on this device")
    # the fastest few again, interleaved: each was first timed at its own moment (GPU clocks
    # drift over a tuning run), the final choice compares them under the same conditions
    top = sorted(ops, key=lambda j: results[j]["ms"])[:RETIME]
    if 0 in ops and 0 not in top:
        top.append(0)
    again: dict[int, list[float]] = {j: [] for j in top}
    for _ in range(3):
        for j in top:
            again[j].append(timed(*ops[j]))
    for j in top:
        results[j]["ms_first"] = results[j]["ms"]
        results[j]["ms"] = statistics.median(again[j])
    # the choice among those timed again (first timings are not comparable across candidates)
    best = min([results[j] for j in top] or good, key=lambda r: r["ms"])
    okey = best.pop("options_key")
    if save:
        store(dev, okey, dims, {**best["entry"], "ms": best["ms"], "variant": best["variant"]})
    return {"device": dev.spec, "bucket": bucket(dims), "best": best, "results": results,
            "heuristic": {"tunables": htun}}
