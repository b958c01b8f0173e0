"""The score_mod and mask_mod the JS loader tests compile (`attnc compile ... --set
score_mod=tests.js.flex_mods:score_mod`): they read a table through a gather (f32 and i32), a u8
array, a bool mask and two numbers, which become kernel inputs listed in the manifest. Only the
arrays' dtypes and ranks matter here: the JS runner binds its own values."""

import numpy as np

import attnc

table = np.zeros((8, 3), np.float32)  # a learned [buckets, heads] table
buckets = np.zeros(5, np.int32)  # the bucket of each distance kv_idx - q_idx + OFFSET
level = np.zeros(4, np.uint8)  # a per-key level, 0..255
keep = np.ones((2, 2), bool)  # which keys each query may see
temperature = 0.5
OFFSET = 2


def score_mod(score, b, h, q_idx, kv_idx):
    return score * temperature + table[buckets[kv_idx - q_idx + OFFSET], h] + 0.25 * attnc.f32(level[kv_idx])


def mask_mod(b, h, q_idx, kv_idx):
    return keep[q_idx, kv_idx]
