"""A mask given as data: a boolean [B, S, T] array says which keys each query may see (stored
four to a 32-bit word on the device)."""

import numpy as np

import attnc


def from_bool(mask: np.ndarray):
    """A mask_mod keeping key kv_idx for query q_idx of batch b where mask[b, q_idx, kv_idx]."""
    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, q_idx, kv_idx]
    return mask_mod


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 30, 64)).astype(np.float32) for _ in range(3))
    print(attnc.attention(q, k, v, mask_mod=from_bool(rng.random((2, 30, 30)) < 0.5)).shape)
