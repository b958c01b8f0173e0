"""`attnc compile` output: WGSL files plus a manifest.json any runtime can use (docs/MANIFEST.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnc.errors import LoweringError
from attnc.ir import nodes as ir
from attnc.ir.printer import print_kernel
from attnc.lowering import lower
from attnc.lowering.plan import COMPACT_KEYS, DEFAULT_LIMITS, Dialect, Family, Plan, Storage
from attnc.lowering.program import Access, Program, storage_buffers
from attnc.lowering.retype import retype

FORMAT = "attnc.manifest"
VERSION = 1

_PARAM_DEFAULTS = {"scale": "rsqrt(D)", "NSPLIT": "1"}
# The WGSL dialects `attnc compile` writes; a program's `file` is in the first, Tint's (the
# WGSL spec's, with every `enable` directive: what manifests without `dialect_files` had).
DIALECTS = (Dialect.TINT, Dialect.NAGA)


@dataclass(frozen=True)
class Compiled:
    """One variant: the plan it was lowered for and its programs (those of `plan.dialect`)."""

    name: str
    plan: Plan
    programs: tuple[Program, ...]


def _dense_strides(dims: tuple[str, ...]) -> list[str]:
    """Row-major element strides of a dense tensor, as formulas over dim names."""
    return ["*".join(dims[i + 1:]) or "1" for i in range(len(dims))]


def _o_row_stride(kernel: ir.Kernel) -> str:
    """Elements from one row of o to the next: its last dim, or for a float16 o that dim
    rounded up to even (halves are stored in pairs, one u32 word each: rows start on a word)."""
    width = kernel.output.dims[-1]
    return f"2*ceil_div({width},2)" if kernel.output.dtype is ir.DType.F16 else width


def _field_formulas(kernel: ir.Kernel, lse: bool) -> dict[str, str]:
    """The value formula of every uniform field a program of this kernel can have."""
    out = {"grid_total": "grid_total", "grid_stride_x": "grid_stride_x"}
    out.update({f"d_{d}": d for d in kernel.dims})
    for p in kernel.params:
        if p.type.dims:
            for i, s in enumerate(_dense_strides(p.type.dims)):
                out[f"s_{p.name}_{i}"] = s
        else:
            out[f"p_{p.name}"] = p.name
    for i, s in enumerate(_dense_strides(kernel.output.dims[:-1] + (_o_row_stride(kernel),))):
        out[f"s_o_{i}"] = s
    if lse:
        for i, s in enumerate(_dense_strides(kernel.output.dims[:-1])):
            out[f"s_lse_{i}"] = s
    return out


def _tensors(kernel: ir.Kernel, plan: Plan, programs: tuple[Program, ...]) -> list[dict[str, Any]]:
    bound = {b.name for p in programs for b in p.bindings}
    out = []
    for p in kernel.params:
        if p.type.dims:
            out.append({"name": p.name, "role": "input", "dtype": p.type.dtype.value, "dims": list(p.type.dims)})
    o = {"name": "o", "role": "output", "dtype": kernel.output.dtype.value, "dims": list(kernel.output.dims)}
    if kernel.output.dtype is ir.DType.F16:
        o["row_stride"] = _o_row_stride(kernel)
    out.append(o)
    if "lse" in bound:
        out.append({"name": "lse", "role": "output", "dtype": "f32", "dims": list(kernel.output.dims[:-1])})
    if "part" in bound:
        rows = "*".join(kernel.output.dims[:-1])
        width = kernel.output.dims[-1]
        split = next(p.name for p in kernel.params if not p.type.dims and p.type.dtype is ir.DType.I32
                     and any(isinstance(a.extent, ir.SplitExtent) and a.extent.count == p.name
                             for s in kernel.body if isinstance(s, ir.Grid) for a in s.axes))
        out.append({"name": "part", "role": "scratch", "dtype": "f32", "count": f"{rows}*{split}*({width}+2)"})
    for p in programs:
        for name, factors in p.scratch:
            out.append({"name": name, "role": "scratch", "dtype": "u32", "count": "*".join(factors)})
    return out


def variant_entry(kernel: ir.Kernel, c: Compiled, files: dict[str, str],
                  dialect_files: dict[str, dict[str, str]] | None = None,
                  param_defaults: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest entry of one compiled variant; `files` maps a program to its `file`,
    `dialect_files` (optional) to the file of each dialect, by dialect name; `param_defaults`
    formulas for params beyond attnc's own defaults (scale, NSPLIT)."""
    defaults = {**_PARAM_DEFAULTS, **(param_defaults or {})}
    lse = any(b.name == "lse" for p in c.programs for b in p.bindings)
    formulas = _field_formulas(kernel, lse)
    programs = []
    n_storage: list[int] = []
    for p in c.programs:
        storage = [b for b in p.bindings if b.access is not Access.UNIFORM]
        programs.append({
            "name": p.name,
            "file": files[p.name],
            **({"dialect_files": dialect_files[p.name]} if dialect_files else {}),
            "entry_point": p.entry_point,
            "workgroup_size": [p.workgroup_size, 1, 1],
            "bindings": [{"binding": b.binding, "name": b.name, "kind": "uniform"} if b.access is Access.UNIFORM
                         else {"binding": b.binding, "name": b.name, "kind": "storage", "access": b.access.value}
                         for b in p.bindings],
            "uniforms": {"size": p.uniform_size,
                         "fields": [{"name": f.name, "offset": f.offset, "type": f.type.value,
                                     "value": formulas[f.name]} for f in p.uniforms]},
            "workgroups": "*".join(p.grid),
            "workgroup_storage_bytes": p.workgroup_storage_bytes,
            "in_bounds": p.in_bounds,
        })
        n_storage.append(len(storage))
    mapped = any(p.name == "classify" for p in c.programs)  # the block map's first pass
    webgpu_name = {"subgroups": "subgroups", "f16": "shader-f16"}  # attnc's names -> WebGPU's
    features = sorted({webgpu_name[f] for p in c.programs for f in p.features})
    return {
        "name": c.name,
        "family": c.plan.family.value,
        # f16 tiles (F16A) read and write what an f16-storage variant does: "tiles" tells them apart
        "dtype": Storage.F16.value if c.plan.storage is Storage.F16A else c.plan.storage.value,
        **({"tiles": "f16"} if c.plan.storage is Storage.F16A else {}),
        "requires": {
            "features": features,
            "limits": {
                "maxComputeWorkgroupStorageSize": max(p.workgroup_storage_bytes for p in c.programs),
                "maxComputeInvocationsPerWorkgroup": max(p.workgroup_size for p in c.programs),
                "maxStorageBuffersPerShaderStage": max(n_storage),
            },
        },
        "enables": sorted({"shader-f16": "f16"}.get(f, f) for f in features),
        # the tile sizes and every plan key (docs/PLANS.md), as in variant strings and tune.json
        "tunables": dict(kernel.tunables) | {key: int(getattr(c.plan, name)) for name, key in COMPACT_KEYS.items()}
                    | {"BMAP": int(mapped)},
        "tensors": _tensors(kernel, c.plan, c.programs),
        "params": [{"name": p.name, "type": p.type.dtype.value,
                    **({"default": defaults[p.name]} if p.name in defaults else {})}
                   for p in kernel.params if not p.type.dims],
        "programs": programs,
    }


def store_entry(store: ir.StoreKernel, outdir: Path) -> dict[str, Any]:
    """The manifest entry of a store kernel (a KV cache's append in the format of its `cache`
    tensor, or kv_store_pair's K and V at once in the formats of `k_cache` and `v_cache`; Tint
    and Naga take the same WGSL): file, bindings, uniform fields with their formulas (dense
    strides; a runtime reading other strides sets the rows' s_* itself), workgroups."""
    from attnc.lowering.store import emit_store

    p = emit_store(store)
    params = {q.name: q for q in store.params}
    pair = "k_cache" in params
    rows = params["k" if pair else "x"].type.dtype.value
    if pair:
        fmts = {"k": params["k_cache"].type.dtype.value, "v": params["v_cache"].type.dtype.value}
        described: dict[str, Any] = {"formats": fmts}
        fname = f"{store.name}.{fmts['k']}.{fmts['v']}.{rows}.wgsl"
    else:
        described = {"format": params["cache"].type.dtype.value}
        fname = f"{store.name}.{described['format']}.{rows}.wgsl"
    (outdir / fname).write_text(p.wgsl)
    formulas = {"grid_total": "grid_total", "grid_stride_x": "grid_stride_x"}
    for q in store.params:
        formulas.update({f"d_{d}": d for d in q.type.dims})
        formulas.update({f"s_{q.name}_{i}": f for i, f in enumerate(_dense_strides(q.type.dims))})
    return {
        "name": store.name,
        **described,
        "rows": rows,
        "file": fname,
        "entry_point": p.entry_point,
        "workgroup_size": [p.workgroup_size, 1, 1],
        "tensors": [{"name": q.name, "dtype": q.type.dtype.value, "dims": list(q.type.dims)} for q in store.params],
        "bindings": [{"binding": b.binding, "name": b.name, "kind": "uniform"} if b.access is Access.UNIFORM
                     else {"binding": b.binding, "name": b.name, "kind": "storage", "access": b.access.value}
                     for b in p.bindings],
        "uniforms": {"size": p.uniform_size,
                     "fields": [{"name": f.name, "offset": f.offset, "type": f.type.value, "value": formulas[f.name]}
                                for f in p.uniforms]},
        "workgroups": "*".join(p.grid),
    }


def _with_lean_variants(kernel: ir.Kernel, plans: list[Plan]) -> list[tuple[Plan, str]]:
    """Each plan with its variant name; a plan whose block map takes a pass past WebGPU's
    default storage buffers per stage comes as two variants, best first: `<name>.block-map`
    (the map, needing the larger limit) and `<name>` without it (fitting the defaults)."""
    out = []
    for plan in plans:
        name = f"{kernel.name}.{plan.family.value}.{plan.storage.value}"
        k = retype(kernel, plan.storage)
        limit = DEFAULT_LIMITS["max-storage-buffers-per-shader-stage"]
        if plan.block_map and storage_buffers(lower(k, plan)) > limit:
            lean = dataclasses.replace(plan, block_map=0)
            if storage_buffers(lower(k, lean)) <= limit:
                out += [(plan, f"{name}.block-map"), (lean, name)]
                continue
        out.append((plan, name))
    return out


def compile_kernel(kernel: ir.Kernel, plans: list[Plan], outdir: Path,
                   stores: tuple[ir.StoreKernel, ...] = (), param_defaults: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """Lower for each plan in each of DIALECTS, write `<kernel>.<variant>.<program>.wgsl`
    files and manifest.json, so that one manifest serves Tint and Naga runtimes alike.

    A program's `file` is Tint's WGSL; `dialect_files` names the file each dialect's compiler
    takes: the same file where the WGSL is the same (the portable family), else
    `<kernel>.<variant>.<program>.<dialect>.wgsl` (the subgroups family: Tint requires
    `enable subgroups;`, Naga rejects it). The plans' own dialect is ignored. `stores`: store
    kernels (quantized KV caches' appends) listed under "stores"; `param_defaults`: default
    formulas of params (e.g. `--set window=[4,null]`'s window_left "4")."""
    dialects = DIALECTS
    outdir.mkdir(parents=True, exist_ok=True)
    text = print_kernel(kernel)
    variants = []
    for plan, name in _with_lean_variants(kernel, plans):
        k = retype(kernel, plan.storage)
        lowered = {d: lower(k, dataclasses.replace(plan, dialect=d)) for d in dialects}
        first = dialects[0]
        files: dict[str, str] = {}
        per_dialect: dict[str, dict[str, str]] = {}
        for i, p in enumerate(lowered[first]):
            files[p.name] = f"{name}.{p.name}.wgsl"
            (outdir / files[p.name]).write_text(p.wgsl)
            per_dialect[p.name] = {first.value: files[p.name]}
            for d in dialects[1:]:
                other = lowered[d][i]
                if dataclasses.replace(other, wgsl=p.wgsl) != p:  # one manifest entry describes both
                    raise LoweringError(f"{name}.{p.name}: the {d.value} program differs from the "
                                        f"{first.value} one in more than its WGSL text")
                if other.wgsl == p.wgsl:
                    per_dialect[p.name][d.value] = files[p.name]
                else:
                    fname = f"{name}.{p.name}.{d.value}.wgsl"
                    (outdir / fname).write_text(other.wgsl)
                    per_dialect[p.name][d.value] = fname
        c = Compiled(name, dataclasses.replace(plan, dialect=first), lowered[first])
        variants.append(variant_entry(k, c, files, per_dialect, param_defaults))
    from attnc._version import __version__

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "attnc_version": __version__,
        "kernel": {"name": kernel.name, "hash": hashlib.sha256(text.encode()).hexdigest(), "source": text},
        "dims": list(kernel.dims),
        "variants": sorted(variants, key=lambda v: (v["family"] != Family.SUBGROUPS.value,
                                                    v["dtype"] != Storage.F32.value, "tiles" in v)),
    }
    if stores:
        manifest["stores"] = [store_entry(st, outdir) for st in stores]
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
