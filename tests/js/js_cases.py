"""Cases for the JS loader (Node + Chromium): inputs and numpy-expected outputs as binary files.

`write_cases(folder)` writes `folder/cases.json` (the format examples/browser/harness.js reads),
the `.bin` files it names, and a `fixtures` link to tests/js/fixtures so that manifest paths are
relative to the cases file for Node and for the browser alike. Expected values are computed
in float64 with numpy from the very inputs the GPU gets (f16 inputs rounded first).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import validation_cases
from manifest_schema import FormulaError, evaluate

from attnc import quant

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = HERE / "fixtures"
TOL = {"f32": 1e-5, "f16": 2e-3}  # docs/API.md: relative Frobenius error
NP_DTYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u32": np.uint32, "u8": np.uint8, "bool": np.bool_}
BIN_DTYPES = {"f32": "<f4", "f16": "<f2", "i32": "<i4", "u32": "<u4", "u8": "u1", "bool": "u1"}


def _scale_ref(q: np.ndarray, scale: float, shift: float) -> np.ndarray:
    return q.astype(np.float64) * float(np.float32(scale)) + float(np.float32(shift))


def _rowsum_ref(q: np.ndarray, lens: np.ndarray, scale: float) -> np.ndarray:
    B, S, D = q.shape
    out = np.zeros((B, S))
    for b in range(B):
        n = int(min(D, max(0, lens[b])))
        out[b] = q[b, :, :n].astype(np.float64).sum(axis=1)
    return out * float(np.float32(scale))


class _Writer:
    """Names the .bin files; writes them unless `folder` is None (to list the cases)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.n = 0

    def bin(self, arr: np.ndarray, dtype: str) -> dict:
        np_dtype = BIN_DTYPES[dtype]
        self.n += 1
        name = f"t{self.n:03d}.{dtype}.bin"
        if self.folder is not None:
            np.ascontiguousarray(arr, dtype=np_dtype).tofile(self.folder / name)
        return {"file": name, "dtype": dtype}


def case_list() -> list[dict]:
    """The cases without writing anything (for pytest's parametrisation)."""
    return fixture_cases(_Writer(None))


def fixture_cases(w: _Writer) -> list[dict]:
    """Cases over the hand-made fixtures: program order, scratch, folding, f16, subgroups."""
    rng = np.random.default_rng(1234)
    cases = []

    def scale_case(name, dtype, shapes, params=None, limits=None):
        B, H, S, D = (shapes[k] for k in "BHSD")
        q = rng.standard_normal((B, H, S, D)).astype(np.float16 if dtype == "f16" else np.float32)
        p = params or {}
        ref = _scale_ref(q, p.get("scale", 1 / math.sqrt(D) if D else 1.0), p.get("shift", 0.0))
        cases.append(
            {
                "name": name,
                "manifest": "fixtures/scale/manifest.json",
                "variant": {"family": "portable", "dtype": dtype},
                "shapes": shapes,
                "params": p,
                "limits": limits or {},
                "tol": TOL[dtype],
                "inputs": {"q": w.bin(q, dtype)},
                "expected": {"o": w.bin(ref, dtype)},
            }
        )

    scale_case("scale.f32", "f32", {"B": 2, "H": 3, "S": 5, "D": 7})
    scale_case("scale.f32.params", "f32", {"B": 1, "H": 2, "S": 3, "D": 8}, {"scale": 0.5, "shift": 1.25})
    scale_case("scale.f16.odd", "f16", {"B": 1, "H": 1, "S": 3, "D": 5}, {"shift": -0.5})
    # 300001 elements / 4 per workgroup = 75001 workgroups > 65535: folded into (65535, 2).
    scale_case("scale.f32.fold_large", "f32", {"B": 1, "H": 1, "S": 1, "D": 300001})
    # A lowered per-dimension limit: 26 workgroups as (7, 4), the last 2 ids ignored.
    scale_case(
        "scale.f32.fold_limit7",
        "f32",
        {"B": 1, "H": 1, "S": 1, "D": 101},
        limits={"maxComputeWorkgroupsPerDimension": 7},
    )
    # an empty q: refused, as attnc's Python API refuses empty arrays
    scale_case("scale.f32.empty", "f32", {"B": 1, "H": 2, "S": 0, "D": 4})
    cases[-1]["expect_error"] = "S=0: expected a positive integer"

    def rowsum_case(name, variant, shapes, lens, params=None, limits=None, expect_variant=None):
        B, S, D = (shapes[k] for k in "BSD")
        q = rng.standard_normal((B, S, D)).astype(np.float32)
        lens = np.array(lens, dtype=np.int32)
        p = params or {}
        ref = _rowsum_ref(q, lens, p.get("scale", 1 / math.sqrt(D)))
        c = {
            "name": name,
            "manifest": "fixtures/rowsum/manifest.json",
            "variant": variant,
            "shapes": shapes,
            "params": p,
            "limits": limits or {},
            "tol": TOL["f32"],
            "inputs": {"q": w.bin(q, "f32"), "lens": w.bin(lens, "i32")},
            "expected": {"o": w.bin(ref, "f32")},
        }
        if expect_variant:
            c["expect_variant"] = expect_variant
        cases.append(c)

    for fam in ("subgroups", "portable"):
        rowsum_case(f"rowsum.{fam}", {"family": fam}, {"B": 3, "S": 5, "D": 100}, [100, 37, -3])
    rowsum_case(
        "rowsum.subgroups.nsplit3",
        {"family": "subgroups"},
        {"B": 2, "S": 70, "D": 130},
        [130, 65],
        params={"NSPLIT": 3, "scale": 2.0},
    )
    rowsum_case(
        "rowsum.auto",
        None,
        {"B": 1, "S": 3, "D": 33},
        [1000],
        expect_variant="rowsum.subgroups.f32",
    )
    # 42 partial workgroups under a per-dimension limit of 7: (7, 6).
    rowsum_case(
        "rowsum.portable.fold_limit7",
        {"family": "portable"},
        {"B": 2, "S": 7, "D": 40},
        [40, 11],
        limits={"maxComputeWorkgroupsPerDimension": 7},
    )
    # ... and of 5: 42 > 5*5 cannot be folded, the loader must say so.
    rowsum_case(
        "rowsum.portable.fold_too_many",
        {"family": "portable"},
        {"B": 2, "S": 7, "D": 40},
        [40, 11],
        limits={"maxComputeWorkgroupsPerDimension": 5},
    )
    cases[-1]["expect_error"] = "do not fit"
    return cases


FORMULA_CHECKS = [
    ("B*Hq*ceil_div(S,32)*NSPLIT", {"B": 2, "Hq": 3, "S": 33, "NSPLIT": 4}),
    ("rsqrt(D)", {"D": 72}),
    ("1 + 2 * 3 - 4 / 8", {}),
    ("(1 + 2) * -3", {}),
    ("floor_div(7, 2) + ceil_div(7, 2) + min(3, 4) + max(3, 4)", {}),
    ("sqrt(2) * 0.5", {}),
    ("Hq*S*D", {"Hq": 7, "S": 1, "D": 80}),
    ("B*Hq*S*NSPLIT*(Dv+2)", {"B": 1, "Hq": 32, "S": 1, "NSPLIT": 16, "Dv": 128}),
    ("2 - 3 - 4", {}),
    ("12 / 3 / 2", {}),
    ("ceil_div(0, 64)", {}),
    ("ceil_div(1, 0)", {}),  # error: division by zero
    ("rsqrt(0)", {}),  # error: not finite
    ("B +", {"B": 1}),  # error: syntax
    ("foo(1)", {}),  # error: unknown function
    ("min(1)", {}),  # error: arity
    ("X", {}),  # error: unknown name
    ("2 $ 3", {}),  # error: bad character
]


def formula_checks() -> list[dict]:
    out = []
    for f, env in FORMULA_CHECKS:
        try:
            out.append({"formula": f, "env": env, "value": evaluate(f, env)})
        except FormulaError as e:
            out.append({"formula": f, "env": env, "error": str(e)})
    return out


def f16_check(w: _Writer) -> dict:
    rng = np.random.default_rng(7)
    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.99,
            65520.0,
            1e9,
            -1e9,
            np.inf,
            -np.inf,
            np.nan,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            1e-8,
            -3e-6,
            1.00048828125,
            1.00146484375,
            2049.0,
            2051.0,
        ],
        dtype=np.float32,
    )
    mags = 10.0 ** rng.uniform(-9, 6, 20000)
    values = np.concatenate(
        [
            special,
            (mags * rng.choice([-1, 1], mags.size)).astype(np.float32),
            rng.standard_normal(5000).astype(np.float32),
        ]
    )
    with np.errstate(over="ignore"):
        bits = values.astype(np.float16).view(np.uint16)
    return {
        "f32_file": w.bin(values, "f32")["file"],
        "bits_file": w.bin(bits.view(np.float16), "f16")["file"],
    }


def write_cases(folder: str | os.PathLike, extra: list[dict] | None = None) -> dict:
    """Write cases.json + data into `folder` (created); returns the cases dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "fixtures"
    if not link.exists():
        link.symlink_to(FIXTURES, target_is_directory=True)
    w = _Writer(folder)
    fixtures = fixture_cases(w)  # first: case_list() names their files the same way
    attention = attention_cases(w, folder)
    spec = {
        "cases": fixtures + attention + kv_cache_cases(w, folder) + refusal_cases(w, folder) + flex_cases(w, folder)
        + (extra or []),
        "checks": {"formulas": formula_checks(), "f16": f16_check(w), **validation_checks(folder)},
    }
    (folder / "cases.json").write_text(json.dumps(spec, indent=1))
    return spec


def load_cases(folder: Path) -> list[dict]:
    return json.loads((Path(folder) / "cases.json").read_text())["cases"]


def load_checks(folder: Path) -> dict:
    return json.loads((Path(folder) / "cases.json").read_text())["checks"]


def decode_output(entry: dict) -> np.ndarray:
    """An output the runners sent back as base64 → numpy array (f16 as float16)."""
    import base64

    raw = base64.b64decode(entry["b64"])
    return np.frombuffer(raw, dtype=BIN_DTYPES[entry["dtype"]])


def read_bin(folder: Path, entry: dict) -> np.ndarray:
    return np.fromfile(
        folder / entry["file"],
        dtype=BIN_DTYPES[entry["dtype"]],
    )


# --- real compiled kernels (`attnc compile`) --------------------------------------------------


def attention_reference(
    q,
    k,
    v,
    *,
    scale=None,
    causal=False,
    window=None,
    softcap=None,
    alibi_slopes=None,
    bias=None,
    sinks=None,
    kv_lens=None,
):
    """docs/API.md's attention semantics in float64 numpy: returns (o, lse)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhsd,bhtd->bhst", q, kk) * (1 / math.sqrt(D) if scale is None else scale)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    L = np.asarray(kv_lens, dtype=np.int64) if kv_lens is not None else np.full(B, T)
    i_abs = np.arange(S)[None, :] + (L - S)[:, None]  # [B, S]
    j = np.arange(T)
    rel = j[None, None, None, :] - i_abs[:, None, :, None]  # [B, 1, S, T]: j - i_abs
    if alibi_slopes is not None:
        s = s + np.asarray(alibi_slopes, np.float64)[None, :, None, None] * rel
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    mask = np.broadcast_to(j[None, None, None, :] >= L[:, None, None, None], s.shape)
    if causal:
        mask = mask | (rel > 0)
    if window is not None:
        left, right = window
        if left is not None:
            mask = mask | (rel < -left)
        if right is not None:
            mask = mask | (rel > right)
    s = np.where(mask, -np.inf, s)
    sink = np.asarray(sinks, np.float64)[None, :, None] if sinks is not None else np.full((1, Hq, 1), -np.inf)
    m = np.maximum(s.max(axis=-1), sink)  # [B, Hq, S]
    safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - safe[..., None])
    den = p.sum(axis=-1) + np.exp(sink - safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.einsum("bhst,bhtd->bhsd", p, vv) / den[..., None]
        lse = np.log(den) + safe
    dead = den == 0
    o[dead] = 0.0
    lse[dead] = -np.inf
    return o, lse


# Kernels to compile and run: (name, compile options as flash_attention's keywords, runtime
# params, variants as (family, dtype) pairs or None for all). Only the None-ness of `window`'s
# ends matters when compiling; the values travel as the i32 params window_left/window_right.
# `softcap` compiles as a bool; the cap is the f32 param `softcap`. The reference takes the
# same values.
#
# Each distinct pipeline costs a shader compile: ~1 s on SwiftShader, 3-9 s on lavapipe the
# first time (llvmpipe compiles at the first dispatch; Mesa's disk cache makes reruns fast).
# So the default set packs several options into one kernel and runs every (family, dtype)
# on `plain` and each option kernel on one variant per family, the dtypes crossed, so that
# each option meets both families and both dtypes: 14 pipelines. ATTNC_JS_FULL=1 adds every
# option on its own on every variant (58 pipelines; minutes on a cold lavapipe).
SG32, SG16, PO32, PO16 = ("subgroups", "f32"), ("subgroups", "f16"), ("portable", "f32"), ("portable", "f16")
ATTENTION_CONFIGS = [
    ("plain", {}, {}, None),
    ("causal_softcap_sinks", {"causal": True, "softcap": 20.0, "sinks": True, "lse": True}, {}, [SG32, PO16]),
    ("window_alibi_bias", {"window": (5, 0), "alibi": True, "bias": True}, {}, [SG16, PO32]),
    ("kvlens_window_right", {"kv_lens": True, "window": (None, 2), "lse": True}, {"scale": 0.3}, [SG32, PO16]),
    (
        "split",
        {"split": True, "causal": True, "kv_lens": True, "sinks": True, "lse": True},
        {"NSPLIT": 3},
        [SG16, PO32],
    ),
    # quantized K and V (attnc/quant.py): the words are inputs, the reference reads the
    # dequantized values; only the shapes whose head dims the formats hold (multiples of 32)
    ("kvquant", {"k_dtype": "q8_0", "v_dtype": "q4_0", "causal": True, "kv_lens": True, "lse": True}, {},
     [SG32, PO16]),
    # the kernel of the KV-cache cases (kv_cache_cases): attention over each row's prefix
    ("kv_cache", {"kv_lens": True, "causal": True}, {}, [PO32, SG16]),
    # f16 workgroup tiles (`--target portable-f16 --target subgroups-f16`: shader-f16)
    ("f16_tiles", {"causal": True, "lse": True, "targets": ["portable-f16", "subgroups-f16"]}, {}, None),
]
QUANT_DTYPES = ("q8_0", "q4_0", "int8")
ATTENTION_CONFIGS_FULL = [
    ("causal", {"causal": True}, {}, None),
    ("window", {"window": (5, 0)}, {}, None),
    ("window_right", {"window": (None, 2)}, {"scale": 0.3}, None),
    ("softcap", {"softcap": 20.0}, {}, None),
    ("alibi", {"alibi": True, "causal": True}, {}, None),
    ("bias", {"bias": True}, {}, None),
    ("sinks", {"sinks": True, "lse": True}, {}, None),
    ("kv_lens", {"kv_lens": True, "causal": True, "lse": True}, {}, None),
    ("split_lse", {"split": True, "lse": True}, {"NSPLIT": 3}, None),
    ("split_all", {"split": True, "causal": True, "kv_lens": True, "sinks": True}, {"NSPLIT": 4}, None),
]


def attention_configs() -> list[tuple]:
    full = os.environ.get("ATTNC_JS_FULL", "").strip().lower() in {"1", "true", "yes"}
    if not full:
        return ATTENTION_CONFIGS
    return [(n, o, p, None) for n, o, p, _ in ATTENTION_CONFIGS] + ATTENTION_CONFIGS_FULL


ATTENTION_SHAPES = [
    {"B": 1, "Hq": 2, "Hkv": 2, "S": 1, "T": 37, "D": 32, "Dv": 32},
    {"B": 2, "Hq": 4, "Hkv": 2, "S": 17, "T": 33, "D": 64, "Dv": 64},
    {"B": 1, "Hq": 3, "Hkv": 1, "S": 9, "T": 9, "D": 72, "Dv": 40},
    # odd sizes: f16 tensors of odd length (padded to 4 bytes), D and Dv not multiples of 2
    {"B": 1, "Hq": 3, "Hkv": 3, "S": 3, "T": 5, "D": 7, "Dv": 5},
]
KERNEL = "attnc.kernels.flash:flash_attention"


def compile_options(options: dict) -> dict:
    """flash_attention's compile-time keywords for a config: softcap is a bool (the cap is a
    runtime param), window keeps only which ends exist (the values are runtime params)."""
    out = {}
    for key, val in options.items():
        if key == "targets":  # --target, not a kernel option
            continue
        if key == "softcap":
            val = val is not None and val is not False
        elif key == "window" and val is not None:
            val = [None if x is None else int(x) for x in val]
        out[key] = val
    return out


def compile_command(out: Path, options: dict) -> list[str]:
    """`python -m attnc compile attnc.kernels.flash:flash_attention -o OUT --force --set KEY=JSON ...`."""
    cmd = [*(_compile_prefix() or []), KERNEL, "-o", str(out), "--force"]  # rerunnable into the same folder
    for target in options.get("targets", []):
        cmd += ["--target", target]
    for key, val in compile_options(options).items():
        cmd += ["--set", f"{key}={val if isinstance(val, str) else json.dumps(val)}"]
    return cmd


@functools.cache
def _compile_prefix() -> tuple[str, ...] | None:
    """`python -m attnc compile`, or None while attnc has no CLI."""
    import importlib.util

    try:
        if importlib.util.find_spec("attnc.cli") is None or importlib.util.find_spec("attnc.__main__") is None:
            return None
    except ImportError:
        return None
    return (sys.executable, "-m", "attnc", "compile")


def _compile_env() -> dict:
    """Run `attnc` from the repository root with it first on PYTHONPATH: the editable install
    can resolve `attnc` to a namespace package (no __version__) from other folders."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return {"cwd": ROOT, "env": env}


def compiler_available() -> bool:
    return _compile_prefix() is not None


def attention_cases(w: _Writer, folder: Path) -> list[dict]:
    """Compile every ATTENTION_CONFIGS kernel into `folder/compiled/NAME` and make cases for
    each (family, dtype) of its variants and each shape; [] when `attnc compile` is missing."""
    import subprocess

    if not compiler_available():
        return []
    # One Python process runs every `attnc compile` command line through attnc.cli.main: the
    # same argument parsing as the shell command, without paying the imports once per kernel.
    configs = attention_configs()
    prefix = len(_compile_prefix()) - 1  # main() takes the argv after `python -m attnc`
    argvs = [
        compile_command((folder / "compiled" / cname).resolve(), options)[prefix:] for cname, options, _, _ in configs
    ]
    driver = (
        "import json, sys\n"
        "from attnc.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    rc = main(argv)\n"
        "    if rc: sys.exit(f'attnc {\" \".join(argv)} exited with {rc}')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(argvs)], capture_output=True, text=True, **_compile_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"attnc compile failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    rng = np.random.default_rng(99)
    cases = []
    for cname, options, params, variants in configs:
        manifest = json.loads((folder / "compiled" / cname / "manifest.json").read_text())
        seen = set()
        for var in manifest["variants"]:
            key = (var["family"], var["dtype"])
            if (*key, var.get("tiles")) in seen or (variants is not None and key not in variants):
                continue
            seen.add((*key, var.get("tiles")))
            quantized = any(t["dtype"] in QUANT_DTYPES for t in var["tensors"])
            for shapes in ATTENTION_SHAPES:
                if quantized and (shapes["D"] % 32 or shapes["Dv"] % 32):
                    continue
                cases.append(
                    _attention_case(w, rng, f"compiled/{cname}/manifest.json", var, cname, options, params, shapes)
                )
    return cases


def _attention_case(w, rng, manifest_rel, var, cname, options, params, shapes) -> dict:
    B, Hq, Hkv, S, T, D, Dv = (shapes[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    lens = rng.integers(0, T + 1, B)
    lens[0] = min(T, max(S, lens[0]))  # one batch with every query row alive, the rest anything
    data = {
        "q": rng.standard_normal((B, Hq, S, D)),
        "k": rng.standard_normal((B, Hkv, T, D)),
        "v": rng.standard_normal((B, Hkv, T, Dv)),
        "kv_lens": lens,
        "alibi_slopes": 2.0 ** -np.arange(1, Hq + 1),
        "bias": rng.standard_normal((B, Hq, S, T)),
        "sinks": rng.standard_normal(Hq),
    }
    inputs, ref_args = {}, {}
    for t in var["tensors"]:
        if t["role"] != "input":
            continue
        if t["name"] not in data:
            raise KeyError(f"{manifest_rel}: no test data for input tensor {t['name']}")
        if t["dtype"] in QUANT_DTYPES:  # u32 words in, the dequantized values to the reference
            qt = quant.quantize(data[t["name"]].astype(np.float32), t["dtype"])
            inputs[t["name"]] = w.bin(qt.words, "u32")
            ref_args[t["name"]] = quant.dequantize(qt)
            continue
        arr = data[t["name"]].astype(NP_DTYPES[t["dtype"]])  # f16 inputs rounded to f16 here
        inputs[t["name"]] = w.bin(arr, t["dtype"])
        ref_args[t["name"]] = arr
    params = dict(params)
    pnames = {p["name"] for p in var["params"]}
    if "softcap" in pnames:
        params["softcap"] = float(options["softcap"])
    if "window_left" in pnames:
        params["window_left"] = options["window"][0]
    if "window_right" in pnames:
        params["window_right"] = options["window"][1]
    unknown = set(params) - pnames
    if unknown:
        raise KeyError(f"{manifest_rel} ({var['name']}) has no param(s) {sorted(unknown)}")
    o, lse = attention_reference(
        ref_args["q"],
        ref_args["k"],
        ref_args["v"],
        scale=float(np.float32(params["scale"])) if "scale" in params else None,
        causal=options.get("causal", False),
        window=options.get("window"),
        softcap=float(np.float32(params["softcap"])) if "softcap" in params else None,
        alibi_slopes=ref_args.get("alibi_slopes"),
        bias=ref_args.get("bias"),
        sinks=ref_args.get("sinks"),
        kv_lens=ref_args.get("kv_lens"),
    )
    expected = {}
    for t in var["tensors"]:
        if t["role"] == "output":  # f32 files: an f16 o is checked as the kernel wrote it, against f32
            expected[t["name"]] = w.bin(o if t["name"] == "o" else lse, "f32")
    dims = "x".join(str(shapes[k]) for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    return {
        "name": f"attn.{cname}.{var['family']}.{var['dtype']}{'.tiles-f16' if 'tiles' in var else ''}.{dims}",
        "manifest": manifest_rel,
        "variant": {"family": var["family"], "dtype": var["dtype"],
                    **({"tiles": var["tiles"]} if "tiles" in var else {})},
        "requires_features": list(var["requires"].get("features", [])),
        "shapes": shapes,
        "params": params,
        "limits": {},
        "tol": TOL[var["dtype"]],
        "inputs": inputs,
        "expected": expected,
    }


# --- a kernel whose mods read data of their own (tests/js/flex_mods.py) ------------------------

FLEX_SHAPES = [
    {"B": 1, "Hq": 3, "Hkv": 3, "S": 9, "T": 13, "D": 16, "Dv": 16},
    {"B": 2, "Hq": 3, "Hkv": 1, "S": 1, "T": 21, "D": 12, "Dv": 8},
]


def flex_cases(w: _Writer, folder: Path) -> list[dict]:
    """`attnc compile` the flash kernel with flex_mods' score_mod and mask_mod (causal) and make a
    case per (family, dtype) and shape, with its captured tables as inputs and numpy's result."""
    import subprocess

    if not compiler_available():
        return []
    out = (folder / "compiled" / "flex").resolve()
    # q, k, v, four captured arrays and o: 8 storage buffers, WebGPU's default limit; the block
    # map of the mask's table takes a 9th, so each (family, dtype) has a `.block-map` variant too
    argv = [*_compile_prefix(), KERNEL, "-o", str(out), "--force", "--set", "causal=true",
            "--set", "score_mod=tests.js.flex_mods:score_mod", "--set", "mask_mod=tests.js.flex_mods:mask_mod"]
    proc = subprocess.run(argv, capture_output=True, text=True, **_compile_env())
    if proc.returncode != 0:
        raise RuntimeError(f"attnc compile failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    rng = np.random.default_rng(5)
    cases = []
    for var in manifest["variants"]:
        for shapes in FLEX_SHAPES:
            cases.append(_flex_case(w, rng, var, dict(shapes)))
    return cases


def _flex_case(w: _Writer, rng, var: dict, shapes: dict) -> dict:
    B, Hq, Hkv, S, T, D, Dv = (shapes[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    NB = 8
    data = {
        "q": rng.standard_normal((B, Hq, S, D)), "k": rng.standard_normal((B, Hkv, T, D)),
        "v": rng.standard_normal((B, Hkv, T, Dv)),
        "table": rng.standard_normal((NB, Hq)),
        "buckets": rng.integers(0, NB, S + T - 1),  # one per distance kv_idx - q_idx + S - 1
        "level": rng.integers(0, 256, T),
        "keep": rng.random((S, T)) < 0.8,
    }
    params = {"temperature": 0.75, "OFFSET": S - 1}
    names = {t["name"] for t in var["tensors"] if t["role"] == "input"}
    assert names == set(data), (names, set(data))  # the manifest lists every captured array
    assert {p["name"] for p in var["params"]} == {"scale", "temperature", "OFFSET"}
    inputs, arrays = {}, {}
    for t in var["tensors"]:
        if t["role"] == "input":
            arrays[t["name"]] = data[t["name"]].astype(NP_DTYPES[t["dtype"]])
            inputs[t["name"]] = w.bin(arrays[t["name"]], t["dtype"])
            for i, d in enumerate(t["dims"]):  # captured arrays bring their own dims
                shapes.setdefault(d, arrays[t["name"]].shape[i])
    q, k, v = (arrays[n].astype(np.float64) for n in ("q", "k", "v"))
    g = Hq // Hkv
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhsd,bhtd->bhst", q, kk) / math.sqrt(D)
    i, j = np.arange(S)[:, None], np.arange(T)[None, :]
    table = arrays["table"].astype(np.float64)
    bias = table[arrays["buckets"][j - i + S - 1]].transpose(2, 0, 1)  # [Hq, S, T]
    s = s * float(np.float32(0.75)) + bias[None] + 0.25 * arrays["level"][None, None, None, :]
    keep = arrays["keep"] & (j <= i + T - S)  # the mask_mod and causal (queries at the end of the keys)
    s = np.where(keep[None, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(den > 0, (p @ vv) / den, 0.0)
        lse = np.where(den[..., 0] > 0, m[..., 0] + np.log(den[..., 0]), -np.inf)
    assert np.isfinite(lse).any()
    expected = {"o": w.bin(o, "f32")}
    return {
        "name": f"flex.{var['name'].split('.', 1)[1]}.{S}x{T}",
        "manifest": "compiled/flex/manifest.json",
        "variant": {"name": var["name"], "family": var["family"], "dtype": var["dtype"]},
        "requires_features": list(var["requires"].get("features", [])),
        "shapes": shapes,
        "params": params,
        "limits": {},
        "tol": TOL[var["dtype"]],
        "inputs": inputs,
        "expected": expected,
    }


# --- KV caches (js/attnc.js createKVCache) ----------------------------------------------------

# (family, dtype), head dims, appends as (new rows n, counts or None, source): the f16 cache has
# odd head dims, so rows share 32-bit words and the store keeps the halves it does not own
KV_CACHES = [
    (PO32, 8, 8, [(4, [4, 2, 0], "array"), (1, None, "buffer"), (3, [1, 3, 2], "bshd"), (2, None, "array")]),
    (SG16, 5, 6, [(3, [3, 1, 0], "array"), (2, [0, 2, 2], "bshd"), (1, None, "buffer"), (2, [2, 0, 1], "array")]),
]


def kv_cache_cases(w: _Writer, folder: Path) -> list[dict]:
    """Cases for the JS KV cache: appends from typed arrays and GPUBuffers (dense, or [B, n,
    Hkv, D] with strides), ragged and not, then attention over each row's prefix with the
    compiled `kv_cache` kernel; expected: o, the cache's whole k and v buffers (rows past each
    prefix still zero) and its GPU lengths. [] when `attnc compile` is missing."""
    if not compiler_available():
        return []
    manifest = json.loads((folder / "compiled" / "kv_cache" / "manifest.json").read_text())
    rng = np.random.default_rng(2024)
    B, Hkv, Hq, cap, S = 3, 2, 4, 24, 2
    cases = []
    for (family, dtype), D, Dv, steps in KV_CACHES:
        var = next(v for v in manifest["variants"] if (v["family"], v["dtype"]) == (family, dtype))
        npdt = NP_DTYPES[dtype]
        k_all = np.zeros((B, Hkv, cap, D), npdt)
        v_all = np.zeros((B, Hkv, cap, Dv), npdt)
        lens = np.zeros(B, np.int32)
        spec_steps = []
        for n, counts, source in steps:
            k_new = rng.standard_normal((B, Hkv, n, D)).astype(npdt)
            v_new = rng.standard_normal((B, Hkv, n, Dv)).astype(npdt)
            rows = counts if counts is not None else [n] * B
            for b in range(B):
                k_all[b, :, lens[b]:lens[b] + rows[b]] = k_new[b, :, :rows[b]]
                v_all[b, :, lens[b]:lens[b] + rows[b]] = v_new[b, :, :rows[b]]
                lens[b] += rows[b]
            order = (0, 2, 1, 3) if source == "bshd" else (0, 1, 2, 3)
            spec_steps.append({"rows": n, "counts": counts, "source": source,
                               "k": w.bin(k_new.transpose(order), dtype), "v": w.bin(v_new.transpose(order), dtype)})
        q = rng.standard_normal((B, Hq, S, D)).astype(npdt)
        o, _ = attention_reference(q, k_all, v_all, causal=True, kv_lens=lens)
        o_dtype = next(t["dtype"] for t in var["tensors"] if t["name"] == "o")
        cases.append({
            "name": f"kv.{family}.{dtype}",
            "kind": "kv_cache",
            "manifest": "compiled/kv_cache/manifest.json",
            "variant": {"family": family, "dtype": dtype},
            "requires_features": list(var["requires"].get("features", [])),
            "cache": {"batch": B, "kvHeads": Hkv, "capacity": cap, "headDim": D, "valueDim": Dv, "dtype": dtype},
            "steps": spec_steps,
            "q": w.bin(q, dtype),
            "shapes": {"Hq": Hq, "S": S},
            "params": {},
            "tol": TOL[dtype],
            "expected": {"o": w.bin(o, o_dtype), "cache_k": w.bin(k_all, dtype), "cache_v": w.bin(v_all, dtype),
                         "kv_lens": w.bin(lens, "i32")},
        })
    return cases + kv_quant_cases(w, folder)


# (variant, k format, v format, D, Dv, steps, how): a quantized cache appends with the store
# kernels of the `kvquant` compile's manifest ("stores"); `how`: "" as written, "one_encoder"
# (every GPUBuffer append recorded into one encoder, submitted after the last), "permuted" (the
# manifest's store uniform fields listed in reverse order, offsets unchanged)
KV_QUANT_CACHES = [
    (PO32, "q8_0", "q4_0", 32, 32, [(4, [4, 2, 0], "array"), (1, None, "buffer"), (3, [1, 3, 2], "bshd")], ""),
    # head dims that differ: the pair store's D and DV (one dispatch for K and V)
    (PO32, "q8_0", "q4_0", 64, 32, [(2, None, "array"), (3, [3, 0, 1], "bshd"), (1, None, "buffer")], ""),
    # 19 ragged appends of counts of their own in one encoder: more counts buffers than the cache
    # keeps (16; the oldest was destroyed while the encoder held it, the submit refused). Every
    # pattern of 0..2 rows with at most one 2, but none: 16 rows or fewer per batch row
    (PO32, "q8_0", "q4_0", 32, 32, [(2, list(c), "buffer") for c in itertools.product(range(3), repeat=3)
                                    if c.count(2) <= 1 and any(c)], "one_encoder"),
    # the store's uniforms written at their offsets (they were packed in list order)
    (PO32, "q8_0", "q4_0", 32, 32, [(3, [3, 1, 2], "bshd"), (2, None, "buffer")], "permuted"),
]


def kv_quant_cases(w: _Writer, folder: Path) -> list[dict]:
    """The JS KV cache with quantized K/V: every append writes each row's counts[b] (or n) rows
    at its length as attnc.quant quantizes them, and no other row; expected: the cache's words
    exactly (rows never written: zero words), the GPU lengths, and o against the float64
    reference on the dequantized cache."""
    manifest = json.loads((folder / "compiled" / "kvquant" / "manifest.json").read_text())
    permuted = json.loads(json.dumps(manifest))
    for st in permuted.get("stores", []):
        st["uniforms"]["fields"].reverse()
    (folder / "compiled" / "kvquant" / "manifest_permuted.json").write_text(json.dumps(permuted, indent=1))
    rng = np.random.default_rng(2025)
    B, Hkv, Hq, cap, S = 3, 2, 4, 24, 2
    cases = []
    for (family, dtype), kf, vf, D, Dv, steps, how in KV_QUANT_CACHES:
        var = next(v for v in manifest["variants"] if (v["family"], v["dtype"]) == (family, dtype))
        vals = {"k": np.zeros((B, Hkv, cap, D), np.float32), "v": np.zeros((B, Hkv, cap, Dv), np.float32)}
        written = np.zeros((B, Hkv, cap), bool)
        lens = np.zeros(B, np.int32)
        spec_steps = []
        for n, counts, source in steps:
            new = {"k": rng.standard_normal((B, Hkv, n, D)).astype(np.float32),
                   "v": rng.standard_normal((B, Hkv, n, Dv)).astype(np.float32)}
            rows = counts if counts is not None else [n] * B
            for b in range(B):
                for name in ("k", "v"):
                    vals[name][b, :, lens[b]:lens[b] + rows[b]] = new[name][b, :, :rows[b]]
                written[b, :, lens[b]:lens[b] + rows[b]] = True
                lens[b] += rows[b]
            order = (0, 2, 1, 3) if source == "bshd" else (0, 1, 2, 3)
            spec_steps.append({"rows": n, "counts": counts, "source": source,
                               "k": w.bin(new["k"].transpose(order), "f32"),
                               "v": w.bin(new["v"].transpose(order), "f32")})
        expected, ref = {}, {}
        for name, fmt in (("k", kf), ("v", vf)):
            if fmt is None:
                ref[name] = vals[name]
                expected[f"cache_{name}"] = w.bin(vals[name], "f32")
                continue
            width = vals[name].shape[3]
            per = quant.words_per_row(fmt, width)
            words = quant.quantize(vals[name], fmt).words.reshape(-1, per)
            words = np.where(written.reshape(-1, 1), words, 0).astype(np.uint32).reshape(-1)
            ref[name] = quant.dequantize(quant.QuantTensor(fmt, vals[name].shape, words))
            expected[f"cache_{name}"] = {**w.bin(words, "u32"), "count": int(words.size)}
        q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
        o, _ = attention_reference(q, ref["k"], ref["v"], causal=True, kv_lens=lens)
        cases.append({
            "name": f"kv.{family}.{dtype}.{kf}.{vf}.d{D}.dv{Dv}" + (f".{how}" if how else ""),
            "kind": "kv_cache",
            "manifest": f"compiled/kvquant/manifest{'_permuted' if how == 'permuted' else ''}.json",
            "one_encoder": how == "one_encoder",
            "variant": {"family": family, "dtype": dtype},
            "requires_features": list(var["requires"].get("features", [])),
            "cache": {"batch": B, "kvHeads": Hkv, "capacity": cap, "headDim": D, "valueDim": Dv, "dtype": dtype,
                      "kFormat": kf, "vFormat": vf},
            "steps": spec_steps,
            "q": w.bin(q, dtype),
            "shapes": {"Hq": Hq, "S": S},
            "params": {},
            "tol": TOL[dtype],
            "expected": {"o": w.bin(o, "f32"), **expected, "kv_lens": w.bin(lens, "i32")},
        })
    return cases


# --- refused calls and the validation sample ---------------------------------------------------


def refusal_cases(w: _Writer, folder: Path) -> list[dict]:
    """Calls of compiled kernels the loader must refuse with a message naming the problem (on
    runners the other cases already built: no new pipelines): dims attnc's Python API
    refuses, a kv_lens past T, an input of the wrong length. [] without `attnc compile`."""
    if not (folder / "compiled" / "plain" / "manifest.json").is_file():
        return []
    rng = np.random.default_rng(5)
    good = {"B": 1, "Hq": 2, "Hkv": 1, "S": 3, "T": 5, "D": 8, "Dv": 8}
    out = []

    def case(name, cname, variant, shapes, expect, arrays=None, lens=None, params=None):
        """A call with these shapes and q/k/v of the shapes `arrays` (default: good)."""
        B, Hq, Hkv, S, T, D, Dv = ({**good, **(arrays or {})}[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
        inputs = {
            "q": w.bin(rng.standard_normal((B, Hq, S, D)), "f32"),
            "k": w.bin(rng.standard_normal((B, Hkv, T, D)), "f32"),
            "v": w.bin(rng.standard_normal((B, Hkv, T, Dv)), "f32"),
        }
        if lens is not None:
            inputs["kv_lens"] = w.bin(np.array(lens), "i32")
        out.append({"name": f"refuse.{name}", "manifest": f"compiled/{cname}/manifest.json", "variant": variant,
                    "shapes": shapes, "params": params or {}, "limits": {}, "tol": TOL["f32"], "inputs": inputs,
                    "expected": {}, "expect_error": expect})

    plain = {"family": "portable", "dtype": "f32"}
    gqa = {"Hq": 3, "Hkv": 2}
    case("gqa_not_a_multiple", "plain", plain, {**good, **gqa}, "Hq=3 query heads is not a multiple of Hkv=2", gqa)
    gqa = {"Hq": 2, "Hkv": 4}
    case("more_kv_heads", "plain", plain, {**good, **gqa}, "Hq=2 query heads is not a multiple of Hkv=4", gqa)
    case("string_dim", "plain", plain, {**good, "S": "3"}, 'S: expected a positive integer, got "3"')
    case("fractional_dim", "plain", plain, {**good, "D": 2.5}, "D: expected a positive integer, got 2.5")
    case("zero_dim", "plain", plain, {**good, "T": 0}, "T=0: expected a positive integer")
    case("negative_dim", "plain", plain, {**good, "B": -1}, "B=-1: expected a positive integer")
    case("short_input", "plain", plain, good, "input q: 40 elements, shape [B=1, Hq=2, S=3, D=8] needs 48",
         arrays={"S": 5, "D": 4})
    case("kv_lens_past_T", "kvlens_window_right", {"family": "subgroups", "dtype": "f32"}, good,
         "input kv_lens: values must be in [0, T=5], got 6 at index 0", lens=[6], params={"window_right": 2})
    def refused_cache(name: str, config: str, variant: dict, expect: str) -> None:
        """An f32 cache of 2 appended rows attended by `variant` of compiled/`config`: refused."""
        if not (folder / "compiled" / config / "manifest.json").is_file():
            return
        B, H, D = 1, 2, 32
        out.append({"name": f"refuse.{name}", "kind": "kv_cache", "manifest": f"compiled/{config}/manifest.json",
                    "variant": variant, "requires_features": [],
                    "cache": {"batch": B, "kvHeads": H, "capacity": 8, "headDim": D, "valueDim": D, "dtype": "f32"},
                    "steps": [{"rows": 2, "counts": None, "source": "array",
                               "k": w.bin(rng.standard_normal((B, H, 2, D)), "f32"),
                               "v": w.bin(rng.standard_normal((B, H, 2, D)), "f32")}],
                    "q": w.bin(rng.standard_normal((B, 4, 1, D)), "f32"), "shapes": {"Hq": 4, "S": 1}, "params": {},
                    "tol": TOL["f32"], "expected": {}, "expect_error": expect})

    # a float cache attended by a variant that reads a q8_0 K: refused naming both (it ran into
    # plausible numbers; an f16 variant over an f32 cache gave NaN)
    refused_cache("kv_cache_of_another_format", "kvquant", plain,
                  "k: the cache stores k as f32, but variant flash_attention.portable.f32 reads "
                  'q8_0: make the cache with kFormat: "q8_0"')
    # an f32 cache attended by an f16 variant: the advice names the cache's dtype or the
    # variant's (an `--set k_dtype=f32` would not help: --dtype f16 sets every float input)
    refused_cache("kv_cache_of_another_dtype", "kv_cache", {"family": "portable", "dtype": "f16"},
                  "k: the cache stores k as f32, but variant flash_attention.portable.f16 reads f16: "
                  'make the cache with dtype: "f16", or load a variant of dtype "f32"')
    return out


def validation_checks(folder: Path) -> dict:
    """The fixed validation sample for the harness: dims (with the flash kernel's dims) and
    corrupted copies of a compiled manifest ({} without `attnc compile`)."""
    path = folder / "compiled" / "split" / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    return {
        "shapes": [{"dims": manifest["dims"], "shapes": validation_cases.encode_numbers(d)}
                   for d in validation_cases.shape_checks()],
        "manifests": validation_cases.manifest_checks(manifest),
    }
