"""Prefix-LM: the first prefix_len[b] tokens of each sequence attend to each other in both
directions; the tokens after them attend causally."""

import numpy as np

import attnc


def prefix_lm(prefix_len: np.ndarray):
    """A mask_mod for prefix_len [B] (int32): bidirectional inside the prefix, causal after it."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix_len[b])
    return mask_mod


def prefix_lm_attention(q, k, v, prefix_len, device=None):
    return attnc.attention(q, k, v, mask_mod=prefix_lm(prefix_len), device=device)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 80, 64)).astype(np.float32) for _ in range(3))
    print(prefix_lm_attention(q, k, v, np.array([10, 33], np.int32)).shape)
