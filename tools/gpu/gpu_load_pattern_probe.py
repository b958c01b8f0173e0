"""Read throughput of decode load patterns alone: how fast the lanes of a one-row decode can pull
K and V rows out of memory when they read them as the lane-group kernels do (4 lanes per key, each
lane a run of words, 64 keys a step per 128-invocation workgroup, one workgroup per head and KV
split) and in other layouts, with no attention math. The loads feed an xor that the next step's
loads wait behind, as the kernel's math does (the loop issues in order), so each step costs one
memory round trip as in the kernel.

The question it answers: whether a quantized cache's per-key time on a GPU is set by how its
4-byte loads spread over cache lines (a q8_0 block is 36 bytes, so a warp's load instruction
touches 8 keys' rows at 36-byte strides) rather than by its bytes. If the `_run` patterns (the
kernels' own) read far slower than the `_vec4` ones over the same bytes, the layout is the lever.

Patterns (D = 128; words of a key row in K and in V, the same pattern for both):
  q8_run        36-word rows (4 q8_0 blocks of 9 words); lane p reads words 9p..9p+8 (the kernel's)
  q8_interleave the same rows; lane p reads words p, p+4, ..., p+32
  q8_vec4       36-word rows as 9 vec4: a header of scales, then 32 code words; lane p reads the
                header and code vec4s 1+p and 5+p (3 loads)
  q4_run        20-word rows (4 q4_0 blocks of 5 words); lane p reads words 5p..5p+4 (the kernel's)
  q4_vec4       20-word rows as 5 vec4: header, then 16 code words; lane p reads header and 1+p
  f16_run       64-word rows as 16 vec4; lane p reads vec4s 4p..4p+3 (the lane groups' f16)
  f16_interleave the same rows; lane p reads vec4s p, p+4, p+8, p+12
  stream        every vec4 of the workgroup's part of K and V once, consecutive lanes on
                consecutive vec4s (a copy's pattern: the ceiling for these bytes)

Measurement only. Usage:
  python tools/gpu/gpu_load_pattern_probe.py DEVICE [HEADS,KEYS,SPLITS ...] [--patterns a,b] [--runs N]
e.g. `python tools/gpu/gpu_load_pattern_probe.py wgpu:vulkan 8,32768,64 8,32768,256 8,16384,64`.
Prints one JSON line per problem and pattern: µs (median), GB/s over the rows' bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics

from attnc.lowering.program import Access, Binding, Program, Scalar, UniformField
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import get_device
from attnc.runtime.dispatch import warm_up

WORKGROUP = 128
LANES_PER_KEY = 4
KEYS_PER_STEP = WORKGROUP // LANES_PER_KEY * 2  # 32 key groups, 2 keys each (the kernels' KC=2)

# pattern: (row words, WGSL element type, loads of lane p as (index expression in row elements))
PATTERNS: dict[str, tuple[int, str, list[str]]] = {
    "q8_run": (36, "u32", [f"part * 9u + {i}u" for i in range(9)]),
    "q8_interleave": (36, "u32", [f"part + {4 * i}u" for i in range(9)]),
    "q8_vec4": (36, "vec4<u32>", ["0u", "1u + part", "5u + part"]),
    "q4_run": (20, "u32", [f"part * 5u + {i}u" for i in range(5)]),
    "q4_vec4": (20, "vec4<u32>", ["0u", "1u + part"]),
    "f16_run": (64, "vec4<u32>", [f"part * 4u + {i}u" for i in range(4)]),
    "f16_interleave": (64, "vec4<u32>", [f"part + {4 * i}u" for i in range(4)]),
}
STREAM_ROW_WORDS = 36  # the stream pattern reads q8_0-sized rows


def _fold(elem: str, name: str) -> str:
    """An expression folding the loaded value `name` into one u32."""
    return name if elem == "u32" else f"({name}.x ^ {name}.y ^ {name}.z ^ {name}.w)"


def pattern_wgsl(name: str) -> str:
    """The probe kernel for one pattern: workgroup w reads keys [w * keys, (w + 1) * keys)."""
    if name == "stream":
        body = """
    let first = wid.x * p.keys * ROWV;
    for (var i = lid; i < p.keys * ROWV; i = i + 128u) {
        let x = k[first + i];
        acc = acc ^ (x.x ^ x.y ^ x.z ^ x.w);
        let y = v[first + i];
        acc = acc ^ (y.x ^ y.y ^ y.z ^ y.w);
    }"""
        return _kernel("vec4<u32>", body.replace("ROWV", f"{STREAM_ROW_WORDS // 4}u"))
    row_words, elem, loads = PATTERNS[name]
    row = row_words if elem == "u32" else row_words // 4
    lines = []
    for c in range(2):
        lines.append(f"        let r{c} = (wid.x * p.keys + s + grp + {32 * c}u) * {row}u;")
        for j, idx in enumerate(loads):
            lines.append(f"        let k{c}_{j} = k[r{c} + {idx}];")
            lines.append(f"        let v{c}_{j} = v[r{c} + {idx}];")
        folds = [_fold(elem, f"{t}{c}_{j}") for j in range(len(loads)) for t in ("k", "v")]
        lines.append(f"        acc = acc ^ {' ^ '.join(folds)};")
    body = f"""
    let part = lid % {LANES_PER_KEY}u;
    let grp = lid / {LANES_PER_KEY}u;
    for (var s = 0u; s < p.keys; s = s + {KEYS_PER_STEP}u) {{
{chr(10).join(lines)}
    }}"""
    return _kernel(elem, body)


def _kernel(elem: str, body: str) -> str:
    """The shared frame: bindings, the uniform, the write that keeps the loads alive."""
    return f"""
struct Params {{ keys: u32, pad0: u32, pad1: u32, pad2: u32 }}
@group(0) @binding(0) var<storage, read> k: array<{elem}>;
@group(0) @binding(1) var<storage, read> v: array<{elem}>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size({WORKGROUP})
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {{
    var acc = 0u;{body}
    dst[wid.x * {WORKGROUP}u + lid] = acc;
}}
"""


def program(name: str) -> Program:
    """The pattern's kernel as a Program attnc's runtime dispatches."""
    return Program(name=f"load_{name}", wgsl=pattern_wgsl(name), entry_point="main", workgroup_size=WORKGROUP,
                   bindings=(Binding("k", 0, Access.READ, Scalar.U32), Binding("v", 1, Access.READ, Scalar.U32),
                             Binding("dst", 2, Access.READ_WRITE, Scalar.U32),
                             Binding("p", 3, Access.UNIFORM, Scalar.U32)),
                   uniforms=(UniformField("keys", 0, Scalar.U32),), grid=(), features=frozenset(),
                   workgroup_storage_bytes=0)


def row_bytes(name: str) -> int:
    """Bytes of one key row of K (as of V) in this pattern."""
    return 4 * (STREAM_ROW_WORDS if name == "stream" else PATTERNS[name][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("device")
    ap.add_argument("problems", nargs="*", default=["8,32768,64", "8,32768,256", "8,16384,64"],
                    help="HEADS,KEYS,SPLITS: one workgroup per head and split, KEYS / SPLITS keys each")
    ap.add_argument("--patterns", default=",".join([*PATTERNS, "stream"]))
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    dev = get_device(args.device)
    names = args.patterns.split(",")
    programs = {n: program(n) for n in names}
    for spec in args.problems:
        heads, keys, splits = (int(x) for x in spec.split(","))
        per_wg = keys // splits
        if per_wg % KEYS_PER_STEP:
            raise SystemExit(f"{spec}: KEYS / SPLITS = {per_wg} is not a multiple of {KEYS_PER_STEP}")
        groups = heads * splits
        dst = rt.empty(dev, 4 * WORKGROUP * groups)
        for n in names:
            nbytes = groups * per_wg * row_bytes(n)
            k, v = rt.empty(dev, nbytes), rt.empty(dev, nbytes)
            d = rt.Dispatch(programs[n], {"k": k, "v": v, "dst": dst}, {"keys": per_wg}, groups)
            warm_up(dev, 100)
            times = []
            for _ in range(args.runs):
                ms = rt.run(dev, [d], timestamps=True)
                times.append(ms[0])
            us = statistics.median(times) * 1e3
            print(json.dumps({"device": args.device, "heads": heads, "keys": keys, "splits": splits, "pattern": n,
                              "us": round(us, 2), "gb_s": round(2 * nbytes / (us * 1e-6) / 1e9, 1),
                              "bytes": 2 * nbytes}), flush=True)
            k.destroy()
            v.destroy()


if __name__ == "__main__":
    main()
