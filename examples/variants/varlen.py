"""Padded batches and static KV caches: per-batch key lengths (kv_lens) with causal alignment."""

import numpy as np
from common import inputs, run

q, k, v = inputs(B=3, S=9, T=50)
lens = np.array([50, 17, 0], np.int32)  # the last row of the batch has no keys: its output is 0
run("varlen", q, k, v, {"kv_lens": True, "causal": True, "lse": True}, {"kv_lens": lens},
    kv_lens=lens, causal=True, return_lse=True)
