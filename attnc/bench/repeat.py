"""`attnc bench --repeat-processes N`: the same benchmark in N separate processes, one after
another, and how far their medians spread per case and implementation.

A number that one process measured is not yet a result: on a GPU the same kernel has timed
apart from one process to the next (clock states, runtime/timing.py). Each process writes its
own JSON; this module runs them, prints per (case, impl) the min, median and max of the
process medians, and flags a spread over SPREAD_LIMIT.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPREAD_LIMIT = 0.10  # processes that disagree by more than 10 % (max/min - 1) are flagged
CHILD_DROPS = {"--repeat-processes": 1, "--json": 1, "--plot": 1}  # options (and values) children do not get


def child_argv(argv: Sequence[str]) -> list[str]:
    """`argv` without the options only the parent acts on (both `--opt v` and `--opt=v`)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in CHILD_DROPS:
            skip = 0 if "=" in a else CHILD_DROPS[name]
            continue
        out.append(a)
    return out


def spread_rows(processes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (case, impl, dtype): the process medians, their min/median/max and the spread."""
    found: dict[tuple[str, str, str], list[float | None]] = {}
    unavailable: set[tuple[str, str, str]] = set()  # a baseline not installed: no measurement, no failure
    for i, doc in enumerate(processes):
        for r in doc.get("results", []):
            key = (r["case"], r["impl"], r.get("dtype", ""))
            found.setdefault(key, [None] * len(processes))[i] = None if r.get("error") else r.get("ms")
            if str(r.get("error", "")).startswith("unavailable:"):
                unavailable.add(key)
    rows = []
    for (case, impl, dtype), per in found.items():
        ms = [x for x in per if x is not None]
        row: dict[str, Any] = {"case": case, "impl": impl, "dtype": dtype, "per_process_ms": per}
        if not ms and (case, impl, dtype) in unavailable:
            row["unavailable"], row["disagree"] = True, False
        if ms:
            lo, hi = min(ms), max(ms)
            row.update(ms_min=lo, ms_median=statistics.median(ms), ms_max=hi, spread=hi / lo - 1 if lo > 0 else None)
            row["disagree"] = bool(row["spread"] is not None and row["spread"] > SPREAD_LIMIT) or len(ms) < len(per)
        rows.append(row)
    return rows


def format_spread(rows: Sequence[dict[str, Any]], n: int) -> str:
    """The spread table: one line per (case, impl)."""
    head = ("case", "impl", "min ms", "median ms", "max ms", "spread", "processes")
    table = [head]
    for r in rows:
        if "ms_min" not in r:
            table.append((r["case"], r["impl"], "-", "-", "-", "-",
                          f"unavailable in all {n}" if r.get("unavailable") else f"failed in all {n}"))
            continue
        flag = " DISAGREE" if r["disagree"] else ""
        per = " ".join("-" if x is None else f"{x:.4f}" for x in r["per_process_ms"])
        table.append((r["case"], r["impl"], f"{r['ms_min']:.4f}", f"{r['ms_median']:.4f}", f"{r['ms_max']:.4f}",
                      f"{100 * r['spread']:.1f}%{flag}", per))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    return "\n".join("  ".join([str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [str(row[-1])])
                     for row in table)


def run_repeated(argv: Sequence[str], n: int, json_path: str | None) -> int:
    """Run `attnc bench` with `argv` in `n` processes one after another; print the spread
    table; write every process's JSON and the spread to `json_path`. Exit status 1 when a
    case's processes disagree by more than SPREAD_LIMIT (or a process failed), else 0."""
    args = child_argv(argv)
    processes: list[dict[str, Any]] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="attnc-bench-") as tmp:
        for i in range(n):
            out = Path(tmp) / f"process{i}.json"
            print(f"attnc bench: process {i + 1} of {n}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, "-m", "attnc.bench", *args, "--json", str(out)], check=False)
            if done.returncode != 0:
                status = 1
            if not out.is_file():  # it measured nothing (no device, a bad option): the others would not either
                print(f"attnc bench: process {i + 1} measured nothing (exit status {done.returncode}); "
                      "not starting the others", file=sys.stderr)
                return done.returncode or 1
            processes.append(json.loads(out.read_text()))
    rows = spread_rows(processes)
    print(f"\nmedians of {n} processes (spread = max / min - 1; over {100 * SPREAD_LIMIT:.0f} % is flagged):")
    print(format_spread(rows, n))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"processes": processes, "spread": rows}, indent=1))
    return 1 if status or any(r.get("disagree", True) for r in rows) else 0
