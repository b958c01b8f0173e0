"""Packed sequences: several documents share one row of tokens; each token attends causally to
the tokens of its own document only (FlexAttention's document mask)."""

import numpy as np

import attnc


def document_mask(doc_ids: np.ndarray):
    """A mask_mod for doc_ids [B, S]: the document number of every position (queries and keys
    are the same tokens)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


def packed_attention(q, k, v, doc_ids, device=None):
    return attnc.attention(q, k, v, mask_mod=document_mask(doc_ids), device=device)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 96, 64)).astype(np.float32) for _ in range(3))
    doc_ids = np.repeat([0, 1, 2], [40, 16, 40])[None]  # three documents in one row
    print(packed_attention(q, k, v, doc_ids).shape)
