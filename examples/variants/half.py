"""float16 inputs: f16 storage (packed, no shader-f16 needed) with f32 math, within 2e-3."""

import numpy as np
from common import inputs, run

q, k, v = inputs(dtype=np.float16)
run("half", q, k, v, {"causal": True}, {}, causal=True)
