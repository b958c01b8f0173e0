"""Packed int8 dots (IDP=1) where the softmax is neither flat nor saturated.

K's dots by dot4I8Packed over base-256 digits of 24-bit query integers must score as f32
products do. A relative error of every score (a wrong digit weight: 65535 for 65536 shrinks
each score by 1.5e-5, a temperature change) hides where scores are N(0, 1) over few keys (the
softmax is nearly flat), where they reach 1e4 (one key takes all the weight), or behind f16's
2e-3: here queries of std 1 and 2 over 200 keys give scores of std 1-2, where o moves with the
scores' scale. IDP=1 is checked against float64 within the 1e-5 contract and against IDP=0 on
the same data, which the same math in f32 products gives within a few 1e-7."""

from __future__ import annotations

import numpy as np
import pytest

from attnc import quant
from attnc.runtime import api
from tests.lowering.test_stream import lane_groups
from tests.textbook import assert_close, attention_ref


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8"])
def test_int_dot_scores_keep_their_scale(fmt, require_adapters) -> None:
    (dev,) = require_adapters("wgpu:vulkan")
    rng = np.random.default_rng(3)
    B, H, S, T, D = 1, 2, 2, 200, 128
    k = quant.dequantize(quant.quantize(rng.standard_normal((B, H, T, D)).astype(np.float32), fmt))
    v = rng.standard_normal((B, H, T, 64)).astype(np.float32)
    kq = quant.quantize(k, fmt)
    dims = dict(B=B, Hq=H, Hkv=H, S=S, T=T, D=D, Dv=64)
    ops = {}
    for idp in (1, 0):
        plan = lane_groups(dev, workgroup_size=64, lanes_per_key=4, keys_per_step=2, query_dim=D, value_columns=64,
                           int_dot=idp)
        ops[idp] = api.prepare(dims, np.float32, device=dev, plan=plan, tunables={"BM": 1, "BN": 64}, nsplit=2,
                               k_format=fmt)
    assert "dot4I8Packed" in ops[1].main_program.wgsl and "dot4I8Packed" not in ops[0].main_program.wgsl
    for temp in (1.0, 2.0):
        q = (rng.standard_normal((B, H, S, D)) * temp).astype(np.float32)
        o = ops[1](q, kq, v)
        assert_close(o, attention_ref(q, k, v), 1e-5, f"o at temperature {temp}")
        assert_close(o, ops[0](q, kq, v), 2e-6, f"IDP=1 against IDP=0 at temperature {temp}")
