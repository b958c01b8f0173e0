"""Validator for `attnc compile` manifests (docs/MANIFEST.md, format `attnc.manifest` version 1).

Pure Python, no GPU: `validate(manifest, root=None)` returns a list of problems (empty when
the manifest follows the spec); `check(manifest, root=None)` raises `ManifestError` listing
them. With `root` (the manifest's folder) the `.wgsl` files are checked too: they exist, start
with the variant's `enable` directives, and define the entry point. The formula grammar is
implemented here as well (`parse_formula`, `evaluate`), the same as js/attnc.js.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "attnc.manifest"
VERSION = 1
FAMILIES = {"portable", "subgroups"}
VARIANT_DTYPES = {"f32", "f16"}
TENSOR_DTYPES = {"f32", "f16", "i32", "u32", "u8", "bool", "q8_0", "q4_0", "int8"}  # quantized: K/V (MANIFEST.md)
ROLES = {"input", "output", "scratch"}
PARAM_TYPES = {"f32", "u32", "i32"}
FIELD_TYPES = {"f32", "u32", "i32"}
ENABLES = {"f16": "shader-f16", "subgroups": "subgroups"}
DIALECTS = ("tint", "naga")  # dialect_files' keys: the shader compilers' WGSL dialects
GRID_NAMES = ("grid_total", "grid_stride_x")
# WebGPU's default limits (what holds when requires.limits does not name one).
DEFAULT_LIMITS = {
    "maxComputeWorkgroupStorageSize": 16384,
    "maxComputeInvocationsPerWorkgroup": 256,
    "maxComputeWorkgroupSizeX": 256,
    "maxComputeWorkgroupSizeY": 256,
    "maxComputeWorkgroupSizeZ": 64,
    "maxComputeWorkgroupsPerDimension": 65535,
    "maxStorageBuffersPerShaderStage": 8,
    "maxStorageBufferBindingSize": 134217728,
    "maxUniformBufferBindingSize": 65536,
    "maxUniformBuffersPerShaderStage": 12,
    "maxBufferSize": 268435456,
    "maxBindingsPerBindGroup": 1000,
}
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ManifestError(ValueError):
    """A manifest that does not follow docs/MANIFEST.md; `.problems` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid manifest:\n  " + "\n  ".join(problems))


class FormulaError(ValueError):
    """A formula that does not parse or cannot be evaluated."""


# --- formulas -----------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|([-+*/(),]))")
FUNCTIONS = {"ceil_div": 2, "floor_div": 2, "min": 2, "max": 2, "sqrt": 1, "rsqrt": 1}


@dataclass(frozen=True)
class Formula:
    source: str
    ast: tuple
    names: frozenset[str]


INT_RANGES = {"i32": (-(2**31), 2**31 - 1), "u32": (0, 2**32 - 1)}  # a literal default a param can hold


def parse_formula(source: str) -> Formula:
    """Parse a manifest formula into a small tuple AST (recursive descent, no eval)."""
    if not isinstance(source, str):
        raise FormulaError(f"formula must be a string, got {source!r}")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while source[pos:].strip():
        m = _TOKEN.match(source, pos)
        if not m:
            raise FormulaError(f"formula {source!r}: unexpected character at {pos}")
        num, name, op = m.groups()
        tokens.append(("num", num) if num else ("name", name) if name else (op, op))
        pos = m.end()
    if not tokens:
        raise FormulaError(f"formula {source!r}: empty formula")
    names: set[str] = set()
    i = 0

    def peek() -> str:
        return tokens[i][0] if i < len(tokens) else "end"

    def fail(what: str):
        raise FormulaError(f"formula {source!r}: {what} at token {i + 1}")

    def expect(kind: str):
        nonlocal i
        if peek() != kind:
            fail(f"expected {kind!r}")
        i += 1

    def expr():
        nonlocal i
        a = term()
        while peek() in ("+", "-"):
            op = tokens[i][0]
            i += 1
            a = ("bin", op, a, term())
        return a

    def term():
        nonlocal i
        a = unary()
        while peek() in ("*", "/"):
            op = tokens[i][0]
            i += 1
            a = ("bin", op, a, unary())
        return a

    def unary():
        nonlocal i
        if peek() == "-":
            i += 1
            return ("neg", unary())
        if peek() == "+":
            i += 1
            return unary()
        return atom()

    def atom():
        nonlocal i
        kind = peek()
        if kind == "num":
            i += 1
            return ("num", float(tokens[i - 1][1]))
        if kind == "(":
            i += 1
            e = expr()
            expect(")")
            return e
        if kind != "name":
            fail("expected a number, a name or (")
        name = tokens[i][1]
        i += 1
        if peek() != "(":
            names.add(name)
            return ("name", name)
        if name not in FUNCTIONS:
            fail(f"unknown function {name}")
        i += 1
        args = [expr()]
        while peek() == ",":
            i += 1
            args.append(expr())
        expect(")")
        if len(args) != FUNCTIONS[name]:
            fail(f"{name} takes {FUNCTIONS[name]} argument(s), got {len(args)}")
        return ("call", name, tuple(args))

    ast = expr()
    if i != len(tokens):
        fail(f"unexpected {tokens[i][1]!r}")
    return Formula(source, ast, frozenset(names))


def _div(a: float, b: float) -> float:
    if b == 0:
        raise FormulaError("division by zero")
    return a / b


_CALLS = {
    "ceil_div": lambda a, b: float(math.ceil(_div(a, b))),
    "floor_div": lambda a, b: float(math.floor(_div(a, b))),
    "min": min,
    "max": max,
    "sqrt": lambda x: math.sqrt(x) if x >= 0 else math.nan,
    "rsqrt": lambda x: (math.inf if x == 0 else 1 / math.sqrt(x)) if x >= 0 else math.nan,
}


def evaluate(formula: str | Formula, env: dict[str, float]) -> float:
    """Evaluate in float64, as MANIFEST.md says; non-finite results are errors."""
    f = formula if isinstance(formula, Formula) else parse_formula(formula)

    def ev(n):
        tag = n[0]
        if tag == "num":
            return n[1]
        if tag == "name":
            if n[1] not in env:
                raise FormulaError(f"formula {f.source!r}: no value for {n[1]!r}")
            return float(env[n[1]])
        if tag == "neg":
            return -ev(n[1])
        if tag == "bin":
            a, b = ev(n[2]), ev(n[3])
            return {"+": a + b, "-": a - b, "*": a * b}[n[1]] if n[1] != "/" else _div(a, b)
        return float(_CALLS[n[1]](*(ev(a) for a in n[2])))

    v = ev(f.ast)
    if not math.isfinite(v):
        raise FormulaError(f"formula {f.source!r} is not finite ({v})")
    return v


# --- the manifest ---------------------------------------------------------------------------


def check(manifest: Any, root: str | Path | None = None) -> None:
    """Raise ManifestError unless `manifest` follows the spec."""
    problems = validate(manifest, root)
    if problems:
        raise ManifestError(problems)


def validate(manifest: Any, root: str | Path | None = None) -> list[str]:
    """Every way `manifest` departs from docs/MANIFEST.md (empty list: valid)."""
    out: list[str] = []
    if not isinstance(manifest, dict):
        return ["manifest: not a JSON object"]
    _keys(
        out,
        "manifest",
        manifest,
        {"format", "version", "attnc_version", "kernel", "dims", "variants", "stores"},
        {"stores"},
    )
    if manifest.get("format") != FORMAT:
        out.append(f"format: {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION or isinstance(manifest.get("version"), bool):
        out.append(f"version: {manifest.get('version')!r}, this validator reads {VERSION}")
    if not isinstance(manifest.get("attnc_version"), str):
        out.append("attnc_version: not a string")
    kernel = manifest.get("kernel")
    if isinstance(kernel, dict):
        _keys(out, "kernel", kernel, {"name", "hash", "source"})
        if not _ident(kernel.get("name")):
            out.append(f"kernel.name: {kernel.get('name')!r} is not an identifier")
        src, h = kernel.get("source"), kernel.get("hash")
        if not isinstance(src, str):
            out.append("kernel.source: not a string")
        if not (isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h)):
            out.append("kernel.hash: not a lowercase hex sha256")
        elif isinstance(src, str) and hashlib.sha256(src.encode()).hexdigest() != h:
            out.append("kernel.hash: is not the sha256 of kernel.source (UTF-8)")
    else:
        out.append("kernel: not an object")
    dims = manifest.get("dims")
    if not (isinstance(dims, list) and dims and all(_ident(d) for d in dims)):
        out.append("dims: not a non-empty list of identifiers")
        dims = []
    elif len(set(dims)) != len(dims):
        out.append("dims: duplicates")
    variants = manifest.get("variants")
    if not (isinstance(variants, list) and variants):
        out.append("variants: not a non-empty list")
        return out
    names = [v.get("name") for v in variants if isinstance(v, dict) and isinstance(v.get("name"), str)]
    for dup in {n for n in names if names.count(n) > 1}:
        out.append(f"variants: name {dup!r} used twice")
    for i, v in enumerate(variants):
        where = f"variants[{i}]" + (f" ({v.get('name')})" if isinstance(v, dict) else "")
        if not isinstance(v, dict):
            out.append(f"{where}: not an object")
            continue
        _variant(out, where, v, set(dims), Path(root) if root is not None else None)
    quantized = any(isinstance(v, dict) and isinstance(v.get("tensors"), list)
                    and any(isinstance(t, dict) and _in(t.get("dtype"), QUANT_FORMATS) for t in v["tensors"])
                    for v in variants)
    if quantized and "stores" not in manifest:
        out.append("stores: missing (a variant reads a quantized input; its cache appends with these kernels)")
    stores = manifest.get("stores", [])
    if not isinstance(stores, list):
        out.append("stores: not a list")
        return out
    for i, st in enumerate(stores):
        _store(out, f"stores[{i}]", st, Path(root) if root is not None else None)
    return out


QUANT_FORMATS = {"q8_0", "q4_0", "int8"}


def _store(out: list[str], where: str, st: Any, root: Path | None) -> None:
    """A store kernel entry (MANIFEST.md "Store kernels"): one cache's (`format`), or K's and
    V's at once (`formats`, kv_store_pair); every field a runtime reads."""
    if not isinstance(st, dict):
        out.append(f"{where}: not an object")
        return
    pair = "formats" in st
    _keys(out, where, st, {"name", "formats" if pair else "format", "rows", "file", "entry_point", "workgroup_size",
                           "tensors", "bindings", "uniforms", "workgroups"})
    if not _ident(st.get("name")):
        out.append(f"{where}.name: not an identifier")
    if not _ident(st.get("entry_point")):
        out.append(f"{where}.entry_point: not an identifier")
    wg = st.get("workgroup_size")
    if not (isinstance(wg, list) and len(wg) == 3 and all(_int(x) and x >= 1 for x in wg)):
        out.append(f"{where}.workgroup_size: not three positive integers")
    if not _wgsl_path(st.get("file")):
        out.append(f"{where}.file: {st.get('file')!r} is not a relative .wgsl path inside the output folder")
    elif root is not None and not (root / st["file"]).is_file():
        out.append(f"{where}.file: {st['file']} does not exist")
    fmts = st.get("formats") if pair else {"": st.get("format")}
    if not (isinstance(fmts, dict) and set(fmts) == ({"k", "v"} if pair else {""})
            and all(_in(f, QUANT_FORMATS) for f in fmts.values())):
        out.append(f"{where}.{'formats' if pair else 'format'}: {fmts!r} is not "
                   + ("{k, v} quantized formats" if pair else "a quantized format"))
        return
    if not _in(st.get("rows"), {"f32", "f16"}):
        out.append(f"{where}.rows: {st.get('rows')!r}, expected f32 or f16")
    tensors = st.get("tensors")
    if not (isinstance(tensors, list) and all(isinstance(t, dict) for t in tensors)):
        out.append(f"{where}.tensors: not a list of tensors")
        return
    by_name: dict[str, dict] = {}
    for j, t in enumerate(tensors):
        tw = f"{where}.tensors[{j}]"
        _keys(out, tw, t, {"name", "dtype", "dims"})
        if not _ident(t.get("name")) or t["name"] in by_name:
            out.append(f"{tw}.name: not an identifier, or listed twice")
        else:
            by_name[t["name"]] = t
        if not _in(t.get("dtype"), TENSOR_DTYPES):
            out.append(f"{tw}.dtype: {t.get('dtype')!r} not one of {sorted(TENSOR_DTYPES)}")
        if not (isinstance(t.get("dims"), list) and t["dims"] and all(_ident(d) for d in t["dims"])):
            out.append(f"{tw}.dims: not a non-empty list of dim names")
    # (rows, cache) tensor names of each format: x and cache, or k, k_cache and v, v_cache
    pairs = [("k", "k_cache", fmts["k"]), ("v", "v_cache", fmts["v"])] if pair else [("x", "cache", fmts[""])]
    base = {n for r, c, _ in pairs for n in (r, c)} | {"pos", "counts"}
    if set(by_name) != base and set(by_name) != base | {"table"}:
        out.append(f"{where}.tensors: {sorted(map(str, by_name))}, expected {', '.join(sorted(base))} (and table)")
        return
    if any(by_name[c].get("dtype") != f or by_name[r].get("dtype") != st.get("rows") for r, c, f in pairs):
        out.append(f"{where}.tensors: cache / row dtypes do not match the format(s) / rows")
    names = {d for t in tensors for d in t.get("dims") or [] if _ident(d)} | set(GRID_NAMES)
    _formula(out, f"{where}.workgroups", st.get("workgroups"), names)
    bindings = st.get("bindings")
    if not isinstance(bindings, list):
        out.append(f"{where}.bindings: not a list")
        bindings = []
    slots: set[int] = set()
    bound: list[str] = []
    for b in bindings:
        if not isinstance(b, dict):
            out.append(f"{where}.bindings: {b!r} is not an object")
            continue
        _binding(out, f"{where}.bindings.{b.get('name')}", b, slots)
        bound.append(b.get("name"))
    if sorted(map(str, bound)) != sorted(set(by_name) | {"params"}):
        out.append(f"{where}.bindings: expected one binding each for {sorted(set(by_name) | {'params'})}")
    _uniforms(out, f"{where}.uniforms", st.get("uniforms"), names, 1 << 16)


def _variant(out: list[str], where: str, v: dict, dims: set[str], root: Path | None) -> None:
    _keys(
        out,
        where,
        v,
        {
            "name",
            "family",
            "dtype",
            "requires",
            "enables",
            "tunables",
            "tensors",
            "params",
            "programs",
            "tiles",
        },
        optional={"tiles"},
    )
    if not isinstance(v.get("name"), str) or not v.get("name"):
        out.append(f"{where}.name: not a non-empty string")
    if "tiles" in v:  # the f16-tile variants: f16 data staged in f16 workgroup tiles (shader-f16)
        if v["tiles"] != "f16" or v.get("dtype") != "f16":
            out.append(f"{where}.tiles: {v['tiles']!r} on a {v.get('dtype')!r} variant; only \"f16\" on an f16 one")
        req = v.get("requires")
        if not (isinstance(req, dict) and "shader-f16" in (req.get("features") or [])):
            out.append(f"{where}.tiles: f16 tiles need shader-f16 in requires.features")
    if not _in(v.get("family"), FAMILIES):
        out.append(f"{where}.family: {v.get('family')!r} not one of {sorted(FAMILIES)}")
    if not _in(v.get("dtype"), VARIANT_DTYPES):
        out.append(f"{where}.dtype: {v.get('dtype')!r} not one of {sorted(VARIANT_DTYPES)}")
    req = v.get("requires")
    features: set[str] = set()
    limits: dict[str, int] = {}
    if isinstance(req, dict):
        _keys(out, f"{where}.requires", req, {"features", "limits"})
        fs = req.get("features")
        if isinstance(fs, list) and all(isinstance(f, str) for f in fs) and len(set(fs)) == len(fs):
            features = set(fs)
        else:
            out.append(f"{where}.requires.features: not a list of distinct strings")
        ls = req.get("limits")
        if isinstance(ls, dict) and all(_int(x) and x >= 0 for x in ls.values()):
            limits = ls
            for k in ls:
                if k not in DEFAULT_LIMITS:
                    out.append(f"{where}.requires.limits: unknown limit {k!r}")
        else:
            out.append(f"{where}.requires.limits: not an object of non-negative integers")
    else:
        out.append(f"{where}.requires: not an object")
    if "subgroups" in features and v.get("family") == "portable":
        out.append(f"{where}: a portable variant requires 'subgroups'")
    if v.get("family") == "subgroups" and "subgroups" not in features:
        out.append(f"{where}: a subgroups variant does not require 'subgroups'")
    enables = v.get("enables")
    if isinstance(enables, list) and all(_in(e, ENABLES) for e in enables) and len(set(enables)) == len(enables):
        for e in enables:
            if ENABLES[e] not in features:
                out.append(f"{where}.enables: {e!r} without {ENABLES[e]!r} in requires.features")
    else:
        out.append(f"{where}.enables: not a list of distinct names from {sorted(ENABLES)}")
        enables = []
    if not isinstance(v.get("tunables"), dict) or not all(isinstance(k, str) for k in v.get("tunables", {})):
        out.append(f"{where}.tunables: not an object")

    def limit(name: str) -> int:
        return limits.get(name, DEFAULT_LIMITS[name])

    # tensors
    tensors: dict[str, dict] = {}
    scratch_formulas: list[tuple[str, str]] = []
    ts = v.get("tensors")
    if not isinstance(ts, list) or not ts:
        out.append(f"{where}.tensors: not a non-empty list")
        ts = []
    for j, t in enumerate(ts):
        tw = f"{where}.tensors[{j}]"
        if not isinstance(t, dict):
            out.append(f"{tw}: not an object")
            continue
        name = t.get("name")
        if not _ident(name):
            out.append(f"{tw}.name: {name!r} is not an identifier")
            continue
        tw = f"{where}.tensors.{name}"
        if name in tensors:
            out.append(f"{tw}: defined twice")
        tensors[name] = t
        role = t.get("role")
        if not _in(role, ROLES):
            out.append(f"{tw}.role: {role!r} not one of {sorted(ROLES)}")
        if not _in(t.get("dtype"), TENSOR_DTYPES):
            out.append(f"{tw}.dtype: {t.get('dtype')!r} not one of {sorted(TENSOR_DTYPES)}")
        if role == "scratch":
            _keys(out, tw, t, {"name", "role", "dtype", "count"})
            scratch_formulas.append((f"{tw}.count", t.get("count")))
        else:
            _keys(out, tw, t, {"name", "role", "dtype", "dims", "row_stride"}, optional={"row_stride"})
            tdims = t.get("dims")
            if not (isinstance(tdims, list) and all(_in(d, dims) for d in tdims)):
                out.append(f"{tw}.dims: {tdims!r} is not a list of manifest dims")
            if "row_stride" in t:  # padded rows: outputs only, a formula over dims
                if role != "output" or not tdims:
                    out.append(f"{tw}.row_stride: only an output with dims may have padded rows")
                _formula(out, f"{tw}.row_stride", t["row_stride"], dims)
    if not any(t.get("role") == "output" for t in tensors.values()):
        out.append(f"{where}: no output tensor")

    # params: names distinct from dims/tensors; defaults may use dims and earlier params
    known = set(dims)
    ps = v.get("params")
    if not isinstance(ps, list):
        out.append(f"{where}.params: not a list")
        ps = []
    for p in ps:
        if not isinstance(p, dict) or not _ident(p.get("name")):
            out.append(f"{where}.params: {p!r} is not a param with an identifier name")
            continue
        pw = f"{where}.params.{p['name']}"
        _keys(out, pw, p, {"name", "type", "default"}, optional={"default"})
        if p["name"] in known or p["name"] in GRID_NAMES or p["name"] in FUNCTIONS:
            out.append(f"{pw}: name clashes with a dim, a param, a grid name or a function")
        if not _in(p.get("type"), PARAM_TYPES):
            out.append(f"{pw}.type: {p.get('type')!r} not one of {sorted(PARAM_TYPES)}")
        if "default" in p:  # no default: the caller must pass the param
            _formula(out, f"{pw}.default", p.get("default"), known)
            literal = p.get("default")
            if isinstance(literal, str) and re.fullmatch(r"\s*-?\d+\s*", literal) and _in(p.get("type"), INT_RANGES):
                lo, hi = INT_RANGES[p["type"]]
                if not lo <= int(literal) <= hi:
                    out.append(f"{pw}.default: {literal} is outside {p['type']}'s range [{lo}, {hi}]")
        known.add(p["name"])
    for w, f in scratch_formulas:
        _formula(out, w, f, known)

    # programs
    progs = v.get("programs")
    if not isinstance(progs, list) or not progs:
        out.append(f"{where}.programs: not a non-empty list")
        return
    pnames = [p.get("name") for p in progs if isinstance(p, dict) and _ident(p.get("name"))]
    if len(set(pnames)) != len(pnames):
        out.append(f"{where}.programs: duplicate names")
    written: set[str] = set()
    used: set[str] = set()
    for k, p in enumerate(progs):
        pw = f"{where}.programs[{k}]"
        if not isinstance(p, dict):
            out.append(f"{pw}: not an object")
            continue
        pw = f"{where}.programs.{p.get('name')}"
        _keys(
            out,
            pw,
            p,
            {
                "name",
                "file",
                "entry_point",
                "workgroup_size",
                "bindings",
                "uniforms",
                "workgroups",
                "workgroup_storage_bytes",
                "in_bounds",
                "dialect_files",
            },
            optional={"in_bounds", "dialect_files"},
        )
        if "in_bounds" in p and not isinstance(p["in_bounds"], bool):
            out.append(f"{pw}.in_bounds: not a boolean")
        if not _ident(p.get("name")):
            out.append(f"{pw}.name: not an identifier")
        file = p.get("file")
        if not _wgsl_path(file):
            out.append(f"{pw}.file: {file!r} is not a relative .wgsl path inside the output folder")
            file = None
        # the file of each dialect: {"tint": file, "naga": ...}; without the key, `file` (Tint's)
        # for both, a Naga runtime removing `enable subgroups;` (MANIFEST.md, Program)
        dialect_files = {d: file for d in DIALECTS} if file else {}
        if "dialect_files" in p:
            df = p["dialect_files"]
            if not (isinstance(df, dict) and set(df) == set(DIALECTS)):
                out.append(f"{pw}.dialect_files: not an object with exactly the keys {list(DIALECTS)}")
                dialect_files = {}
            else:
                for d, f in df.items():
                    if not _wgsl_path(f):
                        out.append(f"{pw}.dialect_files.{d}: {f!r} is not a relative .wgsl path inside the "
                                   "output folder")
                if df.get("tint") != p.get("file"):
                    out.append(f"{pw}.dialect_files.tint: {df.get('tint')!r} is not the program's file {file!r}")
                dialect_files = {d: f for d, f in df.items() if _wgsl_path(f)}
        if not _ident(p.get("entry_point")):
            out.append(f"{pw}.entry_point: not an identifier")
        wg = p.get("workgroup_size")
        if isinstance(wg, list) and len(wg) == 3 and all(_int(x) and x >= 1 for x in wg):
            if wg[0] * wg[1] * wg[2] > limit("maxComputeInvocationsPerWorkgroup"):
                out.append(f"{pw}.workgroup_size: {wg} exceeds maxComputeInvocationsPerWorkgroup")
            for x, ax in zip(wg, "XYZ", strict=True):
                if x > limit(f"maxComputeWorkgroupSize{ax}"):
                    out.append(f"{pw}.workgroup_size: {ax}={x} exceeds maxComputeWorkgroupSize{ax}")
        else:
            out.append(f"{pw}.workgroup_size: not three positive integers")
        wsb = p.get("workgroup_storage_bytes")
        if not (_int(wsb) and wsb >= 0):
            out.append(f"{pw}.workgroup_storage_bytes: not a non-negative integer")
        elif wsb > limit("maxComputeWorkgroupStorageSize"):
            out.append(f"{pw}.workgroup_storage_bytes: {wsb} exceeds maxComputeWorkgroupStorageSize")
        _formula(out, f"{pw}.workgroups", p.get("workgroups"), known)
        # bindings
        uniform_bindings = []
        storage = 0
        seen_b: set[int] = set()
        seen_n: set[str] = set()
        for b in p.get("bindings") if isinstance(p.get("bindings"), list) else []:
            if not isinstance(b, dict):
                out.append(f"{pw}.bindings: {b!r} is not an object")
                continue
            bw = f"{pw}.bindings.{b.get('name')}"
            kind = _binding(out, bw, b, seen_b)
            if not _ident(b.get("name")):
                out.append(f"{bw}.name: not an identifier")
            elif b["name"] in seen_n:
                out.append(f"{bw}: bound twice")
            else:
                seen_n.add(b["name"])
            if kind == "uniform":
                uniform_bindings.append(b)
                if _in(b.get("name"), tensors):
                    out.append(f"{bw}: a uniform binding named like a tensor")
            elif kind == "storage":
                storage += 1
                t = tensors.get(b["name"]) if _ident(b.get("name")) else None
                if t is None:
                    out.append(f"{bw}: not a tensor of the variant")
                    continue
                used.add(b["name"])
                if b.get("access") == "read_write":
                    if t.get("role") == "input":
                        out.append(f"{bw}: input tensor bound read_write")
                    written.add(b["name"])
        if not isinstance(p.get("bindings"), list):
            out.append(f"{pw}.bindings: not a list")
        if storage > limit("maxStorageBuffersPerShaderStage"):
            out.append(f"{pw}: {storage} storage buffers exceed maxStorageBuffersPerShaderStage")
        if len(uniform_bindings) > 1:
            out.append(f"{pw}: more than one uniform binding")
        uni = p.get("uniforms")
        if not uniform_bindings:
            out.append(f"{pw}: no uniform binding (grid_total/grid_stride_x need one)")
        if "uniforms" in p:
            _uniforms(
                out,
                f"{pw}.uniforms",
                uni,
                known | set(GRID_NAMES),
                limit("maxUniformBufferBindingSize"),
            )
        if root is not None:
            for d, f in dialect_files.items():
                if d == "naga" and "dialect_files" not in p:
                    continue  # the Tint file, less a line: checked as Tint's
                want = [e for e in enables if d == "tint" or e != "subgroups"]
                _wgsl(out, pw, f"{pw}.dialect_files.{d}" if "dialect_files" in p else f"{pw}.file",
                      root / f, want, p.get("entry_point"), wg, p.get("bindings") or [])
    for name, t in tensors.items():
        if name not in used:
            out.append(f"{where}.tensors.{name}: bound by no program")
        if t.get("role") in ("output", "scratch") and name not in written:
            out.append(f"{where}.tensors.{name}: {t.get('role')} never bound read_write")


def _binding(out: list[str], bw: str, b: dict, slots: set[int]) -> str | None:
    """A binding's slot (unique among `slots`, which it joins), keys and kind: 'storage' (with
    a read or read_write access) or 'uniform'; returns the kind, None when it is neither."""
    if not (_int(b.get("binding")) and b["binding"] >= 0) or b["binding"] in slots:
        out.append(f"{bw}.binding: missing, negative or used twice")
    else:
        slots.add(b["binding"])
    kind = b.get("kind")
    if kind == "uniform":
        _keys(out, bw, b, {"binding", "name", "kind"})
    elif kind == "storage":
        _keys(out, bw, b, {"binding", "name", "kind", "access"})
        if b.get("access") not in ("read", "read_write"):
            out.append(f"{bw}.access: {b.get('access')!r} not 'read' or 'read_write'")
    else:
        out.append(f"{bw}.kind: {kind!r} not 'storage' or 'uniform'")
        return None
    return kind


def _uniforms(out: list[str], uw: str, uni: Any, names: set[str], max_size: int) -> None:
    if not isinstance(uni, dict):
        out.append(f"{uw}: not an object")
        return
    _keys(out, uw, uni, {"size", "fields"})
    size = uni.get("size")
    if not (_int(size) and size > 0 and size % 16 == 0 and size <= max_size):
        out.append(f"{uw}.size: {size!r} is not a positive multiple of 16 within the uniform limit")
        size = None
    fields = uni.get("fields")
    if not isinstance(fields, list):
        out.append(f"{uw}.fields: not a list")
        return
    taken: dict[int, str] = {}
    values = set()
    for fd in fields:
        if not isinstance(fd, dict) or not _ident(fd.get("name")):
            out.append(f"{uw}.fields: {fd!r} is not a field with an identifier name")
            continue
        fw = f"{uw}.{fd['name']}"
        _keys(out, fw, fd, {"name", "offset", "type", "value"})
        if not _in(fd.get("type"), FIELD_TYPES):
            out.append(f"{fw}.type: {fd.get('type')!r} not one of {sorted(FIELD_TYPES)}")
        off = fd.get("offset")
        if not (_int(off) and off >= 0 and off % 4 == 0):
            out.append(f"{fw}.offset: {off!r} is not a non-negative multiple of 4")
        else:
            if size is not None and off + 4 > size:
                out.append(f"{fw}.offset: {off} + 4 is past size {size}")
            if off in taken:
                out.append(f"{fw}.offset: {off} also used by {taken[off]}")
            taken[off] = fd["name"]
        _formula(out, f"{fw}.value", fd.get("value"), names)
        if isinstance(fd.get("value"), str):
            values.add(fd["value"])
    for g in GRID_NAMES:
        if g not in values:
            out.append(f"{uw}: no field whose value is {g!r} (the dispatch rule needs it)")


def _wgsl_path(file: Any) -> bool:
    """A relative `.wgsl` path that stays inside the manifest's folder."""
    return (isinstance(file, str) and file.endswith(".wgsl") and not file.startswith("/")
            and ".." not in Path(file).parts and "\\" not in file)


def _wgsl(out: list[str], pw: str, fw: str, path: Path, enables: list[str], entry: Any, wg: Any,
          bindings: list) -> None:
    """Check one WGSL file of program `pw` (its field `fw`) against the program's entry."""
    if not path.is_file():
        out.append(f"{fw}: {path} does not exist")
        return
    text = path.read_text()
    code = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)
    found = re.findall(r"\benable\s+([A-Za-z0-9_,\s]+?)\s*;", code)
    got = [e.strip() for group in found for e in group.split(",") if e.strip()]
    if sorted(got) != sorted(enables):
        out.append(f"{fw}: enable directives {got} differ from enables {enables}")
    first = code.strip().split(";", 1)[0].strip() if code.strip() else ""
    if enables and not first.startswith("enable"):
        out.append(f"{fw}: does not start with its enable directives")
    if isinstance(entry, str) and not re.search(r"@compute\b[^{;]*?\bfn\s+" + re.escape(entry) + r"\s*\(", code, re.S):
        out.append(f"{fw}: no @compute fn {entry}")
    m = re.search(r"@workgroup_size\s*\(([^)]*)\)", code)
    if m and isinstance(wg, list):
        parts = [x.strip().rstrip("u") for x in m.group(1).split(",") if x.strip()]
        if all(x.isdigit() for x in parts):
            declared = [int(x) for x in parts] + [1] * (3 - len(parts))
            if declared != wg:
                out.append(f"{pw}.workgroup_size: {wg} but the WGSL declares {declared}")
    for b in bindings:
        if isinstance(b, dict) and _int(b.get("binding")) and isinstance(b.get("name"), str):
            # The WGSL variable's name is the shader's business (attnc writes t_q, P, ...);
            # the slot and its address space/access must match the manifest.
            pat = r"@group\(0\)\s*@binding\(" + str(b["binding"]) + r"\)\s*var<([^>]*)>\s*[A-Za-z_][A-Za-z0-9_]*\b"
            mm = re.search(pat, code)
            if not mm:
                out.append(f"{fw}: no @group(0) @binding({b['binding']}) var (for {b['name']})")
                continue
            space = [s.strip() for s in mm.group(1).split(",")]
            want = ["uniform"] if b.get("kind") == "uniform" else ["storage", b.get("access")]
            if space != want and not (want == ["storage", "read"] and space == ["storage"]):
                out.append(f"{fw}: {b['name']} is var<{', '.join(space)}>, the manifest says {want}")


def _formula(out: list[str], where: str, source: Any, names: set[str]) -> None:
    try:
        f = parse_formula(source)
    except FormulaError as e:
        out.append(f"{where}: {e}")
        return
    unknown = f.names - names
    if unknown:
        out.append(f"{where}: {source!r} uses unknown name(s) {sorted(unknown)}")


def _keys(out: list[str], where: str, obj: dict, allowed: set[str], optional: set[str] = frozenset()) -> None:
    missing = allowed - set(obj) - set(optional)
    extra = set(obj) - allowed
    if missing:
        out.append(f"{where}: missing {sorted(missing)}")
    if extra:
        out.append(f"{where}: unknown key(s) {sorted(extra)}")


def _in(x: Any, values: Any) -> bool:
    """x is one of `values` (strings); False for values of any other kind, hashable or not."""
    return isinstance(x, str) and x in values


def _ident(x: Any) -> bool:
    return isinstance(x, str) and bool(IDENT.match(x))


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
