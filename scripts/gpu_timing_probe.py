"""Why a tuning measurement can differ from a benchmark one: time one variant under several
conditions (right after compile, after a GPU warm-up, after back-to-back runs) on one device.
Usage: python scripts/gpu_timing_probe.py DEVICE B,Hq,Hkv,S,T,D,Dv"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from attnc.runtime import api
from attnc.runtime import dispatch as rt
from attnc.runtime.devices import get_device
from attnc.runtime.dispatch import warm_up


def main() -> None:
    dev = get_device(sys.argv[1])
    B, Hq, Hkv, S, T, D, Dv = (int(x) for x in sys.argv[2].split(","))
    rng = np.random.default_rng(0)
    shapes = ((B, Hq, S, D), (B, Hkv, T, D), (B, Hkv, T, Dv))
    op = api.prepare_attention(*shapes, device=dev)
    copies = [op.bind_copy(*(rng.standard_normal(s).astype(np.float32) for s in shapes)) for _ in range(4)]
    print(op.variant)

    def series(n: int) -> list[float]:
        return [round(op.run(timestamps=True, binding=copies[i % 4]), 4) for i in range(n)]

    print("cold      ", series(8))
    time.sleep(0.5)
    print("after idle", series(8))
    warm_up(dev)
    print("after warm", series(8))
    print("more      ", series(30)[-8:])
    op.run(binding=copies[0])
    print("per pass  ", [round(x, 4) for x in rt.run(dev, op.dispatches, timestamps=True)])
    print("median 20 ", statistics.median(series(20)))


if __name__ == "__main__":
    main()
