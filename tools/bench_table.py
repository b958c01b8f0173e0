"""Render `attnc bench --json` files as the markdown tables of docs/BENCHMARKS.md.

Usage: python tools/bench_table.py RESULT.json [...]  — one table per file: every case with
attnc's time, each baseline's time and attnc's speed-up over it (attnc's own variants, a KV
format or a document mask: their speed-up over attnc's plain run), the fraction of the FMA or
copy ceiling attnc reached (copy for S <= 4: decode is bandwidth bound), WRONG where a result
is off the float64 reference (unchecked results, `--no-check`, are not judged), the bench's
QUANTIZED and CLOCKS AT n % flags, and the error
of a row that did not run. A `--repeat-processes` file gives a table of each process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

CLOCK_OK = 0.93  # attnc.runtime.timing.CLOCK_OK: below it the bench flags a row CLOCKS AT n %


def _cell(r: dict[str, Any]) -> str:
    """A row's time, WRONG when checked and off, the bench's flags (timestamps quantized, the
    GPU's clocks down after the measurement), or why it did not run."""
    if r.get("ms") is None:
        return f"— ({str(r.get('error') or 'not run').splitlines()[0][:60]})"
    flags = " WRONG" if r.get("correct") is False else ""
    flags += " QUANTIZED" if r.get("timestamps_quantized") else ""
    if r.get("clock") is not None and r["clock"] < CLOCK_OK:
        flags += f" CLOCKS AT {100 * r['clock']:.0f} %"
    return f"{r['ms']:.4g}{flags}"


def _header(data: dict[str, Any]) -> str:
    dev, ceil = data["device"], data.get("ceilings") or {}
    parts = [f"{name} {c['value']:.3g} {c['unit']}" for name, c in ceil.items()]
    dtype = (data.get("config") or {}).get("dtype", "f32")
    return (f"**{dev['name']}, {dev['backend']} ({dev['api']}), {dtype}** — "
            + (", ".join(parts) or "ceilings not measured"))


def table(path: str) -> str:
    """The markdown of one bench JSON (of each process's, for a --repeat-processes file)."""
    data = json.load(open(path))
    if "processes" in data:
        return "\n".join(_table(p) for p in data["processes"] if p.get("device"))
    return _table(data)


def _table(data: dict[str, Any]) -> str:
    impls: list[str] = []
    for r in data["results"]:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    base = [i for i in impls if i != "attnc"]
    # a baseline's column: attnc's speed-up over it; attnc's own variants' (a KV format, a
    # document mask): their speed-up over attnc's plain run, as the JSON's speedup_vs_attnc
    head = ["case", "attnc ms"] + [f"{b} ms (over attnc ×)" if b.startswith("attnc") else f"{b} ms (attnc ×)"
                                   for b in base] + ["attnc % of ceiling"]
    out = [_header(data), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        cases.setdefault(r["case"], {})[r["impl"]] = r
    for case, rs in cases.items():
        a = rs.get("attnc")
        ran = a is not None and a.get("ms") is not None
        row = [case, "—" if a is None else _cell(a)]
        for b in base:
            r = rs.get(b)
            cell = "—" if r is None else _cell(r)
            if r is not None and ran and r.get("ms") is not None:
                ratio = a["ms"] / r["ms"] if b.startswith("attnc") else r["ms"] / a["ms"]
                cell += f" ({ratio:.2f}×)"
            row.append(cell)
        decode = ran and a["shape"]["S"] <= 4
        frac = a and a.get("copy_fraction" if decode else "fma_fraction")
        row.append("—" if not ran or frac is None else f"{100 * frac:.1f} % {'BW' if decode else 'FMA'}")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:] else 2)
    for p in sys.argv[1:]:
        print(table(p))
