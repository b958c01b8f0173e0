// Fixed helper functions, emitted once per shader. No conditionals over variants here.

// Bit patterns of -inf, +inf and NaN. Private variables, not constants: Tint rejects
// constant expressions whose value is not finite.
var<private> BITS_NEG_INF: u32 = 0xff800000u;
var<private> BITS_POS_INF: u32 = 0x7f800000u;
var<private> BITS_NAN: u32 = 0x7fc00000u;

// Integer division rounding toward -inf, as the IR's idiv (Python's //); 0 for b = 0; i32 min
// divided by -1 wraps to i32 min. Computed on magnitudes in u32: GLSL (wgpu's OpenGL backend)
// leaves % (and / on some drivers) undefined for negative operands, and llvmpipe's GL gives
// unsigned results for them.
fn floor_div(a: i32, b: i32) -> i32 {
  let ua = select(u32(a), 0u - u32(a), a < 0);
  let ub = max(select(u32(b), 0u - u32(b), b < 0), 1u);
  let uq = ua / ub;
  let neg = (a < 0) != (b < 0);
  let q = select(i32(uq), i32(0u - uq), neg);
  return select(select(q, q - 1, neg && ua != uq * ub), 0, b == 0);
}

// Modulo with the sign of the divisor, as the IR's mod (Python's %); a for b = 0, so that
// a == floor_div(a, b) * b + floor_mod(a, b) always (magnitudes in u32, as floor_div).
fn floor_mod(a: i32, b: i32) -> i32 {
  let ua = select(u32(a), 0u - u32(a), a < 0);
  let ub = max(select(u32(b), 0u - u32(b), b < 0), 1u);
  let ur = ua - (ua / ub) * ub;
  let r = select(i32(ur), i32(0u - ur), a < 0);
  return select(select(r, r + b, r != 0 && ((r < 0) != (b < 0))), a, b == 0);
}

// x / n for an x that is a multiple of n (n >= 1; wrapping when it is not), with no integer
// division (a per-lane loop of scalar divisions on CPU adapters: an int8 KV row per key cost
// 15-18 % of a lavapipe decode; a long instruction sequence on GPUs): x's shift by n's
// trailing zeros times the inverse of n's odd part modulo 2^32. divisor(n) is that (shift,
// inverse), computed once per invocation where n is uniform (the int8 rows' rows_*), div_by
// the division itself. The inverse by Newton's iteration: o * o == 1 mod 8 gives 3 bits, each
// step doubles them (48 >= 32).
fn divisor(n: u32) -> vec2<u32> {
  let s = countTrailingZeros(n);
  let o = n >> s;
  var inv = o;
  inv = inv * (2u - o * inv);
  inv = inv * (2u - o * inv);
  inv = inv * (2u - o * inv);
  inv = inv * (2u - o * inv);
  return vec2<u32>(s, inv);
}

fn div_by(x: u32, d: vec2<u32>) -> u32 {
  return (x >> d.x) * d.y;
}

fn exact_div(x: u32, n: u32) -> u32 {
  return div_by(x, divisor(n));
}

// A tensor index clamped into [0, n - 1], the IR's rule for every read: rows and keys past
// the end of the last tile evaluate the score function too (its value is discarded), and a
// captured table may be indexed with any value; every read stays in bounds.
fn clamp_ix(i: i32, n: u32) -> u32 {
  return min(u32(max(i, 0)), max(n, 1u) - 1u);
}

// sin and cos of f32 x to about 1.2e-7 absolute for |x| <= 1e6 (positions times frequencies,
// scores): x - k*pi/2 exactly (Cody-Waite: pi/2 in 7-bit pieces, k split in two so every
// product is exact), then minimax polynomials on [-pi/4, pi/4]. Beyond 2^24 (where f32 has no
// fraction left) the WGSL builtins. Returns (sin x, cos x).
fn sincos_(x: f32) -> vec2<f32> {
  let k = round(x * 0.63661975);
  let kh = round(k * 0.000244140625) * 4096.0;
  let kl = k - kh;
  var r = x;
  r = (r - kh * 1.5625) - kl * 1.5625;
  r = (r - kh * 0.0081787109375) - kl * 0.0081787109375;
  r = (r - kh * 0.00011730194091796875) - kl * 0.00011730194091796875;
  r = (r - kh * 3.129243850708008e-07) - kl * 3.129243850708008e-07;
  r = (r - kh * 9.89530235528946e-10) - kl * 9.89530235528946e-10;
  r = (r - kh * 2.5633440682570896e-12) - kl * 2.5633440682570896e-12;
  let z = r * r;
  let s = ((-1.9515296e-4 * z + 8.332161e-3) * z - 0.16666655) * z * r + r;
  let c = ((2.4433157e-5 * z - 1.3887316e-3) * z + 4.1666646e-2) * z * z - 0.5 * z + 1.0;
  let q = i32(k) & 3;
  let sn = select(select(-c, -s, q == 2), select(c, s, q == 0), q < 2);
  let cs = select(select(s, -c, q == 2), select(-s, c, q == 0), q < 2);
  let big = abs(x) >= 16777216.0 && (bitcast<u32>(x) & 0x7fffffffu) < 0x7f800000u;
  return select(vec2<f32>(sn, cs), vec2<f32>(sin(x), cos(x)), big);
}

fn sin_(x: f32) -> f32 {
  return sincos_(x).x;
}

fn cos_(x: f32) -> f32 {
  return sincos_(x).y;
}

fn tan_(x: f32) -> f32 {
  let sc = sincos_(x);
  return sc.x / sc.y;
}

// 1 / (1 + exp(-x)) without overflow: exp of -|x| only.
fn sigmoid_(x: f32) -> f32 {
  let e = exp(-abs(x));
  return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
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

// The IR's i32(x) of an f32: truncation toward zero, saturating at the i32 range, NaN -> 0 (as
// the interpreter's to_i32). WGSL's own conversion clamps to [-2^31, 2^31 - 128] (the largest
// f32 below 2^31), so +inf and 3e9 gave 2147483520, and leaves NaN to the implementation
// (lavapipe: -2^31). |x| >= 2^31, inf and NaN are told apart by bits, which fast-math
// compilers cannot assume away.
fn f32_to_i32(x: f32) -> i32 {
  let b = bitcast<u32>(x);
  let a = b & 0x7fffffffu;
  let sat = bitcast<i32>(0x7fffffffu + (b >> 31u));  // 2^31 - 1, or -2^31 for a set sign bit
  return select(i32(x), select(sat, 0, a > 0x7f800000u), a >= 0x4f000000u);
}

// The IR's min and max of f32s: NaN propagates (a NaN operand gives a NaN, as numpy's minimum
// and maximum); WGSL's min and max may return the other operand (lavapipe does).
fn min_nan(a: f32, b: f32) -> f32 {
  return select(select(min(a, b), b, is_nan(b)), a, is_nan(a));
}

fn max_nan(a: f32, b: f32) -> f32 {
  return select(select(max(a, b), b, is_nan(b)), a, is_nan(a));
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
