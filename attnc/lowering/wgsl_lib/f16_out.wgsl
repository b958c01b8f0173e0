// f16 output: emitted after helpers.wgsl by programs that write a float16 o (docs/API.md, float16).

// An f32 as IEEE binary16 bits (low 16 bits of the result), rounded to nearest, ties to even
// (what numpy's astype(float16) does): NaN stays NaN (quiet, sign kept), a value that rounds
// past 65504 (|x| >= 65520) and +-inf become +-inf, results below 2^-14 are subnormal halves
// (not flushed to zero). Integer arithmetic rather than pack2x16float: WGSL lets that builtin
// round either way and leaves its result indeterminate for values outside f16's finite range.
fn f16_bits(x: f32) -> u32 {
  let u = bitcast<u32>(x);
  let sign = (u >> 16u) & 0x8000u;
  let a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {
    return sign | 0x7e00u;
  }
  if (a >= 0x477ff000u) {
    return sign | 0x7c00u;
  }
  if (a >= 0x38800000u) {  // a normal half: rebias the exponent (127 -> 15), round off 13 bits
    let r = a - 0x38000000u;
    return sign | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
  }
  if (a < 0x33000000u) {  // below 2^-25: rounds to zero (2^-25 itself ties to even zero)
    return sign;
  }
  // a subnormal half m * 2^-24: the f32 significand shifted right by 126 - exponent (14..24)
  let m = (a & 0x7fffffu) | 0x800000u;
  let sh = 126u - (a >> 23u);
  let q = m >> sh;
  let rest = m & ((1u << sh) - 1u);
  let half = 1u << (sh - 1u);
  return sign | (q + select(0u, 1u, rest > half || (rest == half && (q & 1u) == 1u)));
}

// Two adjacent output columns (c even, then c + 1) as one u32 word of halves, c in the low half:
// WGSL storage has no 16-bit stores, so the invocation that writes column c writes c + 1 too.
fn pack_f16(lo: f32, hi: f32) -> u32 {
  return f16_bits(lo) | (f16_bits(hi) << 16u);
}
