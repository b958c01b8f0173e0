"""The tuning cache: the plans `attnc tune` measured fastest, per device and shape bucket.

A JSON file in the user cache directory, keyed by adapter identity and driver, attnc version,
the plan schema, kernel options and a shape bucket; `attnc.attention` looks its problem up
here before it falls back to the heuristic plan (lowering/schedule.py).

The file is the user's and may be damaged, hand-edited or written by another attnc: an entry
that does not describe a plan this attnc can run correctly on the device (a field unknown to
PLAN_SCHEMA or missing, a value of the wrong type or out of its range, subgroup facts that are
not the device's, a plan the lowering refuses) is ignored with one TuningCacheWarning per entry
and process, naming the file and key, and the call takes the heuristic plan; an unreadable file
likewise (one warning per file).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from attnc.lowering.plan import Dialect, Family, Plan, Storage, Strategy
from attnc.lowering.schedule import device_refuses, pow2ceil
from attnc.runtime.cachedir import cache_dir, locked, replace_text
from attnc.runtime.devices import Device

VERSION = 2


class TuningCacheWarning(UserWarning):
    """A tuning cache file or entry that attnc ignores (the call takes the heuristic plan)."""


@dataclasses.dataclass(frozen=True)
class Field:
    """What one stored plan field may hold: ints in [lo, hi] (a power of two, a multiple of
    `step`, or 0 where `zero`), a bool, or one of `values`."""

    kind: str  # "int", "bool" or "enum"
    lo: int = 0
    hi: int = 0
    pow2: bool = False
    step: int = 1
    zero: bool = False
    values: tuple[str, ...] = ()

    def check(self, name: str, x: Any) -> None:
        """Raise ValueError naming the field when x is not one of its values."""
        if self.kind == "enum":
            if not isinstance(x, str) or x not in self.values:
                raise ValueError(f"{name}={x!r} is not one of {list(self.values)}")
            return
        if self.kind == "bool":
            if not isinstance(x, bool):
                raise ValueError(f"{name}={x!r} is not a bool")
            return
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"{name}={x!r} is not an int")
        if x == 0 and self.zero:
            return
        if not (self.lo <= x <= self.hi and x % self.step == 0 and (not self.pow2 or x & (x - 1) == 0)):
            what = "a power of two" if self.pow2 else f"a multiple of {self.step}" if self.step > 1 else "an int"
            raise ValueError(f"{name}={x!r} is not {what} in [{self.lo}, {self.hi}]{' or 0' if self.zero else ''}")


def _pow2(lo: int, hi: int, zero: bool = False) -> Field:
    return Field("int", lo, hi, pow2=True, zero=zero)


def _mult4(hi: int) -> Field:
    return Field("int", 4, hi, step=4)


def _flag() -> Field:
    return Field("int", 0, 1)


# The plan schema: every Plan field an entry stores (dialect and storage come from the call)
# and what it may hold. Its digest is part of every cache key, so entries written for other
# plan fields never match; tests check that it names exactly the Plan's fields.
PLAN_SCHEMA: dict[str, Field] = {
    "family": Field("enum", values=tuple(f.value for f in Family)),
    "strategy": Field("enum", values=tuple(s.value for s in Strategy)),
    "workgroup_size": _pow2(1, 1024),
    "head_chunk": _mult4(512),
    "value_columns": _mult4(1024),
    "value_stage_columns": _mult4(1024),
    "min_subgroup": _pow2(1, 128),
    "rows_per_invocation": _pow2(1, 64),
    "keys_per_step": _pow2(1, 64),
    "query_dim": _mult4(1024),
    "vector_width": _pow2(1, 4),
    "resident_query": Field("bool"),
    "lanes_per_key": _pow2(1, 64),
    "softmax_phase": Field("int", 0, 3),
    "unroll": Field("int", 1, 64),
    "prefetch": _flag(),
    "combine_groups": Field("int", 0, 64),
    "value_block_keys": _pow2(1, 1024, zero=True),
    "p_chunk_keys": _pow2(1, 1024, zero=True),
    "last_tile_first": _flag(),
    "subgroup_width": _pow2(1, 128, zero=True),
    "shuffle_only_lanes": Field("int", 0, 128),
    "block_map": _flag(),
    "lane_sum": _flag(),
    "int_dot": _flag(),
}
CALL_FIELDS = ("dialect", "storage")  # plan fields every call sets from its device and inputs
TUNABLE = _pow2(1, 1024)  # the kernel's tunables (BM, BN)
NSPLIT = Field("int", 1, 1 << 16)
ENTRY_FIELDS = ("plan", "tunables", "nsplit", "ms", "variant")  # as `attnc tune` stores them


def _schema_json() -> dict[str, Any]:
    return {n: dataclasses.asdict(f) for n, f in sorted(PLAN_SCHEMA.items())}


SCHEMA_ID = hashlib.sha256(json.dumps(_schema_json(), sort_keys=True).encode()).hexdigest()[:12]


def cache_path() -> Path:
    """The tuning cache file: tune.json in attnc's cache directory (runtime/cachedir.py)."""
    return cache_dir() / "tune.json"


def bucket(dims: dict[str, int]) -> str:
    """Shapes that share a tuned choice: exact head dims and GQA ratio, S and T by power of two."""
    S, T = dims["S"], dims["T"]
    s = str(S) if S <= 16 else f"~{pow2ceil(S)}"
    return f"S{s}.T~{pow2ceil(T)}.D{dims['D']}.Dv{dims['Dv']}.G{dims['Hq'] // dims['Hkv']}"


def key(device: Device, options_key: str, dims: dict[str, int]) -> str:
    """The cache key: adapter identity and driver, attnc version, plan schema, kernel options,
    shape bucket."""
    from attnc._version import __version__

    return f"{device.key}|attnc {__version__}|plan schema {SCHEMA_ID}|{options_key}|{bucket(dims)}"


_WARNED: set[tuple[str, str]] = set()


def ignore(what: str, reason: str, path: Path | None = None) -> None:
    """Warn, once per process for each file and key, that a cache file or entry is ignored."""
    p = str(path or cache_path())
    if (p, what) in _WARNED:
        return
    _WARNED.add((p, what))
    subject = f"the tuning cache file {p}" if what == "" else f"tuning cache entry {what!r} in {p}"
    warnings.warn(f"attnc: ignoring {subject}: {reason}; the heuristic plan is used instead", TuningCacheWarning,
                  stacklevel=2)


# (path, mtime_ns, size) of the file last read, its entries, and why the whole file is ignored
# (None: it is not): the file is read once per process, and again only when it changes
# (attention() looks its problem up for every new prepared op)
_LOADED: tuple[tuple[str, int, int] | None, dict[str, Any], str | None] = (None, {}, None)


def _read(p: Path) -> tuple[dict[str, Any], str | None]:
    """The entries of the cache file at `p`, or ({}, why it is ignored)."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # (decode errors are ValueErrors; nesting too deep)
        return {}, f"not readable as JSON ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict):
        return {}, f"the file holds a {type(data).__name__}, not an object"
    if data.get("version") != VERSION:
        return {}, f"format version {data.get('version')!r}, not {VERSION} (run `attnc tune` again)"
    if not isinstance(data.get("entries"), dict):
        return {}, f"'entries' is a {type(data.get('entries')).__name__}, not an object"
    return data["entries"], None


def load(quiet: bool = False) -> dict[str, Any]:
    """The cache's entries (empty when the file is missing; an unreadable file, or one of
    another format, is ignored with a warning unless `quiet`). The file is read again only when
    its path, modification time or size changed since the last read; the dict returned is
    shared, not to be modified."""
    global _LOADED
    p = cache_path()
    try:
        st = p.stat()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if not quiet:
            ignore("", f"not readable ({type(exc).__name__}: {exc})", p)
        return {}
    stamp = (str(p), st.st_mtime_ns, st.st_size)
    if _LOADED[0] != stamp:
        _LOADED = (stamp, *_read(p))
    _, entries, reason = _LOADED
    if reason is not None and not quiet:
        ignore("", reason, p)
    return entries


def lookup(device: Device, options_key: str, dims: dict[str, int]) -> dict[str, Any] | None:
    """The tuned choice for this problem, if one was stored (as stored: see entry_to_plan)."""
    return load().get(key(device, options_key, dims))


def store(device: Device, options_key: str, dims: dict[str, int], entry: dict[str, Any]) -> None:
    """Record a tuned choice (atomically replacing the cache file; an unreadable one is replaced),
    under the cache's lock and over the file as it is then: another process's entries stay."""
    p = cache_path()
    with locked(p):
        entries, unreadable = _read(p) if p.exists() else ({}, None)
        if unreadable is not None:  # (another attnc's format, say): kept for the user, not lost
            kept = p.with_name(p.name + ".unreadable")
            os.replace(p, kept)
            warnings.warn(f"attnc: the tuning cache file {p} was {unreadable}: moved to {kept}, and a new "
                          "one started", TuningCacheWarning, stacklevel=2)
        entries = dict(entries)
        entries[key(device, options_key, dims)] = entry
        replace_text(p, json.dumps({"version": VERSION, "entries": entries}, indent=1, sort_keys=True))


def plan_to_entry(plan: Plan, tunables: dict[str, int], nsplit: int | None) -> dict[str, Any]:
    """A JSON-able record of a plan choice (dialect and storage come from the call)."""
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in CALL_FIELDS}
    d["family"] = plan.family.value
    d["strategy"] = plan.strategy.value
    return {"plan": d, "tunables": tunables, "nsplit": nsplit}


@functools.cache
def kernel_tunables() -> frozenset[str]:
    """The names of the shipped kernel's tunables (BM, BN), which an entry must give."""
    from attnc.kernels.flash import flash_attention

    return frozenset(name for name, _ in flash_attention.trace().tunables)


def entry_to_plan(entry: Any, dialect: Dialect, storage: Storage) -> tuple[Plan, dict[str, int], int | None]:
    """The plan, kernel tunables and split count a cache entry describes; ValueError saying
    what is wrong with an entry that does not follow PLAN_SCHEMA."""
    if not isinstance(entry, dict):
        raise ValueError(f"the entry is a {type(entry).__name__}, not an object")
    unknown = sorted(set(entry) - set(ENTRY_FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    d, tun = entry.get("plan"), entry.get("tunables")
    if not isinstance(d, dict) or not isinstance(tun, dict):
        raise ValueError("'plan' and 'tunables' must be objects")
    unknown, missing = sorted(set(d) - set(PLAN_SCHEMA)), sorted(set(PLAN_SCHEMA) - set(d))
    if unknown or missing:
        raise ValueError(f"plan fields {'unknown: ' + str(unknown) if unknown else ''}"
                         f"{'; ' if unknown and missing else ''}{'missing: ' + str(missing) if missing else ''}")
    for name, field in PLAN_SCHEMA.items():
        field.check(name, d[name])
    if set(tun) != kernel_tunables():
        raise ValueError(f"tunables {sorted(tun)}, not {sorted(kernel_tunables())}")
    for name, x in tun.items():
        TUNABLE.check(name, x)
    ns = entry.get("nsplit")
    if ns is not None:
        NSPLIT.check("nsplit", ns)
    fields = dict(d, family=Family(d["family"]), strategy=Strategy(d["strategy"]))
    return Plan(dialect=dialect, storage=storage, **fields), dict(tun), ns


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A stored choice that fits a call: its plan, tunables, split count and cache key."""

    plan: Plan
    tunables: dict[str, int]
    nsplit: int | None
    key: str


def tuned_plan(dev: Device, okey: str, dims: dict[str, int], f16: bool, family: Family | None,
               nsplit: int | None) -> Tuned | None:
    """The tuned plan for this device and shape bucket, if `attnc tune` stored one that fits and
    that this attnc can run on the device (else a warning for a damaged entry, and None)."""
    k = key(dev, okey, dims)
    entry = load().get(k)
    if entry is None:
        return None
    caps = dev.capabilities
    try:
        plan, tun, ns = entry_to_plan(entry, caps.dialect, Storage.F16 if f16 else Storage.F32)
    except ValueError as exc:
        ignore(k, str(exc))
        return None
    if family is not None and plan.family is not family:
        return None
    if dev.external and plan.family is Family.SUBGROUPS and "subgroups" not in dev.features:
        return None  # tuned on the adapter; the application created its device without subgroups
    refused = device_refuses(caps, plan)
    if refused is not None:
        ignore(k, refused)
        return None
    if plan.vector_width == 4 and (dims["D"] % 4 or dims["Dv"] % 4):
        if plan.strategy in (Strategy.STREAM, Strategy.LANES):
            return None
        plan = dataclasses.replace(plan, vector_width=1)
    if plan.strategy in (Strategy.STREAM, Strategy.LANES, Strategy.ROWS) and dims["D"] > plan.query_dim:
        return None
    if dims["S"] > 16:
        ns = 1
    elif ns is not None:  # scale the tuned split count with the KV length of this call
        ns = max(1, min(ns, -(-dims["T"] // tun["BN"])))
    return Tuned(plan, tun, nsplit if nsplit is not None else ns, k)
