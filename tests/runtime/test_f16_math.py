"""The f16-tile variants (targets 'portable-f16', 'subgroups-f16'; need shader-f16): float16
q/k/v read natively and staged in f16 workgroup tiles, p in an f32 tile of its own, products
and sums in f32. Same contract as the other f16 paths: within 2e-3 of the float64 reference;
the large-logit cases where f16 products failed it are in test_f16_output.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.errors import DeviceError
from attnc.lowering.plan import Family, Plan, Storage
from tests.runtime.test_attention_options import (
    RUN,
    _seed,
    combined_opts,
    compare,
    prefill,
    qkv,
)

pytestmark = pytest.mark.gpu

F16_TARGETS = [pytest.param((s, f), id=f"{s}-{f}") for s, f in (
    ("wgpu:vulkan", "portable-f16"), ("wgpu:vulkan", "subgroups-f16"),
    ("dawn:vulkan", "portable-f16"), ("dawn:vulkan", "subgroups-f16"))]


@pytest.fixture
def target(request, require_adapters, missing_adapter):
    spec, family = request.param
    dev = require_adapters(spec)[0]
    if "f16" not in dev.features or ("subgroups" in family and "subgroups" not in dev.features):
        missing_adapter(f"{spec} lacks a feature of {family}")
    return dev, family


@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
@settings(RUN, max_examples=30)
@given(data=st.data())
def test_f16_math_prefill_and_decode(target, data) -> None:
    sh = data.draw(prefill()) if data.draw(st.booleans()) else dict(
        B=1, Hq=4, Hkv=2, S=data.draw(st.integers(1, 8)), T=data.draw(st.integers(900, 1600)), D=64, Dv=64)
    rng = _seed(data.draw)
    compare(target, np.float16, *qkv(rng, **sh, dtype=np.float16), {"causal": data.draw(st.booleans())})


@pytest.mark.parametrize("target", F16_TARGETS, indirect=True)
@settings(RUN, max_examples=30)
@given(data=st.data())
def test_f16_math_with_every_option(target, data) -> None:
    Hkv = data.draw(st.integers(1, 2))
    sh = dict(B=data.draw(st.integers(1, 2)), Hq=Hkv * data.draw(st.integers(1, 3)), Hkv=Hkv,
              S=data.draw(st.integers(17, 60)), T=data.draw(st.integers(1, 120)), D=64, Dv=64)
    rng = _seed(data.draw)
    compare(target, np.float16, *qkv(rng, **sh, dtype=np.float16),
            combined_opts(data.draw, rng, sh["B"], sh["Hq"], sh["S"], sh["T"]))


@pytest.mark.parametrize("target", F16_TARGETS[:1], indirect=True)
def test_f16_math_large_logits(target) -> None:
    """Integer q, k with |s| up to ~5e3, exact in every arithmetic."""
    rng = np.random.default_rng(3)
    q = rng.integers(-12, 13, (1, 2, 19, 32)).astype(np.float16)
    k = rng.integers(-12, 13, (1, 2, 40, 32)).astype(np.float16)
    v = rng.standard_normal((1, 2, 40, 32)).astype(np.float16)
    o = compare(target, np.float16, q, k, v, {"scale": 1.0})[0]
    assert np.isfinite(o).all()


def test_f16_math_needs_f16_inputs_and_shader_f16(require_adapters) -> None:
    vk, gl = require_adapters("wgpu:vulkan", "wgpu:opengl")
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="float16"):
        attnc.attention(q, q, q, device=vk, target="portable-f16")
    with pytest.raises(DeviceError, match="shader-f16") as e:
        attnc.attention(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16), device=gl,
                        target="portable-f16")
    assert "target='portable'" in e.value.render()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8"])
def test_f16_tiles_refuse_quantized_k_and_v(require_adapters, fmt) -> None:
    """f16 tiles would round a quantized K's or V's values (d * q: up to 19 bits; 3e-3 to 5e-3
    relative error on o with scores of ~100): attention(), paged_attention() and KVCache.attend
    refuse the f16-tile targets over a quantized K or V naming both, and the lowering refuses an
    F16A plan over one whatever asks for it (a tuning-cache entry, a forced plan)."""
    from attnc import quant
    from attnc.errors import LoweringError
    from attnc.lowering import lower
    from attnc.runtime.build import Options, build_kernel

    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 3, 32)).astype(np.float16)
    kv = rng.standard_normal((1, 2, 40, 32)).astype(np.float32)
    for k, v, name in ((quant.quantize(kv, fmt), kv.astype(np.float16), "k"),
                       (kv.astype(np.float16), quant.quantize(kv, fmt), "v")):
        with pytest.raises(ValueError, match=rf"'portable-f16' stages K and V in f16 tiles.* {fmt} {name}\b"):
            attnc.attention(q, k, v, device=dev, target="portable-f16")
    pages = quant.quantize(kv.reshape(1, 2, 5, 8, 32).transpose(0, 2, 1, 3, 4).reshape(5, 2, 8, 32), fmt)
    with pytest.raises(ValueError, match=rf"'subgroups-f16' stages K and V in f16 tiles.* {fmt} k\b"):
        attnc.paged_attention(q, pages, pages, np.arange(5, dtype=np.int32)[None], device=dev,
                              target="subgroups-f16")
    cache = attnc.KVCache(1, 2, 64, 32, device=dev, dtype=np.float16, k_format=fmt, v_format=fmt)
    cache.append(kv.astype(np.float16), kv.astype(np.float16))
    with pytest.raises(ValueError, match=rf"'portable-f16' stages K and V in f16 tiles.* {fmt} k\b"):
        cache.attend(q, target="portable-f16")
    kern = build_kernel(Options(f16=True, k_format=fmt), {"BM": 16, "BN": 16})
    with pytest.raises(LoweringError, match=r"F16A plans stage K and V in f16 workgroup tiles.*quantized k\b"):
        lower(kern, Plan(Family.PORTABLE, Storage.F16A))
