"""Timing facts shared by the tuner and the benchmark: how many input copies to rotate over."""

from __future__ import annotations

DEFAULT_CACHE_BYTES = 64 << 20  # a guess at the last-level cache (H100/H200 L2: 50 MiB)


def rotation_count(nbytes: int, cache_bytes: int = DEFAULT_CACHE_BYTES, max_copies: int = 32) -> int:
    """How many input copies keep timed runs from reading cached inputs: cover ~3x the cache."""
    if nbytes <= 0 or nbytes >= 3 * cache_bytes:
        return 1
    return int(max(1, min(max_copies, -(-3 * cache_bytes // nbytes))))
