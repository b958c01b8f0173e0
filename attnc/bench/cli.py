"""`attnc bench`: time attnc and baselines on one device, against its measured ceilings.

    attnc bench [--suite seeds|ci] [--case NAME ...] [--shape B,Hq,Hkv,S,T,D,Dv[,causal]]
                [--device SPEC] [--compare ort,tinygrad,naive] [--kv q8_0,q4_0,int8] [--dtype f32|f16]
                [--json FILE] [--plot FILE.png] [--runs N] [--warmup N] [--documents N] [--seed N]
                [--repeat-processes N] [--rounds N] (and the rest: `attnc bench --help`)

Every implementation runs in this process on the same inputs; each result carries its GPU
time per op (median), TFLOP/s, GB/s, its relative error against a float64 numpy reference,
and its fractions of the FMA and copy ceilings measured here first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from attnc.argparsing import Parser
from attnc.bench.cases import (
    Case,
    dequantized,
    load_suites,
    make_inputs,
    parse_shape,
    reference,
    relerr,
    shapes_path,
)
from attnc.bench.impls import DOCS_IMPL, IMPLS, KV_PREFIX, RunOptions, Unavailable, kv_format_of
from attnc.errors import AttncError
from attnc.runtime.dispatch import warm_up
from attnc.runtime.timing import CLOCK_OK, DEFAULT_CACHE_BYTES, clock_ratio, rotation_count

TOLERANCE = {"f32": 1e-5, "f16": 2e-3}  # the accuracy contract (docs/API.md)
DISTRIBUTIONS = (
    "attnc", "numpy", "wgpu", "wgpudawn", "onnxruntime-webgpu", "onnxruntime", "tinygrad",
    "dawn-python", "matplotlib",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `attnc bench`."""
    p = Parser(prog="attnc bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", help="suite of shapes.json (seeds for GPUs, ci for a CPU adapter)")
    p.add_argument(
        "--case",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="only these cases (searched in every suite when --suite is not given)",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="B,Hq,Hkv,S,T,D,Dv[,causal]",
        help="an extra case given by its shape (repeatable)",
    )
    p.add_argument("--device", help="device spec, e.g. wgpu, dawn, wgpu:vulkan (default: best)")
    p.add_argument("--compare", default="", help="baselines: comma list of ort, tinygrad, naive")
    p.add_argument("--no-attnc", action="store_true", help="time only the baselines")
    p.add_argument("--kv", metavar="FORMATS",
                   help="also time attnc over K/V quantized to these formats (comma list of q8_0, q4_0, int8), "
                        "each row with its speed-up over attnc's own run (use --dtype f16 for f16 KV as the baseline)")
    p.add_argument("--documents", type=int, default=0, metavar="N",
                   help="also time attnc with a document mask (the tokens packed as N equal documents, a mask_mod "
                        "reading their ids), each row with its speed-up over attnc's own dense run")
    p.add_argument("--target", help="attnc variant family (portable, subgroups, ...)")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="f32")
    p.add_argument("--json", metavar="FILE", help="write results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw TFLOP/s per case per impl")
    p.add_argument("--runs", type=int, default=20, help="timed runs per result (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (at least 1: the first compiles)")
    p.add_argument(
        "--ceilings",
        choices=("auto", "small", "large", "off"),
        default="auto",
        help="ceiling benchmark sizes (auto: small on a CPU adapter)",
    )
    p.add_argument("--only-ceilings", action="store_true", help="measure and report the ceilings only")
    p.add_argument(
        "--cache-mib",
        type=int,
        default=DEFAULT_CACHE_BYTES >> 20,
        help="cache size guess for input rotation (MiB; 0 turns rotation off)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference")
    p.add_argument("--shapes", metavar="FILE", help="shapes.json to read suites from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list suites and cases, then exit")
    p.add_argument("--repeat-processes", type=int, default=1, metavar="N",
                   help="run the benchmark in N separate processes and report the spread of their medians")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="measure every case N times, the cases interleaved (all of them, then all again); each "
                        "result is its fastest round's median, every round's median in ms_rounds")
    return p  # fmt: skip


def select_cases(args: argparse.Namespace) -> list[Case]:
    """The cases named by --suite, --case and --shape (default suite: ci)."""
    suites = load_suites(args.shapes)
    if args.suite is not None and args.suite not in suites:
        raise ValueError(f"unknown suite {args.suite!r}; suites: {sorted(suites)}")
    cases: list[Case] = []
    if args.case:
        pool = suites[args.suite] if args.suite else [c for s in suites.values() for c in s]
        by_name = {c.name: c for c in pool}
        unknown = [n for n in args.case if n not in by_name]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; known: {sorted(by_name)}")
        ambiguous = sorted({c.name for c in pool if c.name in args.case and by_name[c.name] != c})
        if ambiguous:  # (the same name in two suites, as different shapes)
            raise ValueError(f"case(s) {ambiguous} are different shapes in different suites; pass --suite")
        cases = [by_name[n] for n in args.case]
    elif args.suite or not args.shape:
        if (args.suite or "ci") not in suites:
            raise ValueError(f"{shapes_path(args.shapes)} has no suite 'ci' (the default): pass --suite, one of "
                             f"{sorted(suites)}")
        cases = list(suites[args.suite or "ci"])
    cases = list(dict.fromkeys(cases + [parse_shape(s) for s in args.shape]))  # (a shape given twice: once)
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # results are keyed by case name
        raise ValueError(f"case name(s) {twice} stand for different shapes in this run")
    return cases


def check_documents(cases: Sequence[Case], documents: int) -> None:
    """ValueError unless every case can hold --documents documents: at most T of them, and the
    queries (the last S tokens) within the T tokens."""
    for c in cases:
        if documents and (c.S > c.T or documents > c.T):
            raise ValueError(f"--documents {documents}: case {c.name} (S={c.S}, T={c.T}) cannot be packed as "
                             f"{documents} documents of its T tokens with its S queries among them: --documents "
                             "needs S <= T and at most T documents")


def impl_names(args: argparse.Namespace) -> list[str]:
    """attnc (unless --no-attnc), attnc over each --kv format, then the --compare baselines, validated."""
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    unknown = [c for c in compare if c not in IMPLS or c in ("attnc", DOCS_IMPL) or kv_format_of(c)]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from ort, tinygrad, naive")
    kv = [c.strip() for c in (args.kv or "").split(",") if c.strip()]
    bad = [f for f in kv if KV_PREFIX + f not in IMPLS]
    if bad:
        raise ValueError(f"unknown KV format(s) {bad} for --kv; choose from q8_0, q4_0, int8")
    if args.documents < 0:
        raise ValueError(f"--documents must be a positive number of documents, got {args.documents}")
    if args.no_attnc and (kv or args.documents):
        raise ValueError("--no-attnc times the baselines only; --kv and --documents add rows of attnc's")
    docs = [DOCS_IMPL] if args.documents else []
    names = ([] if args.no_attnc else ["attnc"]) + [KV_PREFIX + f for f in kv] + docs + compare
    if not names:
        raise ValueError("nothing to run: --no-attnc without --compare")
    return list(dict.fromkeys(names))


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter to the numbers."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def device_info(device: Any) -> dict[str, Any]:
    """What the JSON records about the device."""
    info = {k: str(v) for k, v in dict(getattr(device, "info", {})).items()}
    out: dict[str, Any] = {
        "name": getattr(device, "name", "?"),
        "backend": getattr(device, "backend", "?"),
        "api": getattr(device, "api", "?"),
        "adapter_type": getattr(device, "adapter_type", info.get("adapter_type", "?")),
        "features": sorted(getattr(device, "features", ())),
        "key": getattr(device, "key", None),
        "info": info,
        "limits": {k: int(v) for k, v in dict(getattr(device, "limits", {})).items()},
        "versions": versions(),
    }
    return out


def _progress(total: int) -> Any:
    """A tqdm bar on a terminal's stderr; else (no tqdm, or a log file) a plain counter."""
    if not sys.stderr.isatty():
        return _Counter(total)
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, unit="result", dynamic_ncols=True)
    except ImportError:
        return _Counter(total)


class _Counter:
    """The fallback progress display: one numbered stderr line per finished result."""

    def __init__(self, total: int):
        self.total, self.n = total, 0
        self.desc = ""

    def set_description(self, desc: str) -> None:
        """Remember what is running now."""
        self.desc = desc

    def write(self, text: str, file: Any = None) -> None:
        """Print one finished result, numbered."""
        print(f"[{self.n + 1}/{self.total}] {text}", file=file or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        """Count `n` finished results."""
        self.n += n

    def close(self) -> None:
        """Nothing to tear down."""


def math_dtype(impl: str, opts: RunOptions) -> str:
    """The dtype an implementation computes in: attnc's rows in f32 but for the f16-tile
    targets (f16 storage is unpacked to f32), a baseline in the inputs' dtype."""
    from attnc.lowering.schedule import F16_MATH_TARGETS

    if impl.startswith("attnc"):
        return "f16" if opts.target in F16_MATH_TARGETS else "f32"
    return opts.dtype


def result_row(
    case: Case,
    impl: str,
    measured: Any,
    err: float | None,
    ceilings: dict[str, Any],
    dtype: str,
    math: str | None = None,
) -> dict[str, Any]:
    """One JSON result: timing, rates, accuracy, fractions of the ceilings, extras. `math`: the
    dtype of the implementation's arithmetic, whose FMA ceiling it is measured against (attnc's
    f16 storage computes in f32: the f16 ceiling is 4x lower on lavapipe, and gave 199 % FMA)."""
    ms = measured.timing.ms
    itemsize = 2 if dtype == "f16" else 4
    tflops = case.flops() / (ms * 1e-3) / 1e12 if ms > 0 else None
    gbps = case.nbytes(itemsize) / (ms * 1e-3) / 1e9 if ms > 0 else None
    fma = ceilings.get(f"fma_{math or dtype}") or ceilings.get("fma_f32")
    copy = ceilings.get("copy")
    row: dict[str, Any] = {
        "case": case.name,
        "impl": impl,
        "ms": ms,
        "tflops": tflops,
        "gbps": gbps,
        "relerr": err,
        "correct": None if err is None else bool(err <= TOLERANCE[dtype]),
        "fma_fraction": tflops / fma.value if tflops and fma else None,
        "copy_fraction": gbps / copy.value if gbps and copy else None,
        "dtype": dtype,
        "shape": case.as_dict(),
        **measured.timing.as_dict(),
    }
    if measured.timing.notes:
        row["notes"] = list(measured.timing.notes)
    if measured.timing.per_dispatch_ms:
        row["per_dispatch_ms"] = list(measured.timing.per_dispatch_ms)
    row.update({k: v for k, v in measured.extra.items() if k not in row})
    return row


def error_row(case: Case, impl: str, message: str, dtype: str) -> dict[str, Any]:
    """A result that could not be measured: numbers are null and `error` says why."""
    return {
        "case": case.name, "impl": impl, "ms": None, "tflops": None, "gbps": None,
        "relerr": None, "correct": None, "fma_fraction": None, "copy_fraction": None,
        "dtype": dtype, "shape": case.as_dict(), "error": message,
    }  # fmt: skip


CLOCK_ATTEMPTS = 3  # measurements taken with the GPU's clocks down are retaken this often at most


def measure(device: Any, case: Case, impl: str, copies: Sequence[Any], opts: RunOptions, bar: Any
            ) -> tuple[Any, float | None, int]:
    """One implementation's measurement, started on a busy, clocked-up GPU and checked after:
    when the GPU then runs slower than CLOCK_OK of its best (its clocks came down during the
    measurement, e.g. throttled), it is retaken after a longer warm-up, up to CLOCK_ATTEMPTS
    times. Returns the measurement, the clock ratio after it and the attempts it took."""
    clock = None
    for attempt in range(1, CLOCK_ATTEMPTS + 1):
        warm_up(device, ms=60.0 if attempt == 1 else 1000.0)
        m = IMPLS[impl](device, case, copies, opts)
        clock = clock_ratio(device)
        if clock is None or clock >= CLOCK_OK:
            return m, clock, attempt
        bar.write(f"{case.name} {impl}: the GPU ran at {100 * clock:.0f} % of its best speed after the "
                  f"measurement (attempt {attempt} of {CLOCK_ATTEMPTS})", file=sys.stderr)
    return m, clock, CLOCK_ATTEMPTS


def run_cases(
    device: Any,
    cases: Sequence[Case],
    impls: Sequence[str],
    opts: RunOptions,
    ceilings: dict[str, Any],
    *,
    cache_bytes: int,
    check: bool,
    seed: int,
    references: dict[Case, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Measure every (case, impl), yielding result rows as they finish. `references` keeps each
    case's float64 reference, so a later round does not compute it again."""
    bar = _progress(len(cases) * len(impls))
    try:
        for case in cases:
            itemsize = 2 if opts.dtype == "f16" else 4
            n = rotation_count(case.nbytes(itemsize), cache_bytes) if cache_bytes > 0 else 1
            copies = [make_inputs(case, opts.dtype, seed + i) for i in range(n)]
            known = {} if references is None else references
            if check and case not in known:
                known[case] = reference(case, *copies[0])
            ref = known.get(case) if check else None
            base_ms = None
            for impl in impls:
                bar.set_description(f"{case.name} {impl}")
                try:
                    m, clock, attempts = measure(device, case, impl, copies, opts, bar)
                    fmt = kv_format_of(impl)
                    err = relerr(m.out, ref) if ref is not None else None
                    if impl == DOCS_IMPL and check:
                        err = relerr(m.out, reference(case, *copies[0], documents=opts.documents))
                    if fmt is not None and ref is not None:
                        # the contract is against the dequantized K/V; the quantization error is reported
                        q, k, v = copies[0]
                        err, unquantized = relerr(m.out, reference(case, q, *dequantized(fmt, k, v))), err
                    row = result_row(case, impl, m, err, ceilings, opts.dtype, math_dtype(impl, opts))
                    row.update(clock=clock, attempts=attempts)
                    if impl == "attnc":
                        base_ms = row["ms"]
                    if impl == DOCS_IMPL:
                        row["documents"] = opts.documents
                        if base_ms:
                            row["speedup_vs_attnc"] = base_ms / row["ms"]
                    if fmt is not None:
                        if ref is not None:
                            row["relerr_unquantized"] = unquantized
                        if base_ms:
                            row["speedup_vs_attnc"] = base_ms / row["ms"]
                        if row.get("append_ms") is not None:  # against the attention timed beside it
                            row["append_fraction"] = row["append_ms"] / row.get("append_step_attention_ms", row["ms"])
                except Unavailable as exc:
                    row = error_row(case, impl, f"unavailable: {exc}", opts.dtype)
                except Exception as exc:  # one failing implementation must not stop a sweep
                    traceback.print_exc(file=sys.stderr)
                    row = error_row(case, impl, f"{type(exc).__name__}: {exc}", opts.dtype)
                bar.write(summary(row), file=sys.stderr)
                bar.update(1)
                yield row
    finally:
        bar.close()


def merge_rounds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of several rounds (the same cases and impls measured again, in order) as one row per
    (case, impl): its fastest round's row, with every round's median in `ms_rounds`, the worst
    relerr of any round and `correct` only if every round was; a round that failed makes the
    row its error (`ms_rounds` None for that round).
    Speed-ups over attnc are taken again between the fastest rounds. A round slower than the
    others is the GPU's clock state while it ran (docs/BENCHMARKS.md, Method), which this
    keeps out of the result and shows in `ms_rounds`."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["impl"]), []).append(r)
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tries in groups.items():
        ms_rounds = [None if r.get("error") else r.get("ms") for r in tries]
        failed = [r for r in tries if r.get("error") or r.get("ms") is None]
        if failed:  # a round that failed is the result, not hidden behind one that ran
            merged[key] = dict(failed[0], ms_rounds=ms_rounds)
            continue
        best = dict(min(tries, key=lambda r: r["ms"]), ms_rounds=ms_rounds)
        errors = [r["relerr"] for r in tries if r.get("relerr") is not None]
        if errors:  # (a NaN error is the worst: max() would pass over it)
            best["relerr"] = math.nan if any(math.isnan(e) for e in errors) else max(errors)
        verdicts = [r.get("correct") for r in tries]
        best["correct"] = None if None in verdicts else all(verdicts)
        merged[key] = best
    for (case, _impl), row in merged.items():
        base = merged.get((case, "attnc"))
        if "speedup_vs_attnc" in row and base is not None and base.get("ms") and row.get("ms"):
            row["speedup_vs_attnc"] = base["ms"] / row["ms"]
    return list(merged.values())


def summary(row: dict[str, Any]) -> str:
    """One line about a result, for logs."""
    if row.get("error"):
        return f"{row['case']} {row['impl']}: {row['error']}"
    speedup = f", {row['speedup_vs_attnc']:.2f}x attnc" if row.get("speedup_vs_attnc") else ""
    append = ""
    if row.get("append_ms") is not None:  # a quantized cache's append per decode step
        one = row.get("append_one_pass_ms")
        # a difference of two medians: below 0 it is inside their runs' spread, not a gain
        cost = (f"{row['append_ms'] * 1e3:.1f} us ({row['append_fraction']:.0%} of the step's attention)"
                if row["append_ms"] >= 0 else
                f"not measurable ({row['append_ms'] * 1e3:.1f} us: within the spread of the two medians)")
        in_pass = "" if one is None else f", {one * 1e3:.1f} us in the attention's pass" if one >= 0 else \
            f", not measurable in the attention's pass ({one * 1e3:.1f} us)"
        append = f", append {cost}{in_pass}"
    return (f"{row['case']} {row['impl']}: {row['ms']:.4f} ms, {_fmt(row['tflops'], '.3f')} "
            f"TFLOP/s, relerr {_fmt(row['relerr'], '.1e')}{speedup}{append} ({row['timing']})")  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]], ceilings: dict[str, Any]) -> str:
    """The results as a fixed-width text table, ceilings first."""
    lines = []
    for c in ceilings.values():
        lines.append(f"ceiling {c.name}: {c.value:.4g} {c.unit} ({c.ms:.3f} ms, {c.timing})")
    head = ("case", "impl", "ms", "TFLOP/s", "GB/s", "relerr", "ok", "%FMA", "%BW", "timing")
    table = [head]
    for r in rows:
        if r.get("error"):
            table.append((r["case"], r["impl"], "-", "-", "-", "-", "-", "-", "-", r["error"]))
            continue
        ok = {True: "yes", False: "WRONG", None: "-"}[r["correct"]]
        frac = [_fmt(None if f is None else 100 * f, ".1f") for f in
                (r["fma_fraction"], r["copy_fraction"])]  # fmt: skip
        timing = r["timing"] + (" QUANTIZED" if r.get("timestamps_quantized") else "")
        if r.get("clock") is not None and r["clock"] < CLOCK_OK:
            timing += f" CLOCKS AT {100 * r['clock']:.0f} %"
        table.append((
            r["case"], r["impl"], _fmt(r["ms"], ".4f"), _fmt(r["tflops"], ".4f"),
            _fmt(r["gbps"], ".2f"), _fmt(r["relerr"], ".2e"), ok, *frac, timing,
        ))  # fmt: skip
    if not rows:
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join(cells + [str(row[-1])]).rstrip())
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], ceilings: dict[str, Any], path: str, title: str) -> None:
    """Grouped bars of TFLOP/s per case per implementation; wrong results are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cases) + 2), 4.8))
    for j, impl in enumerate(impls):
        mine = {r["case"]: r for r in rows if r["impl"] == impl and r.get("tflops")}
        xs = [i + (j - (len(impls) - 1) / 2) * width for i, c in enumerate(cases) if c in mine]
        hs = [mine[c]["tflops"] for c in cases if c in mine]
        bars = ax.bar(xs, hs, width, color=f"C{j}")
        for patch, c in zip(bars, [c for c in cases if c in mine], strict=True):
            if mine[c].get("correct") is False:
                patch.set_hatch("//")
                patch.set_edgecolor("black")
    handles: list[Any] = []
    for j, impl in enumerate(impls):
        wall = any(r["impl"] == impl and str(r.get("timing", "")).startswith("wall") for r in rows)
        handles.append(Patch(color=f"C{j}", label=impl + (" (wall time)" if wall else "")))
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="wrong result"))
    fma = ceilings.get("fma_f32")
    if fma is not None:
        line = ax.axhline(fma.value, color="gray", linestyle="--")
        line.set_label(f"FMA f32 ceiling {fma.value:.3g}")
        handles.append(line)
    values = [r["tflops"] for r in rows if r.get("tflops")]
    if values and max(values) / max(min(values), 1e-12) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (GPU time per op)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` (atomically, through a temporary file); no-op without a path."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(target)


def check_outputs(args: argparse.Namespace) -> None:
    """Before measuring anything: --plot's matplotlib is importable and the --json and --plot
    files can be written (ValueError saying what to do otherwise), so a sweep never ends in
    an error it could have reported first."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
        target = Path(path)
        if target.is_dir():
            raise ValueError(f"{flag} {path}: is a directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot create {target.parent}: {exc.strerror or exc}") from None
        if not os.access(target.parent, os.W_OK):
            raise ValueError(f"{flag} {path}: {target.parent} is not writable")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(f'--plot {args.plot} needs matplotlib: pip install "attnc[bench]"') from None


def check_target(target: str | None, dtype: str, kv: str | None = None) -> None:
    """ValueError unless --target names a variant family that can take --dtype's inputs and
    --kv's quantized K/V (whether the device offers it is said when the device is opened)."""
    from attnc.lowering.schedule import F16_MATH_TARGETS, TARGETS

    if target is None:
        return
    if target not in TARGETS:
        raise ValueError(f"--target {target}: not a variant family; the families are {', '.join(sorted(TARGETS))}")
    if target in F16_MATH_TARGETS and dtype != "f16":
        raise ValueError(f"--target {target} stages f16 tiles: it takes --dtype f16")
    if target in F16_MATH_TARGETS and kv:
        raise ValueError(f"--target {target} stages K and V in f16 tiles, which would round a quantized cache's "
                         f"values (d * q: up to 19 bits): --kv {kv} runs with --target "
                         f"{target.removesuffix('-f16')} (or without --target)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `attnc bench` with `argv` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        try:
            suites = load_suites(args.shapes)
        except ValueError as exc:
            print(f"attnc bench: {exc}", file=sys.stderr)
            return 2
        try:
            for name, suite in suites.items():
                print(f"{name}: " + ", ".join(c.name for c in suite))
        except BrokenPipeError:  # `attnc bench --list | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit instead of the closed pipe
        return 0
    try:
        if args.runs < 1 or args.warmup < 1 or args.repeat_processes < 1 or args.rounds < 1:
            raise ValueError("--runs, --warmup, --rounds and --repeat-processes must be >= 1 (the first run of "
                             "each implementation compiles its programs: it is never timed)")
        if args.seed < 0 or args.cache_mib < 0:
            raise ValueError("--seed and --cache-mib must be >= 0")
        check_target(args.target, args.dtype, args.kv)
        if args.only_ceilings and args.ceilings == "off":
            raise ValueError("--only-ceilings measures the ceilings: give it --ceilings auto, small or large, not off")
        if args.plot and args.repeat_processes > 1:
            raise ValueError("--plot draws one process's results: run without --repeat-processes for a plot "
                             "(the spread is printed, and written with --json)")
        cases = select_cases(args)
        impls = impl_names(args)
        check_documents(cases, args.documents)
        check_outputs(args)
    except ValueError as exc:
        print(f"attnc bench: {exc}", file=sys.stderr)
        return 2
    if args.repeat_processes > 1:
        from attnc.bench.repeat import run_repeated

        return run_repeated(list(sys.argv[1:] if argv is None else argv), args.repeat_processes, args.json)
    try:
        return _run(args, argv, cases, impls)
    except AttncError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except OSError as exc:  # --json or --plot could not be written after all
        print(f"attnc bench: cannot write {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: Sequence[str] | None, cases: list[Case], impls: list[str]) -> int:
    """Measure the ceilings and every (case, impl); print the table, write --json and --plot."""
    from attnc.bench.ceilings import measure_ceilings
    from attnc.runtime.devices import get_device

    device = get_device(args.device)
    print(f"device: {device!r}", file=sys.stderr)
    if args.target is not None:  # a family the device lacks: said before anything is measured
        from attnc.lowering.schedule import pick_family

        pick_family(device.capabilities, args.target)
    ceilings = {}
    if args.ceilings != "off":
        ceilings = measure_ceilings(device, size=args.ceilings)
    if args.only_ceilings:
        cases = []
    opts = RunOptions(runs=args.runs, warmup=args.warmup, dtype=args.dtype, target=args.target,
                      documents=args.documents)
    started = time.time()
    doc: dict[str, Any] = {
        "device": device_info(device),
        "ceilings": {k: c.as_dict() for k, c in ceilings.items()},
        "config": {
            "argv": list(sys.argv[1:] if argv is None else argv), "suite": args.suite,
            "dtype": args.dtype, "runs": args.runs, "warmup": args.warmup,
            "cache_mib": args.cache_mib, "started": started, "seconds": 0.0,
        },
        "results": [],
    }  # fmt: skip
    doc["config"]["rounds"] = args.rounds
    write_json(args.json, doc)
    measured: list[dict[str, Any]] = []
    references: dict[Case, Any] = {}
    for _ in range(args.rounds):
        for row in run_cases(device, cases, impls, opts, ceilings, cache_bytes=args.cache_mib << 20,
                             check=not args.no_check, seed=args.seed, references=references):  # fmt: skip
            measured.append(row)
            doc["results"] = merge_rounds(measured) if args.rounds > 1 else measured
            doc["config"]["seconds"] = time.time() - started
            write_json(args.json, doc)  # after every result, so a killed sweep keeps what it had
    rows = doc["results"]
    print(format_table(rows, ceilings))
    if args.plot:
        title = f"{doc['device']['name']} ({doc['device']['backend']}, {args.dtype})"
        plot(rows, ceilings, args.plot, title)
    return 1 if any(failed_attnc_row(r) for r in rows) else 0


def failed_attnc_row(row: dict[str, Any]) -> bool:
    """Whether a row is attnc's (any KV format, the documents row) and wrong or failed (a row
    that could not be measured for a reason, "unavailable: ...", is neither); a baseline's
    wrong result is reported in the table, not in the exit status."""
    if not row["impl"].startswith("attnc"):
        return False
    error = row.get("error")
    return row.get("correct") is False or bool(error and not str(error).startswith("unavailable:"))
