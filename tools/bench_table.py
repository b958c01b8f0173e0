"""Render `attnc bench --json` files as the markdown tables of docs/BENCHMARKS.md.

Usage: python tools/bench_table.py RESULT.json [...]  — one table per file: every case with
attnc's time, each baseline's time and attnc's speed-up over it, the fraction of the FMA or
copy ceiling attnc reached (copy for S <= 4: decode is bandwidth bound), and WRONG where a
result is off the float64 reference.
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    data = json.load(open(path))
    dev, ceil = data["device"], data["ceilings"]
    impls = []
    for r in data["results"]:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    base = [i for i in impls if i != "attnc"]
    head = ["case", "attnc ms"] + [f"{b} ms (attnc ×)" for b in base] + ["attnc % of ceiling"]
    out = [f"**{dev['name']}, {dev['backend']} ({dev['api']})** — FMA f32 ceiling "
           f"{ceil['fma_f32']['value']:.1f} TFLOP/s, copy {ceil['copy']['value']:.0f} GB/s",
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        cases.setdefault(r["case"], {})[r["impl"]] = r
    for case, rs in cases.items():
        a = rs.get("attnc")
        row = [case, "—" if a is None else f"{a['ms']:.4g}" + ("" if a["correct"] else " WRONG")]
        for b in base:
            r = rs.get(b)
            if r is None:
                row.append("—")
                continue
            cell = f"{r['ms']:.4g}" + ("" if r["correct"] else " WRONG")
            if a is not None:
                cell += f" ({r['ms'] / a['ms']:.2f}×)"
            row.append(cell)
        decode = a is not None and a["shape"]["S"] <= 4
        frac = "—" if a is None else (f"{100 * a['copy_fraction']:.1f} % BW" if decode else
                                      f"{100 * a['fma_fraction']:.1f} % FMA")
        row.append(frac)
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
