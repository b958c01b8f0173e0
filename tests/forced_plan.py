"""Run attention with a forced plan on random inputs and check it against the textbook reference
(shared by the property tests of the strategies' knobs in tests/lowering)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from attnc.lowering.plan import Plan
from attnc.runtime import api
from tests.strategies import draw_sinks
from tests.textbook import assert_close, attention_ref

# random option sets for check_forced_plan ("draw": random values made there from the seed)
OPTION_SETS = st.fixed_dictionaries({}, optional={
    "causal": st.just(True), "softcap": st.just(20.0), "return_lse": st.just(True),
    "window": st.tuples(st.integers(0, 50), st.none() | st.integers(0, 8)),
    "kv_lens": st.just("draw"), "sinks": st.just("draw"), "bias": st.sampled_from(["draw", "full"])})


def check_forced_plan(dev: Any, dims: dict[str, int], plan: Plan, tun: dict[str, int], nsplit: int | None,
                      opts: dict[str, Any], seed: int) -> api.Prepared:
    """Standard-normal f32 q/k/v; options given as "draw" get random values (kv_lens, with NaN
    values past kv_lens[0]: masked keys add nothing; sinks, a third of them +-inf, NaN or huge,
    tests/strategies.py; a [Hq, 1, T] bias, or with "full" a [B, Hq, S, T] one, whose every
    index matters). Returns the op."""
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, S, T, D, Dv = (dims[x] for x in ("B", "Hq", "Hkv", "S", "T", "D", "Dv"))
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, Dv)).astype(np.float32)
    v_dev = v.copy()
    if "kv_lens" in opts:
        opts["kv_lens"] = rng.integers(0, T + 1, B).astype(np.int32)
        v_dev[0, :, opts["kv_lens"][0]:] = np.nan
    if "sinks" in opts:
        opts["sinks"] = draw_sinks(rng, Hq)
    if "bias" in opts:
        shape = (B, Hq, S, T) if opts["bias"] == "full" else (Hq, 1, T)
        opts["bias"] = rng.standard_normal(shape).astype(np.float32)
    op = api.prepare(dims, np.float32, device=dev, plan=plan, tunables=tun, nsplit=nsplit, **opts)
    op.bind(q, k, v_dev)
    op.run()
    o, lse = op.result()
    ref = attention_ref(q, k, v, **opts)
    o_ref, lse_ref = ref if opts.get("return_lse") else (ref, None)
    assert_close(o, o_ref, 1e-5, "o")
    if lse_ref is not None:
        assert_close(lse, lse_ref, 1e-5, "lse")
    return op
