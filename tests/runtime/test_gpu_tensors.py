"""GPU tensors, prepared ops and the application's own device, on every CI adapter.

attention() and prepared ops take attnc.Tensor views of GPUBuffers for q, k, v and every
option tensor, keep results on the GPU, read strided views in place, write into `out=`, record
into the application's command encoder, and on a repeated call create nothing (the device's
counters say so). Misuse (another device, a wrong dtype or shape, a destroyed buffer, an
unaligned offset) is a ValueError naming the argument.

Shapes are fixed per test (a kernel per option set and plan compiles once per adapter, seconds
on these CPU adapters); values, kv_lens, bias shapes and views are drawn.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime import tuning_cache
from attnc.runtime.dispatch import is_destroyed
from tests.targets import targets
from tests.textbook import assert_close, attention_ref

pytestmark = pytest.mark.gpu

RUN = settings(deadline=None, max_examples=6,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DIMS = dict(B=2, Hq=4, Hkv=2, S=3, T=40, D=16, Dv=8)  # short rows: the decode plans
BIAS_SHAPES = {"T": (40,), "ST": (3, 40), "1H1T": (1, 4, 1, 40), "B1S1": (2, 1, 3, 1), "full": (2, 4, 3, 40)}


def qkv(rng, dims=DIMS, dtype=np.float32):
    B, Hq, Hkv, S, T, D, Dv = (dims[k] for k in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    return (rng.standard_normal((B, Hq, S, D)).astype(dtype), rng.standard_normal((B, Hkv, T, D)).astype(dtype),
            rng.standard_normal((B, Hkv, T, Dv)).astype(dtype))


def on(dev, *xs):
    return [attnc.tensor(x, dev) for x in xs]


# ----------------------------------------------------------------------------- every option on the GPU
@pytest.mark.parametrize("target", targets(), indirect=True)
@RUN
@given(data=st.data())
def test_every_option_tensor_as_a_gpu_tensor(target, data) -> None:
    dev, family = target
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, k, v = qkv(rng)
    lens = np.array([data.draw(st.integers(0, 40)), data.draw(st.sampled_from([3, 40]))], np.int32)
    bias = rng.standard_normal(BIAS_SHAPES[data.draw(st.sampled_from(sorted(BIAS_SHAPES)))]).astype(np.float32)
    slopes = rng.uniform(0, 0.2, 4).astype(np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    # scalar options drawn too: attention() keeps its ops by them, a stale one would be wrong here
    scalars = dict(causal=True, softcap=data.draw(st.sampled_from([5.0, 30.0])),
                   window=(data.draw(st.integers(0, 40)), None), scale=data.draw(st.sampled_from([None, 0.3])))
    opts = dict(scalars, bias=bias, alibi_slopes=slopes, sinks=sinks, kv_lens=lens)
    ref_o, ref_lse = attention_ref(q, k, v, **opts, return_lse=True)
    gpu_opts = dict(scalars, **dict(zip(("bias", "alibi_slopes", "sinks", "kv_lens"),
                                        on(dev, bias, slopes, sinks, lens), strict=True)))
    o, lse = attnc.attention(*on(dev, q, k, v), **gpu_opts, return_lse=True, target=family)
    assert isinstance(o, attnc.Tensor) and isinstance(lse, attnc.Tensor)
    assert o.shape == (2, 4, 3, 8) and o.dtype == np.float32 and o.device is dev
    assert_close(o.numpy(), ref_o, 1e-5)
    assert_close(lse.numpy(), ref_lse, 1e-5, "lse")
    # host q/k/v with GPU option tensors, read back on request; and the reverse
    o2 = attnc.attention(q, k, v, **gpu_opts, target=family, output="numpy")
    assert isinstance(o2, np.ndarray)
    assert_close(o2, ref_o, 1e-5)
    o3 = attnc.attention(*on(dev, q, k, v), **opts, return_lse=True, target=family)[0]
    assert_close(o3.numpy(), ref_o, 1e-5)


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_float16_gpu_tensors(require_adapters, spec) -> None:
    """f16 q/k/v on the GPU (packed storage, f32 math); the GPU result is the float16 o the
    kernel wrote (tests/runtime/test_f16_output.py draws layouts, strategies and out=)."""
    dev = require_adapters(spec)[0]
    q, k, v = qkv(np.random.default_rng(1), dtype=np.float16)
    lens = np.array([17, 40], np.int32)
    o = attnc.attention(*on(dev, q, k, v), kv_lens=attnc.tensor(lens, dev), causal=True)
    assert o.dtype == np.float16 and o.shape == (2, 4, 3, 8) and o.is_contiguous
    assert_close(o.numpy(), attention_ref(q, k, v, causal=True, kv_lens=lens), 2e-3)
    o_host = attnc.attention(*on(dev, q, k, v), kv_lens=lens, causal=True, output="numpy")
    assert o_host.dtype == np.float16


def test_host_objects_through_dlpack_and_array(require_adapters) -> None:
    """PyTorch CPU tensors (DLPack) and objects with __array__ wherever numpy is accepted."""
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(2))
    lens = np.array([30, 12], np.int32)
    sinks = np.linspace(-1, 1, 4).astype(np.float32)

    class ArrayLike:
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    o = attnc.attention(torch.from_numpy(q), ArrayLike(k), torch.from_numpy(v), kv_lens=torch.from_numpy(lens),
                        sinks=ArrayLike(sinks), device=dev)
    assert isinstance(o, np.ndarray)
    assert_close(o, attention_ref(q, k, v, kv_lens=lens, sinks=sinks), 1e-5)
    t = attnc.tensor(torch.from_numpy(q), dev)
    np.testing.assert_array_equal(t.numpy(), q)
    with pytest.raises(ValueError, match="q"):
        attnc.attention(torch.from_numpy(q).requires_grad_(True), k, v, device=dev)


# ----------------------------------------------------------------------------- strided views
def test_strided_views_are_read_in_place(require_adapters) -> None:
    """BSHD buffers viewed as BHSD, a KV prefix sliced out of a longer buffer, an output
    written into a BSHD view: no copies (only the prepared op's own buffers are made)."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng)
    k_long = rng.standard_normal((2, 2, 64, 16)).astype(np.float32)
    k_long[:, :, :40] = k
    q_bshd = attnc.tensor(np.ascontiguousarray(q.transpose(0, 2, 1, 3)), dev).permute(0, 2, 1, 3)
    v_bshd = attnc.tensor(np.ascontiguousarray(v.transpose(0, 2, 1, 3)), dev).permute(0, 2, 1, 3)
    k_prefix = attnc.tensor(k_long, dev)[:, :, :40]
    o_bshd = attnc.zeros((2, 3, 4, 8), device=dev)
    assert not q_bshd.is_contiguous and not k_prefix.is_contiguous
    with pytest.raises(ValueError, match=r"^out: strides \(96, 8, 32, 1\): this variant packs"):
        attnc.prepare(q_bshd, k_prefix, v_bshd, causal=True)(q_bshd, k_prefix, v_bshd, out=o_bshd.permute(0, 2, 1, 3))
    op = attnc.prepare(q_bshd, k_prefix, v_bshd, causal=True, out=o_bshd.permute(0, 2, 1, 3))
    assert op.plan.vector_width == 4  # head dims contiguous: vec4 loads read these views
    before = dev.counters.snapshot()
    op(q_bshd, k_prefix, v_bshd, out=o_bshd.permute(0, 2, 1, 3))
    made = dev.counters.since(before)
    # the first call uploads its uniform blocks, and no data: the views are read in place
    assert made["bytes_uploaded"] == sum(p.uniform_size for p in op.progs), made
    ref = attention_ref(q, k, v, causal=True)
    assert_close(o_bshd.numpy().transpose(0, 2, 1, 3), ref, 1e-5)


def test_head_dim_strided_views_get_scalar_loads(require_adapters) -> None:
    """A view whose head dim is not contiguous (every other element) cannot be read by vec4
    loads: an op prepared with it takes scalar loads; an op prepared for dense tensors refuses
    it with an error naming the argument."""
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(4))
    k_wide = np.repeat(k, 2, axis=3)  # [.., 32]: every other element is k
    k_view = attnc.tensor(k_wide, dev)[..., ::2]
    qt, kt, vt = on(dev, q, k, v)
    op = attnc.prepare(qt, k_view, vt)
    assert op.plan.vector_width == 1
    assert_close(op(qt, k_view, vt).numpy(), attention_ref(q, k, v), 1e-5)
    dense = attnc.prepare(qt, kt, vt)
    assert dense.plan.vector_width == 4
    with pytest.raises(ValueError, match=r"^k: strides .*vec4"):
        dense(qt, k_view, vt)


def test_offsets_must_meet_the_binding_alignment(require_adapters) -> None:
    dev = require_adapters("dawn:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(5))
    align = int(dev.gpu.limits["min-storage-buffer-offset-alignment"])
    pad = align // 4  # floats before q in one buffer: an aligned offset
    both = attnc.tensor(np.concatenate([np.zeros(pad, np.float32), q.reshape(-1)]), dev)
    q_at = attnc.as_tensor(both.buffer, q.shape, np.float32, offset=4 * pad)
    kt, vt = on(dev, k, v)
    assert_close(attnc.attention(q_at, kt, vt).numpy(), attention_ref(q, k, v), 1e-5)
    q_off = attnc.as_tensor(both.buffer, q.shape, np.float32, offset=4 * (pad - 1))
    with pytest.raises(ValueError, match=rf"^q: byte offset {4 * (pad - 1)} is not a multiple of {align}"):
        attnc.attention(q_off, kt, vt)


# ----------------------------------------------------------------------------- prepared ops
def test_a_prepared_op_creates_nothing_on_repeated_calls(require_adapters) -> None:
    """After the first call with a set of tensors, calls with that set or another one seen
    before create no buffers, bind groups or pipelines and upload nothing; host inputs are
    uploaded into the op's own buffers (bytes, no buffers)."""
    for spec in ("wgpu:vulkan", "dawn:vulkan", "wgpu:opengl"):
        dev = require_adapters(spec)[0]
        rng = np.random.default_rng(6)
        sets = [on(dev, *qkv(rng)) for _ in range(2)]
        lens = [attnc.tensor(np.array(x, np.int32), dev) for x in ([40, 9], [1, 33])]
        op = attnc.prepare(*sets[0], kv_lens=lens[0], causal=True)
        outs = [attnc.zeros((2, 4, 3, 8), device=dev) for _ in range(2)]
        for i in range(2):
            op(*sets[i], kv_lens=lens[i], out=outs[i])
        before = dev.counters.snapshot()
        for _ in range(5):
            for i in range(2):
                op(*sets[i], kv_lens=lens[i], out=outs[i])
        made = dev.counters.since(before)
        assert made["submits"] == 10, made
        assert {n: c for n, c in made.items() if n != "submits"} == dict.fromkeys(made.keys() - {"submits"}, 0), made
        for i in range(2):
            q, k, v = (t.numpy() for t in sets[i])
            assert_close(outs[i].numpy(), attention_ref(q, k, v, causal=True, kv_lens=lens[i].numpy()), 1e-5)
        q, k, v = (t.numpy() for t in sets[0])
        op(q, k, v)
        before = dev.counters.snapshot()
        o = op(q, k, v)
        made = dev.counters.since(before)
        assert made["buffers_created"] == 0 and made["bind_groups_created"] == 0, made
        assert made["bytes_uploaded"] == q.nbytes + k.nbytes + v.nbytes, made
        assert_close(o, attention_ref(q, k, v, causal=True, kv_lens=lens[0].numpy()), 1e-5)


def test_out_encoder_and_the_ops_own_output(require_adapters) -> None:
    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(7))
    qt, kt, vt = on(dev, q, k, v)
    op = attnc.prepare(qt, kt, vt, return_lse=True)
    ref_o, ref_lse = attention_ref(q, k, v, return_lse=True)
    o, lse = op(qt, kt, vt)
    o_again, _ = op(qt, kt, vt)
    assert o_again is o  # the op's own output, overwritten by each call
    out, out_lse = attnc.zeros((2, 4, 3, 8), device=dev), attnc.zeros((2, 4, 3), device=dev)
    encoder = dev.gpu.create_command_encoder()
    before = dev.counters.snapshot()
    got = op(qt, kt, vt, out=out, out_lse=out_lse, encoder=encoder)
    assert got == (out, out_lse) and dev.counters.since(before)["submits"] == 0
    assert np.all(out.numpy() == 0)  # recorded, not run: the caller submits
    dev.gpu.queue.submit([encoder.finish()])
    assert_close(out.numpy(), ref_o, 1e-5)
    assert_close(out_lse.numpy(), ref_lse, 1e-5, "lse")
    with pytest.raises(ValueError, match="^q: host data cannot be recorded"):
        op(q, kt, vt, encoder=dev.gpu.create_command_encoder())
    with pytest.raises(ValueError, match="output='numpy'"):
        op(qt, kt, vt, encoder=dev.gpu.create_command_encoder(), output="numpy")
    with pytest.raises(ValueError, match="^out: shape"):
        op(qt, kt, vt, out=attnc.zeros((2, 4, 3, 16), device=dev))
    with pytest.raises(ValueError, match="^out: shares its GPUBuffer with an input"):
        op(qt, kt, vt, out=attnc.as_tensor(qt.buffer, (2, 4, 3, 8)))


def test_32_layers_recorded_into_one_encoder(require_adapters) -> None:
    """One op, 32 layers' own tensors, one encoder, one submission: every layer right."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(8)
    layers = [qkv(rng) for _ in range(32)]
    tensors = [on(dev, *x) for x in layers]
    outs = [attnc.zeros((2, 4, 3, 8), device=dev) for _ in layers]
    op = attnc.prepare(*tensors[0], causal=True)
    encoder = dev.gpu.create_command_encoder()
    for t, out in zip(tensors, outs, strict=True):
        op(*t, out=out, encoder=encoder)
    dev.gpu.queue.submit([encoder.finish()])
    for (q, k, v), out in zip(layers, outs, strict=True):
        assert_close(out.numpy(), attention_ref(q, k, v, causal=True), 1e-5)


# ----------------------------------------------------------------------------- the application's device
def _app_device(spec: str, features: list[str], limits: dict[str, int] | None = None):
    import importlib

    module = importlib.import_module("wgpu" if spec.startswith("wgpu") else "wgpudawn")
    api = spec.split(":")[1]
    adapters = [a for a in module.gpu.enumerate_adapters_sync()
                if str(a.info.get("backend_type", "")).lower() == api]
    adapter = adapters[0]
    wanted = [f for f in features if f in adapter.features]
    return adapter, adapter.request_device_sync(required_features=wanted, required_limits=limits or {}), set(wanted)


FEATURE_SETS = {"none": [], "f16": ["shader-f16"], "subgroups+f16": ["subgroup", "subgroups", "shader-f16"]}


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan", "wgpu:opengl"])
@pytest.mark.parametrize("features", list(FEATURE_SETS))
def test_the_applications_device_with_the_features_it_enabled(require_adapters, spec, features) -> None:
    """attnc runs on a GPUDevice the application made, with what it enabled: the subgroups
    family only with subgroups, f16 tiles only with shader-f16; planning sees that
    device's features and limits; attnc adds no feature and the probe runs only with
    subgroups."""
    require_adapters(spec)
    adapter, gpu, enabled = _app_device(spec, FEATURE_SETS[features])
    dev = attnc.get_device(gpu)
    assert dev.external and dev.gpu is gpu and attnc.get_device(gpu) is dev
    caps = dev.capabilities
    assert caps.limits == dict(gpu.limits)
    has_sg = bool(enabled & {"subgroup", "subgroups"})
    assert ("subgroups" in caps.features) == has_sg and ("f16" in caps.features) == ("shader-f16" in enabled)
    assert ("_subgroup_probe" in dev.__dict__) == has_sg
    q, k, v = qkv(np.random.default_rng(9))
    lens = np.array([40, 21], np.int32)
    o = attnc.attention(*on(gpu, q, k, v), kv_lens=attnc.tensor(lens, gpu), causal=True)
    assert_close(o.numpy(), attention_ref(q, k, v, kv_lens=lens, causal=True), 1e-5)
    op = attnc.prepare(q, k, v, device=gpu, causal=True)
    assert op.plan.family.value == ("subgroups" if has_sg and caps.subgroup_lanes_contiguous >= 4 else "portable")
    assert all(p.features <= dev.features for p in op.progs)
    assert set(gpu.features) == set(dev.gpu.features) and dev.gpu is gpu
    h = [x.astype(np.float16) for x in (q, k, v)]
    if "f16" in caps.features:
        o16 = attnc.attention(*h, device=gpu, target="portable-f16")
        assert_close(o16, attention_ref(*h), 2e-3)
    else:
        with pytest.raises(attnc.DeviceError, match="shader-f16"):
            attnc.attention(*h, device=gpu, target="portable-f16")
    if not has_sg:
        with pytest.raises(attnc.DeviceError, match="subgroups"):
            attnc.attention(q, k, v, device=gpu, target="subgroups")


DOUBLE_WGSL = """
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < arrayLength(&dst)) { dst[i] = 2.0 * src[i] + 1.0; }
}
"""


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_buffers_shared_with_the_applications_own_passes(require_adapters, spec) -> None:
    """In one encoder: the application's shader writes q (2x + 1), attnc reads it, the
    application's shader reads o (2o + 1); one submission."""
    require_adapters(spec)
    _, gpu, _ = _app_device(spec, [])
    module = __import__("wgpu" if spec.startswith("wgpu") else "wgpudawn")
    U = module.BufferUsage
    q, k, v = qkv(np.random.default_rng(10))
    storage = U.STORAGE | U.COPY_SRC | U.COPY_DST
    x_buf = gpu.create_buffer_with_data(data=q.tobytes(), usage=storage)
    q_buf = gpu.create_buffer(size=q.nbytes, usage=storage)
    o_buf = gpu.create_buffer(size=2 * 4 * 3 * 8 * 4, usage=storage)
    y_buf = gpu.create_buffer(size=o_buf.size, usage=storage)
    pipeline = gpu.create_compute_pipeline(layout="auto", compute={
        "module": gpu.create_shader_module(code=DOUBLE_WGSL), "entry_point": "main"})

    def double(src, dst, n):
        group = gpu.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=[
            {"binding": 0, "resource": {"buffer": src, "offset": 0, "size": src.size}},
            {"binding": 1, "resource": {"buffer": dst, "offset": 0, "size": dst.size}}])
        p = encoder.begin_compute_pass()
        p.set_pipeline(pipeline)
        p.set_bind_group(0, group)
        p.dispatch_workgroups(-(-n // 64))
        p.end()

    qt = attnc.as_tensor(q_buf, q.shape)
    kt, vt = on(gpu, k, v)
    op = attnc.prepare(qt, kt, vt, causal=True)
    encoder = gpu.create_command_encoder()
    double(x_buf, q_buf, q.size)
    op(qt, kt, vt, out=attnc.as_tensor(o_buf, (2, 4, 3, 8)), encoder=encoder)
    double(o_buf, y_buf, 2 * 4 * 3 * 8)
    gpu.queue.submit([encoder.finish()])
    y = np.frombuffer(gpu.queue.read_buffer(y_buf), np.float32).reshape(2, 4, 3, 8)
    assert_close(y, 2 * attention_ref(2 * q.astype(np.float64) + 1, k, v, causal=True) + 1, 1e-5)


# ----------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("backend_first", [False, True], ids=["attnc_first", "backend_first"])
def test_a_buffer_destroyed_before_attnc_saw_its_backend_is_known_as_destroyed(require_adapters,
                                                                                backend_first) -> None:
    """In a fresh process an application makes a device and buffers of each backend, destroys
    one, then hands them to attnc: a ValueError naming the argument (it was WebGPU's validation
    error: attnc marked destroy() only once it had seen a device of that backend), whether the
    backend's module was imported before attnc or after."""
    specs = [d.spec for d in require_adapters("wgpu:vulkan", "dawn:vulkan")]
    imports = "import wgpu.backends.wgpu_native, wgpudawn, attnc" if backend_first else "import attnc"
    script = textwrap.dedent(f"""
        import importlib, numpy as np
        {imports}
        for module in ("wgpu", "wgpudawn"):
            api = importlib.import_module(module)
            adapter = api.gpu.request_adapter_sync(power_preference="high-performance")
            gpu = adapter.request_device_sync()
            usage = api.BufferUsage.STORAGE | api.BufferUsage.COPY_SRC | api.BufferUsage.COPY_DST
            buffers = [gpu.create_buffer(size=4 * 2 * 8, usage=usage) for _ in range(3)]
            buffers[1].destroy()
            q, k, v = (attnc.as_tensor(b, (1, 1, 2, 8), device=gpu) for b in buffers)
            try:
                attnc.attention(q, k, v)
                print(module, "no error")
            except ValueError as exc:
                print(module, exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["wgpu k: its GPU buffer was destroyed",
                                                     "wgpudawn k: its GPU buffer was destroyed"], (specs, done.stdout)


def test_a_misused_option_tensor_reads_the_same_whether_or_not_its_op_was_prepared(require_adapters) -> None:
    """attention() and KVCache.attend check option tensors when they prepare an op, and the op
    checks them when called: one misuse gives one message, on the call that prepares the op, on
    a later one that reuses it, and from the prepared op itself. (A test expecting the first
    message failed when an earlier test in its process had prepared the same op.)"""
    vk, dawn = require_adapters("wgpu:vulkan", "dawn:vulkan")
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((1, 2, 5, 8), (1, 2, 11, 8), (1, 2, 11, 8)))
    qt, kt, vt = on(vk, q, k, v)
    good = dict(kv_lens=np.array([7], np.int32), sinks=np.zeros(2, np.float32), bias=np.zeros((5, 11), np.float32),
                alibi_slopes=np.zeros(2, np.float32))
    misuses = [("kv_lens", np.array([7], np.uint32), r"^kv_lens: dtype uint32; this op takes int32"),
               ("kv_lens", np.array([7, 7], np.int32), r"^kv_lens: shape \(2,\); this op takes \(1,\)"),
               ("sinks", np.zeros(2, np.float16), r"^sinks: dtype float16; this op takes float32"),
               ("sinks", np.zeros(3, np.float32), r"^sinks: shape \(3,\); this op takes \(2,\)"),
               ("alibi_slopes", np.zeros(3, np.float32), r"^alibi_slopes: shape \(3,\); this op takes \(2,\)"),
               ("bias", np.zeros((5, 11), np.float16), r"^bias: dtype float16; this op takes float32"),
               ("bias", np.zeros((5, 12), np.float32), r"^bias: shape \(5, 12\) is not broadcastable")]

    def message(call) -> str:
        with pytest.raises(ValueError) as e:
            call()
        return str(e.value)

    for name, value, match in misuses:
        bad = attnc.tensor(value, vk)
        fine = attnc.tensor(good[name], vk)
        first = message(lambda: attnc.attention(qt, kt, vt, **{name: bad}))  # noqa: B023
        attnc.attention(qt, kt, vt, **{name: fine})
        later = message(lambda: attnc.attention(qt, kt, vt, **{name: bad}))  # noqa: B023
        op = attnc.prepare(qt, kt, vt, **{name: fine})
        prepared = message(lambda: op(qt, kt, vt, **{name: bad}))  # noqa: B023
        assert first == later == prepared, (first, later, prepared)
        assert re.match(match, first), first
    for name, value in (("sinks", attnc.zeros((2,), np.float16, device=vk)),
                        ("sinks", attnc.zeros((3,), device=vk)), ("sinks", attnc.zeros((2,), device=dawn)),
                        ("bias", attnc.zeros((5, 11), np.float16, device=vk))):
        cache = attnc.KVCache(1, 2, 11, 8, device=vk)
        cache.append(k, v)
        first = message(lambda: cache.attend(q, **{name: value}))  # noqa: B023
        cache.attend(q, **{name: good[name]})
        later = message(lambda: cache.attend(q, **{name: value}))  # noqa: B023
        assert first == later, (first, later)


def test_misuse_is_an_error_naming_the_argument(require_adapters) -> None:
    vk, dawn = require_adapters("wgpu:vulkan", "dawn:vulkan")
    q, k, v = qkv(np.random.default_rng(11))
    qt, kt, vt = on(vk, q, k, v)
    with pytest.raises(ValueError, match="^k: the tensor is on .*dawn"):
        attnc.attention(qt, attnc.tensor(k, dawn), vt)
    with pytest.raises(ValueError, match="^device: "):
        attnc.attention(qt, kt, vt, device=dawn)
    op = attnc.prepare(qt, kt, vt, kv_lens=np.array([40, 40]))
    with pytest.raises(ValueError, match="^v: the tensor is on .*dawn"):
        op(qt, kt, attnc.tensor(v, dawn))
    with pytest.raises(ValueError, match=r"^q: dtype float16; this op takes float32"):
        op(attnc.tensor(q.astype(np.float16), vk), kt, vt)
    # two application devices of one adapter read apart in the message (they once read the same)
    one, two = (vk.adapter.request_device_sync(label=name) for name in ("one", "two"))
    with pytest.raises(ValueError, match=r"^k: the tensor is on .*\(application device \d+ 'two'\)>, but q is on "
                                         r".*\(application device \d+ 'one'\)>") as e:
        attnc.attention(attnc.tensor(q, one), attnc.tensor(k, two), attnc.tensor(v, one))
    numbers = re.findall(r"application device (\d+)", str(e.value))
    assert len(numbers) == 2 and numbers[0] != numbers[1]
    with pytest.raises(ValueError, match=r"^q: shape \(2, 4, 2, 16\); this op takes \(2, 4, 3, 16\)"):
        op(attnc.tensor(q[:, :, :2], vk), kt, vt)
    with pytest.raises(ValueError, match=r"^kv_lens: dtype uint32; this op takes int32"):
        attnc.attention(qt, kt, vt, kv_lens=attnc.tensor(np.array([3, 4], np.uint32), vk))
    with pytest.raises(ValueError, match=r"^bias: shape \(3, 41\) is not broadcastable"):
        attnc.attention(qt, kt, vt, bias=attnc.zeros((3, 41), device=vk))
    with pytest.raises(ValueError, match="^kv_lens: not a tensor of this op|^bias: not a tensor of this op"):
        op(qt, kt, vt, bias=attnc.zeros((3, 40), device=vk))
    dead = attnc.tensor(k, vk)
    dead.destroy()
    assert is_destroyed(dead.buffer)
    with pytest.raises(ValueError, match="^k: its GPU buffer was destroyed"):
        op(qt, dead, vt)
    vt2 = attnc.tensor(v, vk)
    op(qt, kt, vt2, out=attnc.zeros((2, 4, 3, 8), device=vk))  # bound and remembered ...
    vt2.buffer.destroy()  # ... then destroyed through the buffer itself
    with pytest.raises(ValueError, match="^v: its GPU buffer was destroyed"):
        op(qt, kt, vt2)
    with pytest.raises(ValueError, match="^tensor: its GPU buffer was destroyed"):
        vt2.numpy()
    # write() converts within a kind of number (float64 data into float32), never across it
    # (complex data lost its imaginary part, floats were truncated into int32)
    with pytest.raises(ValueError, match="^data: dtype complex128 does not convert to the tensor's float32"):
        kt.write(np.full(k.shape, 1j))
    with pytest.raises(ValueError, match="^data: dtype float64 does not convert to the tensor's int32"):
        attnc.tensor(np.zeros(3, np.int32), vk).write(np.full(3, 2.7))
    np.testing.assert_array_equal(kt.write(k.astype(np.float64)).numpy(), k)
    with pytest.raises(ValueError, match="^buffer: shape"):
        attnc.as_tensor(qt.buffer, (2, 4, 3, 17))


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_outputs_encoders_and_buffers_the_application_gets_wrong(require_adapters, spec) -> None:
    """What an application can get wrong with its own buffers and encoders is a ValueError
    naming the argument, on both compilers: out and out_lse overlapping in one buffer (wrong
    numbers on wgpu-native, a raw validation error on Dawn; disjoint ranges are fine), a numpy
    array as out= (an unhashable-type TypeError), a write into a buffer without COPY_DST, an
    encoder of another device (an error only at the application's own finish()), an output
    attnc allocates past the binding limit (named `out`, which was not given), a captured
    table past it (a raw bind-group error). A finished encoder is WebGPU's own validation
    error, raised by the call."""
    _, gpu, _ = _app_device(spec, [])
    module = __import__("wgpu" if spec.startswith("wgpu") else "wgpudawn")
    U = module.BufferUsage
    dev = attnc.get_device(gpu)
    q, k, v = qkv(np.random.default_rng(12))
    qt, kt, vt = on(gpu, q, k, v)
    ref_o, ref_lse = attention_ref(q, k, v, return_lse=True)
    shared = gpu.create_buffer(size=4096, usage=U.STORAGE | U.COPY_SRC | U.COPY_DST)
    o_view = attnc.as_tensor(shared, (2, 4, 3, 8))
    with pytest.raises(ValueError, match=r"^out_lse: bytes 0\.\.96 of its buffer overlap out's 0\.\.768"):
        attnc.attention(qt, kt, vt, out=o_view, out_lse=attnc.as_tensor(shared, (2, 4, 3)), return_lse=True)
    lse_view = attnc.as_tensor(shared, (2, 4, 3), offset=1024)  # disjoint: allowed
    attnc.attention(qt, kt, vt, out=o_view, out_lse=lse_view, return_lse=True)
    assert_close(o_view.numpy(), ref_o, 1e-5)
    assert_close(lse_view.numpy(), ref_lse, 1e-5, "lse")
    for args in ((qt, kt, vt), (q, k, v)):
        with pytest.raises(ValueError, match="^out: expected an attnc.Tensor to write into, got ndarray"):
            attnc.attention(*args, device=dev, out=np.zeros((2, 4, 3, 8), np.float32))
    read_only = attnc.as_tensor(gpu.create_buffer(size=768, usage=U.STORAGE | U.COPY_SRC), (2, 4, 3, 8))
    with pytest.raises(ValueError, match="^tensor: its buffer was created without COPY_DST"):
        read_only.write(q[:, :, :, :8])
    op = attnc.prepare(qt, kt, vt)
    other = _app_device(spec, [])[1]
    with pytest.raises(ValueError, match="^encoder: it was created by another GPUDevice"):
        op(qt, kt, vt, out=o_view, encoder=other.create_command_encoder())
    finished = gpu.create_command_encoder()
    finished.finish()
    with pytest.raises(dev.wgpu.GPUValidationError):  # WebGPU's own error, raised by the call
        op(qt, kt, vt, out=o_view, encoder=finished)
    with pytest.raises(ValueError, match="^encoder: expected a GPUCommandEncoder, got str"):
        op(qt, kt, vt, out=o_view, encoder="not an encoder")
    encoder = gpu.create_command_encoder()  # the device still records and runs
    op(qt, kt, vt, out=o_view, encoder=encoder)
    gpu.queue.submit([encoder.finish()])
    assert_close(o_view.numpy(), ref_o, 1e-5)
    small = _app_device(spec, [], {"max-storage-buffer-binding-size": 1024})[1]
    if small.limits["max-storage-buffer-binding-size"] != 1024:
        assert spec.startswith("dawn")  # a required limit is a least: Dawn gives the adapter's (wgpu-native: it)
        return
    rng = np.random.default_rng(13)
    sq, sk, sv = (attnc.tensor(rng.standard_normal(shape).astype(np.float32), small)
                  for shape in ((1, 4, 8, 4), (1, 1, 4, 4), (1, 1, 4, 16)))  # 512, 64 and 256 bytes; o 2048
    with pytest.raises(ValueError, match=r"^o \(the output attnc allocates\): spans 2048 bytes"):
        attnc.attention(sq, sk, sv)
    table = np.zeros(512, np.float32)  # 2048 bytes
    with pytest.raises(ValueError, match=r"^table: 2048 bytes, more than the device's max-storage-buffer-binding-size"):
        attnc.attention(sq, sk, sv, score_mod=lambda s, b, h, i, j: s + table[j], out=attnc.zeros((1, 4, 8, 4),
                                                                                                device=small))


# ----------------------------------------------------------------------------- tracing and the tuning cache
def test_score_mods_are_traced_once_per_distinct_function(require_adapters) -> None:
    """A new closure of the same code is the same kernel; a captured number is a uniform, so a
    new value of it is not traced again either, and the result follows the new value."""
    from attnc.runtime import build

    dev = require_adapters("wgpu:vulkan")[0]
    q, k, v = qkv(np.random.default_rng(12))

    def penalty(alpha):
        return lambda s, b, h, qi, kj: s - alpha * attnc.f32(abs(qi - kj))

    attnc.attention(q, k, v, score_mod=penalty(0.25), device=dev)
    before = build._CACHE.traces
    for _ in range(3):
        o = attnc.attention(q, k, v, score_mod=penalty(0.25), device=dev)  # a new closure, equal values
    for _ in range(2):
        op = attnc.prepare(q, k, v, score_mod=penalty(0.25), device=dev)  # prepare shares the trace too
    o2 = attnc.attention(q, k, v, score_mod=penalty(0.5), device=dev)  # another value: a uniform
    assert build._CACHE.traces == before
    assert_close(o, attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.25 * np.abs(i - j)), 1e-5)
    assert_close(op(q, k, v), attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.25 * np.abs(i - j)), 1e-5)
    assert_close(o2, attention_ref(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.5 * np.abs(i - j)), 1e-5)


def test_the_tuning_cache_is_read_once_and_again_when_it_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    path = tuning_cache.cache_path()
    path.write_text(json.dumps({"version": tuning_cache.VERSION, "entries": {"a": 1}}))
    reads = []
    original = type(path).read_text

    def counting(self, *a, **kw):
        reads.append(str(self))
        return original(self, *a, **kw)

    monkeypatch.setattr(type(path), "read_text", counting)
    assert tuning_cache.load() == {"a": 1}
    for _ in range(5):
        assert tuning_cache.load() == {"a": 1}
    assert len(reads) == 1
    path.write_text(json.dumps({"version": tuning_cache.VERSION, "entries": {"a": 1, "bb": 2}}))
    assert tuning_cache.load() == {"a": 1, "bb": 2} and len(reads) == 2


@pytest.mark.parametrize("make", ["tensor", "zeros"])
def test_write_covers_float16_tensors_of_an_odd_size(require_adapters, make) -> None:
    """A float16 tensor attnc allocated with an odd number of elements (its buffer padded to a
    word) takes write() like any other (it was refused: WebGPU writes whole words), and attention
    reads what was written; a view whose bytes share a word with other data is refused naming
    the alignment, its neighbours untouched."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((1, 3, 7, 5)).astype(np.float16) for _ in range(3))
    qt = attnc.tensor(np.zeros_like(q), dev) if make == "tensor" else attnc.zeros(q.shape, np.float16, device=dev)
    assert qt.nbytes % 4 == 2
    qt.write(q)
    np.testing.assert_array_equal(qt.numpy(), q)
    o = attnc.attention(qt, attnc.tensor(k, dev), attnc.tensor(v, dev), output="numpy")
    assert_close(o, attention_ref(q, k, v), 2e-3, "o")
    words = attnc.tensor(np.arange(8, dtype=np.float16), dev)
    inner = attnc.as_tensor(words.buffer, (3,), np.float16, offset=4)  # halves 2..4: ends inside a word
    with pytest.raises(ValueError, match=r"tensor: write\(\) needs 4-byte aligned bytes; offset 4, 6 bytes"):
        inner.write(np.ones(3, np.float16))
    np.testing.assert_array_equal(words.numpy(), np.arange(8, dtype=np.float16))


def test_an_output_the_caller_destroyed_is_made_again(require_adapters) -> None:
    """The output a prepared op (or KVCache.attend with a GPU q) hands back is overwritten by its
    next call; a caller that destroys it gets a new one from the next call (every later call
    raised "its GPU buffer was destroyed")."""
    dev = require_adapters("wgpu:vulkan")[0]
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for n in (4, 8, 8))
    qt, kt, vt = (attnc.tensor(x, dev) for x in (q, k, v))
    op = attnc.prepare(qt, kt, vt)
    op(qt, kt, vt).destroy()
    o = op(qt, kt, vt)
    assert not o.destroyed
    assert_close(o.numpy(), attention_ref(q, k, v), 1e-5, "o")
    cache = attnc.KVCache(1, 2, 32, 16, device=dev)
    cache.append(k, v)
    cache.attend(qt[:, :, :1]).destroy()
    assert_close(cache.attend(qt[:, :, :1]).numpy(), attention_ref(q[:, :, :1], k, v), 1e-5, "o")


# ----------------------------------------------------------------------------- views
@settings(deadline=None, max_examples=60, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 11), min_size=1, max_size=3), data=st.data())
def test_views_are_numpys_views(require_adapters, shape, data) -> None:
    """A GPU tensor indexed with ints, slices (steps that do not divide the length, starts and
    stops past either end, negative ones) and an ellipsis has numpy's shape and elements."""
    (dev,) = require_adapters("wgpu:vulkan")
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    bound = st.none() | st.integers(-13, 13)
    index = tuple(data.draw(st.integers(-n, n - 1) | st.builds(slice, bound, bound, st.none() | st.integers(1, 7)))
                  for n in shape[:data.draw(st.integers(1, len(shape)))])
    if data.draw(st.booleans()):
        index = (*index, Ellipsis)
    view = attnc.tensor(x, dev)[index]
    want = x[index]
    assert tuple(view.shape) == want.shape, index
    if want.size:
        np.testing.assert_array_equal(view.numpy(), want, err_msg=str(index))


# ----------------------------------------------------------------------------- overlapping outputs
@settings(deadline=None, max_examples=300, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 12)), min_size=1, max_size=4))
def test_overlaps_is_true_exactly_when_two_indices_share_an_element(dims) -> None:
    """`overlaps` against listing every index's offset (nested, interleaved, zero and equal strides)."""
    from attnc.runtime.tensor import overlaps

    shape, strides = [n for n, _ in dims], [s for _, s in dims]
    offsets = [sum(i * s for i, s in zip(idx, strides, strict=True)) for idx in np.ndindex(*shape)]
    assert overlaps(shape, strides) == (len(set(offsets)) < len(offsets))


@pytest.mark.parametrize("spec", ["wgpu:vulkan", "dawn:vulkan"])
def test_outputs_whose_elements_overlap_are_refused(require_adapters, spec) -> None:
    """An out or out_lse view in which two indices share an element (rows 4 floats apart for
    8-float rows, an lse with a stride of 1 over two dims) is a ValueError naming it, through
    attention(), a prepared op and paged_attention (it was accepted and read back wrong by up
    to 1.4); interleaved views whose elements are all distinct are written right."""
    (dev,) = require_adapters(spec)
    rng = np.random.default_rng(13)
    q, k, v = qkv(rng)
    B, Hq, S, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    ref_o, ref_lse = attention_ref(q, k, v, return_lse=True)
    qt, kt, vt = on(dev, q, k, v)
    buf = attnc.zeros((4096,), device=dev)
    rows = (Hq * S * 4, S * 4, 4, 1)  # rows of Dv = 8 floats only 4 apart
    lse_strides = (Hq * S, 1, 1)
    P = 5
    table = np.arange(B * (k.shape[2] // P), dtype=np.int32).reshape(B, -1)
    kp, vp = (x.reshape(B, x.shape[1], -1, P, x.shape[3]).transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1], P,
                                                                                            x.shape[3]) for x in (k, v))
    calls = {
        "attention": lambda **kw: attnc.attention(qt, kt, vt, return_lse=True, **kw),
        "prepared": lambda **kw: attnc.prepare(qt, kt, vt, return_lse=True, **kw)(qt, kt, vt, **kw),
        "paged_attention": lambda **kw: attnc.paged_attention(q, kp, vp, table, device=dev, return_lse=True, **kw),
    }
    lse_ok = attnc.as_tensor(buf.buffer, (B, Hq, S), offset=3 * 4096 // 4)
    for entry, call in calls.items():
        bad_o = attnc.as_tensor(buf.buffer, (B, Hq, S, Dv), strides=rows)
        with pytest.raises(ValueError, match=r"^out: strides \(48, 12, 4, 1\) .* give one element to several"):
            call(out=bad_o, out_lse=lse_ok)
        o_ok = attnc.as_tensor(buf.buffer, (B, Hq, S, Dv))
        bad_lse = attnc.as_tensor(buf.buffer, (B, Hq, S), strides=lse_strides, offset=2048)
        with pytest.raises(ValueError, match=r"^out_lse: strides \(12, 1, 1\) .* give one element to several"):
            call(out=o_ok, out_lse=bad_lse)
        # Hq and S interleaved (element (b, h, s) at b*Hq*S + s*Hq + h): distinct elements, allowed
        woven = attnc.as_tensor(buf.buffer, (B, Hq, S), strides=(Hq * S, 1, Hq), offset=2048)
        call(out=o_ok, out_lse=woven)
        assert_close(o_ok.numpy(), ref_o, 1e-5, f"o, {entry}")
        assert_close(woven.numpy(), ref_lse, 1e-5, f"lse, {entry}")


# ----------------------------------------------------------------------------- conversions into tensors
TENSOR_DTYPES = [np.float32, np.float16, np.int32, np.uint32]
HOST_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint32, np.uint64, np.int8, np.bool_]


@settings(deadline=None, max_examples=60, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.sampled_from(HOST_DTYPES), dst=st.sampled_from(TENSOR_DTYPES), data=st.data())
def test_data_converts_into_a_tensor_exactly_or_is_refused(require_adapters, src, dst, data) -> None:
    """attnc.tensor(x, dtype=) and Tensor.write(x) hold x's values exactly as numpy converts
    them, or raise a ValueError; never a value the conversion changed: a float truncated into an
    int, an integer wrapped past the tensor's range (2**32 + 3 written as 3), a finite float64
    turned into an infinity."""
    (dev,) = require_adapters("wgpu:vulkan")
    src, dst = np.dtype(src), np.dtype(dst)
    if src.kind == "b":
        values = data.draw(st.lists(st.booleans(), min_size=1, max_size=6))
    elif src.kind in "iu":
        info = np.iinfo(src)
        values = data.draw(st.lists(st.integers(int(info.min), int(info.max)) | st.sampled_from(
            [v for v in (0, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**32 + 3) if info.min <= v <= info.max]),
            min_size=1, max_size=6))
    else:
        values = data.draw(st.lists(st.floats(width=8 * src.itemsize) | st.sampled_from([1e5, 7e4, 65504.0, 3e38]),
                                    min_size=1, max_size=6))
    with np.errstate(over="ignore"):
        x = np.array(values).astype(src)
    same_kind = np.can_cast(src, dst, "same_kind")
    with np.errstate(over="ignore", invalid="ignore"):
        as_numpy = x.astype(dst)
    exact = same_kind and (dst.kind == "f" or bool(np.all(as_numpy.astype(np.float64) == x.astype(np.float64))))
    finite_to_inf = dst.kind == "f" and src.kind == "f" and bool(np.any(np.isinf(as_numpy) & np.isfinite(x)))
    for make in ("tensor", "write"):
        try:
            t = attnc.tensor(x, dev, dtype=dst) if make == "tensor" else attnc.zeros(x.shape, dst, dev).write(x)
        except ValueError:
            assert not exact or finite_to_inf, f"{make}: {x!r} into {dst} refused"
            continue
        assert exact and not finite_to_inf, f"{make}: {x!r} into {dst} gave {t.numpy()!r}"
        np.testing.assert_array_equal(t.numpy(), as_numpy)
