"""The `attnc` command line: compile, check, print, devices, run (the main job), tune, bench.

Every failure a user can cause (a missing or binary file, a bad option value, an output
directory that cannot be used, an unknown suite) is a one-line message on stderr and a
non-zero exit status: 2 for a command line attnc cannot use, 1 for a kernel it rejects.
"""

from __future__ import annotations

import argparse
import collections.abc
import difflib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from attnc.argparsing import Parser
from attnc.errors import AttncError, UsageError

MANIFEST = "manifest.json"
MAX_DVC = 1024  # --dvc: output columns per workgroup, four per invocation (Dv is at most a few hundred)
MAX_WG = 1024  # --wg: the most invocations per workgroup any WebGPU device grants
MAX_UNROLL = 1024  # --unroll: past the longest loop of a tile (BN keys) it changes nothing
F16_TILE_TARGETS = {"portable-f16": "portable", "subgroups-f16": "subgroups"}  # --target: f16 tiles of a family


# ----------------------------------------------------------------------------- kernels


def _read_kernel(path: str):
    """Parse an .attn file; a file that cannot be read is a UsageError naming it."""
    from attnc.frontend.parser import parse_file

    try:
        return parse_file(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load_kernel(spec: str, sets: list[str]):
    """KERNEL is an .attn file or `module:name` naming a DSL kernel (traced with the --set options);
    returns the kernel and those options."""
    from attnc.frontend.dsl import KernelDef
    from attnc.ir.nodes import StoreKernel

    if spec.endswith(".attn") or Path(spec).is_file():
        if sets:
            raise UsageError("--set options apply to module:kernel DSL kernels, not .attn files "
                             "(an .attn file states its tunables in its tunables(...) line)")
        return _read_kernel(spec), {}
    if ":" not in spec:
        raise UsageError(f"KERNEL must be an .attn file or module:kernel, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec!r}: {exc}") from None
    except Exception as exc:  # the user's module failed while importing: say where, in one line
        raise UsageError(f"cannot load {spec!r}: importing {mod_name} raised {_where(exc)}") from None
    if not isinstance(obj, KernelDef):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not an @attnc.kernel")
    options = parse_sets(obj, sets)
    try:
        traced = obj.trace(**options)
        if isinstance(traced, StoreKernel):
            raise UsageError(f"{spec!r} is a store kernel (a KV cache's append): `attnc compile` writes store "
                             "kernels into the manifest of an attention kernel that reads a quantized K or V, "
                             "under \"stores\" (e.g. --set k_dtype=q8_0); it compiles attention kernels only")
        _tile_sizes_of(traced, options)
        return traced, options
    except AttncError as exc:
        if exc.span is not None and os.path.abspath(exc.span.file) == os.path.abspath(__file__):
            # refused at the trace call itself: an option value from the command line, not the
            # kernel's code, so name the --set rather than show attnc's own source line
            raise UsageError(f"--set: {exc.message}", notes=exc.notes) from None
        raise
    except RecursionError:
        raise UsageError(f"tracing {spec!r}: the kernel is nested too deeply") from None
    except Exception as exc:  # a bug in the user's kernel function, not in attnc
        raise UsageError(f"tracing {spec!r} raised {_where(exc)}") from None


def _tile_sizes_of(kernel: Any, options: dict[str, Any]) -> None:
    """A tile size the --set options give that the lowering cannot take, said of the --set (the
    lowering's error points at the kernel's tile, in the kernel's file)."""
    from attnc.lowering.analyze import check_tile_sizes

    try:
        check_tile_sizes(kernel)
    except AttncError as exc:
        if any(f"tunable {name}=" in exc.message for name in options):
            raise UsageError(f"--set: {exc.message}") from None
        raise


def _where(exc: BaseException) -> str:
    """`Type: message (file:line)` for an exception, at the innermost frame it came from."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            where = f" ({frames[-1].filename}:{frames[-1].lineno})"
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}{where}" if first else f"{type(exc).__name__}{where}"


# ----------------------------------------------------------------------------- --set values

_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}
_NONE_WORDS = {"none", "null"}
_INT = re.compile(r"[+-]?[0-9]+\Z")


class _BadValue(Exception):
    """A --set value that does not read as the option's type."""


class _NotSettable(Exception):
    """An option whose type (a Python function) the command line cannot express."""


def option_types(kdef: Any) -> dict[str, Any]:
    """The options of a DSL kernel (its keyword-only parameters, and `<input>_dtype` for each tensor
    input: its storage, e.g. k_dtype=q8_0) and the type each takes on the command line: the
    annotation, else the default's type (a tunable: a positive int), else Any."""
    from attnc.frontend.dsl import Tunable

    out: dict[str, Any] = {}
    for p in kdef.signature.parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            if getattr(p.annotation, "dims", None):  # a tensor input: its storage, <name>_dtype=q8_0
                out[f"{p.name}_dtype"] = str
            continue
        if isinstance(p.default, Tunable):
            out[p.name] = Tunable
        elif p.annotation is not inspect.Parameter.empty:
            out[p.name] = p.annotation
        elif p.default is not None and type(p.default) in (bool, int, float, str):
            out[p.name] = type(p.default)
        else:
            out[p.name] = Any
    return out


def parse_sets(kdef: Any, items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as typed keyword options of `kdef`; UsageError naming the item
    for an unknown option or a value that is not of the option's type (a later KEY wins)."""
    types_ = option_types(kdef)
    inputs = [p.name for p in kdef.signature.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        shown = _shown(item)
        if not eq:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        if key not in types_:
            if key in inputs:
                raise UsageError(f"--set {shown}: {key!r} is an input of kernel {kdef.name}, not an option")
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"--set {shown}: kernel {kdef.name} has no option {key!r}; {hint}"
                             f"options: {', '.join(sorted(types_))}")
        try:
            out[key] = convert(text, types_[key])
        except _NotSettable:
            raise UsageError(f"--set {shown}: option {key!r} takes a Python function: give it as module:name "
                             "(e.g. --set mask_mod=examples.flex.alibi:causal)") from None
        except _BadValue:
            raise UsageError(f"--set {shown}: option {key!r} takes {describe(types_[key])}, "
                             f"got {text!r}") from None
    return out


def _shown(text: str) -> str:
    """`text` as a message quotes it: as typed, or as a Python literal when it holds a line break
    or another unprintable character (messages stay one line)."""
    return text if text.isprintable() else repr(text)


def convert(text: str, t: Any) -> Any:
    """`text` read as a value of type `t`: bool (true/false/1/0, any case), int, float, str,
    None (none/null), a union of those, tuple[...] (`[a, b]`, `(a, b)` or `a,b`), a tunable
    (a positive int) or Any (JSON, lists as tuples); _BadValue when it is not one."""
    from attnc.frontend.dsl import Tunable

    word = text.strip()
    origin = typing.get_origin(t)
    if t is Tunable:
        value = convert(word, int)
        if value < 1:
            raise _BadValue
        return value
    if origin in (typing.Union, types.UnionType):
        members = sorted(typing.get_args(t), key=lambda a: a is not type(None))  # none first
        settable = False  # some member other than None has a command-line spelling
        for member in members:
            try:
                return convert(word, member)
            except _BadValue:
                settable = settable or member is not type(None)
            except _NotSettable:
                pass
        if settable:
            raise _BadValue
        raise _NotSettable
    if t is type(None) or t is None:
        if word.lower() in _NONE_WORDS:
            return None
        raise _BadValue
    if t is bool:
        if word.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[word.lower()]
        raise _BadValue
    if t is int:
        if _INT.match(word):
            return int(word)
        raise _BadValue
    if t is float:
        try:
            value = float(word)
        except ValueError:
            raise _BadValue from None
        if math.isnan(value):
            raise _BadValue
        return value
    if t is str:
        return text
    if t is tuple or origin is tuple:
        args = typing.get_args(t)
        parts = _list_items(word)
        if args and args[-1] is not Ellipsis and len(parts) != len(args):
            raise _BadValue
        elems = [args[0]] * len(parts) if args and args[-1] is Ellipsis else list(args) or [Any] * len(parts)
        return tuple(convert(p, a) for p, a in zip(parts, elems, strict=True))
    if t is collections.abc.Callable or origin is collections.abc.Callable:
        if _OBJECT.match(word):  # module:name, a function defined in Python (a mod's captures
            return _resolve(word)  # become kernel inputs, listed in the manifest)
        raise _NotSettable
    if t is Any:
        try:
            value = json.loads(word)
        except ValueError:
            raise _BadValue from None
        return _tuples(value)
    raise _NotSettable  # a class or other type the command line has no spelling for


_OBJECT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def _resolve(spec: str) -> Any:
    """The callable `module:attr` names (UsageError with the reason when it cannot be loaded)."""
    mod_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec!r}: {exc}") from None
    if not callable(obj):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _list_items(word: str) -> list[str]:
    """The items of `[a, b]`, `(a, b)` or `a,b` (no nesting); [] for `[]` or `()`."""
    if len(word) >= 2 and (word[0], word[-1]) in (("[", "]"), ("(", ")")):
        word = word[1:-1]
    if not word.strip():
        return []
    return [p.strip() for p in word.split(",")]


def _tuples(value: Any) -> Any:
    """JSON lists as tuples (options are hashable, like Python's own keyword values)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def describe(t: Any) -> str:
    """How the messages name a type: `true or false`, `an integer`, `none or a list of 2 (...)`."""
    from attnc.frontend.dsl import Tunable

    origin = typing.get_origin(t)
    if t is Tunable:
        return "a positive integer"
    if origin in (typing.Union, types.UnionType):
        members = sorted(typing.get_args(t), key=lambda a: a is not type(None))
        return " or ".join(describe(m) for m in members)
    if t is type(None) or t is None:
        return "none"
    if t is tuple or origin is tuple:
        args = typing.get_args(t)
        if not args:
            return "a list"
        if args[-1] is Ellipsis:
            return f"a list of {describe(args[0])}"
        example = ", ".join(_example(a) for a in args)
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)}), e.g. [{example}]"
    if t is collections.abc.Callable or origin is collections.abc.Callable:
        return "a Python function"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text",
             Any: "a JSON value (text in double quotes)"}
    return names.get(t, getattr(t, "__name__", str(t)))


def _example(t: Any) -> str:
    """A value of type `t` as one would type it."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return _example(next(a for a in typing.get_args(t) if a is not type(None)))
    return {bool: "true", int: "4", float: "0.5", str: "x"}.get(t, "null")


# ----------------------------------------------------------------------------- compile


def _output_dir(out: Path, force: bool) -> list[str]:
    """Check `-o OUT` before compiling: a directory, empty unless --force. With --force, the
    names of the previous compile's files there (what its manifest.json lists, and itself)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a directory")
    if not out.is_dir():
        return []
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot list the directory: {exc.strerror or exc}") from None
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"-o {out}: the directory holds {len(entries)} file{'s' * (len(entries) != 1)} "
                         f"({shown}); pass --force to replace the files of a previous compile there")
    return _previous_compile(out) if entries else []


def _previous_compile(out: Path) -> list[str]:
    """The files a previous compile left in `out`: those its manifest.json names, and the manifest
    (plain names inside `out` only; an unreadable manifest names none but itself)."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return []
    names = {MANIFEST}
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return sorted(names)
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, val in node.items():
                files = [val] if key == "file" else list(val.values()) if key == "dialect_files" and \
                    isinstance(val, dict) else None
                if files is None:
                    stack.append(val)
                    continue
                for f in files:
                    if isinstance(f, str) and f not in (".", "..") and Path(f).name == f and "\\" not in f:
                        names.add(f)
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(n for n in names if (out / n).is_file())


def _install(tmp: Path, out: Path, previous: list[str]) -> list[str]:
    """Move the compiled files from `tmp` into `out` (the manifest last), first removing the
    previous compile's files; returns lines saying what was overwritten or removed."""
    new = sorted(p.name for p in tmp.iterdir())
    new.sort(key=lambda n: n == MANIFEST)
    said = []
    for name in previous:
        if name not in new:
            (out / name).unlink()
            said.append(f"removed {out / name} (from the previous compile)")
    for name in new:
        if (out / name).is_symlink():
            said.append(f"replaced the link {out / name} (its target is left alone)")
        elif (out / name).exists():
            said.append(f"overwrote {out / name}")
        # copied beside it, then renamed over it: a link of that name is replaced, never followed
        shutil.copyfile(tmp / name, out / f".{name}.new")
        os.replace(out / f".{name}.new", out / name)
    return said


DEFAULT_WORKGROUP = 128


def default_workgroup(kernel: Any) -> int:
    """`attnc compile`'s invocations per workgroup when --wg is not given: 128, or fewer for tiles
    of fewer rows x keys (a decode tile of one row over 32 keys has work for 32; the tiled layout
    gives each row at most BN invocations)."""
    from attnc.lowering import analyze

    try:
        spec = analyze(kernel)
    except AttncError:
        return DEFAULT_WORKGROUP  # the lowering will say what is wrong with the kernel
    return max(1, min(DEFAULT_WORKGROUP, spec.BM * spec.BN))


def _window_defaults(kernel: Any, options: dict[str, Any]) -> dict[str, str]:
    """The sides of `--set window=[left,right]` as defaults of the kernel's window_left and
    window_right params: the option fixes which sides are bounded, the numbers are runtime params
    (a caller may pass others); a side below 0 is refused, as attention() refuses it."""
    from attnc.kernels.flash import WINDOW_SIDE_CAP

    window = options.get("window")
    if not isinstance(window, tuple):
        return {}
    params = {p.name for p in kernel.params if not p.type.dims}
    out = {}
    for side, n in zip(("left", "right"), window, strict=True):
        if n is None:
            continue
        if n < 0:
            shown = "[" + ",".join("null" if x is None else str(x) for x in window) + "]"
            raise UsageError(f"--set window={shown}: the {side} side is {n}; a side is a number of keys >= 0, "
                             "or null for a side without a bound")
        if f"window_{side}" in params:  # past 2^30 no key is out of reach (kernels/flash.py), and it fits an i32
            out[f"window_{side}"] = str(min(n, WINDOW_SIDE_CAP))
    return out


def _quant_stores(kernel: Any) -> tuple[Any, ...]:
    """The DSL store kernels (attnc/kernels/store.py) that append float32 rows to a cache in
    each quantized format the kernel's inputs are stored in, and where k and v are both
    quantized the pair kernel appending both in one dispatch (a manifest's "stores"); for a
    kernel reading its K/V through a `block_table` (the paged kernel) the paged stores, which
    write through the same table into the page pools."""
    fmts = sorted({p.type.dtype.value for p in kernel.params if p.type.dims and p.type.dtype.is_quant})
    if not fmts:
        return ()
    from attnc.kernels.store import kv_store, kv_store_paged, kv_store_pair, kv_store_pair_paged

    paged = any(p.name == "block_table" for p in kernel.params)
    single, pair = (kv_store_paged, kv_store_pair_paged) if paged else (kv_store, kv_store_pair)
    stores = [single.trace(cache_dtype=f, x_dtype="f32") for f in fmts]
    kv = {p.name: p.type.dtype for p in kernel.params if p.name in ("k", "v")}
    if len(kv) == 2 and all(d.is_quant for d in kv.values()):
        stores.append(pair.trace(k_cache_dtype=kv["k"].value, v_cache_dtype=kv["v"].value))
    return tuple(stores)


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a kernel into -o: .wgsl files and manifest.json (see docs/MANIFEST.md)."""
    from attnc.lowering.manifest import compile_kernel
    from attnc.lowering.plan import Dialect, Family, Plan, Storage

    if not 4 <= args.dvc <= MAX_DVC or args.dvc % 4:
        # each invocation keeps DVC/4 accumulators: a DVC of a million wrote 139 MB shaders
        raise UsageError(f"--dvc {args.dvc}: output columns per workgroup must be 4 to {MAX_DVC} "
                         "(a multiple of 4; the value head dim Dv is what it covers)")
    if args.wg is not None and not (1 <= args.wg <= MAX_WG and args.wg & (args.wg - 1) == 0):
        raise UsageError(f"--wg {args.wg}: invocations per workgroup must be a power of two from 1 to {MAX_WG}")
    if not 1 <= args.unroll <= MAX_UNROLL:
        raise UsageError(f"--unroll {args.unroll}: copies of a loop's body must be 1 to {MAX_UNROLL} (a count at "
                         "least a loop's trip count unrolls it completely)")
    if not args.output.strip():
        raise UsageError("-o: an empty name; give the directory to write into (-o . for this one)")
    out = Path(args.output)
    previous = _output_dir(out, args.force)
    kernel, options = _load_kernel(args.kernel, args.set)
    defaults = _window_defaults(kernel, options)
    targets = list(dict.fromkeys(args.target or ["portable", "subgroups"]))  # a repeated one: one variant
    dtypes = list(dict.fromkeys(args.dtype or ["f32", "f16"]))
    if kernel.output.dtype.value == "f16":  # (its f16 output is written by f16-storage variants only)
        if args.dtype and "f32" in dtypes:
            raise UsageError(f"--dtype f32: kernel {kernel.name} declares a float16 output, which f32 variants "
                             "cannot write; compile it with --dtype f16")
        dtypes = [d for d in dtypes if d != "f32"]
    tiles16 = [t for t in targets if t in F16_TILE_TARGETS]
    if tiles16 and args.dtype and "f16" not in dtypes:
        raise UsageError(f"--target {tiles16[0]} compiles float16 variants (f16 workgroup tiles); "
                         f"--dtype {' '.join(dtypes)} asks for none")
    quantized = [p.name for p in kernel.params if p.type.dims and p.type.dtype.is_quant]
    if tiles16 and quantized:
        raise UsageError(f"--target {tiles16[0]}: f16 workgroup tiles would round the dequantized values of "
                         f"{', '.join(quantized)} (d * q needs up to 19 bits); quantized K/V compile with "
                         f"--target {F16_TILE_TARGETS[tiles16[0]]} (f16 storage, f32 tiles)")
    storages = [(t, Storage(d)) for t in targets if t not in F16_TILE_TARGETS for d in dtypes]
    storages += [(F16_TILE_TARGETS[t], Storage.F16A) for t in tiles16]
    wg = args.wg if args.wg is not None else default_workgroup(kernel)
    plans = [Plan(Family(t), st, Dialect.TINT, workgroup_size=wg, value_columns=args.dvc,
                  unroll=args.unroll, prefetch=int(args.prefetch)) for t, st in storages]
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot create the directory: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="attnc-compile-") as tmp:
            try:
                manifest = compile_kernel(kernel, plans, Path(tmp), _quant_stores(kernel), defaults)
            except RecursionError:
                raise UsageError(f"{args.kernel}: the kernel is nested too deeply to compile") from None
            try:
                said = _install(Path(tmp), out, previous)
            except OSError as exc:
                where = exc.filename or out
                raise UsageError(f"-o {out}: cannot write {where}: {exc.strerror or exc}") from None
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed compile leaves no directory it made
        raise
    for v in manifest["variants"]:
        files = ", ".join(f for p in v["programs"] for f in dict.fromkeys([p["file"], *p["dialect_files"].values()]))
        print(f"{v['name']}: {files}")
    for line in said:
        print(line)
    print(f"wrote {out / MANIFEST}")
    return 0


# ----------------------------------------------------------------------------- other commands


def cmd_check(args: argparse.Namespace) -> int:
    """Parse and verify each .attn file; a bad one is reported and the others still checked."""
    bad = unreadable = 0
    for f in args.files:
        try:
            _read_kernel(f)
            print(f"{f}: ok")
        except UsageError as exc:  # not a kernel to check: a missing file, a directory
            print(exc.render(), file=sys.stderr)
            unreadable += 1
        except AttncError as exc:
            print(exc.render(), file=sys.stderr)
            bad += 1
    return 2 if unreadable else 1 if bad else 0


def cmd_print(args: argparse.Namespace) -> int:
    """Print an .attn file in canonical form."""
    from attnc.ir.printer import print_kernel

    print(print_kernel(_read_kernel(args.file)), end="")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    """List the adapters (the best marked *) and the backends that are not installed."""
    from attnc.runtime.devices import default_device, devices, missing_backends

    listed = devices(include_unusable=True)
    best = default_device() if any(d.unusable is None for d in listed) else None
    for d in listed:
        mark = "*" if d is best else " "
        if d.unusable is not None:
            print(f"  {d.spec:13s} {d.adapter_type:12s} {d.name}")
            print(f"    unusable: {d.unusable}")
            continue
        sg = f"subgroup size {d.subgroup_size}" if d.subgroup_size else "no subgroups"
        lim = d.limits
        print(f"{mark} {d.spec:13s} {d.adapter_type:12s} {d.name}")
        print(f"    features: {', '.join(sorted(d.features)) or '-'}; {sg} "
              f"(range {d.subgroup_min_size}..{d.subgroup_max_size})")
        print(f"    limits: workgroup storage {lim.get('max-compute-workgroup-storage-size')} B, "
              f"{lim.get('max-compute-invocations-per-workgroup')} invocations, "
              f"storage binding {lim.get('max-storage-buffer-binding-size')} B")
    for backend, hint in missing_backends().items():
        print(f"  {backend}: not installed ({hint})")
    if best is None:
        default_device()  # raises the DeviceError that says why none is usable
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: compile the shipped kernels and run them on a device, checked against numpy."""
    from attnc.demo import run_demo

    return run_demo(args.device, verbose=True)


def _tune_cases(args: argparse.Namespace) -> list[Any]:
    """The cases `attnc tune` was asked for; UsageError for an unknown suite, case or bad shape."""
    from attnc.bench.cases import load_suite, load_suites, parse_shape

    if args.shape and args.suite is not None:  # (--shape tunes those shapes only: a suite would be ignored)
        raise UsageError(f"--suite {args.suite} and --shape: tune either a suite's cases or the given shapes")
    try:
        if args.shape:
            cases = [parse_shape(s) for s in args.shape]
        elif args.case and args.suite is None:  # a case is looked for in every suite, as bench does
            cases = list({c.name: c for suite in load_suites().values() for c in suite}.values())
        else:
            cases = load_suite(args.suite or "ci")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.case:
        known = {c.name for c in cases}
        unknown = [n for n in args.case if n not in known]
        if unknown:
            where = ("the --shape cases" if args.shape else f"suite {args.suite!r}" if args.suite
                     else "any suite")
            raise UsageError(f"--case: no case named {', '.join(map(repr, unknown))} in {where}; "
                             f"cases: {', '.join(sorted(known))}")
        by_name = {c.name: c for c in cases}
        cases = [by_name[n] for n in dict.fromkeys(args.case)]
    return cases


def cmd_tune(args: argparse.Namespace) -> int:
    """Time the candidate variants of each case on a device and store the fastest."""
    import numpy as np

    from attnc.runtime.tune import tune
    from attnc.runtime.tuning_cache import cache_path

    if args.runs < 1 or args.max < 1:
        raise UsageError("--runs and --max must be at least 1")
    cases = _tune_cases(args)
    cache = cache_path()
    try:  # the winners are stored there after each case: fail now, not after the first tuning
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(cache.parent, os.W_OK):
            raise PermissionError(13, "not writable")
        if cache.exists() and not cache.is_file():
            raise IsADirectoryError(21, "not a file")
    except OSError as exc:
        raise UsageError(f"tuning cache {cache}: cannot write: {exc.strerror or exc} "
                         "(ATTNC_CACHE_DIR names another folder)") from None
    if args.json:
        try:
            with open(args.json, "a"):
                pass
        except OSError as exc:
            raise UsageError(f"--json {args.json}: cannot write: {exc.strerror or exc}") from None
    dtype = np.float16 if args.dtype == "f16" else np.float32
    for c in cases:
        dims = dict(B=c.B, Hq=c.Hq, Hkv=c.Hkv, S=c.S, T=c.T, D=c.D, Dv=c.Dv)
        print(f"{c.name}: tuning", file=sys.stderr)
        try:
            res = tune(dims, dtype, device=args.device, runs=args.runs, max_candidates=args.max, causal=c.causal)
        except OSError as exc:  # storing the winner (the checks above ran before any tuning)
            raise UsageError(f"tuning cache {cache}: cannot write: {exc.strerror or exc}") from None
        best = res["best"]
        print(f"{c.name} [{res['bucket']}] on {res['device']}: {best['variant']} {best['ms']:.3f} ms "
              f"({len([r for r in res['results'] if r.get('ok')])} valid of {len(res['results'])})")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"case": c.name, **res}) + "\n")
    print(f"cache: {cache_path()}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """`attnc bench`, with its own parser (attnc/bench/cli.py)."""
    from attnc.bench.cli import main as bench_main

    return int(bench_main(argv) or 0)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `attnc` (`attnc bench` has its own, in attnc/bench/cli.py)."""
    ap = Parser(prog="attnc", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    c = sub.add_parser("compile", help="compile a kernel to .wgsl files and manifest.json")
    c.add_argument("kernel", help="an .attn file or module:kernel")
    c.add_argument("-o", "--output", required=True, help="output directory (new or empty, or --force)")
    c.add_argument("--force", action="store_true",
                   help="compile into a directory that holds files: replace the files its manifest.json "
                        "lists (other files stay)")
    c.add_argument("--target", action="append", choices=["portable", "subgroups", *F16_TILE_TARGETS],
                   help="variant family (repeatable; default: portable and subgroups); portable-f16 and "
                        "subgroups-f16 add float16 variants with f16 workgroup tiles (shader-f16)")
    c.add_argument("--dtype", action="append", choices=["f32", "f16"], help="storage dtype (default: both)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="option or tunable of a DSL kernel, typed as the kernel declares it, e.g. "
                        "--set causal=true --set BN=64 --set window=[4,null]; a function option takes "
                        "module:name, e.g. --set mask_mod=examples.flex.alibi:causal; an unknown KEY is "
                        "refused with the kernel's options listed")
    c.add_argument("--wg", type=int, default=None,
                   help="invocations per workgroup (default 128, or the tile's rows x keys where fewer: "
                        "BM=1 with BN=32 takes 32)")
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
    p = sub.add_parser("print", help="print an .attn file in canonical form (the IR's text: comments are not kept)")
    p.add_argument("file")
    p.set_defaults(fn=cmd_print)
    d = sub.add_parser("devices", help="list WebGPU adapters and their capabilities")
    d.set_defaults(fn=cmd_devices)
    r = sub.add_parser("run", help="compile the shipped kernels, run them, check against numpy")
    r.add_argument("--device", default=None, help="device spec (default: the best adapter)")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("tune", help="autotune variants per device and shape bucket (persistent cache)")
    t.add_argument("--suite", default=None, help="suite of attnc/bench/shapes.json (ci, seeds; default ci)")
    t.add_argument("--case", nargs="+", action="extend", default=[], metavar="NAME",
                   help="only these cases (searched in every suite when --suite is not given)")
    t.add_argument("--shape", action="append", default=[], help="B,Hq,Hkv,S,T,D,Dv[,causal]")
    t.add_argument("--device", default=None)
    t.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    t.add_argument("--runs", type=int, default=7)
    t.add_argument("--max", type=int, default=64, help="at most this many candidates per case")
    t.add_argument("--json", default=None, help="append every measurement as JSON lines")
    t.set_defaults(fn=cmd_tune)
    sub.add_parser("bench", help="benchmarks (see `attnc bench --help`)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `attnc` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    cmd = None
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command's own parser: its usage is where the right spelling is
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
        cmd = args.cmd
        return int(args.fn(args))
    except UsageError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except AttncError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnc: interrupted", file=sys.stderr)
        return 130
    finally:
        if cmd == "run":
            print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
