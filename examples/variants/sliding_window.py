"""Sliding-window attention (Mistral/Gemma local layers): each query sees keys within W before it.

As a FlexAttention-style mask_mod: a plain Python function of (b, h, q_idx, kv_idx), traced
into the kernel. KV tiles the mask removes are skipped (bounds derived from the mask itself).
"""

from common import inputs, run

W = 16


def sliding_window(b, h, q_idx, kv_idx):
    """Keep keys in (q_idx - W, q_idx]."""
    return (kv_idx <= q_idx) & (kv_idx > q_idx - W)


q, k, v = inputs(S=64, T=64)
# W is a number the mask captures: a runtime parameter of the kernel (a new W needs no new
# kernel), so the reference interpreter is given its value by name
run("sliding_window", q, k, v, {"mask_mod": sliding_window}, {"W": W}, mask_mod=sliding_window)
# the same through the built-in option (queries aligned to the end of the keys)
run("window_option", q, k, v, {"window": (W - 1, 0)}, {"window_left": W - 1, "window_right": 0},
    window=(W - 1, 0))
