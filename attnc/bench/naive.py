"""The naive baseline: three-pass attention with the scores materialised, f32, BHSD.

1. scores: one invocation per (row, key): `s[r, j] = (q[row] . k[kv, j]) * scale`
2. softmax: one workgroup per row: max, exp and sum (workgroup-memory tree reductions),
   `s[r, j] = exp(s - max) / sum` in place, 0 for masked keys
3. pv: one invocation per (row, column): `o[row, c] = sum_j s[r, j] * v[kv, j, c]`

A row is one (b, h, i) query; GQA reads kv head `h // (Hq / Hkv)`; causal masks keys
`j > i + T - S` (queries aligned to the end of the keys), and a row with no key gives 0.
The scores buffer holds as many rows as the device's storage-binding limit allows; the
three passes repeat per chunk of rows. Shapes are baked into the WGSL as constants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnc.bench import gpu as g
from attnc.bench.cases import Case
from attnc.bench.timing import Dispatch
from attnc.bench.wgsl import Shader, f32

WG = 64  # invocations per workgroup in every pass
LOWEST = "-3.4028234e38"  # stands in for -inf (Naga and Tint reject infinite constants)


def _prelude(sh: Shader, case: Case) -> None:
    """Shape constants, the chunk uniform and the builtins every pass uses."""
    for name, value in (
        ("S", case.S),
        ("T", case.T),
        ("D", case.D),
        ("DV", case.Dv),
        ("HQ", case.Hq),
        ("HKV", case.Hkv),
        ("GROUP", case.group),
    ):
        sh.const(name, f"{value}u")
    sh.const("SCALE", f32(np.float32(1.0 / np.sqrt(case.D))), "f32")
    sh.builtin("workgroup_id", "wid")
    sh.builtin("local_invocation_index", "lid", "u32")


def _decode_row(sh: Shader, case: Case) -> None:
    """Map the workgroup to its row (b, h, i), the kv head, and the row's key limit."""
    sh.line("let r = wid.y + wid.z * u.ny;")
    with sh.block("if (r >= u.rows)"):
        sh.line("return;")
    sh.line("let row = u.row0 + r;")
    sh.line("let i = row % S;")
    sh.line("let bh = row / S;")
    sh.line("let kvh = (bh / HQ) * HKV + (bh % HQ) / GROUP;")
    sh.line(_key_limit(case))


def _key_limit(case: Case) -> str:
    """The statement defining `lim`, the number of keys row i attends to."""
    if case.causal:
        return f"let lim = u32(clamp(i32(i) + {case.T - case.S + 1}, 0, {case.T}));"
    return "let lim = T;"


def _uniform(sh: Shader) -> None:
    """The per-chunk uniform: first row, row count, rows per grid plane."""
    sh.uniform("u", [("row0", "u32"), ("rows", "u32"), ("ny", "u32")])


def scores_wgsl(case: Case) -> str:
    """Pass 1: scaled QK^T for the keys each row attends to."""
    sh = Shader(workgroup_size=(WG, 1, 1))
    _prelude(sh, case)
    sh.storage("q", "f32")
    sh.storage("k", "f32")
    sh.storage("s", "f32", "read_write")
    _uniform(sh)
    _decode_row(sh, case)
    sh.line(f"let j = wid.x * {WG}u + lid;")
    with sh.block("if (j >= lim)"):
        sh.line("return;")
    sh.line("let qb = row * D;")
    sh.line("let kb = (kvh * T + j) * D;")
    sh.line("var acc = 0.0;")
    with sh.block("for (var d = 0u; d < D; d++)"):
        sh.line("acc = fma(q[qb + d], k[kb + d], acc);")
    sh.line("s[r * T + j] = acc * SCALE;")
    return sh.render()


def _reduce(sh: Shader, op: Callable[[str, str], str], var: str) -> None:
    """Tree-reduce `var` over the workgroup into `red[0]` (steps unrolled here)."""
    sh.line(f"red[lid] = {var};")
    sh.line("workgroupBarrier();")
    step = WG // 2
    while step:
        with sh.block(f"if (lid < {step}u)"):
            sh.line(f"red[lid] = {op('red[lid]', f'red[lid + {step}u]')};")
        sh.line("workgroupBarrier();")
        step //= 2
    sh.line(f"{var} = red[0];")
    sh.line("workgroupBarrier();")


def softmax_wgsl(case: Case) -> str:
    """Pass 2: row softmax in place; masked keys become 0."""
    sh = Shader(workgroup_size=(WG, 1, 1))
    _prelude(sh, case)
    sh.const("LOWEST", LOWEST, "f32")
    sh.storage("s", "f32", "read_write")
    _uniform(sh)
    sh.workgroup_var("red", f"array<f32, {WG}>")
    _decode_row(sh, case)
    sh.line("let sb = r * T;")
    sh.line("var m = LOWEST;")
    with sh.block(f"for (var j = lid; j < lim; j += {WG}u)"):
        sh.line("m = max(m, s[sb + j]);")
    _reduce(sh, lambda a, b: f"max({a}, {b})", "m")
    sh.line("var sum = 0.0;")
    with sh.block(f"for (var j = lid; j < lim; j += {WG}u)"):
        sh.line("let e = exp(s[sb + j] - m);")
        sh.line("s[sb + j] = e;")
        sh.line("sum += e;")
    _reduce(sh, lambda a, b: f"{a} + {b}", "sum")
    sh.line("let inv = select(0.0, 1.0 / sum, sum > 0.0);")
    with sh.block(f"for (var j = lid; j < T; j += {WG}u)"):
        sh.line("s[sb + j] = select(0.0, s[sb + j] * inv, j < lim);")
    return sh.render()


def pv_wgsl(case: Case) -> str:
    """Pass 3: o = P V over the keys each row attends to."""
    sh = Shader(workgroup_size=(WG, 1, 1))
    _prelude(sh, case)
    sh.storage("s", "f32")
    sh.storage("v", "f32")
    sh.storage("o", "f32", "read_write")
    _uniform(sh)
    _decode_row(sh, case)
    sh.line(f"let c = wid.x * {WG}u + lid;")
    with sh.block("if (c >= DV)"):
        sh.line("return;")
    sh.line("let sb = r * T;")
    sh.line("var acc = 0.0;")
    with sh.block("for (var j = 0u; j < lim; j++)"):
        sh.line("acc = fma(s[sb + j], v[(kvh * T + j) * DV + c], acc);")
    sh.line("o[row * DV + c] = acc;")
    return sh.render()


@dataclass(frozen=True, slots=True)
class _Bound:
    """The buffers and dispatches of one copy of the inputs."""

    out: Any
    dispatches: tuple[Dispatch, ...]
    keep: tuple[Any, ...]


class NaiveAttention:
    """The naive three-pass attention for one case on one device, with bindable inputs."""

    def __init__(self, device: Any, case: Case, max_scores_bytes: int | None = None):
        limits = device.gpu.limits
        cap = min(int(limits["max-storage-buffer-binding-size"]), int(limits["max-buffer-size"]))
        cap = min(cap, max_scores_bytes or cap)
        total = case.B * case.Hq * case.S
        per = min(total, cap // (4 * case.T))
        if per < 1:
            raise ValueError(f"naive: one row of {case.T} scores exceeds the binding limit {cap}")
        self.device, self.case = device, case
        self.chunks = [(r0, min(per, total - r0)) for r0 in range(0, total, per)]
        self.passes = tuple(
            g.pipeline(device, build(case), f"naive_{name}")
            for name, build in (("scores", scores_wgsl), ("softmax", softmax_wgsl), ("pv", pv_wgsl))
        )
        self.scores = g.storage(device, 4 * per * case.T)
        self.grids = [g.grid2d(rows) for _, rows in self.chunks]
        self.uniforms = [
            g.uniform(device, [r0, rows, ny]) for (r0, rows), (ny, _) in zip(self.chunks, self.grids, strict=True)
        ]
        self.copies: list[_Bound] = []

    def bind(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> int:
        """Upload one copy of the inputs; returns its index for `dispatches` and `result`."""
        dev, case = self.device, self.case
        qb, kb, vb = (g.storage(dev, np.asarray(x, dtype=np.float32)) for x in (q, k, v))
        ob = g.storage(dev, 4 * case.B * case.Hq * case.S * case.Dv)
        p1, p2, p3 = self.passes
        cols = -(-case.T // WG), 1, -(-case.Dv // WG)
        ds: list[Dispatch] = []
        for u, (ny, nz) in zip(self.uniforms, self.grids, strict=True):
            groups = ([qb, kb, self.scores, u], [self.scores, u], [self.scores, vb, ob, u])
            for pipe, bufs, x in zip((p1, p2, p3), groups, cols, strict=True):
                ds.append(Dispatch(pipe, (g.bind_group(dev, pipe, bufs),), (x, ny, nz)))
        self.copies.append(_Bound(ob, tuple(ds), (qb, kb, vb)))
        return len(self.copies) - 1

    def dispatches(self, index: int = 0) -> list[Dispatch]:
        """The dispatches of one op on copy `index`."""
        return list(self.copies[index].dispatches)

    def result(self, index: int = 0) -> np.ndarray:
        """The output of copy `index` (after it ran), as [B, Hq, S, Dv] float32."""
        c = self.case
        return g.read(self.device, self.copies[index].out, np.float32, (c.B, c.Hq, c.S, c.Dv))


def naive_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False, device: Any = None
) -> np.ndarray:
    """Run the naive attention once on `device` (default: attnc's default device)."""
    from attnc.bench.timing import time_dispatches
    from attnc.runtime.devices import get_device

    dev = get_device(device)
    b, hq, s, d = q.shape
    _, hkv, t, dv = v.shape
    op = NaiveAttention(dev, Case("naive", b, hq, hkv, s, t, d, dv, causal))
    index = op.bind(q, k, v)
    time_dispatches(dev, [op.dispatches(index)], runs=1, warmup=0)
    return op.result(index)
