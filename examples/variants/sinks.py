"""Attention sinks (gpt-oss, ONNX Runtime's head_sink): one extra logit per head in the denominator."""

import numpy as np
from common import inputs, run

q, k, v = inputs(Hq=4, Hkv=1)
sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
run("sinks", q, k, v, {"sinks": True, "causal": True}, {"sinks": sinks}, sinks=sinks, causal=True)
