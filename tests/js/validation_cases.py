"""Inputs for the JS loader's validation tests: dims to check against attnc's Python rules, and
manifests with one field deleted or of the wrong kind (test_js_validation.py draws them with
hypothesis; `shape_checks` / `manifest_checks` are a fixed sample that the Node + Dawn and
Chromium runs of the example page's harness also check)."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DIMS = ("B", "Hq", "S", "D", "Hkv", "T", "Dv")  # attnc.runtime.api.DIMS, the manifest's order
# a dim's value of every kind but a JS-distinguishable integer: integral floats (4.0) are left
# out, since a JS number cannot tell them from integers (JSON carries 4.0 as 4)
BAD_VALUES: tuple[Any, ...] = (0, -1, -7, -(2**40), 2.5, 0.5, -0.5, 1e-300, math.nan, math.inf, -math.inf,
                               "4", "", "Hq", True, False, None, [2], {"n": 2})
# compile options of the manifest the validation tests use: a scratch tensor, two programs,
# params with and without defaults
VALIDATION_OPTIONS = ["split=true", "lse=true", "kv_lens=true", "sinks=true", "softcap=true", "window=[4, null]"]


def encode_numbers(x: Any) -> Any:
    """JSON-safe: non-finite floats as {"$number": "NaN" | "Infinity" | "-Infinity"}."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"$number": "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")}
    if isinstance(x, dict):
        return {k: encode_numbers(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode_numbers(v) for v in x]
    return x


def compile_validation_manifest(outdir: Path) -> dict:
    """`attnc compile attnc.kernels.flash:flash_attention` with VALIDATION_OPTIONS into outdir."""
    from attnc.cli import main

    args = ["compile", "attnc.kernels.flash:flash_attention", "-o", str(outdir)]
    for s in VALIDATION_OPTIONS:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((outdir / "manifest.json").read_text())


# --------------------------------------------------------------------------- manifests
def _optional(parent: list[str], key: str) -> bool:
    """Keys MANIFEST.md lets a manifest leave out: a program's in_bounds and dialect_files, a
    param's default, an output's row_stride (dense rows), any one limit of requires.limits, any
    tunable."""
    return key in ("in_bounds", "dialect_files", "default", "row_stride") or parent[-1:] == ["tunables"] \
        or parent[-2:] == ["requires", "limits"]


def manifest_paths(m: Any, keys: list | None = None) -> Iterator[tuple[list, bool]]:
    """Every position in a manifest (object keys and list elements, the tunables' values left
    out: they are free-form) as (keys from the top, whether it may be deleted)."""
    keys = keys or []
    if isinstance(m, dict):
        for k, v in m.items():
            here = [*keys, k]
            yield here, not _optional([str(x) for x in keys], k)
            if k != "tunables":
                yield from manifest_paths(v, here)
    elif isinstance(m, list):
        for i, v in enumerate(m):
            here = [*keys, i]
            yield here, False  # an element is not a field: it is corrupted, never deleted
            yield from manifest_paths(v, here)


def path_text(keys: list) -> str:
    """`manifest.variants[2].programs[0].file` for ["variants", 2, "programs", 0, "file"]."""
    return "manifest" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def _kind(x: Any) -> str:
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "int" if x.is_integer() else "float"  # JSON (and JS) do not tell 4.0 from 4
    return type(x).__name__


WRONG_VALUES: tuple[Any, ...] = (None, True, 2.5, "x", [], {}, [1], {"x": 1})


def wrong_values(x: Any) -> list[Any]:
    """Values of another kind than x; for an integer also -1 (every integer field of a
    manifest is non-negative)."""
    out = [w for w in WRONG_VALUES if _kind(w) != _kind(x)]
    return out + [-1] if _kind(x) == "int" else out


def corrupt(m: dict, keys: list, value: Any = None, delete: bool = False) -> dict:
    """A copy of m with the position `keys` deleted or set to `value`."""
    bad = copy.deepcopy(m)
    obj = bad
    for k in keys[:-1]:
        obj = obj[k]
    if delete:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value
    return bad


# --------------------------------------------------------------------------- fixed samples
def shape_checks(n: int = 24) -> list[dict]:
    """A fixed sample of dims, valid and not, for the harness runs (Node + Dawn, Chromium)."""
    rng = random.Random(20240917)
    out = [dict(B=1, Hq=3, Hkv=2, S=1, T=1, D=1, Dv=1), dict(B=1, Hq=2, Hkv=4, S=4, T=4, D=8, Dv=8),
           dict(B=1, Hq=8, Hkv=2, S=16, T=16, D=64, Dv=32)]
    while len(out) < n:
        hkv = rng.randint(1, 4)
        dims = {d: rng.randint(1, 9) for d in DIMS} | {"Hkv": hkv, "Hq": hkv * rng.randint(1, 3)}
        for d in rng.sample(DIMS, rng.randint(0, 2)):
            dims[d] = rng.choice(BAD_VALUES)
        if rng.random() < 0.1:
            del dims[rng.choice(DIMS)]
        if rng.random() < 0.1:
            dims["Hk"] = 1
        out.append(dims)
    return out


def manifest_checks(m: dict, n: int = 8) -> list[dict]:
    """A fixed sample of corrupted copies of m: {"path", "manifest"}."""
    rng = random.Random(7)
    paths = list(manifest_paths(m))
    out = []
    for _ in range(n):
        keys, deletable = rng.choice(paths)
        if deletable and rng.random() < 0.5:
            out.append({"path": path_text(keys), "manifest": corrupt(m, keys, delete=True)})
        else:
            obj = m
            for k in keys:
                obj = obj[k]
            out.append({"path": path_text(keys), "manifest": corrupt(m, keys, rng.choice(wrong_values(obj)))})
    return out
