"""What the flash template cannot express in a custom kernel (attnc/lowering/analyze.py): each
refusal is a LoweringError that says why, at the user's own line (file and line asserted), made
before any WGSL exists; a kernel that lowered instead failed in the WGSL compiler or ran wrong.

The template shares a query tile's q rows across its key tiles and a key tile's k and v rows
across its query rows, so the query slice may not move with the key, nor the key and value
slices with the query row; the score holds one q.k dot, the query slice is indexed by the row,
and tiles are powers of two. (Two updates, nested KV loops and two sinks are VerifyErrors of
the DSL, before the lowering.)
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import attnc
from attnc.errors import LoweringError
from attnc.frontend.dsl import dim, dot, f32, grid, i32, kernel, online_softmax, tiles, tunable
from attnc.lowering.analyze import analyze

Q = f32["B", "H", "S", "D"]
K = f32["B", "H", "T", "D"]
V = f32["B", "H", "T", "Dv"]
PERM = attnc.input("perm", i32["S"])
HERE = "# <- refused here"


@kernel
def query_moves_with_the_key(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, (i + j) % dim("S"), :], k[b, h, j, :])  # <- refused here
        acc.update(s, v[b, h, j, :])
    return acc.result()


@kernel
def key_moves_with_the_row(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, i, :], k[b, h, (j + i) % dim("T"), :])  # <- refused here
        acc.update(s, v[b, h, j, :])
    return acc.result()


@kernel
def key_gathered_by_the_row(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, i, :], k[b, h, PERM[i], :])  # <- refused here
        acc.update(s, v[b, h, j, :])
    return acc.result()


@kernel
def value_moves_with_the_row(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, i, :], k[b, h, j, :])
        acc.update(s, v[b, h, (j + i) % dim("T"), :])  # <- refused here
    return acc.result()


@kernel
def value_row_through_a_let(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    shift = PERM[i]
    for j in tiles("T", BN):
        s = dot(q[b, h, i, :], k[b, h, j, :])
        row = (j + shift) % dim("T")
        acc.update(s, v[b, h, row, :])  # <- refused here
    return acc.result()


@kernel
def query_not_indexed_by_the_row(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, 0, :], k[b, h, j, :])  # <- refused here
        acc.update(s, v[b, h, j, :])
    return acc.result()


@kernel
def two_dots(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        s = dot(q[b, h, i, :], k[b, h, j, :]) + dot(q[b, 0, i, :], k[b, h, j, :])  # <- refused here
        acc.update(s, v[b, h, j, :])
    return acc.result()


@kernel
def no_dot(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):
        acc.update(f32(j), v[b, h, j, :])  # <- refused here
    return acc.result()


@kernel
def plain(q: Q, k: K, v: V, *, BM=tunable(16), BN=tunable(16)):
    b, h, i = grid(b="B", h="H", i=tiles("S", BM))  # <- refused here (BM=24)
    acc = online_softmax(rows=i, width="Dv")
    for j in tiles("T", BN):  # <- refused here (BN=12)
        acc.update(dot(q[b, h, i, :], k[b, h, j, :]), v[b, h, j, :])
    return acc.result()


def _marked(kern, marker: str = HERE) -> int:
    """The line of `kern`'s source that holds `marker`."""
    lines, first = inspect.getsourcelines(kern.fn)
    (n,) = [n for n, line in enumerate(lines) if marker in line]
    return first + n


def _at(err: LoweringError, line: int) -> None:
    assert err.span is not None, err.render()
    assert (err.span.file, err.span.line) == (__file__, line), err.render()
    assert f"{__file__}:{line}:" in err.render()


REFUSALS = [  # (kernel, its tunables, the message, the marker of the line it points at)
    (query_moves_with_the_key, {}, "the query slice q[...] must not depend on the key index", HERE),
    (key_moves_with_the_row, {}, "the key slice k[...] must not depend on the query row", HERE),
    (key_gathered_by_the_row, {}, "the key slice k[...] must not depend on the query row", HERE),
    (value_moves_with_the_row, {}, "the value slice v[...] must not depend on the query row", HERE),
    (value_row_through_a_let, {}, "the value slice v[...] must not depend on the query row", HERE),
    (query_not_indexed_by_the_row, {}, "the first dot operand must be indexed by the query row variable", HERE),
    (two_dots, {}, "the update score must use exactly one dot(q-row slice, k-row slice)", HERE),
    (no_dot, {}, "the update score must use exactly one dot(q-row slice, k-row slice)", HERE),
    (plain, {"BM": 24}, "tunable BM=24 sizes the query-row tiles, which are powers of two when lowered",
     f"{HERE} (BM=24)"),
    (plain, {"BN": 12}, "tunable BN=12 sizes the key tiles, which are powers of two when lowered",
     f"{HERE} (BN=12)"),
]


@pytest.mark.parametrize(("kern", "tunables", "message", "marker"), REFUSALS,
                         ids=[k.fn.__name__ + "".join(f"-{n}={v}" for n, v in t.items()) for k, t, _, _ in REFUSALS])
def test_what_the_template_cannot_express_is_refused_at_the_users_line(kern, tunables, message, marker) -> None:
    """Each refusal of analyze(): its message, located at the user's line that asks for it."""
    with pytest.raises(LoweringError) as e:
        analyze(kern.trace(**tunables))
    assert e.value.message == message
    _at(e.value, _marked(kern, marker))


def test_the_refusals_leave_the_kernels_the_template_expresses() -> None:
    """The same kernels with legal tiles and slices analyze (the refusals above are theirs)."""
    spec = analyze(plain.trace(BM=32, BN=8))
    assert (spec.BM, spec.BN, spec.row.var, spec.head_dim) == (32, 8, "i", "D")


@pytest.mark.gpu
def test_attnc_build_says_the_refusal_before_compiling_any_shader(require_adapters) -> None:
    """Through attnc.build: the refusal reaches the caller as the LoweringError at the user's line
    (a value slice that moved with the row lowered, and naga rejected the WGSL it made)."""
    device = require_adapters("wgpu:vulkan")[0]
    q, k, v = (np.zeros((1, 1, 8, 8), np.float32) for _ in range(3))
    with pytest.raises(LoweringError) as e:
        attnc.build(value_moves_with_the_row, device=device)(q=q, k=k, v=v)
    assert e.value.message == "the value slice v[...] must not depend on the query row"
    _at(e.value, _marked(value_moves_with_the_row))
