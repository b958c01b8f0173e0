"""A custom score modifier (FlexAttention's score_mod): a learned-free relative-position penalty."""

from common import inputs, run

import attnc


def relative_position(score, b, h, q_idx, kv_idx):
    """Penalise distant keys: s - 0.05 * |i - j|."""
    return score - 0.05 * attnc.f32(abs(q_idx - kv_idx))


q, k, v = inputs(S=30, T=30)
run("relative_position", q, k, v, {"score_mod": relative_position}, {}, score_mod=relative_position)
