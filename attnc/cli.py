"""The `attnc` command line: compile, check, print, devices, run (the main job), bench."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from attnc.errors import AttncError


def _load_kernel(spec: str, options: dict[str, Any]):
    """KERNEL is an .attn file or `module:name` naming a DSL kernel (traced with options)."""
    from attnc.frontend.dsl import KernelDef
    from attnc.frontend.parser import parse_file

    if spec.endswith(".attn") or Path(spec).is_file():
        if options:
            raise SystemExit("error: --set options apply to module:kernel DSL kernels, not .attn files")
        return parse_file(spec)
    if ":" not in spec:
        raise SystemExit(f"error: KERNEL must be an .attn file or module:kernel, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: cannot load {spec!r}: {exc}") from None
    if not isinstance(obj, KernelDef):
        raise SystemExit(f"error: {spec!r} is a {type(obj).__name__}, not an @attnc.kernel")
    # `--set score_mod=pkg.module:fn`: options naming a Python object are that object; what a
    # mod captures becomes kernel inputs, listed in the manifest for the caller to bind
    options = {k: _resolve(v) if isinstance(v, str) and _OBJECT.match(v) else v for k, v in options.items()}
    return obj.trace(**options)


_OBJECT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def _resolve(spec: str) -> Any:
    """The object `module:attr` names (SystemExit with the reason when it cannot be loaded)."""
    mod_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: cannot load {spec!r}: {exc}") from None


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def cmd_compile(args: argparse.Namespace) -> int:
    from attnc.lowering.manifest import compile_kernel
    from attnc.lowering.plan import Dialect, Family, Plan, Storage

    kernel = _load_kernel(args.kernel, _parse_sets(args.set))
    targets = args.target or ["portable", "subgroups"]
    dtypes = args.dtype or ["f32", "f16"]
    plans = [Plan(Family(t), Storage(d), Dialect.TINT, workgroup_size=args.wg, value_columns=args.dvc,
                  unroll=args.unroll,
                  prefetch=int(args.prefetch)) for t in targets for d in dtypes]
    manifest = compile_kernel(kernel, plans, Path(args.output))
    for v in manifest["variants"]:
        files = ", ".join(p["file"] for p in v["programs"])
        print(f"{v['name']}: {files}")
    print(f"wrote {Path(args.output) / 'manifest.json'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from attnc.frontend.parser import parse_file

    bad = 0
    for f in args.files:
        try:
            parse_file(f)
            print(f"{f}: ok")
        except AttncError as exc:
            print(exc.render(), file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def cmd_print(args: argparse.Namespace) -> int:
    from attnc.frontend.parser import parse_file
    from attnc.ir.printer import print_kernel

    print(print_kernel(parse_file(args.file)), end="")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from attnc.runtime.devices import default_device, devices

    best = default_device()
    for d in devices():
        mark = "*" if d is best else " "
        sg = f"subgroup size {d.subgroup_size}" if d.subgroup_size else "no subgroups"
        lim = d.limits
        print(f"{mark} {d.spec:13s} {d.adapter_type:12s} {d.name}")
        print(f"    features: {', '.join(sorted(d.features)) or '-'}; {sg} "
              f"(range {d.subgroup_min_size}..{d.subgroup_max_size})")
        print(f"    limits: workgroup storage {lim.get('max-compute-workgroup-storage-size')} B, "
              f"{lim.get('max-compute-invocations-per-workgroup')} invocations, "
              f"storage binding {lim.get('max-storage-buffer-binding-size')} B")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: compile the shipped kernels and run them on a device, checked against numpy."""
    from attnc.demo import run_demo

    return run_demo(args.device, verbose=True)


def cmd_tune(args: argparse.Namespace) -> int:
    """Time the candidate variants of each case on a device and store the fastest."""
    import numpy as np

    from attnc.bench.cases import load_suite, parse_shape
    from attnc.runtime.tune import cache_path, tune

    cases = [parse_shape(s) for s in args.shape] if args.shape else load_suite(args.suite)
    if args.case:
        cases = [c for c in cases if c.name in args.case]
        if not cases:
            raise SystemExit(f"error: no case named {args.case} in suite {args.suite}")
    dtype = np.float16 if args.dtype == "f16" else np.float32
    for c in cases:
        dims = dict(B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, T=c.T, D=c.D, Dv=c.Dv)
        print(f"{c.name}: tuning", file=sys.stderr)
        res = tune(dims, dtype, device=args.device, runs=args.runs, max_candidates=args.max, causal=c.causal)
        best = res["best"]
        print(f"{c.name} [{res['bucket']}] on {res['device']}: {best['variant']} {best['ms']:.3f} ms "
              f"({len([r for r in res['results'] if r.get('ok')])} valid of {len(res['results'])})")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"case": c.name, **res}) + "\n")
    print(f"cache: {cache_path()}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from attnc.bench.cli import main as bench_main

    return int(bench_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `attnc` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    ap = argparse.ArgumentParser(prog="attnc", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a kernel to .wgsl files and manifest.json")
    c.add_argument("kernel", help="an .attn file or module:kernel")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--target", action="append", choices=["portable", "subgroups"],
                   help="variant family (repeatable; default: both)")
    c.add_argument("--dtype", action="append", choices=["f32", "f16"], help="storage dtype (default: both)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="option or tunable of a DSL kernel, e.g. --set causal=true --set BN=64; a value "
                        "module:name is that Python object, e.g. --set score_mod=examples.flex.t5_buckets:score_mod")
    c.add_argument("--wg", type=int, default=128, help="invocations per workgroup")
    c.add_argument("--dvc", type=int, default=64, help="output columns per workgroup")
    c.add_argument("--unroll", type=int, default=1, metavar="UN",
                   help="copies of each tile loop's body per iteration (64: straight-line code, what "
                        "GPUs run fastest; 1: small shaders that compile fast on CPU adapters)")
    c.add_argument("--prefetch", action="store_true",
                   help="load the next staged block into registers before the math on the current one")
    c.set_defaults(fn=cmd_compile)
    k = sub.add_parser("check", help="parse and verify .attn files")
    k.add_argument("files", nargs="+")
    k.set_defaults(fn=cmd_check)
    p = sub.add_parser("print", help="print an .attn file in canonical form")
    p.add_argument("file")
    p.set_defaults(fn=cmd_print)
    d = sub.add_parser("devices", help="list WebGPU adapters and their capabilities")
    d.set_defaults(fn=cmd_devices)
    r = sub.add_parser("run", help="compile the shipped kernels, run them, check against numpy")
    r.add_argument("--device", default=None, help="device spec (default: the best adapter)")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("tune", help="autotune variants per device and shape bucket (persistent cache)")
    t.add_argument("--suite", default="ci", help="suite of attnc/bench/shapes.json (ci, seeds)")
    t.add_argument("--case", action="append", help="only these case names")
    t.add_argument("--shape", action="append", default=[], help="B,Hq,Hkv,S,T,D,Dv[,causal]")
    t.add_argument("--device", default=None)
    t.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    t.add_argument("--runs", type=int, default=7)
    t.add_argument("--max", type=int, default=64, help="at most this many candidates per case")
    t.add_argument("--json", default=None, help="append every measurement as JSON lines")
    t.set_defaults(fn=cmd_tune)
    sub.add_parser("bench", help="benchmarks (see `attnc bench --help`)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        return int(args.fn(args))
    except AttncError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    finally:
        if args.cmd == "run":
            print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
