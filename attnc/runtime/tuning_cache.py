"""The tuning cache: the plans `attnc tune` measured fastest, per device and shape bucket.

A JSON file in the user cache directory, keyed by adapter identity and driver, attnc version,
kernel options and a shape bucket; `attnc.attention` looks its problem up here before it
falls back to the heuristic plan (lowering/schedule.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy
from attnc.lowering.schedule import pick_family, pow2ceil
from attnc.runtime.devices import Device

VERSION = 2


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


# (path, mtime_ns, size) of the file last read, and its entries: read once per process, again
# only when the file changes (attention() looks its problem up on every new prepared op)
_LOADED: tuple[tuple[str, int, int] | None, dict[str, Any]] = (None, {})


def load() -> dict[str, Any]:
    """The whole cache (empty when missing or unreadable); the file is read again only when its
    path, modification time or size changed since the last read."""
    global _LOADED
    p = cache_path()
    try:
        st = p.stat()
    except OSError:
        return {}
    stamp = (str(p), st.st_mtime_ns, st.st_size)
    if _LOADED[0] == stamp:
        return _LOADED[1]
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries", {}) if data.get("version") == VERSION else {}
    _LOADED = (stamp, entries)
    return entries


def lookup(device: Device, options_key: str, dims: dict[str, int]) -> dict[str, Any] | None:
    """The tuned choice for this problem, if one was stored."""
    return load().get(key(device, options_key, dims))


def store(device: Device, options_key: str, dims: dict[str, int], entry: dict[str, Any]) -> None:
    """Record a tuned choice (atomically replacing the cache file)."""
    entries = dict(load())
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


def tuned_plan(dev: Device, okey: str, dims: dict[str, int], f16: bool, family: Family | None,
               nsplit: int | None) -> tuple[Plan | None, dict[str, int] | None, int | None]:
    """The tuned plan for this device and shape bucket, if `attnc tune` stored one that fits."""
    entry = lookup(dev, okey, dims)
    if entry is None:
        return None, None, nsplit
    caps = dev.capabilities
    plan, tun, ns = entry_to_plan(entry, caps.dialect, Storage.F16 if f16 else Storage.F32)
    if family is not None and plan.family is not family:
        return None, None, nsplit
    if plan.family is Family.SUBGROUPS and pick_family(caps, None) is not Family.SUBGROUPS:
        return None, None, nsplit  # e.g. an application's device created without subgroups
    if plan.vector_width == 4 and (dims["D"] % 4 or dims["Dv"] % 4):
        if plan.strategy in (Strategy.STREAM, Strategy.LANES):
            return None, None, nsplit
        plan = dataclasses.replace(plan, vector_width=1)
    if plan.strategy in (Strategy.STREAM, Strategy.LANES) and dims["D"] > plan.query_dim:
        return None, None, nsplit
    if dims["S"] > 16:
        ns = 1
    elif ns is not None:  # scale the tuned split count with the KV length of this call
        ns = max(1, min(ns, -(-dims["T"] // tun["BN"])))
    return plan, tun, nsplit if nsplit is not None else ns
