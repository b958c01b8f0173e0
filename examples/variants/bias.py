"""An additive bias broadcast to [B, Hq, S, T] (here one row per key: a padding mask as -inf)."""

import numpy as np
from common import inputs, run

q, k, v = inputs(S=20, T=30)
bias = np.zeros(30, np.float32)
bias[25:] = -np.inf  # the last five keys are padding
full = np.broadcast_to(bias, (1, 4, 20, 30))
run("bias", q, k, v, {"bias": True}, {"bias": full}, bias=bias)
