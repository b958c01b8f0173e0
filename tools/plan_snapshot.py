"""Snapshot the heuristic plans, split counts, tuner candidates and their WGSL for many shapes
and device facts, as JSON lines: a refactor of the planning code must leave it byte-identical.

Usage (repo root): python3 tools/plan_snapshot.py OUT.jsonl [--candidates N]
Then compare two snapshots with `cmp` (or `diff`). Plans are written with the compact keys of
the variant strings (WG, TM, UN, ...), so a snapshot survives renaming the Plan fields.
No GPU is needed: the device facts are the ones the heuristics read.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnc.bench.cases import load_suites  # noqa: E402
from attnc.lowering import Family, Plan, Storage  # noqa: E402
from attnc.lowering import candidates as cands  # noqa: E402
from attnc.lowering import schedule as sched  # noqa: E402
from attnc.lowering.capabilities import Capabilities  # noqa: E402
from attnc.lowering.plan import COMPACT_KEYS, Dialect  # noqa: E402
from attnc.runtime.build import Options, build_kernel, programs_for  # noqa: E402


def facts(**kw: Any) -> Capabilities:
    """Device facts as the planning code reads them."""
    base = dict(adapter_type="DiscreteGPU", dialect="naga", subgroup_min_size=4, subgroup_size=32,
                subgroup_lanes_contiguous=32, features=frozenset({"subgroups", "timestamps", "f16"}),
                limits={"max-compute-workgroup-storage-size": 49152,
                        "max-compute-invocations-per-workgroup": 1024})
    base.update(kw)
    return Capabilities(cpu=base.pop("adapter_type") == "CPU", dialect=Dialect(base.pop("dialect")), **base)


DEVICES = {
    "h200-naga": facts(),
    "h200-tint": facts(dialect="tint"),
    "lavapipe8-naga": facts(adapter_type="CPU", subgroup_size=8, subgroup_lanes_contiguous=8,
                            limits={"max-compute-workgroup-storage-size": 32768,
                                    "max-compute-invocations-per-workgroup": 1024}),
    "lavapipe4-tint": facts(adapter_type="CPU", dialect="tint", subgroup_size=4, subgroup_lanes_contiguous=4,
                            limits={"max-compute-workgroup-storage-size": 32768,
                                    "max-compute-invocations-per-workgroup": 1024}),
    "browser-default": facts(adapter_type="IntegratedGPU", dialect="tint", subgroup_size=16,
                             subgroup_lanes_contiguous=16, subgroup_min_size=16,
                             limits={"max-compute-workgroup-storage-size": 16384,
                                     "max-compute-invocations-per-workgroup": 256}),
    "opengl": facts(adapter_type="CPU", subgroup_size=None, subgroup_min_size=None, subgroup_lanes_contiguous=0,
                    features=frozenset({"timestamps"})),
}


def shapes() -> list[dict[str, int]]:
    """The seeds and ci suites, plus random shapes over the axes the heuristics branch on."""
    out = []
    for cases in load_suites().values():
        for c in cases:
            out.append(dict(B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, T=c.T, D=c.D, Dv=c.Dv))
    rng = random.Random(0)
    for _ in range(60):
        hkv = rng.choice([1, 2, 4, 8])
        d = rng.choice([32, 64, 72, 80, 96, 128, 256, 6, 40])
        out.append(dict(B=rng.choice([1, 2, 4]), Hq=hkv * rng.choice([1, 2, 4, 8]), Hkv=hkv,
                        S=rng.choice([1, 2, 4, 7, 16, 17, 64, 128, 501, 1024, 4096]),
                        T=rng.choice([1, 63, 256, 1000, 4096, 16384]), D=d,
                        Dv=rng.choice([d, d, 64, 128])))
    return out


def plan_dict(plan: Plan) -> dict[str, Any]:
    """A plan as compact keys (field names mapped through COMPACT_KEYS where they exist)."""
    d = {}
    for f in dataclasses.fields(plan):
        v = getattr(plan, f.name)
        d[COMPACT_KEYS.get(f.name, f.name)] = v.value if hasattr(v, "value") else v
    return d


def wgsl_digest(plan: Plan, tun: dict[str, int], opts: Options) -> str:
    """sha256 over the WGSL of every program the plan lowers to (or the lowering error)."""
    try:
        kern = build_kernel(opts, tun)
        progs = programs_for(kern, plan)
    except Exception as exc:  # a plan the lowering refuses: its message is part of the snapshot
        return f"error: {type(exc).__name__}: {exc}"
    h = hashlib.sha256()
    for p in progs:
        h.update(p.wgsl.encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--candidates", type=int, default=40, help="tuner candidates per shape and device")
    args = ap.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        for (dname, dev), dims in itertools.product(DEVICES.items(), shapes()):
            for causal, f16, f16_math, explicit in [(False, False, False, False), (True, False, False, False),
                                                    (False, True, False, False), (True, True, True, True),
                                                    (False, False, False, True)]:
                fams = [Family.PORTABLE] + ([Family.SUBGROUPS] if "subgroups" in dev.features else [])
                for fam in fams:
                    opts = Options(causal=causal, f16=f16)
                    try:
                        plan, tun = sched.plan_for(dev, fam, dims, causal=causal, f16=f16, explicit_family=explicit,
                                                   f16_math=f16_math)
                    except Exception as exc:
                        f.write(json.dumps({"dev": dname, "dims": dims, "causal": causal, "fam": fam.value,
                                            "error": str(exc)}) + "\n")
                        continue
                    if f16_math:
                        plan = dataclasses.replace(plan, storage=Storage.F16A)
                    short = dims["S"] <= 16
                    packed = short and dims["Hq"] > dims["Hkv"]
                    split = (sched.split_count(dev, dims, tun["BM"], tun["BN"], packed, plan.strategy.value == "stream")
                             if short else sched.prefill_split_count(dev, dims, tun["BM"], tun["BN"]))
                    kopts = dataclasses.replace(opts, split=split > 1,
                                                pack_gqa=packed and plan.strategy.value != "rows")
                    f.write(json.dumps({"dev": dname, "dims": dims, "causal": causal, "f16": f16, "f16m": f16_math,
                                        "explicit": explicit, "fam": fam.value, "plan": plan_dict(plan), "tun": tun,
                                        "split": split, "wgsl": wgsl_digest(plan, tun, kopts)}, sort_keys=True) + "\n")
            fams = [Family.PORTABLE] + ([Family.SUBGROUPS] if "subgroups" in dev.features else [])
            base, _ = sched.plan_for(dev, fams[-1], dims, explicit_family=True)
            ns0 = sched.split_count(dev, dims, 32, 64) if dims["S"] <= 16 else None
            for i, (plan, tun, ns) in enumerate(cands.candidates(dev, dims, base, fams, ns0)):
                if i >= args.candidates:
                    break
                row = {"dev": dname, "dims": dims, "cand": i, "plan": plan_dict(plan), "tun": tun, "ns": ns}
                if i % 8 == 0:  # lowering every candidate would take long: every 8th
                    packed = dims["S"] <= 16 and dims["Hq"] > dims["Hkv"] and plan.strategy.value != "rows"
                    row["wgsl"] = wgsl_digest(plan, tun, Options(split=bool(ns and ns > 1), pack_gqa=packed))
                f.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
