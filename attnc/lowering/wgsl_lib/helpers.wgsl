// Fixed helper functions, emitted once per shader. No conditionals over variants here.

// Bit patterns of -inf, +inf and NaN. Private variables, not constants: Tint rejects
// constant expressions whose value is not finite.
var<private> BITS_NEG_INF: u32 = 0xff800000u;
var<private> BITS_POS_INF: u32 = 0x7f800000u;
var<private> BITS_NAN: u32 = 0x7fc00000u;

// Integer division rounding toward -inf, as the IR's idiv (WGSL's / truncates).
fn floor_div(a: i32, b: i32) -> i32 {
  let q = a / b;
  return select(q, q - 1, (a % b != 0) && ((a < 0) != (b < 0)));
}

// Modulo with the sign of the divisor, as the IR's mod.
fn floor_mod(a: i32, b: i32) -> i32 {
  let r = a % b;
  return select(r, r + b, (r != 0) && ((r < 0) != (b < 0)));
}

// A tensor index clamped into [0, n): rows and keys past the end of the last tile evaluate
// the score function too (its value is discarded), and their reads must stay in bounds.
fn clamp_ix(i: i32, n: u32) -> u32 {
  return min(u32(i), max(n, 1u) - 1u);
}

// tanh within 1.2e-7 relative over all of f32 (measured on lavapipe; 2 units of 2^-24), not
// WGSL's builtin tanh, which drivers may compute as 1 - 2/(exp(2x) + 1) (lavapipe: 2^-25 for
// tanh(1e-30)). |x| < 1: x + x^3 P(x^2), P of degree 6, the weighted minimax fit of
// (tanh(x) - x) / x^3 on (0, 1] to tanh's relative error, in float64, coefficients rounded to
// f32 (tools/fit_tanh.py): 7.7e-9 in exact arithmetic, 8.8e-8 evaluated in f32.
// |x| >= 1: 1 - 2/(exp(2|x|) + 1), which does not cancel there (|x| clamped to 10, where it
// is 1 in f32). The sign bit of x is put back (-0 stays -0, tanh(+-inf) = +-1); NaN stays NaN.
fn safe_tanh(x: f32) -> f32 {
  let a = abs(x);
  let y = a * a;
  let p = ((((((-0.00035844964 * y + 0.002301357) * y - 0.007946097) * y + 0.021486651) * y
           - 0.0538798) * y + 0.13332345) * y - 0.33333296);
  let t = select(1.0 - 2.0 / (exp(2.0 * min(a, 10.0)) + 1.0), a + (a * y) * p, a < 1.0);
  let r = bitcast<f32>(bitcast<u32>(t) | (bitcast<u32>(x) & 0x80000000u));
  return select(r, x, is_nan(x));
}

// NaN test by bits: holds even where the compiler assumes finite math.
fn is_nan(x: f32) -> bool {
  return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// -inf test by bits.
fn is_neg_inf(x: f32) -> bool {
  return bitcast<u32>(x) == 0xff800000u;
}

// exp(x - m) for a running max m that may be -inf (all masked so far): 0 instead of NaN.
fn exp_sub(x: f32, m: f32) -> f32 {
  return select(exp(x - m), 0.0, is_neg_inf(x));
}

// +inf test by bits.
fn is_pos_inf(x: f32) -> bool {
  return bitcast<u32>(x) == 0x7f800000u;
}

// A sink logit z joining a softmax state of max m (mf = max(m, z)): the factor that rescales
// the state's sum and accumulators, and the sink's own term of the sum. A sink of +inf takes
// all the weight (factor 0, term 1: o = 0, lse = +inf) where exp(z - mf) would be NaN; a NaN
// state stays NaN (NaN * 0).
fn sink_scale(m: f32, mf: f32, z: f32) -> f32 {
  return select(exp_sub(m, mf), 0.0, is_pos_inf(z));
}

fn sink_term(z: f32, mf: f32) -> f32 {
  return select(exp_sub(z, mf), 1.0, is_pos_inf(z));
}
