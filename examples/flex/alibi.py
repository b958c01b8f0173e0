"""ALiBi written as a score_mod: a per-head slope (a captured [Hq] array) times the distance
from the query to the key (FlexAttention's raw positions: q_idx and kv_idx from 0)."""

import numpy as np

import attnc


def alibi(slopes: np.ndarray):
    """A score_mod adding slopes[h] * (kv_idx - q_idx)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * attnc.f32(kv_idx - q_idx)
    return score_mod


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 64, 64)).astype(np.float32) for _ in range(3))
    slopes = 2.0 ** (-8.0 * np.arange(1, 9) / 8)
    print(attnc.attention(q, k, v, score_mod=alibi(slopes), mask_mod=causal).shape)
