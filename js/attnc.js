// attnc.js: run `attnc compile` output (manifest.json + .wgsl files) on WebGPU, without attnc.
//
// Dependency-free ES module for browsers and Node (npm `webgpu`). The manifest format is
// docs/MANIFEST.md (format "attnc.manifest", version 1). Usage:
//
//   const attn = await createAttention(device, await loadManifest('kernels/manifest.json'));
//   const {o} = await attn.run({q, k, v}, {B: 1, Hq: 8, Hkv: 2, S: 128, T: 128, D: 64, Dv: 64});
//
// f16 tensors travel as Uint16Array holding IEEE half bits (see f32ToF16 / f16ToF32); u8 and
// bool tensors as Uint8Array (bool: 0 or 1), one byte per element, as the shaders read them.
// An f16 variant's o is f16, written by the kernel, and comes back that way (Node 20 has no
// Float16Array).

export const MANIFEST_FORMAT = 'attnc.manifest';
export const MANIFEST_VERSION = 1;

/** Every error this module throws on purpose. */
export class AttncError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'AttncError';
  }
}

// WebGPU flag values, spelled out so that the module needs no globals (GPUBufferUsage, ...).
const USAGE = {MAP_READ: 0x1, COPY_SRC: 0x4, COPY_DST: 0x8, UNIFORM: 0x40, STORAGE: 0x80};
const STAGE_COMPUTE = 0x4;
const MAP_READ = 0x1;

/** WebGPU's default limits: what a variant gets when `requires.limits` does not name a limit. */
export const DEFAULT_LIMITS = Object.freeze({
  maxComputeWorkgroupStorageSize: 16384,
  maxComputeInvocationsPerWorkgroup: 256,
  maxComputeWorkgroupSizeX: 256,
  maxComputeWorkgroupSizeY: 256,
  maxComputeWorkgroupSizeZ: 64,
  maxComputeWorkgroupsPerDimension: 65535,
  maxStorageBuffersPerShaderStage: 8,
  maxStorageBufferBindingSize: 134217728,
  maxUniformBufferBindingSize: 65536,
  maxBufferSize: 268435456,
  maxBindingsPerBindGroup: 1000,
});

const ELEM_BYTES = {f32: 4, f16: 2, i32: 4, u32: 4, u8: 1, bool: 1};
const ARRAY_TYPES = {f32: Float32Array, f16: Uint16Array, i32: Int32Array, u32: Uint32Array, u8: Uint8Array, bool: Uint8Array,
  q8_0: Uint32Array, q4_0: Uint32Array, int8: Uint32Array};
// Quantized K/V inputs (MANIFEST.md "Quantized K/V tensors"): u32 words, `unit` values of the last
// dim per block (q8_0, q4_0) or row (int8), `words(D)` words per row of D values.
const QUANT = {
  q8_0: {unit: 32, words: (/** @type {number} */ d) => (d / 32) * 9},
  q4_0: {unit: 32, words: (/** @type {number} */ d) => (d / 32) * 5},
  int8: {unit: 4, words: (/** @type {number} */ d) => d / 4 + 1},
};
const TENSOR_DTYPES = [...Object.keys(ELEM_BYTES), ...Object.keys(QUANT)];

// ---------------------------------------------------------------------------------------
// Formulas (MANIFEST.md "Formulas"): a recursive-descent parser, evaluated in float64.
//   expr  := term (('+' | '-') term)*
//   term  := unary (('*' | '/') unary)*
//   unary := ('-' | '+') unary | atom
//   atom  := NUMBER | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'
// ---------------------------------------------------------------------------------------

/** @type {Record<string, [number, (...a: number[]) => number]>} */
const FUNCTIONS = {
  ceil_div: [2, (a, b) => Math.ceil(divide(a, b))],
  floor_div: [2, (a, b) => Math.floor(divide(a, b))],
  min: [2, Math.min],
  max: [2, Math.max],
  sqrt: [1, Math.sqrt],
  rsqrt: [1, (x) => 1 / Math.sqrt(x)],
};

/** @param {number} a @param {number} b */
function divide(a, b) {
  if (b === 0) throw new AttncError('formula: division by zero');
  return a / b;
}

/**
 * @typedef {{t: 'num', v: number} | {t: 'name', name: string} | {t: 'neg', a: Node}
 *   | {t: 'bin', op: string, a: Node, b: Node} | {t: 'call', fn: string, args: Node[]}} Node
 */

const TOKEN = /\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|([-+*/(),]))/y;

/** A parsed formula: `names` it references, `evaluate(env)` → float64. */
export class Formula {
  /** @param {string} source */
  constructor(source) {
    if (typeof source !== 'string') throw new AttncError(`formula must be a string, got ${JSON.stringify(source)}`);
    this.source = source;
    /** @type {Set<string>} */
    this.names = new Set();
    const tokens = [];
    TOKEN.lastIndex = 0;
    let pos = 0;
    while (pos < source.length) {
      if (/^\s*$/.test(source.slice(pos))) break;
      TOKEN.lastIndex = pos;
      const m = TOKEN.exec(source);
      if (!m) throw new AttncError(`formula ${JSON.stringify(source)}: unexpected character at ${pos}`);
      tokens.push(m[1] !== undefined ? {k: 'num', v: m[1]} : m[2] !== undefined ? {k: 'name', v: m[2]} : {k: m[3], v: m[3]});
      pos = TOKEN.lastIndex;
    }
    let i = 0;
    const fail = (/** @type {string} */ what) => {
      throw new AttncError(`formula ${JSON.stringify(source)}: ${what} at token ${i + 1}`);
    };
    const peek = () => (i < tokens.length ? tokens[i].k : 'end');
    const expect = (/** @type {string} */ k) => (peek() === k ? tokens[i++] : fail(`expected '${k}'`));
    /** @returns {Node} */
    const expr = () => {
      let a = term();
      while (peek() === '+' || peek() === '-') a = {t: 'bin', op: tokens[i++].k, a, b: term()};
      return a;
    };
    /** @returns {Node} */
    const term = () => {
      let a = unary();
      while (peek() === '*' || peek() === '/') a = {t: 'bin', op: tokens[i++].k, a, b: unary()};
      return a;
    };
    /** @returns {Node} */
    const unary = () => {
      if (peek() === '-') return i++, {t: 'neg', a: unary()};
      if (peek() === '+') return i++, unary();
      return atom();
    };
    /** @returns {Node} */
    const atom = () => {
      const tok = tokens[i];
      if (peek() === 'num') return i++, {t: 'num', v: Number(tok.v)};
      if (peek() === '(') {
        i++;
        const e = expr();
        expect(')');
        return e;
      }
      if (peek() !== 'name') return fail('expected a number, a name or (');
      i++;
      if (peek() !== '(') {
        this.names.add(tok.v);
        return {t: 'name', name: tok.v};
      }
      const fn = FUNCTIONS[tok.v];
      if (!fn) fail(`unknown function ${tok.v}`);
      i++;
      const args = [expr()];
      while (peek() === ',') i++, args.push(expr());
      expect(')');
      if (args.length !== fn[0]) fail(`${tok.v} takes ${fn[0]} argument(s), got ${args.length}`);
      return {t: 'call', fn: tok.v, args};
    };
    if (tokens.length === 0) fail('empty formula');
    /** @type {Node} */
    this.ast = expr();
    if (i !== tokens.length) fail(`unexpected '${tokens[i].v}'`);
  }

  /** @param {Record<string, number>} env @returns {number} */
  evaluate(env) {
    const ev = (/** @type {Node} */ n) => {
      switch (n.t) {
        case 'num': return n.v;
        case 'name': {
          const v = env[n.name];
          if (typeof v !== 'number') throw new AttncError(`formula ${JSON.stringify(this.source)}: no value for '${n.name}'`);
          return v;
        }
        case 'neg': return -ev(n.a);
        case 'bin': {
          const a = ev(n.a), b = ev(n.b);
          return n.op === '+' ? a + b : n.op === '-' ? a - b : n.op === '*' ? a * b : divide(a, b);
        }
        case 'call': return FUNCTIONS[n.fn][1](...n.args.map(ev));
      }
      throw new AttncError('formula: bad node');
    };
    const v = ev(this.ast);
    if (!Number.isFinite(v)) throw new AttncError(`formula ${JSON.stringify(this.source)} is not finite (${v})`);
    return v;
  }
}

const formulaCache = new Map();
/** Parse (memoised) a manifest formula. @param {string} source @returns {Formula} */
export function parseFormula(source) {
  let f = formulaCache.get(source);
  if (!f) formulaCache.set(source, (f = new Formula(source)));
  return f;
}

/** Evaluate a formula string in `env` (dims, params, grid_total, grid_stride_x). */
export function evaluateFormula(/** @type {string} */ source, /** @type {Record<string, number>} */ env) {
  return parseFormula(source).evaluate(env);
}

/** @param {number} v @param {string} type @param {string} what */
function toScalar(v, type, what) {
  if (type === 'f32') return Math.fround(v);
  if (!Number.isInteger(v)) throw new AttncError(`${what}: ${type} value ${v} is not an integer`);
  if (type === 'u32' && (v < 0 || v > 0xffffffff)) throw new AttncError(`${what}: ${v} out of u32 range`);
  if (type === 'i32' && (v < -0x80000000 || v > 0x7fffffff)) throw new AttncError(`${what}: ${v} out of i32 range`);
  return v;
}

// ---------------------------------------------------------------------------------------
// Manifest validation (docs/MANIFEST.md): every field a runtime reads, with its path.
// ---------------------------------------------------------------------------------------

const IDENT = /^[A-Za-z_][A-Za-z0-9_]*$/;
const GRID_NAMES = ['grid_total', 'grid_stride_x'];
/** The WGSL dialects a program's `dialect_files` names: Tint (browsers, Dawn) and Naga (wgpu-native). */
export const DIALECTS = Object.freeze(['tint', 'naga']);
const MAX_PROBLEMS = 40;

/** A short description of a JSON value for messages. @param {any} x */
function describe(x) {
  if (x === undefined) return 'nothing';
  if (x === null) return 'null';
  if (Array.isArray(x)) return 'an array';
  if (typeof x === 'object') return 'an object';
  if (typeof x === 'string') return JSON.stringify(x.length > 40 ? x.slice(0, 40) + '…' : x);
  if (typeof x === 'number' || typeof x === 'boolean') return String(x);
  if (typeof x === 'bigint') return `${x}n`;
  return `a ${typeof x}`;
}

/** Whether obj has its own key (not one inherited from Object.prototype). @param {object} obj @param {string} key */
const has = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);

/** @param {any} x @returns {x is Record<string, any>} */
const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);
/** @param {any} x */
const isCount = (x) => Number.isInteger(x) && x >= 0;
/** @param {string} file */
const isWgslPath = (file) => typeof file === 'string' && file.endsWith('.wgsl') && !file.startsWith('/')
  && !/^[a-z][a-z0-9+.-]*:/i.test(file) && !file.split('/').includes('..') && !file.includes('\\');

/**
 * Every way `manifest` departs from docs/MANIFEST.md in what a runtime reads, as
 * `path: problem` lines (empty: it can be loaded). Paths look like
 * `manifest.variants[2].programs[0].file`. Keys the format does not define are ignored (a
 * later attnc may add optional ones); kernel.hash is not recomputed.
 * @param {any} manifest @returns {string[]}
 */
export function manifestProblems(manifest) {
  /** @type {string[]} */
  const out = [];
  const bad = (/** @type {string} */ path, /** @type {string} */ what) => { out.push(`${path}: ${what}`); };
  /** The value at obj[key] if present and of the right kind, else undefined (problem recorded). */
  const field = (/** @type {any} */ obj, /** @type {string} */ path, /** @type {string} */ key,
    /** @type {(x: any) => boolean} */ ok, /** @type {string} */ want, optional = false) => {
    const p = `${path}.${key}`;
    if (!has(obj, key) || obj[key] === undefined) {
      if (!optional) bad(p, 'missing');
      return undefined;
    }
    if (!ok(obj[key])) {
      bad(p, `expected ${want}, got ${describe(obj[key])}`);
      return undefined;
    }
    return obj[key];
  };
  const str = (/** @type {any} */ x) => typeof x === 'string';
  const ident = (/** @type {any} */ x) => typeof x === 'string' && IDENT.test(x);
  const oneOf = (/** @type {string[]} */ values) => (/** @type {any} */ x) => values.includes(x);
  const list = (/** @type {any} */ x) => Array.isArray(x);
  const nonEmptyList = (/** @type {any} */ x) => Array.isArray(x) && x.length > 0;
  /** Check a formula field: present (unless optional), parses, names only `names`. */
  const formula = (/** @type {any} */ obj, /** @type {string} */ path, /** @type {string} */ key,
    /** @type {Set<string>} */ names, optional = false) => {
    const src = field(obj, path, key, str, 'a formula string', optional);
    if (src === undefined) return;
    try {
      const f = parseFormula(src);
      const unknown = [...f.names].filter((n) => !names.has(n));
      if (unknown.length) bad(`${path}.${key}`, `formula ${JSON.stringify(src)} uses unknown name(s) ${unknown.join(', ')}`);
    } catch (e) {
      if (!(e instanceof AttncError)) throw e;
      bad(`${path}.${key}`, e.message);
    }
  };
  /** Each element of a list checked by `ok`, with its index in the path. */
  const elements = (/** @type {any[]} */ xs, /** @type {string} */ path, /** @type {(x: any) => boolean} */ ok, /** @type {string} */ want) => {
    xs.forEach((x, i) => { if (!ok(x)) bad(`${path}[${i}]`, `expected ${want}, got ${describe(x)}`); });
  };

  /** A program's fields (a variant's program, or a store kernel: `store`, whose storage bytes
   * are optional and which has one file for both dialects); `names`: what its formulas may
   * use; `tensorNames`: what its storage bindings may be (null: not checked). */
  const program = (/** @type {any} */ p, /** @type {string} */ pp, /** @type {Set<string>} */ withGrid,
    /** @type {Set<string> | null} */ tensorNames, store = false) => {
    const file = field(p, pp, 'file', isWgslPath, 'a relative .wgsl path');
    const df = store ? undefined : field(p, pp, 'dialect_files', isObject, 'an object of files by dialect', true);
    if (df) {
      for (const d of DIALECTS) field(df, `${pp}.dialect_files`, d, isWgslPath, 'a relative .wgsl path');
      if (file !== undefined && isWgslPath(df.tint) && df.tint !== file) bad(`${pp}.dialect_files.tint`, `${describe(df.tint)} is not the program's file ${describe(file)}`);
    }
    field(p, pp, 'entry_point', ident, 'an identifier');
    const wg = field(p, pp, 'workgroup_size', (x) => Array.isArray(x) && x.length === 3, 'a list of 3 sizes');
    if (wg) elements(wg, `${pp}.workgroup_size`, (x) => Number.isInteger(x) && x >= 1, 'a positive integer');
    formula(p, pp, 'workgroups', withGrid);
    field(p, pp, 'workgroup_storage_bytes', isCount, 'a non-negative integer', store);
    field(p, pp, 'in_bounds', (x) => typeof x === 'boolean', 'a boolean', true);
    const bs = field(p, pp, 'bindings', list, 'a list of bindings');
    /** @type {Set<number>} */
    const slots = new Set();
    let uniforms = 0;
    (bs || []).forEach((/** @type {any} */ b, /** @type {number} */ k) => {
      const bp = `${pp}.bindings[${k}]`;
      if (!isObject(b)) return bad(bp, `expected a binding object, got ${describe(b)}`);
      const slot = field(b, bp, 'binding', isCount, 'a non-negative integer');
      if (slot !== undefined) {
        if (slots.has(slot)) bad(`${bp}.binding`, `slot ${slot} is used twice`);
        slots.add(slot);
      }
      const bname = field(b, bp, 'name', str, 'a string');
      const kind = field(b, bp, 'kind', oneOf(['storage', 'uniform']), '"storage" or "uniform"');
      if (kind === 'uniform' && ++uniforms === 2) bad(bp, 'a second uniform binding (a program has one)');
      if (kind === 'storage') {
        field(b, bp, 'access', oneOf(['read', 'read_write']), '"read" or "read_write"');
        if (bname !== undefined && tensorNames && !tensorNames.has(bname)) bad(`${bp}.name`, `${JSON.stringify(bname)} is not a tensor of the ${store ? 'store kernel' : 'variant'}`);
      }
    });
    if (bs && uniforms === 0) bad(`${pp}.bindings`, 'no uniform binding (grid_total and grid_stride_x need one)');
    const u = field(p, pp, 'uniforms', isObject, 'an object');
    if (u) {
      const size = field(u, `${pp}.uniforms`, 'size', (x) => Number.isInteger(x) && x > 0 && x % 16 === 0, 'a positive multiple of 16');
      const fields = field(u, `${pp}.uniforms`, 'fields', list, 'a list of fields');
      /** @type {Map<number, number>} */
      const offsets = new Map();
      (fields || []).forEach((/** @type {any} */ f, /** @type {number} */ k) => {
        const fp = `${pp}.uniforms.fields[${k}]`;
        if (!isObject(f)) return bad(fp, `expected a field object, got ${describe(f)}`);
        field(f, fp, 'name', ident, 'an identifier');
        field(f, fp, 'type', oneOf(['f32', 'u32', 'i32']), '"f32", "u32" or "i32"');
        const off = field(f, fp, 'offset', (x) => isCount(x) && x % 4 === 0, 'a non-negative multiple of 4');
        if (off !== undefined) {
          if (size !== undefined && off + 4 > size) bad(`${fp}.offset`, `${off} + 4 bytes is past the uniform size ${size}`);
          else if (offsets.has(off)) bad(`${fp}.offset`, `${off} is also the offset of fields[${offsets.get(off)}]`);
          offsets.set(off, k);
        }
        formula(f, fp, 'value', withGrid);
      });
      if (fields) {
        for (const g of GRID_NAMES) {
          if (!fields.some((/** @type {any} */ f) => isObject(f) && f.value === g)) bad(`${pp}.uniforms.fields`, `no field whose value is ${g} (the dispatch rule needs it)`);
        }
      }
    }
  };

  if (!isObject(manifest)) return [`manifest: expected the manifest object, got ${describe(manifest)}`];
  const m = 'manifest';
  const format = field(manifest, m, 'format', str, 'a string');
  if (format !== undefined && format !== MANIFEST_FORMAT) bad(`${m}.format`, `${describe(format)}: not an attnc manifest (expected ${JSON.stringify(MANIFEST_FORMAT)})`);
  const version = field(manifest, m, 'version', Number.isInteger, 'an integer');
  if (version !== undefined && version !== MANIFEST_VERSION) bad(`${m}.version`, `${version} is not supported (this loader reads version ${MANIFEST_VERSION})`);
  if (out.length) return out; // not a manifest this loader reads: the rest would only add noise
  field(manifest, m, 'attnc_version', str, 'a string');
  const kernel = field(manifest, m, 'kernel', isObject, 'an object');
  if (kernel) {
    field(kernel, `${m}.kernel`, 'name', ident, 'an identifier');
    field(kernel, `${m}.kernel`, 'hash', (x) => typeof x === 'string' && /^[0-9a-f]{64}$/.test(x), 'a lowercase hex sha256');
    field(kernel, `${m}.kernel`, 'source', str, 'a string');
  }
  /** @type {Set<string>} */
  const dims = new Set();
  const dimList = field(manifest, m, 'dims', nonEmptyList, 'a non-empty list of dim names');
  if (dimList) {
    dimList.forEach((/** @type {any} */ d, /** @type {number} */ i) => {
      if (!ident(d)) bad(`${m}.dims[${i}]`, `expected an identifier, got ${describe(d)}`);
      else if (dims.has(d)) bad(`${m}.dims[${i}]`, `${JSON.stringify(d)} is listed twice`);
      else dims.add(d);
    });
  }
  const variants = field(manifest, m, 'variants', nonEmptyList, 'a non-empty list of variants');
  if (!variants) return out;
  /** @type {Map<string, number>} */
  const variantNames = new Map();
  variants.forEach((/** @type {any} */ v, /** @type {number} */ i) => {
    const vp = `${m}.variants[${i}]`;
    if (!isObject(v)) return bad(vp, `expected a variant object, got ${describe(v)}`);
    const name = field(v, vp, 'name', (x) => typeof x === 'string' && x.length > 0, 'a non-empty string');
    if (name !== undefined) {
      if (variantNames.has(name)) bad(`${vp}.name`, `${JSON.stringify(name)} is also the name of variants[${variantNames.get(name)}]`);
      else variantNames.set(name, i);
    }
    field(v, vp, 'family', oneOf(['portable', 'subgroups']), '"portable" or "subgroups"');
    field(v, vp, 'dtype', oneOf(['f32', 'f16']), '"f32" or "f16"');
    const req = field(v, vp, 'requires', isObject, 'an object');
    if (req) {
      const fs = field(req, `${vp}.requires`, 'features', list, 'a list of feature names');
      if (fs) elements(fs, `${vp}.requires.features`, str, 'a feature name');
      const ls = field(req, `${vp}.requires`, 'limits', isObject, 'an object of limits');
      if (ls) for (const k of Object.keys(ls)) if (!isCount(ls[k])) bad(`${vp}.requires.limits.${k}`, `expected a non-negative integer, got ${describe(ls[k])}`);
    }
    const en = field(v, vp, 'enables', list, 'a list of enable directives');
    if (en) elements(en, `${vp}.enables`, oneOf(['subgroups', 'f16']), '"subgroups" or "f16"');
    field(v, vp, 'tunables', isObject, 'an object');

    /** @type {Map<string, any>} */
    const tensors = new Map();
    /** @type {[string, any][]} */
    const scratch = [];
    const ts = field(v, vp, 'tensors', nonEmptyList, 'a non-empty list of tensors');
    (ts || []).forEach((/** @type {any} */ t, /** @type {number} */ j) => {
      const tp = `${vp}.tensors[${j}]`;
      if (!isObject(t)) return bad(tp, `expected a tensor object, got ${describe(t)}`);
      const tname = field(t, tp, 'name', ident, 'an identifier');
      if (tname !== undefined) {
        if (tensors.has(tname)) bad(`${tp}.name`, `${JSON.stringify(tname)} is listed twice`);
        else tensors.set(tname, t);
      }
      const role = field(t, tp, 'role', oneOf(['input', 'output', 'scratch']), '"input", "output" or "scratch"');
      field(t, tp, 'dtype', oneOf(TENSOR_DTYPES), TENSOR_DTYPES.map((x) => JSON.stringify(x)).join(', '));
      if (role === 'scratch') {
        scratch.push([tp, t]);
      } else if (role !== undefined) {
        const td = field(t, tp, 'dims', list, 'a list of dim names');
        if (td) elements(td, `${tp}.dims`, (d) => dims.has(d), `one of the manifest's dims (${[...dims].join(', ')})`);
        if (has(t, 'row_stride')) { // padded rows: outputs with dims only, a formula over dims
          if (role !== 'output' || !(td && td.length)) bad(`${tp}.row_stride`, 'only an output with dims may have padded rows');
          formula(t, tp, 'row_stride', dims);
        }
      }
      if (role === 'scratch' && has(t, 'row_stride')) bad(`${tp}.row_stride`, 'only an output with dims may have padded rows');
    });
    if (ts && ![...tensors.values()].some((t) => t.role === 'output')) bad(`${vp}.tensors`, 'no output tensor');

    const known = new Set(dims);
    const ps = field(v, vp, 'params', list, 'a list of params');
    (ps || []).forEach((/** @type {any} */ p, /** @type {number} */ j) => {
      const pp = `${vp}.params[${j}]`;
      if (!isObject(p)) return bad(pp, `expected a param object, got ${describe(p)}`);
      const pname = field(p, pp, 'name', ident, 'an identifier');
      field(p, pp, 'type', oneOf(['f32', 'u32', 'i32']), '"f32", "u32" or "i32"');
      formula(p, pp, 'default', known, true); // dims and the params before it
      if (pname !== undefined) {
        if (known.has(pname) || GRID_NAMES.includes(pname) || pname in FUNCTIONS) bad(`${pp}.name`, `${JSON.stringify(pname)} clashes with a dim, a param, a grid name or a function`);
        known.add(pname);
      }
    });
    for (const [tp, t] of scratch) formula(t, tp, 'count', known);
    const withGrid = new Set([...known, ...GRID_NAMES]);

    const progs = field(v, vp, 'programs', nonEmptyList, 'a non-empty list of programs');
    /** @type {Set<string>} */
    const progNames = new Set();
    (progs || []).forEach((/** @type {any} */ p, /** @type {number} */ j) => {
      const pp = `${vp}.programs[${j}]`;
      if (!isObject(p)) return bad(pp, `expected a program object, got ${describe(p)}`);
      const pname = field(p, pp, 'name', ident, 'an identifier');
      if (pname !== undefined) {
        if (progNames.has(pname)) bad(`${pp}.name`, `${JSON.stringify(pname)} is listed twice`);
        progNames.add(pname);
      }
      program(p, pp, withGrid, ts ? new Set(tensors.keys()) : null);
    });
  });
  // store kernels (a quantized K or V): what createKVCache reads of them
  const quantized = variants.some((/** @type {any} */ v) => isObject(v) && Array.isArray(v.tensors)
    && v.tensors.some((/** @type {any} */ t) => isObject(t) && t.dtype in QUANT));
  // (there when an input is quantized: the kernels appending to its cache)
  const stores = field(manifest, m, 'stores', list, 'a list of store kernels', !quantized);
  (stores || []).forEach((/** @type {any} */ st, /** @type {number} */ i) => {
    const sp = `${m}.stores[${i}]`;
    if (!isObject(st)) return bad(sp, `expected a store kernel object, got ${describe(st)}`);
    field(st, sp, 'name', ident, 'an identifier');
    const quant = oneOf(Object.keys(QUANT));
    if (has(st, 'formats')) {
      const fs = field(st, sp, 'formats', isObject, 'an object {k, v} of formats');
      if (fs) for (const n of ['k', 'v']) field(fs, `${sp}.formats`, n, quant, Object.keys(QUANT).map((x) => JSON.stringify(x)).join(', '));
    } else {
      field(st, sp, 'format', quant, Object.keys(QUANT).map((x) => JSON.stringify(x)).join(', '));
    }
    field(st, sp, 'rows', oneOf(['f32', 'f16']), '"f32" or "f16"');
    /** @type {Set<string>} */
    const names = new Set(GRID_NAMES);
    /** @type {Set<string>} */
    const tensorNames = new Set();
    const ts = field(st, sp, 'tensors', nonEmptyList, 'a non-empty list of tensors');
    (ts || []).forEach((/** @type {any} */ t, /** @type {number} */ j) => {
      const tp = `${sp}.tensors[${j}]`;
      if (!isObject(t)) return bad(tp, `expected a tensor object, got ${describe(t)}`);
      const tname = field(t, tp, 'name', ident, 'an identifier');
      if (tname !== undefined) tensorNames.add(tname);
      field(t, tp, 'dtype', oneOf(TENSOR_DTYPES), TENSOR_DTYPES.map((x) => JSON.stringify(x)).join(', '));
      const td = field(t, tp, 'dims', list, 'a list of dim names');
      if (td) {
        elements(td, `${tp}.dims`, ident, 'a dim name');
        for (const d of td) if (ident(d)) names.add(d);
      }
    });
    if (ts) program(st, sp, names, tensorNames, true);  // (its formulas name the tensors' dims)
  });
  return out;
}

/** Throw an AttncError listing the manifest's problems, if any. @param {any} manifest @param {string} [where] */
export function checkManifest(manifest, where = 'manifest') {
  const problems = manifestProblems(manifest);
  if (!problems.length) return;
  const shown = problems.slice(0, MAX_PROBLEMS);
  const more = problems.length > shown.length ? `\n  … and ${problems.length - shown.length} more` : '';
  throw new AttncError(`invalid ${where}:\n  ${shown.join('\n  ')}${more}`);
}

// ---------------------------------------------------------------------------------------
// Shapes and params: the rules attnc's Python API applies (attnc/runtime/api.py).
// ---------------------------------------------------------------------------------------

/**
 * Check a run's shapes against the manifest's `dims`; return them. Every dim is a positive
 * integer (q, k and v must not be empty, as in attnc's Python API), no other name is given,
 * and where the dims include Hq and Hkv, Hq is a multiple of Hkv (so Hkv <= Hq): the
 * kernels read KV head h / (Hq / Hkv) for query head h. The first problem, in `dims` order,
 * is thrown as an AttncError whose message starts with the dim's name.
 * @param {string[]} dims @param {any} shapes @returns {Record<string, number>}
 */
export function checkShapes(dims, shapes) {
  if (!isObject(shapes)) throw new AttncError(`shapes: expected an object of dims (${dims.join(', ')}), got ${describe(shapes)}`);
  /** @type {Record<string, number>} */
  const env = Object.create(null);
  // R: the rows of a variant that packs each KV head's query heads into rows (pack_gqa), Hq/Hkv·S
  const packed = dims.includes('R') && ['Hq', 'Hkv', 'S'].every((d) => dims.includes(d));
  for (const d of dims) {
    if (d === 'R' && packed) continue;  // derived below
    const x = has(shapes, d) ? shapes[d] : undefined;
    if (x === undefined) throw new AttncError(`${d}: missing (the shapes give ${Object.keys(shapes).join(', ') || 'no dims'})`);
    if (typeof x !== 'number' || !Number.isInteger(x)) throw new AttncError(`${d}: expected a positive integer, got ${describe(x)}`);
    if (x < 1) throw new AttncError(`${d}=${x}: expected a positive integer (q, k and v must not be empty)`);
    env[d] = x;
  }
  for (const k of Object.keys(shapes)) {
    if (!dims.includes(k)) throw new AttncError(`${k}: not a dim of this kernel (its dims: ${dims.join(', ')})`);
  }
  if ('Hq' in env && 'Hkv' in env && env.Hq % env.Hkv !== 0) {
    throw new AttncError(`Hq=${env.Hq} query heads is not a multiple of Hkv=${env.Hkv} kv heads`);
  }
  if (packed) {
    const rows = (env.Hq / env.Hkv) * env.S;
    if (has(shapes, 'R') && shapes.R !== rows) {
      throw new AttncError(`R=${describe(shapes.R)}: this variant packs the Hq/Hkv query heads of a KV head into rows, R = (Hq/Hkv)·S = ${rows}; leave R out and it is derived`);
    }
    env.R = rows;
  }
  return env;
}

/**
 * A param's value, checked: a finite number (an integer in range for u32/i32), and for
 * attnc's attention params the rules of its Python API: `softcap` > 0, `window_left` and
 * `window_right` >= 0, `NSPLIT` >= 1.
 * @param {{name: string, type: string}} p @param {any} x @returns {number}
 */
function checkParam(p, x) {
  if (typeof x !== 'number' || !Number.isFinite(x)) throw new AttncError(`param ${p.name}: expected a finite number, got ${describe(x)}`);
  if (p.type === 'f32' && !Number.isFinite(Math.fround(x))) throw new AttncError(`param ${p.name}: ${x} is past f32's range (the kernel reads it as f32)`);
  const v = p.type === 'f32' ? x : toScalar(x, p.type, `param ${p.name}`);
  const min = {softcap: [0, false], window_left: [0, true], window_right: [0, true], NSPLIT: [1, true]}[p.name];
  if (min && (min[1] ? v < min[0] : v <= min[0])) {
    throw new AttncError(`param ${p.name}: ${v} must be ${min[1] ? 'at least' : 'greater than'} ${min[0]}`);
  }
  return v;
}

// ---------------------------------------------------------------------------------------
// f16 <-> f32 (IEEE binary16 bits in a Uint16Array; round to nearest even, like numpy).
// ---------------------------------------------------------------------------------------

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

/** One f32 value → half bits, round to nearest even. @param {number} x */
export function f32ToF16Bits(x) {
  f32buf[0] = x;
  const u = u32buf[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0); // inf / NaN (quiet)
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow → inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow → ±0
    mant |= 0x800000; // subnormal half: shift the implicit 1 in
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && (r & 1))) r += 1;
    return sign | r;
  }
  let r = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (r & 1))) r += 1; // may carry into the exponent: fine
  return sign | r;
}

/** Half bits → f32 value. @param {number} h */
export function f16BitsToF32(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 0x1f) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** Float32Array (or number[]) → Uint16Array of half bits. @param {ArrayLike<number>} a */
export function f32ToF16(a) {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f32ToF16Bits(a[i]);
  return out;
}

/** Uint16Array of half bits → Float32Array. @param {ArrayLike<number>} a */
export function f16ToF32(a) {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f16BitsToF32(a[i]);
  return out;
}

// ---------------------------------------------------------------------------------------
// Loading and variant selection.
// ---------------------------------------------------------------------------------------

const SOURCES = Symbol('attnc.sources');
/** Manifests that passed checkManifest. */
const checked = new WeakSet();

/** checkManifest, once per manifest object (loadManifest's are checked already). @param {any} manifest */
function ensureChecked(manifest) {
  if (manifest !== null && typeof manifest === 'object' && checked.has(manifest)) return;
  checkManifest(manifest);
  checked.add(manifest);
}

/** @param {string} base @param {string} file */
function resolvePath(base, file) {
  if (/^[a-z][a-z0-9+.-]*:/i.test(file) || file.startsWith('/')) return file;
  try {
    const loc = /** @type {any} */ (globalThis).location;
    return new URL(file, new URL(base, loc ? loc.href : undefined)).href;
  } catch {
    const cut = base.lastIndexOf('/');
    return (cut >= 0 ? base.slice(0, cut + 1) : '') + file;
  }
}

/** @param {string} url */
async function defaultFetchText(url) {
  if (typeof fetch !== 'function') throw new AttncError(`no fetch(): pass fetchText to loadManifest to read ${url}`);
  const r = await fetch(url);
  if (!r.ok) throw new AttncError(`fetching ${url}: HTTP ${r.status}`);
  return r.text();
}

/**
 * Load and check a manifest. `urlOrObject` is a URL/path of manifest.json or the parsed
 * object; `fetchText(url)` reads a text file (default: fetch), or pass an object mapping
 * program file names to WGSL text. Program files are resolved relative to the manifest URL.
 * @param {string | object} urlOrObject
 * @param {((url: string) => Promise<string> | string) | Record<string, string>} [fetchText]
 */
export async function loadManifest(urlOrObject, fetchText) {
  const read = typeof fetchText === 'function' ? fetchText
    : fetchText ? (/** @type {string} */ f) => {
      const key = Object.keys(fetchText).find((k) => k === f || f.endsWith('/' + k));
      if (key === undefined) throw new AttncError(`no WGSL text given for ${f}`);
      return fetchText[key];
    } : defaultFetchText;
  let manifest, base = '';
  if (typeof urlOrObject === 'string') {
    base = urlOrObject;
    const text = await read(urlOrObject);
    try {
      manifest = JSON.parse(text);
    } catch (e) {
      throw new AttncError(`${urlOrObject}: not JSON (${/** @type {any} */ (e).message})`);
    }
  } else {
    manifest = urlOrObject;
  }
  checkManifest(manifest, typeof urlOrObject === 'string' ? `manifest ${urlOrObject}` : 'manifest');
  checked.add(manifest);
  Object.defineProperty(manifest, SOURCES, {
    value: (/** @type {string} */ file) => read(base ? resolvePath(base, file) : file),
    enumerable: false,
  });
  return manifest;
}

/** @param {any} features @returns {Set<string>} */
function featureSet(features) {
  if (!features) return new Set();
  return new Set(typeof features === 'string' ? [features] : [...features]);
}

/** @param {any} limits @param {string} name */
function limitOf(limits, name) {
  const v = limits ? limits[name] : undefined;
  return typeof v === 'number' ? v : DEFAULT_LIMITS[/** @type {keyof typeof DEFAULT_LIMITS} */ (name)];
}

/**
 * Why a variant does not fit (empty list: it fits).
 * @param {any} variant @param {Iterable<string>} features @param {any} limits @returns {string[]}
 */
export function variantMismatches(variant, features, limits) {
  const have = featureSet(features);
  const why = [];
  const req = variant.requires || {};
  for (const f of req.features || []) if (!have.has(f)) why.push(`feature ${f} missing`);
  for (const [name, need] of Object.entries(req.limits || {})) {
    const got = limitOf(limits, name);
    if (typeof got !== 'number') why.push(`limit ${name} unknown`);
    else if (name.startsWith('min') ? got > need : got < need) why.push(`limit ${name} ${got}, needs ${need}`);
  }
  return why;
}

/** @param {any} v @param {any} sel */
function matchesSelector(v, sel) {
  if (sel === undefined || sel === null) return true;
  if (typeof sel === 'string') return v.name === sel;
  if (typeof sel === 'function') return !!sel(v);
  return Object.entries(sel).every(([k, want]) => v[k] === want);
}

/**
 * Pick the first variant (manifest order = best first) that matches `selector` (a name, a
 * `{family, dtype, ...}` filter or a predicate) and whose requirements the features/limits meet.
 * @param {any} manifest @param {{variant?: any, features?: Iterable<string>, limits?: any}} [opts]
 */
export function selectVariant(manifest, opts = {}) {
  ensureChecked(manifest);
  const rejected = [];
  for (const v of manifest.variants) {
    if (!matchesSelector(v, opts.variant)) continue;
    const why = variantMismatches(v, opts.features || [], opts.limits);
    if (why.length === 0) return v;
    rejected.push(`${v.name}: ${why.join(', ')}`);
  }
  const sel = opts.variant === undefined ? '' : ` matching ${typeof opts.variant === 'function' ? 'the predicate' : JSON.stringify(opts.variant)}`;
  throw new AttncError(`no variant${sel} fits this device` + (rejected.length ? `:\n  ${rejected.join('\n  ')}` : ''));
}

/**
 * The `requestDevice` descriptor that enables every variant this adapter can run.
 * @param {any} adapter @param {any} manifest @returns {{requiredFeatures: string[], requiredLimits: Record<string, number>}}
 */
export function deviceDescriptor(adapter, manifest) {
  ensureChecked(manifest);
  const features = new Set();
  /** @type {Record<string, number>} */
  const limits = {};
  for (const v of manifest.variants) {
    if (variantMismatches(v, adapter.features, adapter.limits).length) continue;
    for (const f of v.requires?.features || []) features.add(f);
    for (const [k, need] of Object.entries(v.requires?.limits || {})) {
      if (need > limitOf(DEFAULT_LIMITS, k)) limits[k] = Math.max(limits[k] || 0, need);
    }
  }
  return {requiredFeatures: [...features], requiredLimits: limits};
}

/**
 * Prepare a manifest's Tint WGSL (a program's `file`) for a shader compiler: Tint (browsers,
 * Dawn) keeps the `enable` lines; Naga (wgpu-native, Firefox) gets `enable subgroups;`
 * removed. Only for manifests without `dialect_files`, which name each dialect's own file.
 * @param {string} code @param {'tint' | 'naga'} [dialect]
 */
export function adaptWgsl(code, dialect = 'tint') {
  if (dialect === 'naga') return code.replace(/^[ \t]*enable[ \t]+subgroups[ \t]*;[ \t]*\r?\n?/gm, '');
  return code;
}

/**
 * The WGSL file of a manifest program for a compiler's dialect, and whether its text still
 * needs adaptWgsl: the program's `dialect_files[dialect]` where the manifest has them, else
 * its `file` (Tint's; adapted for Naga).
 * @param {any} program @param {'tint' | 'naga'} [dialect] @returns {{file: string, adapt: boolean}}
 */
export function programFile(program, dialect = 'tint') {
  if (!DIALECTS.includes(dialect)) throw new AttncError(`dialect must be one of ${DIALECTS.map((d) => `'${d}'`).join(', ')}, got ${describe(dialect)}`);
  const own = program.dialect_files && program.dialect_files[dialect];
  return own ? {file: own, adapt: false} : {file: program.file, adapt: dialect !== 'tint'};
}

// The subgroup probe of attnc/runtime/devices.py (PROBE_WGSL; a test checks the text is identical).
const SUBGROUP_PROBE_WGSL = String.raw`@group(0) @binding(0) var<storage, read_write> out: array<atomic<u32>>;

// out[0]: the subgroup size; out[1]: bit k set when subgroupShuffleXor(lid, 1 << k) did not
// return lid ^ (1 << k) for some invocation, i.e. local_invocation_index does not map onto
// aligned groups of 2^(k+1) lanes of one subgroup (what the subgroups family relies on).
@compute @workgroup_size(256)
fn main(@builtin(subgroup_size) size: u32, @builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        atomicStore(&out[0], size);
    }
    var bad = 0u;
    bad = bad | select(0u, 1u, 1u < size && subgroupShuffleXor(lid, 1u) != (lid ^ 1u));
    bad = bad | select(0u, 2u, 2u < size && subgroupShuffleXor(lid, 2u) != (lid ^ 2u));
    bad = bad | select(0u, 4u, 4u < size && subgroupShuffleXor(lid, 4u) != (lid ^ 4u));
    bad = bad | select(0u, 8u, 8u < size && subgroupShuffleXor(lid, 8u) != (lid ^ 8u));
    bad = bad | select(0u, 16u, 16u < size && subgroupShuffleXor(lid, 16u) != (lid ^ 16u));
    atomicOr(&out[1], bad);
}
`;
/** @type {WeakMap<any, Promise<number>>} */
const subgroupProbes = new WeakMap();

/**
 * The largest aligned group of consecutive `local_invocation_index` (1, 2, 4 ... 32) that the
 * device's subgroups keep together with lanes in order, found by one probe dispatch (once per
 * device; 0 without `subgroups`). attnc's subgroups variants shuffle within groups of 4, which
 * WebGPU does not promise: `createAttention` takes them only where this is 4 or more, as attnc's
 * Python runtime does. @param {any} device @param {'tint' | 'naga'} [dialect] @returns {Promise<number>}
 */
export function subgroupLanesContiguous(device, dialect = 'tint') {
  let probe = subgroupProbes.get(device);
  if (!probe) {
    probe = runSubgroupProbe(device, dialect);
    subgroupProbes.set(device, probe);
  }
  return probe;
}

/** @param {any} device @param {'tint' | 'naga'} dialect @returns {Promise<number>} */
async function runSubgroupProbe(device, dialect) {
  if (!featureSet(device.features).has('subgroups')) return 0;
  const code = (dialect === 'tint' ? 'enable subgroups;\n\n' : '') + SUBGROUP_PROBE_WGSL;
  const out = device.createBuffer({label: 'attnc.subgroup_probe', size: 8, usage: USAGE.STORAGE | USAGE.COPY_SRC});
  const read = device.createBuffer({label: 'attnc.subgroup_probe.read', size: 8, usage: USAGE.MAP_READ | USAGE.COPY_DST});
  try {
    const module = device.createShaderModule({label: 'attnc.subgroup_probe', code});
    const pipeline = await device.createComputePipelineAsync({label: 'attnc.subgroup_probe', layout: 'auto',
      compute: {module, entryPoint: 'main'}});
    const encoder = device.createCommandEncoder({label: 'attnc.subgroup_probe'});
    const pass = encoder.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, device.createBindGroup({layout: pipeline.getBindGroupLayout(0),
      entries: [{binding: 0, resource: {buffer: out}}]}));
    pass.dispatchWorkgroups(1);
    pass.end();
    encoder.copyBufferToBuffer(out, 0, read, 0, 8);
    device.queue.submit([encoder.finish()]);
    await read.mapAsync(MAP_READ);
    const [size, bad] = new Uint32Array(read.getMappedRange().slice(0));
    read.unmap();
    let lanes = 1;
    while (lanes < Math.min(size, 32) && !(bad & lanes)) lanes *= 2;
    return lanes;
  } catch {
    return 0;  // a device that cannot run the probe does not get the subgroups variants
  } finally {
    out.destroy();
    read.destroy();
  }
}

// ---------------------------------------------------------------------------------------
// Attention objects: pipelines per program, planning, encoding, running.
// ---------------------------------------------------------------------------------------

// A TensorPlan's count is the tensor's elements (the product of its dims; what run() returns
// for an output), width its last dim, rowStride the elements from one row to the next in the
// buffer (width, or the manifest's `row_stride`: an f16 o with an odd last dim has padded
// rows), bytes the buffer's content (rows at rowStride) and size that rounded up to 4.
/**
 * @typedef {{name: string, bytes: number, size: number, count: number, dtype: string, role: string,
 *   width: number, rowStride: number}} TensorPlan
 * @typedef {{program: any, n: number, x: number, y: number, uniform: ArrayBuffer | null}} DispatchPlan
 * @typedef {{env: Record<string, number>, tensors: Record<string, TensorPlan>, dispatches: DispatchPlan[]}} Plan
 */

/**
 * Create an attention runner for `device` from a loaded manifest: picks the variant,
 * compiles its programs and builds the pipelines.
 * @param {any} device GPUDevice
 * @param {any} manifest from loadManifest
 * @param {{variant?: any, adapterFeatures?: Iterable<string>, features?: Iterable<string>, limits?: any,
 *   subgroupLanes?: number, dialect?: 'tint' | 'naga', fetchText?: (file: string) => Promise<string> | string,
 *   label?: string}} [opts]
 */
export async function createAttention(device, manifest, opts = {}) {
  ensureChecked(manifest);
  const dialect = opts.dialect ?? 'tint';
  programFile({file: ''}, dialect); // an unknown dialect is an error before any work
  let features = featureSet(opts.adapterFeatures || opts.features || device.features);
  // Selection uses the device's limits (what was granted), overridden by opts.limits.
  const limits = mergeLimits(device.limits, opts.limits);
  // the subgroups family where the device keeps 4 consecutive invocations in one subgroup
  // (the probe's answer, or opts.subgroupLanes in its place)
  let probed = '';
  if (features.has('subgroups')) {
    const lanes = opts.subgroupLanes ?? await subgroupLanesContiguous(device, dialect);
    if (lanes < 4) {
      features = new Set([...features].filter((f) => f !== 'subgroups'));
      probed = lanes === 0 ? ' (the subgroup probe could not run on this device)'
        : ` (the device has subgroups, but they keep ${lanes} consecutive invocation${lanes === 1 ? '' : 's'} together, and the subgroups variants need 4)`;
    }
  }
  let variant;
  try {
    variant = selectVariant(manifest, {variant: opts.variant, features, limits});
  } catch (e) {
    if (e instanceof AttncError && probed) throw new AttncError(e.message + probed);
    throw e;
  }
  const source = opts.fetchText || manifest[SOURCES];
  if (!source) throw new AttncError('manifest has no file loader: load it with loadManifest() or pass fetchText');
  const tensors = new Map(variant.tensors.map((/** @type {any} */ t) => [t.name, t]));
  const programs = await Promise.all(variant.programs.map(async (/** @type {any} */ p) => {
    const wg = p.workgroup_size;
    const invocations = wg[0] * wg[1] * wg[2];
    if (invocations > limitOf(limits, 'maxComputeInvocationsPerWorkgroup')) throw new AttncError(`${variant.name}/${p.name}: ${invocations} invocations per workgroup exceed the device limit`);
    if ((p.workgroup_storage_bytes || 0) > limitOf(limits, 'maxComputeWorkgroupStorageSize')) throw new AttncError(`${variant.name}/${p.name}: ${p.workgroup_storage_bytes} bytes of workgroup storage exceed the device limit`);
    const {file, adapt} = programFile(p, dialect);
    const text = await source(file);
    const code = adapt ? adaptWgsl(text, dialect) : text;
    const label = `${opts.label || variant.name}/${p.name}`;
    const entries = p.bindings.map((/** @type {any} */ b) => {
      if (b.kind === 'uniform') return {binding: b.binding, visibility: STAGE_COMPUTE, buffer: {type: 'uniform'}};
      if (!tensors.has(b.name)) throw new AttncError(`${label}: binding ${b.binding} names unknown tensor ${b.name}`);
      return {binding: b.binding, visibility: STAGE_COMPUTE, buffer: {type: b.access === 'read' ? 'read-only-storage' : 'storage'}};
    });
    device.pushErrorScope('validation');
    const module = device.createShaderModule({label, code});
    const layout = device.createBindGroupLayout({label, entries});
    const scoped = device.popErrorScope();
    let pipeline;
    try {
      pipeline = await device.createComputePipelineAsync({
        label, layout: device.createPipelineLayout({label, bindGroupLayouts: [layout]}),
        compute: {module, entryPoint: p.entry_point},
      });
    } catch (e) {
      const lost = device.lost && await Promise.race([device.lost, Promise.resolve(null)]);
      const why = lost ? `the device was lost (${lost.reason}: ${lost.message})` : /** @type {any} */ (e).message;
      throw new AttncError(`${label}: pipeline creation failed: ${await compileMessages(module) || why}`);
    }
    const err = await scoped;
    if (err) throw new AttncError(`${label}: ${err.message}`);
    return {program: p, pipeline, layout, uniform: p.bindings.find((/** @type {any} */ b) => b.kind === 'uniform')};
  }));
  return new Attention(device, manifest, variant, programs, limits);
}

/** The compiler's messages for a module, or '' (also where they cannot be read: a lost device must
 * not hide the error that asked for them). @param {any} module */
async function compileMessages(module) {
  if (!module.getCompilationInfo) return '';
  try {
    const info = await module.getCompilationInfo();
    return info.messages.map((/** @type {any} */ m) => `${m.type} ${m.lineNum}:${m.linePos} ${m.message}`).join('\n');
  } catch {
    return '';
  }
}

/** @param {any} deviceLimits @param {any} overrides */
function mergeLimits(deviceLimits, overrides) {
  /** @type {Record<string, number>} */
  const out = {};
  for (const k of Object.keys(DEFAULT_LIMITS)) out[k] = limitOf(deviceLimits, k);
  if (deviceLimits) for (const k in deviceLimits) if (typeof deviceLimits[k] === 'number') out[k] = deviceLimits[k];
  return Object.assign(out, overrides || {});
}

/**
 * A tensor's rows in its buffer: [width, rowStride] (rowStride = the manifest's `row_stride`
 * formula, else width). @param {any} t @param {Record<string, number>} env @returns {[number, number]}
 */
function rowLayout(t, env) {
  if (!t.dims || t.dims.length === 0) return [1, 1];
  const width = env[t.dims[t.dims.length - 1]];
  if (t.row_stride === undefined) return [width, width];
  if (t.role !== 'output') throw new AttncError(`${t.name}: only outputs may have a row_stride (it is ${t.role})`);
  const stride = toScalar(evaluateFormula(t.row_stride, env), 'u32', `${t.name}.row_stride`);
  if (stride < width) throw new AttncError(`${t.name}: row_stride ${stride} is less than its last dim ${width}`);
  return [width, stride];
}

/** The product of a tensor's dims. @param {any} t @param {Record<string, number>} env */
function elementCount(t, env) {
  if (t.dims) {
    return t.dims.reduce((/** @type {number} */ n, /** @type {string} */ d) => {
      const v = env[d];
      if (typeof v !== 'number') throw new AttncError(`missing shape ${d} (needed by ${t.name})`);
      return n * v;
    }, 1);
  }
  return toScalar(evaluateFormula(t.count, env), 'u32', `${t.name}.count`);
}

export class Attention {
  /** @param {any} device @param {any} manifest @param {any} variant @param {any[]} programs @param {Record<string, number>} limits */
  constructor(device, manifest, variant, programs, limits) {
    this.device = device;
    this.manifest = manifest;
    /** The chosen variant (its manifest entry). */
    this.variant = variant;
    this.programs = programs;
    this.limits = limits;
    this.inputs = variant.tensors.filter((/** @type {any} */ t) => t.role === 'input');
    this.outputs = variant.tensors.filter((/** @type {any} */ t) => t.role === 'output');
  }

  /**
   * Evaluate everything that depends on shapes and params: tensor sizes, dispatch grids
   * (folded by maxComputeWorkgroupsPerDimension) and uniform block contents.
   * @param {Record<string, number>} shapes @param {Record<string, number>} [params] @returns {Plan}
   */
  plan(shapes, params = {}) {
    const v = this.variant;
    const env = checkShapes(this.manifest.dims, shapes);
    if (params === null || params === undefined) params = {};
    if (!isObject(params)) throw new AttncError(`params: expected an object of param values, got ${describe(params)}`);
    const known = new Set((v.params || []).map((/** @type {any} */ p) => p.name));
    for (const k of Object.keys(params)) if (!known.has(k)) throw new AttncError(`unknown param ${k} (variant ${v.name} has: ${[...known].join(', ') || 'none'})`);
    for (const p of v.params || []) {
      const given = has(params, p.name) ? params[p.name] : undefined;
      if ((given === undefined || given === null) && (p.default === undefined || p.default === null)) {
        throw new AttncError(`param ${p.name} (${p.type}) has no default: pass it (variant ${v.name})`);
      }
      let value = given;
      if (given === undefined || given === null) {
        try {
          value = evaluateFormula(p.default, env);
        } catch (e) {
          throw new AttncError(`param ${p.name}: its default ${JSON.stringify(p.default)}: ${/** @type {any} */ (e).message}`);
        }
      }
      env[p.name] = checkParam(p, value);
    }
    /** @type {Record<string, TensorPlan>} */
    const tensors = {};
    const maxBinding = limitOf(this.limits, 'maxStorageBufferBindingSize');
    for (const t of v.tensors) {
      let count = elementCount(t, env);
      const [width, rowStride] = t.dims ? rowLayout(t, env) : [count, count];
      let stored = width === rowStride ? count : (width ? count / width : 0) * rowStride;
      let elem = ELEM_BYTES[/** @type {keyof typeof ELEM_BYTES} */ (t.dtype)];
      const qf = QUANT[/** @type {keyof typeof QUANT} */ (t.dtype)];
      if (qf) {  // a quantized tensor: count its u32 words
        const d = env[t.dims[t.dims.length - 1]];
        if (d % qf.unit) {
          throw new AttncError(`${t.name}: head dim ${d} cannot be stored as ${t.dtype}: it must be a multiple of ${qf.unit} (pad it with zeros to ${Math.ceil(d / qf.unit) * qf.unit})`);
        }
        count = stored = (count / d) * qf.words(d);
        elem = 4;
      }
      const bytes = stored * elem;
      const size = Math.max(4, Math.ceil(bytes / 4) * 4);
      if (size > maxBinding) throw new AttncError(`${t.name}: ${size} bytes exceed maxStorageBufferBindingSize ${maxBinding}`);
      tensors[t.name] = {name: t.name, role: t.role, dtype: t.dtype, count, bytes, size, width, rowStride};
    }
    const maxDim = this.limits.maxComputeWorkgroupsPerDimension;
    const dispatches = this.programs.map(({program, uniform}) => {
      const n = toScalar(evaluateFormula(program.workgroups, env), 'u32', `${program.name}.workgroups`);
      const x = Math.max(1, Math.min(n, maxDim));
      const y = Math.ceil(n / x);
      if (y > maxDim) throw new AttncError(`${program.name}: ${n} workgroups do not fit a ${maxDim}x${maxDim} grid`);
      let data = null;
      if (uniform) {
        const u = program.uniforms;
        data = new ArrayBuffer(Math.ceil(Math.max(u.size, 16) / 16) * 16);
        const view = new DataView(data);
        const penv = {...env, grid_total: n, grid_stride_x: x};
        for (const f of u.fields) {
          const val = toScalar(evaluateFormula(f.value, penv), f.type, `${program.name}.uniforms.${f.name}`);
          if (f.type === 'f32') view.setFloat32(f.offset, val, true);
          else if (f.type === 'i32') view.setInt32(f.offset, val, true);
          else view.setUint32(f.offset, val, true);
        }
      }
      return {program, n, x, y, uniform: data};
    });
    return {env, tensors, dispatches};
  }

  /**
   * Record the programs into `encoder` (one compute pass, programs in manifest order).
   * `buffers` maps every tensor name (inputs, outputs, scratch) to a GPUBuffer of at least
   * plan.tensors[name].size bytes. Returns the uniform buffers it created (destroy them
   * once the work is done).
   * @param {any} encoder GPUCommandEncoder @param {Record<string, any>} buffers @param {Plan} plan
   */
  encode(encoder, buffers, plan) {
    if (!isObject(plan) || !Array.isArray(plan.dispatches) || plan.dispatches.length !== this.programs.length || !isObject(plan.tensors)) {
      throw new AttncError(`plan: expected what attn.plan(shapes, params) returned for variant ${this.variant.name}`);
    }
    if (!isObject(buffers)) throw new AttncError(`buffers: expected an object of GPUBuffers by tensor name, got ${describe(buffers)}`);
    for (const t of this.variant.tensors) {
      const buf = buffers[t.name], tp = plan.tensors[t.name];
      if (!tp) throw new AttncError(`plan: no tensor ${t.name}: pass what attn.plan(shapes, params) returned for variant ${this.variant.name}`);
      if (buf === undefined || buf === null) throw new AttncError(`no buffer for tensor ${t.name}`);
      if (!isGpuBuffer(buf)) throw new AttncError(`buffer ${t.name}: expected a GPUBuffer, got ${describe(buf)}`);
      if (buf.size < tp.bytes) throw new AttncError(`buffer ${t.name}: ${buf.size} bytes, the shapes need ${tp.bytes}`);
    }
    const created = [];
    const pass = encoder.beginComputePass({label: this.variant.name});
    this.programs.forEach(({program, pipeline, layout, uniform}, i) => {
      const d = plan.dispatches[i];
      if (d.n === 0) return;
      const entries = [];
      for (const b of program.bindings) {
        if (b.kind === 'uniform') {
          const ub = this.device.createBuffer({label: `${program.name}.${b.name}`, size: /** @type {ArrayBuffer} */ (d.uniform).byteLength, usage: USAGE.UNIFORM | USAGE.COPY_DST, mappedAtCreation: true});
          new Uint8Array(ub.getMappedRange()).set(new Uint8Array(/** @type {ArrayBuffer} */ (d.uniform)));
          ub.unmap();
          created.push(ub);
          entries.push({binding: b.binding, resource: {buffer: ub}});
        } else {
          const buf = buffers[b.name];
          if (!buf) throw new AttncError(`no buffer for tensor ${b.name}`);
          entries.push({binding: b.binding, resource: {buffer: buf}});
        }
      }
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, this.device.createBindGroup({label: program.name, layout, entries}));
      pass.dispatchWorkgroups(d.x, d.y, 1);
    });
    pass.end();
    return created;
  }

  /**
   * Run the variant: uploads inputs (typed arrays; f16 tensors as Uint16Array half bits or
   * Float32Array, converted; or GPUBuffers, used as they are), dispatches every program and
   * returns the outputs as dense typed arrays, f16 ones as Uint16Array half bits (rows a
   * manifest `row_stride` pads are stripped; `{output: 'buffer'}`: the GPUBuffers as written,
   * rows at plan.tensors[name].rowStride, owned by the caller).
   * @param {Record<string, any>} inputs @param {Record<string, number>} shapes @param {Record<string, number>} [params]
   * @param {{output?: 'array' | 'buffer'}} [opts]
   * @returns {Promise<Record<string, any>>}
   */
  async run(inputs, shapes, params = {}, opts = {}) {
    const device = this.device;
    const plan = this.plan(shapes, params);
    if (!isObject(inputs)) throw new AttncError(`inputs: expected an object of arrays or GPUBuffers by tensor name, got ${describe(inputs)}`);
    if (!isObject(opts)) throw new AttncError(`opts: expected an object such as {output: 'buffer'}, got ${describe(opts)}`);
    if (![undefined, 'array', 'buffer'].includes(opts.output)) throw new AttncError(`opts.output: expected 'array' or 'buffer', got ${describe(opts.output)}`);
    /** @type {Record<string, any>} */
    const buffers = {};
    const temporary = [];
    for (const k of Object.keys(inputs)) if (!this.inputs.some((/** @type {any} */ t) => t.name === k)) throw new AttncError(`unknown input ${k} (variant ${this.variant.name} takes ${this.inputs.map((/** @type {any} */ t) => t.name).join(', ')})`);
    // every input checked before any buffer is created (a refusal leaves nothing behind)
    /** @type {Record<string, any>} */
    const given = {};
    for (const t of this.inputs) {
      const tp = plan.tensors[t.name];
      const data = inputs[t.name];
      if (data === undefined || data === null) throw new AttncError(`missing input ${t.name}`);
      if (isGpuBuffer(data)) {
        if (data.size < tp.bytes) throw new AttncError(`input ${t.name}: buffer has ${data.size} bytes, needs ${tp.bytes}`);
        if (typeof data.usage === 'number' && !(data.usage & USAGE.STORAGE)) throw new AttncError(`input ${t.name}: the GPUBuffer lacks STORAGE usage`);
        given[t.name] = data;
        continue;
      }
      const arr = toTypedArray(data, t.dtype, t.name);
      const shape = t.dims.map((/** @type {string} */ d) => `${d}=${plan.env[d]}`).join(', ');
      const unit = t.dtype in QUANT ? `${t.dtype} words` : 'elements';
      if (arr.length !== tp.count) throw new AttncError(`input ${t.name}: ${arr.length} ${unit}, shape [${shape}] needs ${tp.count}`);
      if (t.name === 'kv_lens') checkKvLens(arr, plan.env);
      given[t.name] = arr;
    }
    if (ArrayBuffer.isView(given.block_table)) checkBlockTable(given.block_table, given.kv_lens, plan.env);
    for (const t of this.variant.tensors) {
      const tp = plan.tensors[t.name];
      if (t.role === 'input') {
        const data = given[t.name];
        if (isGpuBuffer(data)) {
          buffers[t.name] = data;
          continue;
        }
        const buf = device.createBuffer({label: t.name, size: tp.size, usage: USAGE.STORAGE | USAGE.COPY_DST, mappedAtCreation: true});
        new Uint8Array(buf.getMappedRange()).set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
        buf.unmap();
        buffers[t.name] = buf;
        temporary.push(buf);
      } else {
        const buf = device.createBuffer({label: t.name, size: tp.size, usage: USAGE.STORAGE | USAGE.COPY_SRC | USAGE.COPY_DST});
        buffers[t.name] = buf;
        if (t.role === 'scratch') temporary.push(buf);
      }
    }
    // what WebGPU rejects (a destroyed buffer, a binding the shader does not match) is an error,
    // not a result of zeros: the commands run inside an error scope
    device.pushErrorScope('validation');
    let encoder;
    try {
      encoder = device.createCommandEncoder({label: this.variant.name});
      temporary.push(...this.encode(encoder, buffers, plan));
    } catch (e) {
      await device.popErrorScope();
      for (const b of temporary) b.destroy();
      throw e;
    }
    /** @type {Record<string, any>} */
    const result = {};
    const staging = [];
    if (opts.output === 'buffer') {
      for (const t of this.outputs) result[t.name] = buffers[t.name];
    } else {
      for (const t of this.outputs) {
        const tp = plan.tensors[t.name];
        const s = device.createBuffer({label: `${t.name}.read`, size: tp.size, usage: USAGE.MAP_READ | USAGE.COPY_DST});
        encoder.copyBufferToBuffer(buffers[t.name], 0, s, 0, tp.size);
        staging.push([t, tp, s]);
        temporary.push(buffers[t.name]);
      }
    }
    device.queue.submit([encoder.finish()]);
    const rejected = await device.popErrorScope();
    if (rejected) {
      for (const [, , s] of staging) s.destroy();
      for (const b of temporary) b.destroy();
      throw new AttncError(`variant ${this.variant.name}: WebGPU rejected the work: ${String(rejected.message || rejected).split('\n')[0]}`);
    }
    await Promise.all(staging.map(async ([t, tp, s]) => {
      await s.mapAsync(MAP_READ);
      const Ctor = ARRAY_TYPES[/** @type {keyof typeof ARRAY_TYPES} */ (t.dtype)];
      result[t.name] = denseRows(new Ctor(s.getMappedRange().slice(0, tp.bytes)), tp);
      s.unmap();
      s.destroy();
    }));
    for (const b of temporary) b.destroy();
    return result;
  }
}

// ---------------------------------------------------------------------------------------
// KV caches: keys and values on the GPU that grow in place (the same store kernels as
// attnc's Python KVCache, attnc/runtime/kvcache.py; tests check the text is identical).
// ---------------------------------------------------------------------------------------

const KV_STORE_WGSL = String.raw`struct Params {
    grid_total: u32, grid_stride_x: u32, B: u32, H: u32, n: u32, D: u32, cap: u32, ragged: u32,
    s0: u32, s1: u32, s2: u32, s3: u32, per: u32,
}

@group(0) @binding(0) var<storage, read> src: array<ELEM>;
@group(0) @binding(1) var<storage, read> lens: array<i32>;
@group(0) @binding(2) var<storage, read> counts: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<ELEM>;
@group(0) @binding(4) var<uniform> P: Params;

fn row_count(b: u32) -> u32 {
    if (P.ragged != 0u) {
        return u32(max(counts[b], 0));
    }
    return P.n;
}

fn src_index(b: u32, h: u32, i: u32, d: u32) -> u32 {
    return b * P.s0 + h * P.s1 + i * P.s2 + d * P.s3;
}
BODY`;
const KV_STORE_F32 = String.raw`
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let g = group * 64u + lid;
    if (group >= P.grid_total || g >= P.B * P.H * P.per) {
        return;
    }
    let bh = g / P.per;
    let b = bh / P.H;
    let h = bh % P.H;
    let i = (g % P.per) / P.D;
    let d = (g % P.per) % P.D;
    if (i >= row_count(b)) {
        return;
    }
    dst[(bh * P.cap + u32(lens[b]) + i) * P.D + d] = src[src_index(b, h, i, d)];
}
`;
const KV_STORE_F16 = String.raw`
fn src_half(b: u32, h: u32, rel: u32) -> f32 {
    let e = src_index(b, h, rel / P.D, rel % P.D);
    let pair = unpack2x16float(src[e >> 1u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let g = group * 64u + lid;
    if (group >= P.grid_total || g >= P.B * P.H * P.per) {
        return;
    }
    let bh = g / P.per;
    let b = bh / P.H;
    let h = bh % P.H;
    let e0 = (bh * P.cap + u32(lens[b])) * P.D;   // the first element written in this block
    let e1 = e0 + row_count(b) * P.D;              // one past the last
    let w = (e0 >> 1u) + g % P.per;
    if (2u * w >= e1) {
        return;
    }
    var pair = unpack2x16float(dst[w]);
    if (2u * w >= e0) {
        pair.x = src_half(b, h, 2u * w - e0);
    }
    if (2u * w + 1u < e1) {
        pair.y = src_half(b, h, 2u * w + 1u - e0);
    }
    dst[w] = pack2x16float(pair);
}
`;
const KV_ADVANCE_WGSL = String.raw`struct Params { grid_total: u32, grid_stride_x: u32, B: u32, n: u32, ragged: u32 }

@group(0) @binding(0) var<storage, read> counts: array<i32>;
@group(0) @binding(1) var<storage, read_write> lens: array<i32>;
@group(0) @binding(2) var<uniform> P: Params;

// lens[b] += count(b), after the store dispatches that read the old lengths
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * P.grid_stride_x;
    let b = group * 64u + lid;
    if (group >= P.grid_total || b >= P.B) {
        return;
    }
    var c = i32(P.n);
    if (P.ragged != 0u) {
        c = counts[b];
    }
    lens[b] = lens[b] + c;
}
`;

/** The u32 fields of a built-in kernel's uniform block, one after another. @param {string[]} names */
const u32Fields = (names) => names.map((name, i) => ({name, offset: 4 * i, type: 'u32'}));
const KV_STORE_FIELDS = u32Fields(['grid_total', 'grid_stride_x', 'B', 'H', 'n', 'D', 'cap', 'ragged', 's0', 's1', 's2', 's3', 'per']);
const KV_ADVANCE_FIELDS = u32Fields(['grid_total', 'grid_stride_x', 'B', 'n', 'ragged']);
/** Bytes of a uniform block of these fields (a multiple of 16). @param {{offset: number}[]} fields */
const uniformBytes = (fields) => Math.ceil((Math.max(...fields.map((f) => f.offset)) + 4) / 16) * 16;
const KV_WORKGROUP = 64;

/** The store kernel's WGSL for a cache of `dtype` ('f32', or 'f16' packed two per u32). @param {'f32' | 'f16'} dtype */
export function kvStoreWgsl(dtype) {
  const half = dtype === 'f16';
  return KV_STORE_WGSL.replaceAll('ELEM', half ? 'u32' : 'f32')
    .replace('BODY', half ? KV_STORE_F16 : KV_STORE_F32);
}

/** @param {any} device @param {string} code @param {string} label */
async function kvPipeline(device, code, label) {
  device.pushErrorScope('validation');
  const module = device.createShaderModule({label, code});
  const scoped = device.popErrorScope();
  let pipeline;
  try {
    pipeline = await device.createComputePipelineAsync({label, layout: 'auto', compute: {module, entryPoint: 'main'}});
  } catch (e) {
    throw new AttncError(`${label}: pipeline creation failed: ${await compileMessages(module) || /** @type {any} */ (e).message}`);
  }
  const err = await scoped;
  if (err) throw new AttncError(`${label}: ${err.message}`);
  return pipeline;
}

/** @param {number} n @param {number} maxDim */
function foldGrid(n, maxDim) {
  const x = Math.max(1, Math.min(n, maxDim));
  const y = Math.ceil(n / x);
  if (y > maxDim) throw new AttncError(`${n} workgroups do not fit a ${maxDim}x${maxDim} grid`);
  return [x, y];
}

/**
 * Create a KV cache on `device`: keys [B, Hkv, capacity, D] and values [B, Hkv, capacity, Dv]
 * in GPU buffers (f32, or f16 packed two per u32 as attnc's kernels read them), each row's
 * length on the host (`lengths`) and in an i32 GPU buffer (`kvLens`) that attention reads as
 * `kv_lens`. Appending past `capacity` throws. f16 caches with an odd head dim get an even
 * capacity (a 32-bit word never spans two sequences).
 * @param {any} device
 * @param {{batch: number, kvHeads: number, capacity: number, headDim: number, valueDim?: number,
 *   dtype?: 'f32' | 'f16', label?: string}} opts
 */
export async function createKVCache(device, opts) {
  const dtype = opts.dtype || 'f32';
  if (dtype !== 'f32' && dtype !== 'f16') throw new AttncError(`dtype must be 'f32' or 'f16', got ${JSON.stringify(dtype)}`);
  const dims = {batch: opts.batch, kvHeads: opts.kvHeads, capacity: opts.capacity, headDim: opts.headDim,
    valueDim: opts.valueDim ?? opts.headDim};
  for (const [k, n] of Object.entries(dims)) {
    if (!Number.isInteger(n) || n < 1) throw new AttncError(`${k} must be a positive integer, got ${n}`);
  }
  const label = opts.label || 'attnc.kv';
  // quantized K / V (kFormat, vFormat: q8_0, q4_0, int8): the manifest's store kernel of that
  // format (compiled with k_dtype / v_dtype), which quantizes f32 rows on the device
  const formats = {k: opts.kFormat ?? null, v: opts.vFormat ?? null};
  /** @type {Record<string, {pipeline: any, entry: any}>} */
  const quantStores = {};
  for (const [name, fmt] of Object.entries(formats)) {
    if (fmt === null) continue;
    const q = QUANT[/** @type {keyof typeof QUANT} */ (fmt)];
    if (!q) throw new AttncError(`${name}Format: unknown KV format ${JSON.stringify(fmt)}; the quantized formats are ${Object.keys(QUANT).join(', ')}`);
    const width = name === 'k' ? dims.headDim : dims.valueDim;
    if (width % q.unit) throw new AttncError(`${name === 'k' ? 'headDim' : 'valueDim'}: head dim ${width} cannot be stored as ${fmt}: the head dim must be a multiple of ${q.unit} (pad it with zeros to ${Math.ceil(width / q.unit) * q.unit})`);
    if (quantStores[fmt]) continue;
    const manifest = opts.manifest;
    if (!manifest || !manifest[SOURCES]) throw new AttncError(`${name}Format: a ${fmt} cache appends with the store kernel of a manifest compiled with ${name}_dtype=${fmt}: pass manifest (from loadManifest)`);
    const entry = (manifest.stores || []).find((/** @type {any} */ e) => e.format === fmt && e.rows === 'f32'
      && !e.tensors.some((/** @type {any} */ t) => t.name === 'table'));  // a contiguous cache: not the paged store
    if (!entry) throw new AttncError(`${name}Format: the manifest has no store kernel for ${fmt} (compile with --set ${name}_dtype=${fmt})`);
    if (!entry.tensors.some((/** @type {any} */ t) => t.name === 'counts')) throw new AttncError(`${name}Format: the manifest's ${fmt} store kernel has no counts binding (an attnc older than ragged quantized appends compiled it): compile it again`);
    quantStores[fmt] = {entry, pipeline: await kvPipeline(device, await manifest[SOURCES](entry.file), `${label}.store.${fmt}`)};
  }
  // K and V both quantized: the manifest's pair kernel appends both in one dispatch, where it has one
  let quantPair = null;
  if (formats.k !== null && formats.v !== null) {
    const entry = (opts.manifest.stores || []).find((/** @type {any} */ e) => e.formats && e.formats.k === formats.k
      && e.formats.v === formats.v && e.rows === 'f32' && !e.tensors.some((/** @type {any} */ t) => t.name === 'table')
      && e.tensors.some((/** @type {any} */ t) => t.name === 'counts'));
    if (entry) quantPair = {entry, pipeline: await kvPipeline(device, await opts.manifest[SOURCES](entry.file), `${label}.store.kv`)};
  }
  const [store, advance] = await Promise.all([
    kvPipeline(device, kvStoreWgsl(dtype), `${label}.store`),
    kvPipeline(device, KV_ADVANCE_WGSL, `${label}.advance`),
  ]);
  return new KVCache(device, {...dims, dtype, formats, quantStores, quantPair}, store, advance);
}

export class KVCache {
  /** @param {any} device @param {any} cfg @param {any} store @param {any} advance */
  constructor(device, cfg, store, advance) {
    this.device = device;
    this.dtype = cfg.dtype;
    this.batch = cfg.batch;
    this.kvHeads = cfg.kvHeads;
    this.headDim = cfg.headDim;
    this.valueDim = cfg.valueDim;
    this.capacity = cfg.capacity + (cfg.dtype === 'f16' && (cfg.headDim % 2 || cfg.valueDim % 2) && cfg.capacity % 2 ? 1 : 0);
    /** Storage of K and V: a quantized format (q8_0, q4_0, int8: u32 words) or null (the cache's dtype). */
    this.formats = cfg.formats || {k: null, v: null};
    this._quantStores = cfg.quantStores || {};
    /** The manifest's kv_store_pair entry and pipeline (K and V quantized), or null. */
    this._quantPair = cfg.quantPair || null;
    const elem = ELEM_BYTES[cfg.dtype];
    const usage = USAGE.STORAGE | USAGE.COPY_SRC | USAGE.COPY_DST;
    const rowsOf = this.batch * this.kvHeads * this.capacity;
    const size = (/** @type {string | null} */ fmt, /** @type {number} */ width) => Math.max(16, fmt
      ? 4 * rowsOf * QUANT[/** @type {keyof typeof QUANT} */ (fmt)].words(width)
      : Math.ceil(rowsOf * width * elem / 4) * 4);
    /** Keys [B, Hkv, capacity, D] (quantized: u32 words). */
    this.k = device.createBuffer({label: 'attnc.kv.k', size: size(this.formats.k, this.headDim), usage});
    /** Values [B, Hkv, capacity, Dv] (quantized: u32 words). */
    this.v = device.createBuffer({label: 'attnc.kv.v', size: size(this.formats.v, this.valueDim), usage});
    /** Each row's length as i32, what attention reads as kv_lens. */
    this.kvLens = device.createBuffer({label: 'attnc.kv.lens', size: Math.max(16, 4 * this.batch), usage});
    this._lengths = new Int32Array(this.batch);
    this._store = store;
    this._advance = advance;
    this._noCounts = device.createBuffer({label: 'attnc.kv.counts', size: Math.max(16, 4 * this.batch), usage});
    /** @type {Map<string, any>} */
    this._counts = new Map();
    /** @type {Map<string, any>} */
    this._uniforms = new Map();
    /** @type {Record<string, any>} */
    this._staging = {};
  }

  /** Each row's number of valid keys (a copy). */
  get lengths() {
    return Int32Array.from(this._lengths);
  }

  /** The tensors attention reads: `{k, v, kv_lens}` (pass them with q to `Attention.run`/`encode`). */
  inputs() {
    return {k: this.k, v: this.v, kv_lens: this.kvLens};
  }

  /** The shapes of attention over the cache (T = capacity): `{B, Hkv, T, D, Dv, ...extra}` (extra: Hq, S). @param {Record<string, number>} extra */
  shapes(extra = {}) {
    return {B: this.batch, Hkv: this.kvHeads, T: this.capacity, D: this.headDim, Dv: this.valueDim, ...extra};
  }

  /** Set every row's valid prefix (e.g. zeros to start over). @param {ArrayLike<number>} lengths */
  setLengths(lengths) {
    if (lengths.length !== this.batch) throw new AttncError(`lengths: expected ${this.batch} values, got ${lengths.length}`);
    for (let b = 0; b < this.batch; b++) {
      if (!Number.isInteger(lengths[b]) || lengths[b] < 0 || lengths[b] > this.capacity) throw new AttncError(`lengths: values must be integers in [0, capacity=${this.capacity}], got ${lengths[b]}`);
    }
    this._lengths = Int32Array.from(lengths);
    this.device.queue.writeBuffer(this.kvLens, 0, this._lengths);
  }

  /** Empty every row. */
  reset() {
    this.setLengths(new Int32Array(this.batch));
  }

  /**
   * Write new keys and values behind each row's valid prefix, in place. kNew [B, Hkv, n, D] and
   * vNew [B, Hkv, n, Dv]: typed arrays (f16: Uint16Array half bits, or Float32Array converted;
   * `rows` gives n) or GPUBuffers holding them (`rows` = n; `strides` = {k: [s0, s1, s2, s3],
   * v: [...]} in elements for other layouts, e.g. [B, n, Hkv, D]). `counts` (B integers in
   * [0, n]) appends only the first counts[b] rows of batch row b. With `encoder` the store is
   * recorded there (GPUBuffer sources only) and the caller submits; otherwise it is submitted.
   * @param {any} kNew @param {any} vNew
   * @param {{rows?: number, counts?: ArrayLike<number>, strides?: {k?: number[], v?: number[]}, encoder?: any}} [opts]
   */
  append(kNew, vNew, opts = {}) {
    const B = this.batch, H = this.kvHeads;
    for (const [name, x] of [['kNew', kNew], ['vNew', vNew]]) {
      if (!isGpuBuffer(x) && !ArrayBuffer.isView(x) && !Array.isArray(x)) throw new AttncError(`${name}: expected a typed array, an array or a GPUBuffer of new rows, got ${describe(x)}`);
    }
    if (!isObject(opts)) throw new AttncError(`opts: expected an object such as {rows, counts, encoder}, got ${describe(opts)}`);
    const n = opts.rows ?? (isGpuBuffer(kNew) ? undefined : kNew.length / (B * H * this.headDim));
    if (!Number.isInteger(n) || n < 0) throw new AttncError(`kNew: cannot tell the number of new rows (pass rows): got ${n}`);
    let rows;
    if (opts.counts) {
      if (opts.counts.length !== B) throw new AttncError(`counts: expected ${B} values (one per batch row), got ${opts.counts.length}`);
      const given = Array.from(opts.counts);
      const bad = given.findIndex((c) => typeof c !== 'number' || !Number.isInteger(c) || c < 0 || c > n);
      if (bad >= 0) throw new AttncError(`counts: values must be integers in [0, n=${n}] (the rows given), got ${describe(given[bad])} at ${bad}`);
      rows = Int32Array.from(given);
    } else {
      rows = new Int32Array(B).fill(n);
    }
    for (let b = 0; b < B; b++) {
      if (this._lengths[b] + rows[b] > this.capacity) throw new AttncError(`append: batch row ${b} holds ${this._lengths[b]} keys; ${rows[b]} more exceed the cache's capacity of ${this.capacity}`);
    }
    if (n === 0 || rows.every((c) => c === 0)) return;
    const k = this._source('kNew', kNew, n, this.headDim, opts.strides?.k, !!opts.encoder, this.formats.k ? 'f32' : this.dtype);
    const v = this._source('vNew', vNew, n, this.valueDim, opts.strides?.v, !!opts.encoder, this.formats.v ? 'f32' : this.dtype);
    const ragged = !!opts.counts && !rows.every((c) => c === n);
    const counts = ragged ? this._countsBuffer(rows) : this._noCounts;
    // the DSL store kernels of a quantized K or V read every row's count (n unless ragged)
    const written = this.formats.k || this.formats.v ? (ragged ? counts : this._countsBuffer(rows)) : null;
    const encoder = opts.encoder || this.device.createCommandEncoder({label: 'attnc.kv.append'});
    this._encodeStore(encoder, [[k, this.k, this.headDim, this.formats.k], [v, this.v, this.valueDim, this.formats.v]], n, ragged, counts, written);
    if (!opts.encoder) this.device.queue.submit([encoder.finish()]);
    for (let b = 0; b < B; b++) this._lengths[b] += rows[b];
  }

  /** Destroy the cache's buffers. */
  destroy() {
    for (const b of [this.k, this.v, this.kvLens, this._noCounts, ...this._counts.values(), ...this._uniforms.values(), ...Object.values(this._staging)]) b.destroy();
  }

  /**
   * Run a loaded attention kernel (compiled with kv_lens) over each row's valid prefix: q [B, Hq,
   * S, D] (typed array or GPUBuffer), shapes `{Hq, S}`; query i of row b sits at position
   * lengths[b] - S + i. Returns what `Attention.run` returns.
   * @param {Attention} attn @param {any} q @param {{Hq: number, S: number}} shapes
   * @param {Record<string, number>} [params] @param {{output?: 'array' | 'buffer'}} [opts]
   */
  attend(attn, q, shapes, params = {}, opts = {}) {
    if (!(attn instanceof Attention)) throw new AttncError(`attn: expected what createAttention returned, got ${describe(attn)}`);
    if (!isObject(shapes)) throw new AttncError(`shapes: expected {Hq, S}, got ${describe(shapes)}`);
    // the cache's own dims (B, Hkv, T = capacity, D, Dv) are not the caller's to change
    const other = Object.keys(shapes).filter((d) => d !== 'Hq' && d !== 'S');
    if (other.length) throw new AttncError(`shapes: ${other.join(', ')} ${other.length > 1 ? 'are' : 'is'} the cache's (B=${this.batch}, Hkv=${this.kvHeads}, T=${this.capacity}, D=${this.headDim}, Dv=${this.valueDim}); pass only Hq and S`);
    if (!attn.inputs.some((/** @type {any} */ t) => t.name === 'kv_lens')) throw new AttncError(`attn: variant ${attn.variant.name} has no kv_lens input, which attention over a cache reads: compile the kernel with --set kv_lens=true`);
    for (const [name, fmt] of [['k', this.formats.k], ['v', this.formats.v]]) {
      const t = attn.inputs.find((/** @type {any} */ x) => x.name === name);
      const stored = fmt || this.dtype;
      if (t && t.dtype !== stored) {
        const option = name === 'k' ? 'kFormat' : 'vFormat';
        // a float K/V takes the variant's storage dtype (attnc compile --dtype), a quantized one its --set
        const fix = stored in QUANT
          ? `compile the kernel with --set ${name}_dtype=${stored}, or make the cache with ${option}: ${JSON.stringify(t.dtype in QUANT ? t.dtype : null)}`
          : t.dtype in QUANT
            ? `make the cache with ${option}: ${JSON.stringify(t.dtype)}`
            : `make the cache with dtype: ${JSON.stringify(t.dtype)}, or load a variant of dtype ${JSON.stringify(stored)}`;
        throw new AttncError(`${name}: the cache stores ${name} as ${stored}, but variant ${attn.variant.name} reads ${t.dtype}: ${fix}`);
      }
    }
    return attn.run({q, ...this.inputs()}, this.shapes(shapes), params, /** @type {any} */ (opts));
  }

  /** @param {Int32Array} rows */
  _countsBuffer(rows) {
    const key = rows.join(',');
    let buf = this._counts.get(key);
    if (buf) {
      this._counts.delete(key);
    } else {
      buf = this.device.createBuffer({label: 'attnc.kv.counts', size: Math.max(16, 4 * rows.length), usage: USAGE.STORAGE | USAGE.COPY_DST});
      this.device.queue.writeBuffer(buf, 0, rows);
      if (this._counts.size >= 16) {
        // dropped, not destroyed: an encoder of the caller's not yet submitted may use it (the
        // garbage collector frees it once no command uses it)
        this._counts.delete(this._counts.keys().next().value);
      }
    }
    this._counts.set(key, buf);
    return buf;
  }

  /** A source as {buffer, strides}: a GPUBuffer in place, a typed array uploaded (only the new rows); `dtype`: the rows' (f32 for a quantized K or V). */
  _source(/** @type {string} */ name, /** @type {any} */ x, /** @type {number} */ n, /** @type {number} */ width,
    /** @type {number[] | undefined} */ strides, /** @type {boolean} */ recorded, /** @type {string} */ dtype = this.dtype) {
    const B = this.batch, H = this.kvHeads;
    const dense = [H * n * width, n * width, width, 1];
    if (isGpuBuffer(x)) {
      if (typeof x.usage === 'number' && !(x.usage & USAGE.STORAGE)) throw new AttncError(`${name}: the GPUBuffer lacks STORAGE usage (the store kernel binds it as storage)`);
      if (strides !== undefined && !(Array.isArray(strides) && strides.length === 4 && strides.every((s) => Number.isInteger(s) && s >= 0))) {
        throw new AttncError(`strides.${name === 'kNew' ? 'k' : 'v'}: expected 4 non-negative integers (element strides of [B, Hkv, n, ${name === 'kNew' ? 'D' : 'Dv'}]), got ${describe(strides)}`);
      }
      const st = strides || dense;
      const last = (B - 1) * st[0] + (H - 1) * st[1] + (n - 1) * st[2] + (width - 1) * st[3] + 1;
      const eb = ELEM_BYTES[/** @type {keyof typeof ELEM_BYTES} */ (dtype)];
      if (x.size < last * eb) throw new AttncError(`${name}: buffer has ${x.size} bytes, the rows need ${last * eb}`);
      return {buffer: x, strides: st};
    }
    if (recorded) throw new AttncError(`${name}: typed arrays cannot be recorded into an encoder (they would be uploaded before it runs); pass a GPUBuffer`);
    const arr = toTypedArray(x, dtype, name);
    if (arr.length !== B * H * n * width) throw new AttncError(`${name}: ${arr.length} elements, [${B}, ${H}, ${n}, ${width}] needs ${B * H * n * width}`);
    const bytes = Math.max(16, Math.ceil(arr.byteLength / 4) * 4);
    let buf = this._staging[name];
    if (!buf || buf.size < bytes) {
      if (buf) buf.destroy();
      buf = this._staging[name] = this.device.createBuffer({label: `attnc.kv.${name}`, size: bytes, usage: USAGE.STORAGE | USAGE.COPY_DST});
    }
    const padded = new Uint8Array(Math.ceil(arr.byteLength / 4) * 4);
    padded.set(new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength));
    this.device.queue.writeBuffer(buf, 0, padded);
    return {buffer: buf, strides: dense};
  }

  /** The one write path: store each [source, destination, width] pair's new rows, then advance the GPU lengths (`written`: every row's count, for the quantized stores). */
  _encodeStore(/** @type {any} */ encoder, /** @type {any[]} */ pairs, /** @type {number} */ n, /** @type {boolean} */ ragged, /** @type {any} */ counts, /** @type {any} */ written) {
    const maxDim = this.device.limits.maxComputeWorkgroupsPerDimension;
    const pass = encoder.beginComputePass({label: 'attnc.kv.append'});
    const B = this.batch, H = this.kvHeads;
    if (this._quantPair && pairs.every(([, , , fmt]) => fmt)) {  // K and V in one dispatch
      this._encodeQuantPairStore(pass, pairs[0][0], pairs[1][0], n, written);
      pairs = [];
    }
    for (const [src, dst, width, fmt] of pairs) {
      if (fmt) {
        this._encodeQuantStore(pass, src, dst, width, fmt, n, written);
        continue;
      }
      const per = this.dtype === 'f32' ? n * width : Math.ceil(n * width / 2) + 1;
      const groups = Math.ceil(B * H * per / KV_WORKGROUP);
      const [x, y] = foldGrid(groups, maxDim);
      const values = {grid_total: groups, grid_stride_x: x, B, H, n, D: width, cap: this.capacity, ragged: ragged ? 1 : 0,
        s0: src.strides[0], s1: src.strides[1], s2: src.strides[2], s3: src.strides[3], per};
      const ub = this._uniform(KV_STORE_FIELDS, values, uniformBytes(KV_STORE_FIELDS));
      pass.setPipeline(this._store);
      pass.setBindGroup(0, this.device.createBindGroup({layout: this._store.getBindGroupLayout(0), entries: [
        {binding: 0, resource: {buffer: src.buffer}}, {binding: 1, resource: {buffer: this.kvLens}},
        {binding: 2, resource: {buffer: counts}}, {binding: 3, resource: {buffer: dst}}, {binding: 4, resource: {buffer: ub}}]}));
      pass.dispatchWorkgroups(x, y, 1);
    }
    const groups = Math.ceil(B / KV_WORKGROUP);
    const [x, y] = foldGrid(groups, maxDim);
    const ub = this._uniform(KV_ADVANCE_FIELDS, {grid_total: groups, grid_stride_x: x, B, n, ragged: ragged ? 1 : 0},
      uniformBytes(KV_ADVANCE_FIELDS));
    pass.setPipeline(this._advance);
    pass.setBindGroup(0, this.device.createBindGroup({layout: this._advance.getBindGroupLayout(0), entries: [
      {binding: 0, resource: {buffer: counts}}, {binding: 1, resource: {buffer: this.kvLens}}, {binding: 2, resource: {buffer: ub}}]}));
    pass.dispatchWorkgroups(x, y, 1);
    pass.end();
  }

  /** The manifest's store kernel writing the first counts[b] of n f32 rows of `src` into the quantized `dst` at each row's GPU length (the rows past the capacity are not written). */
  _encodeQuantStore(/** @type {any} */ pass, /** @type {any} */ src, /** @type {any} */ dst, /** @type {number} */ width, /** @type {string} */ fmt, /** @type {number} */ n, /** @type {any} */ counts) {
    const {entry, pipeline} = this._quantStores[fmt];
    const maxDim = this.device.limits.maxComputeWorkgroupsPerDimension;
    const env = {B: this.batch, H: this.kvHeads, N: n, D: width, C: this.capacity};
    const groups = evaluateFormula(entry.workgroups, env);
    const [x, y] = foldGrid(groups, maxDim);
    /** @type {Record<string, number>} */
    const values = {};
    for (const f of entry.uniforms.fields) {
      const m = /^s_x_(\d)$/.exec(f.name);
      values[f.name] = f.name === 'grid_total' ? groups : f.name === 'grid_stride_x' ? x
        : m ? src.strides[Number(m[1])] : evaluateFormula(f.value, env);
    }
    const ub = this._uniform(entry.uniforms.fields, values, entry.uniforms.size);
    const buffers = /** @type {Record<string, any>} */ ({x: src.buffer, pos: this.kvLens, counts, cache: dst, params: ub});
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, this.device.createBindGroup({layout: pipeline.getBindGroupLayout(0),
      entries: entry.bindings.map((/** @type {any} */ b) => ({binding: b.binding, resource: {buffer: buffers[b.name]}}))}));
    pass.dispatchWorkgroups(x, y, 1);
  }

  /** The manifest's kv_store_pair writing the first counts[b] of n f32 rows of K (`k`) and V (`v`) into the quantized caches at each row's GPU length, in one dispatch. */
  _encodeQuantPairStore(/** @type {any} */ pass, /** @type {any} */ k, /** @type {any} */ v, /** @type {number} */ n, /** @type {any} */ counts) {
    const {entry, pipeline} = this._quantPair;
    const maxDim = this.device.limits.maxComputeWorkgroupsPerDimension;
    const env = {B: this.batch, H: this.kvHeads, N: n, D: this.headDim, DV: this.valueDim, C: this.capacity};
    const groups = evaluateFormula(entry.workgroups, env);
    const [x, y] = foldGrid(groups, maxDim);
    /** @type {Record<string, number>} */
    const values = {};
    for (const f of entry.uniforms.fields) {
      const m = /^s_([kv])_(\d)$/.exec(f.name);  // the rows' strides: the sources' own
      values[f.name] = f.name === 'grid_total' ? groups : f.name === 'grid_stride_x' ? x
        : m ? (m[1] === 'k' ? k : v).strides[Number(m[2])] : evaluateFormula(f.value, env);
    }
    const ub = this._uniform(entry.uniforms.fields, values, entry.uniforms.size);
    const buffers = /** @type {Record<string, any>} */ ({k: k.buffer, v: v.buffer, pos: this.kvLens, counts, k_cache: this.k,
      v_cache: this.v, params: ub});
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, this.device.createBindGroup({layout: pipeline.getBindGroupLayout(0),
      entries: entry.bindings.map((/** @type {any} */ b) => ({binding: b.binding, resource: {buffer: buffers[b.name]}}))}));
    pass.dispatchWorkgroups(x, y, 1);
  }

  /**
   * A uniform buffer of `size` bytes holding each field at its byte offset as its type (the
   * manifest's `uniforms`; the built-in kernels' u32 fields one after another), made once per
   * distinct content (the 64 most recent kept).
   * @param {{name: string, offset: number, type: string}[]} fields @param {Record<string, number>} values @param {number} size
   */
  _uniform(fields, values, size) {
    const data = new DataView(new ArrayBuffer(size));
    for (const f of fields) {
      const x = values[f.name];
      if (f.type === 'f32') data.setFloat32(f.offset, x, true);
      else if (f.type === 'i32') data.setInt32(f.offset, x, true);
      else data.setUint32(f.offset, x, true);
    }
    const bytes = new Uint8Array(data.buffer);
    const key = bytes.join(',');
    let buf = this._uniforms.get(key);
    if (buf) {
      this._uniforms.delete(key);
    } else {
      buf = this.device.createBuffer({label: 'attnc.kv.uniforms', size, usage: USAGE.UNIFORM | USAGE.COPY_DST});
      this.device.queue.writeBuffer(buf, 0, bytes);
      // dropped, not destroyed, past 64 (as the counts buffers)
      if (this._uniforms.size >= 64) this._uniforms.delete(this._uniforms.keys().next().value);
    }
    this._uniforms.set(key, buf);
    return buf;
  }
}

/**
 * An output read back as stored (rows at tp.rowStride) → dense rows of tp.width elements.
 * @param {Float32Array | Uint16Array | Int32Array | Uint32Array} stored @param {TensorPlan} tp
 */
function denseRows(stored, tp) {
  if (tp.rowStride === tp.width) return stored;
  const out = new /** @type {any} */ (stored.constructor)(tp.count);
  for (let r = 0, n = tp.width ? tp.count / tp.width : 0; r < n; r++) {
    out.set(stored.subarray(r * tp.rowStride, r * tp.rowStride + tp.width), r * tp.width);
  }
  return out;
}

/**
 * attnc's kv_lens (valid keys per batch) lie in [0, T] (of kv_total for a chunk of a larger
 * problem), as its Python API requires: more keys than k and v hold would be read past them.
 * @param {ArrayLike<number>} lens @param {Record<string, number>} env
 */
function checkKvLens(lens, env) {
  const total = 'kv_total' in env ? env.kv_total : env.T;
  if (typeof total !== 'number') return;
  for (let i = 0; i < lens.length; i++) {
    if (!(lens[i] >= 0 && lens[i] <= total)) throw new AttncError(`input kv_lens: values must be in [0, ${'kv_total' in env ? 'kv_total' : 'T'}=${total}], got ${lens[i]} at index ${i}`);
  }
}

/**
 * A host block table of a paged variant (k and v [NP, Hkv, P, D], block_table [B, NB]), as
 * attnc's paged_attention checks it: each row's keys (kv_lens[b] from a host kv_lens, T
 * without kv_lens) fit its NB pages, and every entry of the pages it uses is a page of the
 * pool (with kv_lens in a GPUBuffer, the entries of the first ceil(T / P) pages, at most NB).
 * @param {ArrayLike<number>} table @param {any} lens @param {Record<string, number>} env
 */
function checkBlockTable(table, lens, env) {
  const {B, NB, NP, P, T} = env;
  if (![B, NB, NP, P, T].every((n) => typeof n === 'number')) return;
  for (let b = 0; b < B; b++) {
    const keys = ArrayBuffer.isView(lens) ? /** @type {any} */ (lens)[b] : T;
    const pages = isGpuBuffer(lens) ? Math.min(NB, Math.ceil(T / P)) : Math.ceil(keys / P);
    if (pages > NB) throw new AttncError(`input ${ArrayBuffer.isView(lens) ? `kv_lens[${b}] = ${keys}` : `T = ${T}`} needs ${pages} pages of P=${P} keys, but block_table has NB=${NB} entries per row (${NB * P} keys)`);
    for (let j = 0; j < pages; j++) {
      const page = table[b * NB + j];
      if (!(page >= 0 && page < NP)) throw new AttncError(`input block_table[${b}, ${j}] = ${page} is outside the page pool: k and v hold NP=${NP} pages (0..${NP - 1}); row ${b} uses its first ${pages} entries`);
    }
  }
}

/** @param {any} x */
function isGpuBuffer(x) {
  return x && typeof x === 'object' && typeof x.mapAsync === 'function' && typeof x.size === 'number';
}

/** @param {any} data @param {string} dtype @param {string} name */
function toTypedArray(data, dtype, name) {
  const Want = ARRAY_TYPES[/** @type {keyof typeof ARRAY_TYPES} */ (dtype)];
  if (data instanceof Want) return data;
  if (dtype === 'f16' && (data instanceof Float32Array || data instanceof Float64Array || Array.isArray(data))) return f32ToF16(data);
  if (dtype !== 'f16' && Array.isArray(data)) {
    // a plain array is converted only where each value is one of the dtype's (no truncation of 2.5, NaN or '1')
    const integer = dtype === 'i32' || dtype === 'u32';
    const bad = data.findIndex((x) => typeof x !== 'number' || (integer && !Number.isInteger(x)));
    if (bad >= 0) throw new AttncError(`input ${name}: element ${bad} is ${describe(data[bad])}, not ${integer ? 'an integer' : 'a number'} (dtype ${dtype})`);
    return Want.from(data);
  }
  if (dtype === 'f32' && data instanceof Float64Array) return Float32Array.from(data);
  throw new AttncError(`input ${name}: expected ${Want.name} for dtype ${dtype}, got ${data && data.constructor ? data.constructor.name : typeof data}`);
}
