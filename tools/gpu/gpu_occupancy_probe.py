"""How many workgroups of a prefill plan an SM holds at once, read from the time against the
workgroup count: one head of S = BM * n queries over T keys is n workgroups, and the time
steps up where n passes a multiple of (SMs x workgroups per SM). Measurement only.
Usage: python tools/gpu/gpu_occupancy_probe.py DEVICE D T N[,N...] [VARIANT ...] [--json FILE]
(VARIANT: PLAN[/ABLATIONS], PLAN as in gpu_plan_sweep.py, `-` for the heuristic plan or
FIELD=VALUE,...; ABLATIONS `a+b+...` from gpu_ablate.py, e.g. `PF=0/smem20+nosoftmax`)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_ablate import ablated  # noqa: E402
from gpu_plan_sweep import PER_ROUND, emit, parse, take_json, time_rounds  # noqa: E402

from attnc.bench.cases import Case, make_inputs  # noqa: E402
from attnc.lowering import schedule  # noqa: E402
from attnc.lowering.plan import from_compact  # noqa: E402
from attnc.runtime import api  # noqa: E402
from attnc.runtime.devices import get_device  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    out = take_json(argv)
    dev = get_device(argv[0])
    D, T = int(argv[1]), int(argv[2])
    counts = [int(x) for x in argv[3].split(",")]
    specs = argv[4:] or ["-"]
    big = {"B": 1, "Hq": 16, "Hkv": 16, "S": 4096, "T": T, "D": D, "Dv": D}  # vit-like: a prefill plan
    base, tun0 = schedule.plan_for(dev.capabilities, schedule.pick_family(dev.capabilities, None), big)
    for spec in specs:
        plan_spec, _, abl = spec.partition("/")
        kw = parse(plan_spec)
        tun = {**tun0, **{x: kw.pop(x) for x in ("BM", "BN") if x in kw}}
        ops = []
        for n in counts:
            case = Case(f"n{n}", 1, 1, 1, tun["BM"] * n, T, D, D)
            q, k, v = make_inputs(case, seed=0)
            with ablated(abl or "-"):
                op = api.prepare(api.validate(q, k, v), q.dtype, device=dev,
                                 plan=dataclasses.replace(base, **from_compact(kw)), tunables=tun, nsplit=1)
            handle = op.bind_copy(q, k, v)
            op.run(binding=handle)
            ops.append((n, op, handle, []))
        time_rounds(dev, [(op, [handle], times) for _n, op, handle, times in ops], 300.0)
        for n, op, _h, times in ops:
            ms = statistics.median(times[PER_ROUND:])
            row = {"D": D, "T": T, "spec": spec, "workgroups": n, "ms": round(ms, 5),
                   "variant": op.variant, "device": argv[0]}
            emit(row, out)


if __name__ == "__main__":
    main()
