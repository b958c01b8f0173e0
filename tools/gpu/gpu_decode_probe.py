"""Where a decode op's time goes: for each plan variant, the whole op (first pass begin to last
pass end), each pass alone, and the same dispatches encoded in one compute pass (also the first
pass alone and followed by a dependent one-workgroup dispatch: a second pass's fixed cost); plus a
read-only kernel over as many bytes as K and V, and over the fractions of them in READ_FRACTIONS
(the bytes of a quantized cache: q8_0 reads 0.53 of f16 K/V, q4_0 0.28), so the time a decode
pass could reach is measured, not assumed. Variants as in gpu_plan_sweep.py (`-` = heuristic,
`FIELD=VALUE,...`, BM/BN/NSPLIT, KV=, ABL=); cases from every suite of shapes.json.
Usage: python tools/gpu/gpu_decode_probe.py DEVICE CASE[,CASE...] VARIANT [VARIANT...] [--dtype f16]"""

from __future__ import annotations

import json
import os
import statistics
import sys

import numpy as np

from attnc.bench.cases import load_suites, make_inputs
from attnc.lowering import schedule  # noqa: E402
from attnc.lowering.program import Access, Binding, Program, Scalar
from attnc.runtime import api
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import get_device
from attnc.runtime.dispatch import warm_up

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_plan_sweep import prepare_variant, take_dtype  # noqa: E402

READ_FRACTIONS = (1.0, 0.53, 0.28)

READ_WGSL = """\
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

// Sums a buffer with UNROLL independent vec4 loads per step per invocation (grid-stride).
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = arrayLength(&src);
    let stride = nwg.x * 256u;
    var acc = vec4<f32>();
    var i = gid.x;
    loop {
        if (i + (UNROLL - 1u) * stride >= n) { break; }
BODY
        i = i + UNROLL * stride;
    }
    for (; i < n; i = i + stride) { acc = acc + src[i]; }
    dst[gid.x] = acc;
}
"""


def read_program(unroll: int) -> Program:
    """The read-only bandwidth kernel with `unroll` loads in flight per invocation."""
    body = "\n".join(f"        acc = acc + src[i + {u}u * stride];" for u in range(unroll))
    wgsl = READ_WGSL.replace("UNROLL", f"{unroll}u").replace("BODY", body)
    return Program(name=f"read{unroll}", wgsl=wgsl, entry_point="main", workgroup_size=256,
                   bindings=(Binding("src", 0, Access.READ, Scalar.F32),
                             Binding("dst", 1, Access.READ_WRITE, Scalar.F32)),
                   uniforms=(), grid=(), features=frozenset(), workgroup_storage_bytes=0)


TOUCH_WGSL = """\
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

// One workgroup that reads a word of what the pass before wrote: a dependent dispatch with no work.
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) { dst[0] = src[0]; }
}
"""


def touch_dispatch(dev, after) -> rt.Dispatch:
    """A one-workgroup dispatch reading the buffer the dispatch `after` writes first: what a second
    pass costs with nothing to do (its launch and the barrier before it)."""
    prog = Program(name="touch", wgsl=TOUCH_WGSL, entry_point="main", workgroup_size=64,
                   bindings=(Binding("src", 0, Access.READ, Scalar.F32),
                             Binding("dst", 1, Access.READ_WRITE, Scalar.F32)),
                   uniforms=(), grid=(), features=frozenset(), workgroup_storage_bytes=0)
    written = next(b.name for b in after.program.bindings if b.access is Access.READ_WRITE)
    return rt.Dispatch(prog, {"src": after.buffers[written], "dst": rt.empty(dev, 256)}, {}, 1)


def one_pass(dev, dispatches) -> float:
    """All dispatches in one compute pass (timestamps at its begin and end), in ms."""
    gpu = dev.gpu
    qs = gpu.create_query_set(type="timestamp", count=2)
    enc = gpu.create_command_encoder()
    cp = enc.begin_compute_pass(timestamp_writes={"query_set": qs, "beginning_of_pass_write_index": 0,
                                                  "end_of_pass_write_index": 1})
    for d in dispatches:
        compiled = dev.pipelines.get(dev, d.program)
        grid = rt.fold_grid(d.workgroups, int(gpu.limits["max-compute-workgroups-per-dimension"]))
        cp.set_pipeline(compiled.pipeline)
        cp.set_bind_group(0, rt._bind_group(dev, d, compiled, grid))
        cp.dispatch_workgroups(*grid)
    cp.end()
    res = gpu.create_buffer(size=16, usage=dev.wgpu.BufferUsage.QUERY_RESOLVE | dev.wgpu.BufferUsage.COPY_SRC)
    enc.resolve_query_set(qs, 0, 2, res, 0)
    gpu.queue.submit([enc.finish()])
    t = np.frombuffer(gpu.queue.read_buffer(res), dtype=np.uint64).astype(np.int64)
    return float(t[1] - t[0]) * dev.timestamp_period / 1e6


def main() -> None:
    argv = sys.argv[1:]
    dtype = take_dtype(argv)
    dev = get_device(argv[0])
    cases = {c.name: c for suite in load_suites().values() for c in suite}
    for name in argv[1].split(","):
        case = cases[name]
        copies = [tuple(x.astype(dtype) for x in make_inputs(case, seed=i)) for i in range(2 if case.T > 8192 else 6)]
        q, k, v = copies[0]
        dims = api.validate(q, k, v)
        base, tun0 = schedule.plan_for(dev.capabilities, schedule.pick_family(dev.capabilities, None), dims,
                                       causal=case.causal, f16=dtype == np.float16)
        kv_bytes = k.nbytes + v.nbytes
        whole = np.concatenate([k.reshape(-1), v.reshape(-1)]).view(np.uint8)
        for frac in READ_FRACTIONS:
            nbytes = int(kv_bytes * frac) // 16 * 16
            src = rt.upload(dev, whole[:nbytes].view(np.float32))
            for unroll in (1, 4, 8):
                for groups in (1056, 4224):
                    dst = rt.empty(dev, 16 * groups * 256)
                    d = rt.Dispatch(read_program(unroll), {"src": src, "dst": dst}, {}, groups)
                    warm_up(dev, 200)
                    ts = [rt.run(dev, [d], timestamps=True)[0] for _ in range(30)]
                    ms = statistics.median(ts[5:])
                    print(json.dumps({"case": name, "read": unroll, "fraction": frac, "groups": groups,
                                      "ms": round(ms, 5), "GBps": round(nbytes / ms / 1e6, 1)}), flush=True)
        for spec in argv[2:]:
            try:
                op, hs, err = prepare_variant(dev, case, dims, base, tun0, spec, copies)
            except Exception as exc:  # report and go on
                print(f"{name} {spec}: {type(exc).__name__}: {exc}", flush=True)
                continue
            warm_up(dev, 200)
            span, per, one, first, first_touch, touch = [], [], [], [], [], []
            for i in range(40):
                h = hs[i % len(hs)]
                span.append(rt.run(dev, h.dispatches, timestamps=True, span=True)[0])
                per.append(rt.run(dev, h.dispatches, timestamps=True))
                one.append(one_pass(dev, h.dispatches))
                t = touch_dispatch(dev, h.dispatches[0])
                first.append(one_pass(dev, h.dispatches[:1]))
                first_touch.append(one_pass(dev, [h.dispatches[0], t]))
                touch.append(one_pass(dev, [t]))
            row = {"case": name, "spec": spec, "variant": op.variant, "relerr": err,
                   "span": round(statistics.median(span[5:]), 5),
                   "passes": [round(statistics.median(p[j] for p in per[5:]), 5) for j in range(len(per[0]))],
                   "one_pass": round(statistics.median(one[5:]), 5),
                   # the first pass alone, then followed by a dependent empty dispatch, and that alone
                   "first_pass": round(statistics.median(first[5:]), 5),
                   "first_then_touch": round(statistics.median(first_touch[5:]), 5),
                   "touch_alone": round(statistics.median(touch[5:]), 5),
                   "GBps_span": round(kv_bytes / statistics.median(span[5:]) / 1e6, 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
