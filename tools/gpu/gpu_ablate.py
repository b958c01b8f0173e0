"""Where the tiled kernel's time goes: time the heuristic plan against copies of it with one
part of the emitted main pass removed (results are wrong by design; only the time matters),
in interleaved rounds like gpu_plan_sweep.py. Measurement only: attnc never runs these.
Usage: python tools/gpu/gpu_ablate.py DEVICE CASE[,CASE...] [ABLATION ...] [--json FILE]
Ablations: nosoftmax noreduce nomaxred nosumred norescale smem20 nomask nonan noexp nobar nopv nodot noqstage
nokstage novstage; of the stream strategy (decoding): snok (no K loads in the dot phase), snov (no V
loads in the P.V phase), snosp (scores not read back from the partial dots); of its SMX=3 lane
groups: gnok (no K loads), gnov (no V loads), gnoshuf (no shuffles summing a key's dot). gpu_plan_sweep.py
takes any of them as `ABL=a+b` on a variant (f16, quantized KV, any plan).
`altcombine` is not an ablation but an A/B: the split-KV combine emitted by another version of
attnc/lowering/combine.py, the file named by ALT_COMBINE (e.g. `git show REV:attnc/lowering/combine.py
> .ab/combine.py`), so two versions of the pass are timed in one process."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_plan_sweep import PER_ROUND, emit, head0_relerr, take_json, time_rounds  # noqa: E402

from attnc.bench.cases import load_suite, make_inputs  # noqa: E402
from attnc.lowering import tiled  # noqa: E402
from attnc.runtime import (
    api,  # noqa: E402
    build,  # noqa: E402
)
from attnc.runtime.devices import get_device  # noqa: E402


def _p_only(w, sh) -> None:
    """The softmax step cut down to the p stores (s written as p, no max, exp or sums)."""
    lay, st = sh.lay, sh.smem_t
    for x in range(lay.TN):
        line = f"({tiled._owned(lay, lay.TN, x)}) * {lay.QS}u + rg * {lay.TM}u"
        for i in range(lay.TM):
            w.line(f"{tiled._sm('stage', f'{line} + {i}u')} = {st}(s{i}_{x});")


def _skip_copy(pred: Callable[[tiled._Copy], bool]) -> dict[str, Callable]:
    """Patches that drop the staging (loads and stores) of the blocks `pred` selects."""
    stage, prefetch = tiled._stage, tiled._prefetch
    return {
        "_stage": lambda w, sh, cp: None if pred(cp) else stage(w, sh, cp),
        "_prefetch": lambda w, sh, cp, name, put: None if pred(cp) else prefetch(w, sh, cp, name, put),
    }


def _is_q(cp: tiled._Copy) -> bool:
    return cp.idx == "qi"


def _is_k(cp: tiled._Copy) -> bool:
    return cp.idx == "kj" and not cp.flag


def _is_v(cp: tiled._Copy) -> bool:
    return cp.flag


PATCHES: dict[str, dict[str, Callable]] = {
    "nosoftmax": {"_softmax": _p_only},
    "noreduce": {"_reduce": lambda *a, **k: None},
    "nomaxred": {"_reduce": lambda w, lay, names, op, fast, f=tiled._reduce: op == "max" or f(w, lay, names, op, fast)},
    "nosumred": {"_reduce": lambda w, lay, names, op, fast, f=tiled._reduce: op == "add" or f(w, lay, names, op, fast)},
    "nopv": {"_pv_loop": lambda *a, **k: None},
    "nodot": {"_dot_step": lambda *a, **k: None},
    "noqstage": _skip_copy(_is_q),
    "nokstage": _skip_copy(_is_k),
    "novstage": _skip_copy(_is_v),
}

# text edits of the emitted WGSL: (pattern, replacement)
EDITS: dict[str, list[tuple[str, str]]] = {
    "nomask": [(r"select\(bitcast<f32>\(BITS_NEG_INF\), (score_fn\([^;]*\)), kj\d+ < n_keys\)", r"\1")],
    "nonan": [(r"\n *nan\d+ = nan\d+ \|\| is_nan\(s\d+_\d+\);", "")],
    "noexp": [(r"return select\(exp\(x - m\)", "return select((x - m)")],
    "norescale": [(r"\n *o\d+_\d+ = o\d+_\d+ \* al\d+;", "")],
    # the staging array cut to 20 KiB (robustness clamps keep the accesses in bounds): as many
    # registers and instructions, a smaller workgroup-memory footprint
    "smem20": [(r"var<workgroup> stage: array<vec4<f32>, \d+>;", "var<workgroup> stage: array<vec4<f32>, 1280>;")],
    "nobar": [(r"\n *workgroupBarrier\(\);", "")],
    # stream strategy: a K vec4 made from the invocation's index, not loaded
    "snok": [(r"let k(\d+) = select\(vec4<f32>\(\), [^;]*;", r"let k\1 = vec4<f32>(f32(e + \1u) * 1e-3);")],
    # stream strategy: a V vec4 made from the key's index, not loaded
    "snov": [(r"let v(\d+) = [^;]*(?:kj|jl)\1\b[^;]*;", r"let v\1 = vec4<f32>(f32(jl\1) * 1e-3);")],
    # stream SMX=3 (lane groups): K vec4s from the lane's index, V vec4s from the key's index,
    # no shuffles summing a key's partial dots
    "gnok": [(r"let k(\d+) = select\(vec4<f32>\(\), [^;]*;", r"let k\1 = vec4<f32>(f32(lid + \1u) * 1e-3);")],
    "gnov": [(r"let v(\d+)_(\d+) = [^;]*;", r"let v\1_\2 = vec4<f32>(f32(kj\1) * 1e-3);")],
    "gnoshuf": [(r"\n *s\d+_\d+ = s\d+_\d+ \+ subgroupShuffleXor\([^;]*;", "")],
    # stream strategy: each score from the key's index, its partial dots not read back
    "snosp": [(r"(score_(?:tile_)?fn\()sp\[\(jl(\d*) \* [^,]*,", r"\1f32(jl\2) * 1e-3,")],
}


@contextlib.contextmanager
def ablated(names: str) -> Iterator[None]:
    """Emit with the ablations `a+b+...` applied (`-`: none), lowering cache bypassed."""
    with contextlib.ExitStack() as stack:
        for name in names.split("+"):
            if name != "-":
                stack.enter_context(_ablated(name))
        yield


@contextlib.contextmanager
def _alternative_combine() -> Iterator[None]:
    """Lower with emit_combine from the file ALT_COMBINE names (lowering cache bypassed)."""
    import attnc.lowering as lowering

    spec = importlib.util.spec_from_file_location("alt_combine", os.environ["ALT_COMBINE"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = lowering.emit_combine
    lowering.emit_combine = module.emit_combine
    build._CACHE.programs.clear()
    try:
        yield
    finally:
        lowering.emit_combine = saved
        build._CACHE.programs.clear()


@contextlib.contextmanager
def _ablated(name: str) -> Iterator[None]:
    """Emit with one ablation applied (module patches, WGSL edits), lowering cache bypassed."""
    if name == "altcombine":
        with _alternative_combine():
            yield
        return
    if name not in PATCHES and name not in EDITS:
        raise KeyError(f"no ablation {name!r}")
    saved = {k: getattr(tiled, k) for k in PATCHES.get(name, {})}
    lower = build.programs_for
    edits = EDITS.get(name, [])

    def programs_for(kern, plan):
        progs = lower(kern, plan)
        out = []
        for p in progs:
            text = p.wgsl
            for pat, rep in edits if p.name == "main" else []:
                text, n = re.subn(pat, rep, text)
                if n == 0:
                    raise RuntimeError(f"{name}: {pat!r} matched nothing")
            # an ablated shader is not known to stay in bounds: the compilers' clamps stay on
            out.append(dataclasses.replace(p, wgsl=text, in_bounds=p.in_bounds and not edits))
        return tuple(out)

    for k, f in PATCHES.get(name, {}).items():
        setattr(tiled, k, f)
    build._CACHE.programs.clear()
    build.programs_for = programs_for
    try:
        yield
    finally:
        for k, f in saved.items():
            setattr(tiled, k, f)
        build.programs_for = lower
        build._CACHE.programs.clear()


def main() -> None:
    argv = sys.argv[1:]
    out = take_json(argv)
    dev = get_device(argv[0])
    names = ["-"] + (argv[2:] or [*PATCHES, *EDITS])
    cases = {c.name: c for c in load_suite("seeds") + load_suite("ci")}
    for cname in argv[1].split(","):
        case = cases[cname]
        copies = [make_inputs(case, seed=i) for i in range(3)]
        q, k, v = copies[0]
        dims = api.validate(q, k, v)
        ops = []
        for name in names:
            try:
                with ablated(name):
                    op = api.prepare(dims, q.dtype, causal=case.causal, device=dev)
                    handles = [op.bind_copy(*c) for c in copies]
                    op.run(binding=handles[0])
                err = head0_relerr(case, q, k, v, op.result()[0])
                ops.append((name, op, handles, err, []))
            except Exception as exc:  # report and go on with the others
                print(f"{cname} {name}: {type(exc).__name__}: {exc}", flush=True)
        warm_ms = float(os.environ.get("SWEEP_WARM_MS", "300"))
        time_rounds(dev, [(op, h, times) for _n, op, h, _e, times in ops], warm_ms)
        base = statistics.median(ops[0][4][PER_ROUND:]) if ops and ops[0][0] == "-" else None
        for name, op, _h, err, times in ops:
            ms = statistics.median(times[PER_ROUND:])
            row = {"case": cname, "device": argv[0], "ablation": name, "ms": round(ms, 5),
                   "saved": round(1 - ms / base, 3) if base else None, "relerr": err, "variant": op.variant}
            emit(row, out)


if __name__ == "__main__":
    main()
