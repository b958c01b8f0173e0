"""A temperature per head (an [Hq] array) and a global one (a Python float): both are inputs of
the compiled kernel, so changing either runs the same kernel with new values."""

import numpy as np

import attnc


def tempered(temperature: np.ndarray, alpha: float):
    """A score_mod dividing head h's scores by temperature[h] and scaling them all by alpha."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score * alpha / temperature[h]
    return score_mod


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 50, 64)).astype(np.float32) for _ in range(3))
    for alpha in (0.5, 2.0):  # one kernel for both
        print(attnc.attention(q, k, v, score_mod=tempered(np.array([0.5, 1, 2, 4], np.float32), alpha)).shape)
