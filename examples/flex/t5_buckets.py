"""T5 relative-position bias: the distance kv_idx - q_idx falls in one of NB buckets (exact up to
a distance, logarithmic beyond), and a learned table [NB, Hq] holds a bias per bucket and head.

The bucket of every distance is computed once on the host with T5's formula and captured as an
int32 array; the score_mod gathers from it, then from the table (a read indexed by a read).
Computing the logarithm in the kernel instead would put distances on a bucket boundary in a
different bucket than a float64 reference does (f32 logs round differently)."""

import math

import numpy as np

import attnc


def t5_bucket(rel: np.ndarray, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional bucket of relative positions rel = kv_idx - q_idx (numpy, exact)."""
    n = num_buckets // 2
    out = np.where(rel > 0, n, 0)
    rel = np.abs(rel)
    exact = n // 2
    with np.errstate(divide="ignore"):
        large = exact + (np.log(np.maximum(rel, 1) / exact) / math.log(max_distance / exact) * (n - exact)).astype(int)
    return out + np.where(rel < exact, rel, np.minimum(large, n - 1))


def t5_bias(table: np.ndarray, n_queries: int, n_keys: int, num_buckets: int = 32, max_distance: int = 128):
    """A score_mod adding table[bucket(kv_idx - q_idx), h] for n_queries queries and n_keys keys."""
    first = n_queries - 1  # buckets[0] is the distance -(n_queries - 1)
    buckets = t5_bucket(np.arange(-first, n_keys), num_buckets, max_distance).astype(np.int32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[buckets[kv_idx - q_idx + first], h]
    return score_mod


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 64, 64)).astype(np.float32) for _ in range(3))
    table = rng.standard_normal((32, 8)).astype(np.float32)  # learned in a real model
    print(attnc.attention(q, k, v, score_mod=t5_bias(table, 64, 64)).shape)
