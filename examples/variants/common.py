"""Shared by the variant examples: random inputs, a run through attnc, a check against the IR reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import attnc
from attnc.ir.interp import interpret
from attnc.ir.printer import print_kernel
from attnc.kernels.flash import flash_attention

ATTN_DIR = Path(__file__).resolve().parent / "attn"


def inputs(B=1, Hq=4, Hkv=2, S=37, T=53, D=64, Dv=64, dtype=np.float32, seed=0):
    """Random q [B,Hq,S,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv]."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype), rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, Dv)).astype(dtype))


def run(name: str, q, k, v, kernel_options: dict, reference_args: dict, **attention_kwargs) -> float:
    """attnc.attention(q, k, v, **attention_kwargs) vs the float64 interpreter of the same DSL kernel.

    Prints the relative error and writes the kernel's text form to attn/<name>.attn
    (`--write-attn`); exits non-zero when the error exceeds the contract's tolerance.
    """
    out = attnc.attention(q, k, v, **attention_kwargs)
    o = out[0] if isinstance(out, tuple) else out
    kern = flash_attention.trace(**kernel_options)
    args = {"q": q, "k": k, "v": v, "scale": attention_kwargs.get("scale", 1.0 / np.sqrt(q.shape[-1])),
            **reference_args}
    ref, _ = interpret(kern, args)
    err = float(np.linalg.norm(o.astype(np.float64) - ref) / np.linalg.norm(ref))
    tol = 2e-3 if q.dtype == np.float16 else 1e-5
    print(f"{name}: relative error {err:.2e} (tolerance {tol:g}) on {attnc.default_device().spec}")
    if "--write-attn" in sys.argv:
        ATTN_DIR.mkdir(exist_ok=True)
        (ATTN_DIR / f"{name}.attn").write_text(print_kernel(kern))
    if not err <= tol:
        raise SystemExit(f"{name}: error {err:.2e} above {tol:g}")
    return err
