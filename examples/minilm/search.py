"""Semantic search demo: rank sentences against a query with all-MiniLM-L6-v2 on attnc.

Every attention call of the encoder runs through `attnc.attention` on the chosen WebGPU
device(s); the script prints the cosine similarities and the wall time spent in attention.

    python examples/minilm/search.py
    python examples/minilm/search.py --device all --dtype float16 --target portable
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model import DTYPES, MiniLM, TimedAttention, attention_for, cosine  # noqa: E402

DOCUMENTS = [
    "A man is eating a piece of bread.",
    "A woman is playing the violin on a stage.",
    "The new movie is awesome, I loved every minute of it.",
    "Two cats are sleeping on the warm windowsill in the afternoon sun.",
    "GPUs run thousands of threads in parallel to multiply large matrices quickly.",
    "The stock market fell sharply after the central bank raised interest rates.",
]
QUERY = "Which sentence talks about graphics hardware doing fast linear algebra?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device",
        action="append",
        help='attnc device: "wgpu:vulkan", "wgpu:opengl", "dawn", a full device name, or '
        '"all" (every attnc.devices()); repeatable; default: attnc\'s default adapter',
    )
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the attention inputs (the rest stays float32)",
    )
    ap.add_argument(
        "--target",
        choices=["portable", "subgroups"],
        default=None,
        help="attnc variant family; default: attnc's choice for the device",
    )
    ap.add_argument("--query", default=QUERY, help="the search query")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs after the first (which includes kernel compilation)",
    )
    return ap.parse_args(argv)


def device_specs(requested: list[str] | None) -> list[Any]:
    """Expand the --device options ("all" becomes every attnc device)."""
    if not requested:
        return [None]
    if "all" in requested:
        import attnc

        return list(attnc.devices())
    return list(requested)


def run_device(model: MiniLM, attention: TimedAttention, args: argparse.Namespace) -> None:
    """Embed documents and query on one device, print the ranking and attention times."""
    texts = [args.query, *DOCUMENTS]
    start = time.perf_counter()
    emb = model.encode(texts, attention=attention, dtype=args.dtype)
    first_total, first_attn = time.perf_counter() - start, attention.seconds
    calls = attention.calls
    attention.reset()
    warm_total = 0.0
    for _ in range(args.repeat):
        start = time.perf_counter()
        model.encode(texts, attention=attention, dtype=args.dtype)
        warm_total += time.perf_counter() - start
    print(f"\n== {attention.label}  (dtype={args.dtype}, target={args.target or 'auto'})")
    print(f"query: {args.query}")
    sims = cosine(emb[1:], emb[:1])
    for rank, i in enumerate(sims.argsort()[::-1], 1):
        print(f"  {rank}. {sims[i]:+.4f}  {DOCUMENTS[i]}")
    batch = model.tokenize(texts)
    print(
        f"batch {len(texts)} x {batch.input_ids.shape[1]} tokens "
        f"(lengths {batch.lengths.tolist()}), {calls} attention calls per embedding"
    )
    print(
        f"first run:   attention {first_attn * 1e3:8.2f} ms of {first_total * 1e3:8.2f} ms "
        "(includes kernel compilation)"
    )
    if args.repeat:
        n = args.repeat
        per_call = sorted(attention.per_call)[len(attention.per_call) // 2]
        print(
            f"warm runs:   attention {attention.seconds / n * 1e3:8.2f} ms of "
            f"{warm_total / n * 1e3:8.2f} ms per embedding (mean of {n}), "
            f"median {per_call * 1e3:.3f} ms per call"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the demo on each requested device."""
    args = parse_args(argv)
    model = MiniLM()
    specs = device_specs(args.device)
    if args.target == "subgroups":  # with --device all, leave out adapters without subgroups
        skipped = [s for s in specs if s is not None and not isinstance(s, str) and "subgroups" not in s.features]
        for dev in skipped:
            print(f"skipping {dev!r}: no 'subgroups' feature for --target subgroups")
        specs = [s for s in specs if s not in skipped]
    timers = [attention_for(spec, args.target) for spec in specs]
    for timer in timers:
        run_device(model, timer, args)
    if len(timers) > 1:
        print("\nattention time per embedding (warm):")
        for timer in timers:
            print(f"  {timer.seconds / max(args.repeat, 1) * 1e3:8.2f} ms  {timer.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
