"""Fit the polynomial of `safe_tanh` (attnc/lowering/wgsl_lib/helpers.wgsl) and measure it.

For |x| < 1, tanh(x) = x + x^3 P(x^2) with P of degree 6. P is the weighted minimax fit of
g(y) = (tanh(sqrt y) - sqrt y) / sqrt(y)^3 on (0, 1], weighted so that the error minimised is
the relative error of tanh itself (|x^3 (P - g)| / tanh x), by Lawson's iteration over
least-squares fits in float64 against numpy's float64 tanh. The coefficients are then
rounded to f32, as the WGSL literals are, and the result is measured twice on a dense grid:
in exact (float64) arithmetic, and evaluated the way the shader does, in f32.

Usage: python tools/fit_tanh.py   (prints the coefficients, highest degree first, and the errors)
"""

from __future__ import annotations

import numpy as np

X_MAX = 1.0  # the polynomial's interval is [0, X_MAX); 1 - 2/(exp(2|x|) + 1) above
DEGREE = 6  # of P in y = x^2


def fit(x_max: float = X_MAX, degree: int = DEGREE, iterations: int = 400) -> np.ndarray:
    """P's coefficients (lowest degree first) in float64."""
    y = np.linspace(0.0, x_max * x_max, 20001)[1:]
    x = np.sqrt(y)
    g = (np.tanh(x) - x) / x**3
    weight = x**3 / np.tanh(x)
    a = np.vander(y, degree + 1, increasing=True)
    lawson = np.full_like(y, 1.0 / y.size)
    coef = np.zeros(degree + 1)
    for _ in range(iterations):
        w = np.sqrt(lawson) * weight
        coef = np.linalg.lstsq(a * w[:, None], g * w, rcond=None)[0]
        err = np.abs(a @ coef - g) * weight
        lawson = lawson * err
        lawson /= lawson.sum()
    return coef


def f32_tanh(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The shader's evaluation in f32: Horner in y = x*x, then x + (x*y)*P (x >= 0)."""
    c = coef.astype(np.float32)
    x = x.astype(np.float32)
    y = x * x
    p = np.full_like(x, c[-1])
    for a in c[-2::-1]:
        p = p * y + a
    return x + (x * y) * p


def main() -> None:
    coef = fit()
    c32 = coef.astype(np.float32)
    x = np.linspace(0.0, X_MAX, 2_000_001, dtype=np.float64)[1:-1]
    ref = np.tanh(x)
    exact = x + x**3 * np.polyval(c32.astype(np.float64)[::-1], x * x)
    x32 = x.astype(np.float32)
    in_f32 = f32_tanh(coef, x32).astype(np.float64)
    ref32 = np.tanh(x32.astype(np.float64))
    print(f"P on (0, {X_MAX}) of degree {DEGREE} in x^2, f32 coefficients (shortest), highest degree first:")
    for c in c32[::-1]:
        print(f"  {np.format_float_positional(c, unique=True)}")
    print(f"max relative error, exact arithmetic: {np.max(np.abs(exact - ref) / ref):.3g}")
    print(f"max relative error, evaluated in f32: {np.max(np.abs(in_f32 - ref32) / ref32):.3g}")


if __name__ == "__main__":
    main()
