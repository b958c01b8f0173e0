// Runs a list of attention cases with js/attnc.js and measures them against expected outputs.
// Shared by the example page (main.js) and the Node test runner (tests/js/run_node.mjs), so
// the browser and Node exercise the same code. A cases file (written by tests/js/cases.py):
//   {"cases": [{"name", "manifest", "variant", "shapes", "params", "limits", "tol",
//               "expect_variant", "inputs": {name: {"file", "dtype"}},
//               "expected": {name: {"file", "dtype"}}}],
//    "checks": {"formulas": [{"formula", "env", "value" | "error"}], "f16": {...},
//               "shapes": [{"dims", "shapes"}], "manifests": [{"path", "manifest"}]}}
// (in "shapes", numbers JSON cannot hold are {"$number": "NaN" | "Infinity" | "-Infinity"}).
// Paths are relative to the cases file. Binary files are little-endian raw arrays.

import {
  AttncError, checkShapes, createAttention, createKVCache, evaluateFormula, f16BitsToF32, f16ToF32, f32ToF16,
  loadManifest, manifestProblems, selectVariant,
} from '../../js/attnc.js';

const ARRAYS = {f32: Float32Array, f16: Uint16Array, i32: Int32Array, u32: Uint32Array, u8: Uint8Array, bool: Uint8Array};

/** @param {string} base @param {string} rel */
export function joinPath(base, rel) {
  if (/^[a-z]+:/i.test(rel) || rel.startsWith('/')) return rel;
  const cut = base.lastIndexOf('/');
  return (cut >= 0 ? base.slice(0, cut + 1) : '') + rel;
}

/** The WebGPU features the harness asks for when the adapter offers them. */
export const WANTED_FEATURES = ['subgroups', 'shader-f16', 'timestamp-query'];

/**
 * The device the harness asks for: the wanted features the adapter offers, and the adapter's
 * own storage-buffer limit (a kernel whose masks read several tensors has a block-map variant
 * that binds one more storage buffer than WebGPU's default 8).
 * @param {any} adapter
 */
export function deviceRequest(adapter) {
  return {
    requiredFeatures: WANTED_FEATURES.filter((f) => adapter.features.has(f)),
    requiredLimits: {maxStorageBuffersPerShaderStage: adapter.limits.maxStorageBuffersPerShaderStage},
  };
}

/** Describe an adapter: name, features that matter, subgroup sizes, key limits. @param {any} adapter */
export function describeAdapter(adapter) {
  const info = adapter.info || {};
  return {
    vendor: info.vendor || '', architecture: info.architecture || '', device: info.device || '',
    description: info.description || '',
    isFallbackAdapter: !!(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    subgroupMinSize: info.subgroupMinSize ?? null, subgroupMaxSize: info.subgroupMaxSize ?? null,
    features: WANTED_FEATURES.filter((f) => adapter.features.has(f)),
    maxComputeWorkgroupsPerDimension: adapter.limits.maxComputeWorkgroupsPerDimension,
    maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
    maxStorageBuffersPerShaderStage: adapter.limits.maxStorageBuffersPerShaderStage,
  };
}

/** @param {Uint8Array} bytes */
export function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/** @param {any} arr @param {string} dtype @returns {Float64Array} */
function asFloat(arr, dtype) {
  return Float64Array.from(dtype === 'f16' ? f16ToF32(arr) : arr);
}

/** Max abs error and relative Frobenius error (NaN at the same place counts as equal). */
export function compare(/** @type {Float64Array} */ got, /** @type {Float64Array} */ want) {
  let maxAbs = 0, num = 0, den = 0, nanMismatch = 0;
  if (got.length !== want.length) return {max_abs: Infinity, rel_err: Infinity, nan_mismatch: 0, length_mismatch: true};
  for (let i = 0; i < got.length; i++) {
    const g = got[i], w = want[i];
    if (Number.isNaN(w) || Number.isNaN(g)) {
      if (Number.isNaN(w) !== Number.isNaN(g)) nanMismatch++;
      continue;
    }
    if (!Number.isFinite(w) || !Number.isFinite(g)) {
      if (g !== w) nanMismatch++;
      continue;
    }
    const d = Math.abs(g - w);
    maxAbs = Math.max(maxAbs, d);
    num += d * d;
    den += w * w;
  }
  const rel = den > 0 ? Math.sqrt(num / den) : Math.sqrt(num);
  return {max_abs: maxAbs, rel_err: rel, nan_mismatch: nanMismatch};
}

/**
 * Run every case. `io.text(path)` and `io.bytes(path)` read files; `io.onResult` sees each
 * result as it comes. Returns {adapter, results, checks}.
 * @param {any} adapter @param {any} device @param {string} casesPath
 * @param {{text: (p: string) => Promise<string>, bytes: (p: string) => Promise<ArrayBuffer>,
 *   onResult?: (r: any) => void, returnOutputs?: boolean, repeat?: number}} io
 */
export async function runCases(adapter, device, casesPath, io) {
  const spec = JSON.parse(await io.text(casesPath));
  const manifests = new Map();
  const attentions = new Map();
  const results = [];
  for (const c of spec.cases) {
    const r = await runCase(device, casesPath, c, io, manifests, attentions);
    results.push(r);
    if (io.onResult) io.onResult(r);
  }
  const checks = spec.checks ? await runChecks(casesPath, spec.checks, io) : {};
  return {adapter: describeAdapter(adapter), device_features: [...device.features].filter((f) => WANTED_FEATURES.includes(f)),
    device_limits: deviceLimits(device), results, checks};
}

/**
 * @param {any} device @param {string} casesPath @param {any} c @param {any} io @param {Map<string, any>} manifests
 * @param {Map<string, any>} attentions runners by manifest, variant selector and limits: cases that differ only
 *   in shapes or params share pipelines (a compile costs seconds on software adapters)
 */
async function runCase(device, casesPath, c, io, manifests, attentions) {
  /** @type {any} */
  const r = {name: c.name, status: 'error', variant: null, shapes: c.shapes};
  if (c.kind === 'kv_cache') return runKvCase(device, casesPath, c, io, manifests, attentions, r);
  try {
    const mpath = joinPath(casesPath, c.manifest);
    if (!manifests.has(mpath)) manifests.set(mpath, await loadManifest(mpath, io.text));
    const manifest = manifests.get(mpath);
    const limits = {...deviceLimits(device), ...(c.limits || {})};
    try {
      selectVariant(manifest, {variant: c.variant ?? undefined, features: device.features, limits});
    } catch (e) {
      if (!(e instanceof AttncError)) throw e;
      r.status = 'unsupported';
      r.error = e.message;
      return r;
    }
    const t0 = performance.now();
    const key = JSON.stringify([mpath, c.variant ?? null, c.limits || {}]);
    if (!attentions.has(key)) attentions.set(key, await createAttention(device, manifest, {variant: c.variant ?? undefined, limits: c.limits}));
    const attn = attentions.get(key);
    r.create_ms = performance.now() - t0;
    r.variant = attn.variant.name;
    /** @type {Record<string, any>} */
    const inputs = {};
    for (const [name, f] of Object.entries(c.inputs || {})) {
      const Ctor = ARRAYS[/** @type {keyof typeof ARRAYS} */ (f.dtype)];
      inputs[name] = new Ctor(await io.bytes(joinPath(casesPath, f.file)));
    }
    const plan = attn.plan(c.shapes, c.params || {});
    r.dispatches = plan.dispatches.map((d) => ({program: d.program.name, n: d.n, x: d.x, y: d.y}));
    const t1 = performance.now();
    let out = await attn.run(inputs, c.shapes, c.params || {});
    r.first_ms = performance.now() - t1;
    const times = [];
    for (let i = 0; i < (io.repeat ?? 3); i++) {
      const t = performance.now();
      out = await attn.run(inputs, c.shapes, c.params || {});
      times.push(performance.now() - t);
    }
    times.sort((a, b) => a - b);
    r.ms = times.length ? times[times.length >> 1] : null;
    r.metrics = {};
    r.outputs = {};
    for (const [name, f] of Object.entries(c.expected || {})) {
      const Ctor = ARRAYS[/** @type {keyof typeof ARRAYS} */ (f.dtype)];
      const want = new Ctor(await io.bytes(joinPath(casesPath, f.file)));
      const got = out[name];
      // the output's own dtype (an f16 variant's o is f16; its expected values may be f32)
      const dtype = attn.outputs.find((/** @type {any} */ t) => t.name === name)?.dtype ?? f.dtype;
      r.metrics[name] = compare(asFloat(got, dtype), asFloat(want, f.dtype));
      if (io.returnOutputs) r.outputs[name] = {dtype, b64: toBase64(new Uint8Array(got.buffer, got.byteOffset, got.byteLength))};
    }
    if (io.returnOutputs) r.stored = await storedOutputs(device, attn, inputs, c);
    r.status = judged(c, r.metrics);
  } catch (e) {
    r.error = String(/** @type {any} */ (e).message || e);
    r.status = c.expect_error && r.error.includes(c.expect_error) ? 'ok' : 'error';
    if (c.expect_error) r.expected_error = c.expect_error;
  }
  return r;
}

/**
 * The outputs as the kernel wrote them (`run(..., {output: 'buffer'})`), read back whole, with
 * the plan's width (last dim) and rowStride (padded rows: an f16 o with an odd last dim).
 * @param {any} device @param {any} attn @param {Record<string, any>} inputs @param {any} c
 */
async function storedOutputs(device, attn, inputs, c) {
  const plan = attn.plan(c.shapes, c.params || {});
  const bufs = await attn.run(inputs, c.shapes, c.params || {}, {output: 'buffer'});
  /** @type {Record<string, any>} */
  const out = {};
  for (const [name, buf] of Object.entries(bufs)) {
    const tp = plan.tensors[name];
    const s = device.createBuffer({label: `${name}.stored`, size: tp.size, usage: 0x1 | 0x8});  // MAP_READ | COPY_DST
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(buf, 0, s, 0, tp.size);
    device.queue.submit([enc.finish()]);
    await s.mapAsync(0x1);
    const bytes = new Uint8Array(s.getMappedRange().slice(0, tp.bytes));
    s.unmap();
    s.destroy();
    /** @type {any} */ (buf).destroy();
    out[name] = {dtype: tp.dtype, width: tp.width, row_stride: tp.rowStride, count: tp.count, b64: toBase64(bytes)};
  }
  return out;
}

/**
 * 'ok' when every output is within the case's tolerance (relative error, no NaN/inf where the
 * reference has none, the same length), else 'wrong': the page shows what pytest would fail.
 * @param {any} c @param {Record<string, any>} metrics
 */
function judged(c, metrics) {
  const bad = Object.values(metrics).some((m) => m.length_mismatch || m.nan_mismatch || !(m.rel_err <= c.tol));
  return bad ? 'wrong' : 'ok';
}

/**
 * A KV-cache case: appends (typed arrays; GPUBuffers recorded into an encoder, dense or in
 * [B, n, Hkv, D] order with strides), then attention over the cache; returns o and the cache's
 * contents and lengths. Same arguments as runCase.
 * @param {any} device @param {string} casesPath @param {any} c @param {any} io @param {Map<string, any>} manifests
 * @param {Map<string, any>} attentions @param {any} r
 */
async function runKvCase(device, casesPath, c, io, manifests, attentions, r) {
  try {
    const mpath = joinPath(casesPath, c.manifest);
    if (!manifests.has(mpath)) manifests.set(mpath, await loadManifest(mpath, io.text));
    const manifest = manifests.get(mpath);
    try {
      selectVariant(manifest, {variant: c.variant, features: device.features, limits: deviceLimits(device)});
    } catch (e) {
      if (!(e instanceof AttncError)) throw e;
      r.status = 'unsupported';
      r.error = e.message;
      return r;
    }
    const key = JSON.stringify([mpath, c.variant, {}]);
    if (!attentions.has(key)) attentions.set(key, await createAttention(device, manifest, {variant: c.variant}));
    const attn = attentions.get(key);
    r.variant = attn.variant.name;
    const read = async (/** @type {any} */ f) => new ARRAYS[/** @type {keyof typeof ARRAYS} */ (f.dtype)](await io.bytes(joinPath(casesPath, f.file)));
    const cache = await createKVCache(device, c.cache.kFormat || c.cache.vFormat ? {...c.cache, manifest} : c.cache);
    const {batch: B, kvHeads: H, headDim: D, valueDim: Dv} = c.cache;
    // elements of each cache buffer read back: values, or (quantized) u32 words
    const kCount = c.expected.cache_k?.count ?? B * H * cache.capacity * D;
    const vCount = c.expected.cache_v?.count ?? B * H * cache.capacity * Dv;
    // c.one_encoder: every GPUBuffer append recorded into one encoder, submitted after the last
    const shared = c.one_encoder ? device.createCommandEncoder() : null;
    for (const step of c.steps) {
      const k = await read(step.k), v = await read(step.v);
      const opts = {rows: step.rows, counts: step.counts ?? undefined};
      if (step.source === 'array') {
        cache.append(k, v, opts);
        continue;
      }
      const upload = (/** @type {any} */ a) => {
        const buf = device.createBuffer({size: Math.max(16, Math.ceil(a.byteLength / 4) * 4), usage: 0x80 | 0x8, mappedAtCreation: true});
        new Uint8Array(buf.getMappedRange()).set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
        buf.unmap();
        return buf;
      };
      const n = step.rows;
      const strides = step.source === 'bshd' ? {k: [n * H * D, D, H * D, 1], v: [n * H * Dv, Dv, H * Dv, 1]} : undefined;
      const encoder = shared || device.createCommandEncoder();
      cache.append(upload(k), upload(v), {...opts, strides, encoder});
      if (!shared) device.queue.submit([encoder.finish()]);
    }
    if (shared) {
      device.pushErrorScope('validation');
      device.queue.submit([shared.finish()]);
      const rejected = await device.popErrorScope();
      if (rejected) throw new Error(`the appends' encoder was rejected: ${rejected.message}`);
    }
    const q = await read(c.q);
    const out = await cache.attend(attn, q, c.shapes, c.params || {});
    const cacheOut = {
      o: out.o,
      cache_k: await readBuffer(device, cache.k, c.expected.cache_k.dtype, kCount),
      cache_v: await readBuffer(device, cache.v, c.expected.cache_v.dtype, vCount),
      kv_lens: await readBuffer(device, cache.kvLens, 'i32', B),
    };
    r.metrics = {};
    r.outputs = {};
    for (const [name, f] of Object.entries(c.expected)) {
      const want = await read(f);
      const got = /** @type {any} */ (cacheOut)[name];
      r.metrics[name] = compare(asFloat(got, f.dtype), asFloat(want, f.dtype));
      if (io.returnOutputs) r.outputs[name] = {dtype: f.dtype, b64: toBase64(new Uint8Array(got.buffer, got.byteOffset, got.byteLength))};
    }
    cache.destroy();
    r.status = judged(c, r.metrics);
  } catch (e) {
    r.error = String(/** @type {any} */ (e).message || e);
    r.status = c.expect_error && r.error.includes(c.expect_error) ? 'ok' : 'error';
    if (c.expect_error) r.expected_error = c.expect_error;
  }
  return r;
}

/** The first `count` elements of a GPUBuffer as a typed array of `dtype`. @param {any} device @param {any} buffer @param {string} dtype @param {number} count */
async function readBuffer(device, buffer, dtype, count) {
  const Ctor = ARRAYS[/** @type {keyof typeof ARRAYS} */ (dtype)];
  const bytes = count * Ctor.BYTES_PER_ELEMENT;
  const size = Math.ceil(bytes / 4) * 4;
  const staging = device.createBuffer({size, usage: 0x1 | 0x8});
  const encoder = device.createCommandEncoder();
  encoder.copyBufferToBuffer(buffer, 0, staging, 0, size);
  device.queue.submit([encoder.finish()]);
  await staging.mapAsync(0x1);
  const out = new Ctor(staging.getMappedRange().slice(0, bytes));
  staging.unmap();
  staging.destroy();
  return out;
}

/** @param {any} device */
function deviceLimits(device) {
  /** @type {Record<string, number>} */
  const out = {};
  for (const k of ['maxComputeWorkgroupsPerDimension', 'maxComputeWorkgroupStorageSize', 'maxComputeInvocationsPerWorkgroup', 'maxStorageBuffersPerShaderStage', 'maxStorageBufferBindingSize']) out[k] = device.limits[k];
  return out;
}

/** Formula and f16-conversion checks against values Python computed. */
async function runChecks(/** @type {string} */ casesPath, /** @type {any} */ checks, /** @type {any} */ io) {
  /** @type {any} */
  const out = {};
  if (checks.formulas) {
    out.formulas = checks.formulas.map((/** @type {any} */ f) => {
      try {
        return {formula: f.formula, value: evaluateFormula(f.formula, f.env)};
      } catch (e) {
        return {formula: f.formula, error: String(/** @type {any} */ (e).message || e), attnc_error: e instanceof AttncError};
      }
    });
  }
  if (checks.shapes) {
    out.shapes = checks.shapes.map((/** @type {any} */ c) => {
      try {
        return {ok: true, env: checkShapes(c.dims, specialNumbers(c.shapes))};
      } catch (e) {
        return {error: String(/** @type {any} */ (e).message || e), attnc_error: e instanceof AttncError};
      }
    });
  }
  if (checks.manifests) {
    out.manifests = await Promise.all(checks.manifests.map(async (/** @type {any} */ c) => {
      try {
        await loadManifest(c.manifest, {});
        return {path: c.path, ok: true};
      } catch (e) {
        return {path: c.path, error: String(/** @type {any} */ (e).message || e), attnc_error: e instanceof AttncError,
          problems: manifestProblems(c.manifest).length};
      }
    }));
  }
  if (checks.f16) {
    const values = new Float32Array(await io.bytes(joinPath(casesPath, checks.f16.f32_file)));
    const bits = new Uint16Array(await io.bytes(joinPath(casesPath, checks.f16.bits_file)));
    const mine = f32ToF16(values);
    let toHalf = 0;
    for (let i = 0; i < bits.length; i++) if (mine[i] !== bits[i]) toHalf++;
    let toFloat = 0;
    for (let h = 0; h < 65536; h++) {
      const v = f16BitsToF32(h);
      // Every finite half is exactly an f32; NaNs stay NaNs.
      const back = new Float32Array([v])[0];
      const want = halfToFloatReference(h);
      if (!(Object.is(back, want) || (Number.isNaN(back) && Number.isNaN(want)))) toFloat++;
    }
    out.f16 = {count: bits.length, to_half_mismatches: toHalf, to_float_mismatches: toFloat};
  }
  return out;
}

/** Replace {"$number": "NaN" | "Infinity" | "-Infinity"} by the number. @param {any} x @returns {any} */
function specialNumbers(x) {
  if (Array.isArray(x)) return x.map(specialNumbers);
  if (x && typeof x === 'object') {
    const keys = Object.keys(x);
    if (keys.length === 1 && keys[0] === '$number') return {NaN: NaN, Infinity: Infinity, '-Infinity': -Infinity}[x.$number];
    return Object.fromEntries(keys.map((k) => [k, specialNumbers(x[k])]));
  }
  return x;
}

/** Independent half → float via DataView-free arithmetic on the fields. @param {number} h */
function halfToFloatReference(h) {
  const s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  const mag = e === 31 ? (m ? NaN : Infinity) : e === 0 ? m / 16777216 : (1024 + m) * 2 ** (e - 25);
  return s ? -mag : mag;
}
