"""How far attention over quantized K/V is from attention over the unquantized K/V (a report,
not a test: the accuracy contract is against the dequantized K/V, tests/runtime/test_quant_attention.py).

    python tools/kv_quant_accuracy.py [--json FILE]

For each format (q8_0, q4_0, int8, and f16 for comparison): the relative Frobenius error of
the float64 reference attention on the dequantized K and V against the one on the original
K and V, (1) on standard-normal q, k, v (D = 64 and 128, T = 4096, decode S = 1 and S = 64),
(2) on all-MiniLM-L6-v2's own q, k, v (every layer's attention on a few sentences; needs the
example's packages, examples/minilm), with the embeddings' 1 - cos against unquantized ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from attnc import quant

FORMATS = ("f16", "q8_0", "q4_0", "int8")
SENTENCES = ["A man is eating food.", "A man is riding a horse on a beach at sunset.",
             "The new movie is awesome, everyone in the cinema laughed.", "Quantized caches save memory."]


def ref_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_lens: np.ndarray | None = None) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(D)) v with GQA and per-batch key lengths."""
    group = q.shape[1] // k.shape[1]
    k64 = np.repeat(k.astype(np.float64), group, axis=1)
    v64 = np.repeat(v.astype(np.float64), group, axis=1)
    s = np.einsum("bhsd,bhtd->bhst", q.astype(np.float64), k64) / np.sqrt(q.shape[-1])
    if kv_lens is not None:
        s = np.where(np.arange(k.shape[2])[None, None, None, :] < kv_lens[:, None, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhst,bhtd->bhsd", p / p.sum(-1, keepdims=True), v64)


def stored(x: np.ndarray, fmt: str) -> np.ndarray:
    """x as a cache in `fmt` gives it back."""
    if fmt == "f16":
        return x.astype(np.float16).astype(np.float32)
    return quant.dequantize(quant.quantize(x, fmt))


def relerr(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_rows() -> list[dict]:
    """Errors on standard-normal inputs."""
    rng = np.random.default_rng(0)
    out = []
    for D in (64, 128):
        for S in (1, 64):
            q = rng.standard_normal((1, 8, S, D)).astype(np.float32)
            k = rng.standard_normal((1, 2, 4096, D)).astype(np.float32)
            v = rng.standard_normal((1, 2, 4096, D)).astype(np.float32)
            exact = ref_attention(q, k, v)
            for fmt in FORMATS:
                out.append({"data": "random", "D": D, "S": S, "format": fmt,
                            "relerr": relerr(ref_attention(q, stored(k, fmt), stored(v, fmt)), exact)})
    return out


def minilm_rows() -> list[dict]:
    """Errors on MiniLM's attention inputs, per layer and for the embeddings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "minilm"))
    from model import MiniLM  # type: ignore[import-not-found]

    model = MiniLM()
    calls: list[tuple[np.ndarray, ...]] = []

    def exact(q, k, v, *, kv_lens):
        calls.append((q, k, v, kv_lens))
        return ref_attention(q, k, v, kv_lens).astype(np.float32)

    base = model.encode(SENTENCES, exact)
    out = []
    for fmt in FORMATS:
        errs = [relerr(ref_attention(q, stored(k, fmt), stored(v, fmt), lens), ref_attention(q, k, v, lens))
                for q, k, v, lens in calls]
        emb = model.encode(SENTENCES, lambda q, k, v, *, kv_lens, f=fmt: ref_attention(
            q, stored(k, f), stored(v, f), kv_lens).astype(np.float32))
        cos = np.sum(emb * base, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(base, axis=1))
        out.append({"data": "minilm", "format": fmt, "relerr_max_layer": max(errs),
                    "relerr_mean_layer": float(np.mean(errs)), "embedding_1_minus_cos_max": float(1 - cos.min())})
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (and write --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = random_rows()
    try:
        rows += minilm_rows()
    except ImportError as exc:
        print(f"MiniLM skipped: {exc}", file=sys.stderr)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
