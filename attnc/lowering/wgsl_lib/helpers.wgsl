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
