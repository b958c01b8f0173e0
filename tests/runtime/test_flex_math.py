"""The math score and mask functions may use, elementwise on every CI adapter, against float64
and the IR interpreter: sin, cos, tan over the ranges positions and scores take, exp2, log2,
floor, ceil, sigmoid, Python's // and % on negative operands and zero divisors, i32 wrap-around,
the clamped reads of captured tables, and over f32 edge values (signed zeros, subnormals, inf,
NaN, the neighbours of +-2^31) the int conversions and minimum / maximum, exactly.

A kernel with one key gives lse = the score exactly (m + log 1), so a score_mod computing f(x)
from a captured array x hands back f32 values of f(x) through lse, one per query row; one
query head per function keeps them in one kernel (one compile per adapter).
"""

from __future__ import annotations

import numpy as np
import pytest

import attnc
from attnc.ir.interp import interpret

pytestmark = pytest.mark.gpu


def run_elementwise(device, fns, x, extra=None):
    """lse[h, i] = fns[h](x, i) for the rows i of x, on `device`; and the interpreter's."""
    H, S = len(fns), x.shape[0]

    def score_mod(s, b, h, q_idx, kv_idx):
        out = fns[-1](x, q_idx)
        for n in range(H - 2, -1, -1):
            out = attnc.where(h == n, fns[n](x, q_idx), out)
        return out

    q = np.zeros((1, H, S, 4), np.float32)
    k = np.zeros((1, H, 1, 4), np.float32)
    v = np.ones((1, H, 1, 4), np.float32)
    _, lse = attnc.attention(q, k, v, score_mod=score_mod, return_lse=True, device=device)
    from attnc.runtime.build import Options, build_kernel_with_captures

    kern, captured, _ = build_kernel_with_captures(Options(lse=True, score_mod=score_mod), {"BM": 32, "BN": 32})
    _, lse_ref = interpret(kern, {"q": q, "k": k, "v": v, "scale": 0.5, **captured})
    return lse[0].astype(np.float64), lse_ref[0]


def test_sin_cos_tan_over_positions_and_scores(device):
    rng = np.random.default_rng(0)
    n = 4096
    x = np.concatenate([rng.uniform(-8, 8, n),                     # scores
                        rng.uniform(-2e3, 2e3, n),                 # large scores, distances
                        np.arange(100000 - n, 100000) * 1.0,       # positions up to 1e5
                        rng.uniform(-1e6, 1e6, n)]).astype(np.float32)  # positions x frequencies
    freq = np.float32(0.0731)
    fns = [lambda a, i: attnc.sin(a[i]), lambda a, i: attnc.cos(a[i]), lambda a, i: attnc.tan(a[i]),
           lambda a, i: attnc.sin(attnc.f32(i) * freq)]  # sin(q_idx * f): rotary-style angles
    got, interp = run_elementwise(device, fns, x)
    x64 = x.astype(np.float64)
    angle = (np.arange(x.size, dtype=np.float32) * freq).astype(np.float64)  # the f32 product
    want = [np.sin(x64), np.cos(x64), np.tan(x64), np.sin(angle)]
    for h, w in enumerate(want):
        # tan: the error as a perturbation of the argument (its derivative is 1 + tan^2)
        err = np.abs(got[h] - w) / (1.0 + w * w if h == 2 else 1.0)
        assert err.max() <= 2e-7, (h, float(err.max()), x[np.argmax(err)])
    # the interpreter's float64 sin of the f32 argument (it computes q_idx * f in float64)
    np.testing.assert_allclose(interp[0], want[0], atol=1e-15)


def test_exp2_log2_floor_ceil_sigmoid(device):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-30, 30, 3000), rng.uniform(-1, 1, 1000),
                        np.arange(-20, 20) + 0.5, np.arange(-20, 20) * 1.0, [-100.0, 100.0, 0.0]]).astype(np.float32)
    fns = [lambda a, i: attnc.exp2(a[i] * 0.25), lambda a, i: attnc.log2(abs(a[i]) + 1e-3),
           lambda a, i: attnc.floor(a[i]), lambda a, i: attnc.ceil(a[i]), lambda a, i: attnc.sigmoid(a[i]),
           lambda a, i: attnc.f32(a[i].__floor__())]
    got, interp = run_elementwise(device, fns, x)
    x64 = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-x64))
    want = [np.exp2(x64 * 0.25), np.log2(np.abs(x64) + np.float64(np.float32(1e-3))), np.floor(x64), np.ceil(x64),
            sig, np.floor(x64)]
    # (absolute, relative) tolerances: a few f32 ulps; floor and ceil exact
    tol = [(0, 4e-7), (1e-6, 0), (0, 0), (0, 0), (1e-7, 4e-7), (0, 0)]
    for h, (w, (atol, rtol)) in enumerate(zip(want, tol, strict=True)):
        np.testing.assert_allclose(got[h], w, atol=atol, rtol=rtol, err_msg=f"function {h}")
        # the interpreter: float64 throughout (its constant 1e-3 is not rounded to f32)
        np.testing.assert_allclose(interp[h], np.log2(np.abs(x64) + 1e-3) if h == 1 else w, rtol=1e-12)
    assert got[4][x == 100.0] == 1.0 and np.isfinite(got[4]).all()  # no overflow to NaN


def test_floor_division_and_modulo_follow_python(device):
    a = np.array([-7, 7, -7, 7, -8, 8, 0, -1, 1, 5, -5, 2**31 - 1, -(2**31), -(2**31), 13, -13, 3], np.int64)
    b = np.array([2, 2, -2, -2, 4, -4, 3, 3, -3, 0, 0, 7, 1, -1, 1000, 1000, 0], np.int64)
    pairs = np.stack([a, b], axis=1).astype(np.int32)
    S = len(a)
    fns = [lambda t, i: attnc.f32(t[i, 0] // t[i, 1]), lambda t, i: attnc.f32(t[i, 0] % t[i, 1]),
           lambda t, i: attnc.f32(t[i, 0] * 65536 * t[i, 1])]  # wraps around in i32
    got, interp = run_elementwise(device, fns, pairs)

    def wrap(x):
        return (np.asarray(x, np.int64) + 2**31) % 2**32 - 2**31

    div = np.array([wrap(x // y) if y else 0 for x, y in zip(a, b, strict=True)])
    mod = np.array([x % y if y else x for x, y in zip(a, b, strict=True)])
    mul = wrap(wrap(a * 65536) * b)
    assert (div[:4] == [-4, 3, 3, -4]).all() and (mod[:4] == [1, 1, -1, -1]).all()  # Python's rules
    for h, w in enumerate((div, mod, mul)):
        np.testing.assert_array_equal(got[h], w.astype(np.float32).astype(np.float64), err_msg=f"op {h}")
        np.testing.assert_array_equal(interp[h], w.astype(np.float64), err_msg=f"interp op {h}")
    assert (wrap(div * b + mod)[b != 0] == a[b != 0]).all() and (mod[b == 0] == a[b == 0]).all()
    assert S == len(b)


def test_a_number_on_the_left_of_an_operator(device):
    """`37 // x`, `29 % x`, `5 - x`, `3.5 / y`, `3 < x` with the traced value on the right
    (Python's reflected operators): every non-commutative one keeps its operands' order."""
    t = np.array([1, 2, 3, 5, 7, 10, -1, -3, -8, 40, 37, -37], np.int32)
    y = (t.astype(np.float32) * 0.75).astype(np.float32)
    table = np.stack([t, y.view(np.int32)], axis=1)
    fns = [lambda a, i: attnc.f32(37 // a[i, 0]), lambda a, i: attnc.f32(29 % a[i, 0]),
           lambda a, i: attnc.f32(5 - a[i, 0]), lambda a, i: 3.5 / attnc.f32(a[i, 0]),
           lambda a, i: attnc.where(3 < a[i, 0], 1.0, 0.0), lambda a, i: attnc.where(3 >= a[i, 0], 1.0, 0.0),
           lambda a, i: 2.0 - attnc.f32(a[i, 0]) * 0.75]
    got, interp = run_elementwise(device, fns, table)
    x = t.astype(np.int64)
    want = [37 // x, 29 % x, 5 - x, 3.5 / x.astype(np.float32), (3 < x) * 1.0, (3 >= x) * 1.0, 2.0 - y]
    for h, w in enumerate(want):
        w32 = np.asarray(w, np.float64).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(got[h], w32, rtol=2e-7, err_msg=f"function {h}")
        np.testing.assert_allclose(interp[h], np.asarray(w, np.float64), rtol=2e-7, err_msg=f"interp {h}")


def test_integer_literals_at_the_ends_of_i32(device):
    """Literals -2**31 and 2**31 - 1 in a mod compile on every compiler and compute as the
    interpreter does (-2**31 was written -i32(2147483648), which Naga and Tint reject)."""
    a = np.array([0, 1, -1, 2**31 - 1, -(2**31), 12345, -999], np.int64)
    fns = [lambda t, i: attnc.f32(t[i, 0] + (-2147483648)),
           lambda t, i: attnc.where(t[i, 0] > -2147483648, 1.0, 0.0),
           lambda t, i: attnc.where(t[i, 0] < 2147483647, 1.0, 0.0), lambda t, i: attnc.f32(t[i, 0] - 2147483647)]
    got, interp = run_elementwise(device, fns, np.stack([a, a], axis=1).astype(np.int32))

    def wrap(x):
        return (np.asarray(x, np.int64) + 2**31) % 2**32 - 2**31

    want = [wrap(a - 2**31), (a > -(2**31)).astype(np.int64), (a < 2**31 - 1).astype(np.int64), wrap(a - (2**31 - 1))]
    for h, w in enumerate(want):
        np.testing.assert_array_equal(got[h], w.astype(np.float32).astype(np.float64), err_msg=f"op {h}")
        np.testing.assert_array_equal(interp[h], w.astype(np.float64), err_msg=f"interp op {h}")


@pytest.mark.sanitize
def test_reads_of_captured_tables_are_clamped_to_the_nearest_element(device):
    """Indices below 0 and past the end read the first and last elements on the device and in
    the interpreter, and never leave the array (rerun under ATTNC_SANITIZE=bounds)."""
    table = np.arange(10, dtype=np.float32) * 1.5 + 1.0
    grid = np.arange(12, dtype=np.int32).reshape(3, 4)
    x = np.zeros(40, np.float32)
    fns = [lambda t, i: table[i - 15], lambda t, i: table[i * 7 - 100],
           lambda t, i: attnc.f32(grid[i - 20, 3 - i])]
    got, interp = run_elementwise(device, fns, x)
    i = np.arange(40)
    want = [table[np.clip(i - 15, 0, 9)], table[np.clip(i * 7 - 100, 0, 9)],
            grid[np.clip(i - 20, 0, 2), np.clip(3 - i, 0, 3)].astype(np.float64)]
    for h, w in enumerate(want):
        np.testing.assert_array_equal(got[h], w)
        np.testing.assert_array_equal(interp[h], w)


def test_a_positive_number_to_a_traced_power(device):
    """`b ** x` for a number b > 0 (ALiBi's 2 ** (-8 * (h + 1) / H)): exp2(x * log2(b)), within
    a few f32 ulps of float64 over the exponents slopes and decays take."""
    x = np.concatenate([np.linspace(-20, 20, 2001), -8 * (np.arange(64) + 1) / 64]).astype(np.float32)
    fns = [lambda a, i: 2 ** a[i], lambda a, i: 0.5 ** a[i], lambda a, i: 10.0 ** (a[i] * 0.25)]
    got, interp = run_elementwise(device, fns, x)
    x64 = x.astype(np.float64)
    want = [2.0 ** x64, 0.5 ** x64, 10.0 ** (x64 * 0.25)]
    for h, w in enumerate(want):
        np.testing.assert_allclose(got[h], w, rtol=2e-6, err_msg=f"function {h}")
        np.testing.assert_allclose(interp[h], w, rtol=1e-12)


# f32 edge values: signed zeros, subnormals, infinities, NaN, the neighbours of +-2^31 (2^31 - 128
# is the largest f32 below 2^31, 2^31 + 256 the next above), values past the i32 range and halves
EDGES = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, np.inf, -np.inf, np.nan,
                  2**31 - 128, 2**31, 2**31 + 256, -(2**31 - 128), -(2**31), -(2**31 + 256),
                  3e9, -3e9, 1e10, -1e10, 3.4e38, -3.4e38, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5,
                  0.999999, 16777217.0, 1.0, -1.0], np.float32)


def test_int_conversions_saturate_and_take_nan_to_zero(device):
    """attnc.i32, math.floor, math.ceil and math.trunc of f32 edge values give the documented
    i32 (toward zero / floor / ceiling, saturating at the i32 range, NaN -> 0), as the interpreter.
    WGSL's own f32 -> i32 clamps to 2^31 - 128 (+inf and 3e9 gave 2147483520) and left NaN to the
    driver (-2^31 on lavapipe). Each i32 comes back exactly as two f32s: r // 65536 and r % 65536."""
    import math

    convs = [attnc.i32, math.floor, math.ceil, math.trunc]
    fns = [f for c in convs for f in (lambda a, i, c=c: attnc.f32(c(a[i]) // 65536),
                                      lambda a, i, c=c: attnc.f32(c(a[i]) % 65536))]
    got, interp = run_elementwise(device, fns, EDGES)
    x = EDGES.astype(np.float64)
    for n, rnd in enumerate((np.trunc, np.floor, np.ceil, np.trunc)):
        with np.errstate(invalid="ignore"):
            r = np.where(np.isnan(x), 0, np.clip(np.nan_to_num(rnd(x)), -(2**31), 2**31 - 1)).astype(np.int64)
        for h, w in ((2 * n, r // 65536), (2 * n + 1, r % 65536)):
            np.testing.assert_array_equal(got[h], w.astype(np.float64), err_msg=f"device, conversion {n}, {x}")
            np.testing.assert_array_equal(interp[h], w.astype(np.float64), err_msg=f"interpreter, conversion {n}")


def test_minimum_and_maximum_propagate_nan(device):
    """attnc.minimum / maximum over every pair of f32 edge values: a NaN operand gives NaN
    (their documented rule, numpy's), as the interpreter; WGSL's min and max returned the other
    operand on lavapipe. The lse passes each result through exactly except +inf, which comes
    back as NaN (inf - inf in the softmax): -result tells the two apart."""
    a, b = (g.ravel() for g in np.meshgrid(EDGES, EDGES, indexing="ij"))
    pairs = np.stack([a, b], axis=1)
    fns = [lambda t, i: attnc.minimum(t[i, 0], t[i, 1]), lambda t, i: -attnc.minimum(t[i, 0], t[i, 1]),
           lambda t, i: attnc.maximum(t[i, 0], t[i, 1]), lambda t, i: -attnc.maximum(t[i, 0], t[i, 1]),
           lambda t, i: attnc.minimum(t[i, 0], 1.0), lambda t, i: attnc.maximum(-1.0, t[i, 1])]
    got, interp = run_elementwise(device, fns, pairs)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    lo, hi = np.minimum(a64, b64), np.maximum(a64, b64)

    def through_lse(y):  # what the lse of a one-key row holding score y reads
        return np.where(np.isposinf(y), np.nan, y) + 0.0

    want = [lo, -lo, hi, -hi, np.minimum(a64, 1.0), np.maximum(-1.0, b64)]
    assert np.isnan(want[0][np.isnan(a) | np.isnan(b)]).all()
    for h, w in enumerate(want):
        np.testing.assert_array_equal(got[h], through_lse(w), err_msg=f"device, function {h}")
        np.testing.assert_array_equal(interp[h], through_lse(w), err_msg=f"interpreter, function {h}")
