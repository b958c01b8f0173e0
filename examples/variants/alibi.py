"""ALiBi: a per-head linear bias on the distance between key and query positions."""

import numpy as np
from common import inputs, run

q, k, v = inputs(Hq=4, Hkv=4, S=40, T=40)
slopes = (2.0 ** -np.arange(1, 5)).astype(np.float32)
run("alibi", q, k, v, {"alibi": True, "causal": True}, {"alibi_slopes": slopes}, alibi_slopes=slopes, causal=True)
