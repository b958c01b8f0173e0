// Node helper for the JS loader's validation tests (tests/js/test_js_validation.py): answers
// one JSON request per stdin line with one JSON line on stdout, so that a hypothesis test
// can ask js/attnc.js thousands of questions from one process. No GPU: runners are created on
// a recording stand-in device (shader modules are not compiled).
//   {"op": "shapes", "dims": [...], "shapes": {...}}             checkShapes
//   {"op": "manifest", "manifest": {...}}                        loadManifest on the object
//   {"op": "plan", "manifest", "files", "variant", "shapes", "params"}   createAttention + plan
//                                                                (env, workgroups, tensor plans)
//   {"op": "sources", "manifest", "files", "variant", "dialect"} the WGSL createAttention compiles
//   {"op": "kvcache", "manifest", "files", "cache"}              createKVCache (cache: its options
//                                                                but manifest): the store kernels picked
//   {"op": "rejected", "manifest", "files", "variant", "shapes", "params"}   run() on a device whose
//                                                                error scope reports a validation error
//   {"op": "kvcalls", "manifest", "files", "cache", "variant", "calls"}   a KV cache on a device that
//                                                                encodes and submits, then each call:
//                                                                {append: {rows, usage, strides}} with
//                                                                GPUBuffer sources of that usage, or
//                                                                {attend: {shapes}}; answers each call's
//                                                                error (or null) and the host lengths
//   {"op": "run", "manifest", "files", "variant", "shapes", "inputs"}   run() on that device with
//                                                                typed arrays (name -> [dtype, values])
// Every op creating a runner takes "subgroupLanes", what createAttention takes for its subgroup
// probe's answer (default 32: the stand-in devices run no shader).
// Answers: {"ok": true, ...} or {"error": message, "attnc_error": bool, "type": constructor name}.
// Numbers JSON cannot hold travel as {"$number": "NaN" | "Infinity" | "-Infinity"}.
import {createInterface} from 'node:readline';

import {AttncError, checkShapes, createAttention, createKVCache, loadManifest} from '../../js/attnc.js';

const SPECIAL = {NaN: NaN, Infinity: Infinity, '-Infinity': -Infinity};

/** @param {string} _key @param {any} value */
function revive(_key, value) {
  if (value && typeof value === 'object' && !Array.isArray(value) && Object.keys(value).length === 1 && '$number' in value) {
    return SPECIAL[value.$number];
  }
  return value;
}

/** A GPUDevice stand-in that records the WGSL it is given. @param {string[]} codes */
function recordingDevice(codes) {
  return {
    features: new Set(['subgroups', 'shader-f16']),
    limits: {},
    pushErrorScope() {},
    popErrorScope: async () => null,
    createShaderModule: ({code}) => (codes.push(code), {}),
    createBindGroupLayout: () => ({}),
    createPipelineLayout: () => ({}),
    createComputePipelineAsync: async () => ({getBindGroupLayout: () => ({})}),
    createBuffer: () => ({destroy() {}}),
    queue: {writeBuffer() {}},
  };
}

/** A stand-in device on which run() can encode and submit (buffers map, passes record nothing). */
function workingDevice() {
  const pass = {setPipeline() {}, setBindGroup() {}, dispatchWorkgroups() {}, end() {}};
  return {
    ...recordingDevice([]),
    createBuffer: ({size, usage}) => ({size, usage, getMappedRange: () => new ArrayBuffer(size), unmap() {}, destroy() {},
      mapAsync: async () => {}}),
    createBindGroup: () => ({}),
    createCommandEncoder: () => ({beginComputePass: () => pass, copyBufferToBuffer() {}, finish: () => ({})}),
    queue: {writeBuffer() {}, submit() {}},
  };
}

/** createAttention's options for a request: its variant, and the subgroup probe's answer (default
 * 32: the stand-in devices run no shader). @param {any} req @param {any} [extra] */
function runnerOptions(req, extra = {}) {
  return {variant: req.variant, subgroupLanes: req.subgroupLanes ?? 32, ...extra};
}

/** @param {any} req */
async function answer(req) {
  switch (req.op) {
    case 'shapes':
      return {ok: true, env: checkShapes(req.dims, req.shapes)};
    case 'manifest':
      await loadManifest(req.manifest, {});
      return {ok: true};
    case 'plan': {
      const m = await loadManifest(req.manifest, req.files || {});
      const attn = await createAttention(recordingDevice([]), m, runnerOptions(req));
      const plan = attn.plan(req.shapes, req.params);
      return {ok: true, env: plan.env, dispatches: plan.dispatches.map((d) => d.n), tensors: plan.tensors,
        variant: attn.variant.name};
    }
    case 'sources': {
      const codes = [];
      const m = await loadManifest(req.manifest, req.files);
      await createAttention(recordingDevice(codes), m, runnerOptions(req, {dialect: req.dialect}));
      return {ok: true, codes};
    }
    case 'rejected': {
      const m = await loadManifest(req.manifest, req.files || {});
      const device = workingDevice();
      const attn = await createAttention(device, m, runnerOptions(req));
      device.popErrorScope = async () => ({message: "Buffer 'q' is destroyed.\n - While encoding"});
      const plan = attn.plan(req.shapes, req.params);
      const inputs = Object.fromEntries(attn.inputs.map((t) => [t.name, device.createBuffer({size: plan.tensors[t.name].size, usage: 0x80})]));
      await attn.run(inputs, req.shapes, req.params);
      return {ok: true};
    }
    case 'kvcalls': {
      const m = await loadManifest(req.manifest, req.files);
      const device = workingDevice();
      const cache = await createKVCache(device, {...req.cache, manifest: m});
      const attn = await createAttention(device, m, runnerOptions(req));
      const {batch: B, kvHeads: H, headDim: D, valueDim: Dv = D} = req.cache;
      const errors = [];
      for (const call of req.calls) {
        try {
          if (call.append) {
            const {rows, usage, strides} = call.append;
            const source = (/** @type {number} */ width) => device.createBuffer({size: 4 * B * H * rows * width, usage});
            cache.append(source(D), source(Dv), {rows, strides, encoder: device.createCommandEncoder()});
          } else {
            await cache.attend(attn, new Float32Array(B * call.attend.shapes.Hq * call.attend.shapes.S * D), call.attend.shapes);
          }
          errors.push(null);
        } catch (e) {
          errors.push({error: String(/** @type {any} */ (e).message), attnc_error: e instanceof AttncError});
        }
      }
      return {ok: true, errors, lengths: Array.from(cache.lengths)};
    }
    case 'run': {
      const m = await loadManifest(req.manifest, req.files || {});
      const attn = await createAttention(workingDevice(), m, runnerOptions(req));
      const arrays = {Float32Array, Int32Array, Uint32Array};
      const inputs = Object.fromEntries(Object.entries(req.inputs).map(([n, [t, xs]]) => [n, arrays[t].from(xs)]));
      await attn.run(inputs, req.shapes, req.params || {});
      return {ok: true};
    }
    case 'kvcache': {
      const m = await loadManifest(req.manifest, req.files);
      const cache = await createKVCache(recordingDevice([]), {...req.cache, manifest: m});
      return {ok: true, singles: Object.keys(cache._quantStores).sort(), pair: cache._quantPair ? cache._quantPair.entry.file : null};
    }
  }
  throw new Error(`unknown op ${req.op}`);
}

const lines = createInterface({input: process.stdin, crlfDelay: Infinity});
for await (const line of lines) {
  if (!line.trim()) continue;
  let out;
  try {
    out = await answer(JSON.parse(line, revive));
  } catch (e) {
    const err = /** @type {any} */ (e);
    out = {error: String(err && err.message), attnc_error: err instanceof AttncError, type: err && err.constructor ? err.constructor.name : typeof err};
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}
