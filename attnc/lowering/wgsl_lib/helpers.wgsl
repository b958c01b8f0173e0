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

// tanh that never produces NaN from overflow inside exp (|x| > 15 is +-1 in f32).
fn safe_tanh(x: f32) -> f32 {
  return tanh(clamp(x, -15.0, 15.0));
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
