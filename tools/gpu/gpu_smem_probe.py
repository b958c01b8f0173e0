"""How many 256-invocation workgroups an SM holds at once for a given workgroup-memory size (the
driver's shared-memory carve-out), with a kernel that uses few registers: each invocation
chases a chain of dependent workgroup-memory loads, so a workgroup's time does not depend on
what shares its SM, and the time for n = SMs x k workgroups stays flat while k workgroups fit.
Measurement only. Usage: python tools/gpu/gpu_smem_probe.py DEVICE SMS KIB[,KIB...] [STEPS]"""

from __future__ import annotations

import json
import statistics
import sys

from attnc.lowering.program import Access, Binding, Program, Scalar
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import get_device
from attnc.runtime.dispatch import warm_up

CHASE_WGSL = """\
@group(0) @binding(0) var<storage, read_write> dst: array<u32>;
var<workgroup> pad: array<u32, WORDS>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    for (var i = lid; i < WORDS; i = i + 256u) { pad[i] = (i * 2654435761u + 977u) % WORDS; }
    workgroupBarrier();
    var j = lid;
    for (var s = 0u; s < STEPS; s = s + 1u) { j = pad[j]; }
    dst[wid.x * 256u + lid] = j;
}
"""


def chase_program(words: int, steps: int) -> Program:
    """The pointer-chasing kernel over `words` u32 of workgroup memory."""
    wgsl = CHASE_WGSL.replace("WORDS", f"{words}u").replace("STEPS", f"{steps}u")
    return Program(name=f"chase{words}", wgsl=wgsl, entry_point="main", workgroup_size=256,
                   bindings=(Binding("dst", 0, Access.READ_WRITE, Scalar.U32),), uniforms=(), grid=(),
                   features=frozenset(), workgroup_storage_bytes=4 * words)


def main() -> None:
    dev = get_device(sys.argv[1])
    sms = int(sys.argv[2])
    for kib in (int(x) for x in sys.argv[3].split(",")):
        prog = chase_program(max(256, kib * 256), int(sys.argv[4]) if len(sys.argv) > 4 else 20000)
        times = {}
        for k in range(1, 9):
            n = sms * k
            dst = rt.empty(dev, 4 * 256 * n)
            d = rt.Dispatch(prog, {"dst": dst}, {}, n)
            warm_up(dev, 50)
            times[k] = statistics.median(rt.run(dev, [d], timestamps=True)[0] for _ in range(7))
        fit = max(k for k in times if times[k] < 1.3 * times[1])
        print(json.dumps({"kib": kib, "workgroups_per_sm": fit,
                          "ms": {k: round(t, 4) for k, t in times.items()}}), flush=True)


if __name__ == "__main__":
    main()
