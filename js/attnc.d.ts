// Types for attnc.js: the loader for `attnc compile` output (docs/MANIFEST.md, version 1).
// WebGPU objects are typed loosely (`any`) so that this file needs no @webgpu/types.

export const MANIFEST_FORMAT: 'attnc.manifest';
export const MANIFEST_VERSION: 1;
export const DEFAULT_LIMITS: Readonly<Record<string, number>>;

export class AttncError extends Error {}

/** Quantized K/V inputs (q8_0, q4_0, int8) are Uint32Array words (docs/MANIFEST.md). */
export type Dtype = 'f32' | 'f16' | 'i32' | 'u32' | 'q8_0' | 'q4_0' | 'int8';
export type Shapes = Record<string, number>;
export type Params = Record<string, number>;
/**
 * f32 → Float32Array, f16 → Uint16Array (IEEE half bits: an f16 variant's o comes back this
 * way, `f16ToF32` converts), i32 → Int32Array, u32 → Uint32Array.
 */
export type TensorData = Float32Array | Uint16Array | Int32Array | Uint32Array;

export interface ManifestTensor {
  name: string;
  role: 'input' | 'output' | 'scratch';
  dtype: Dtype;
  dims?: string[];
  count?: string;
  /** Outputs only: elements from one row (last dim) to the next in the buffer, a formula (absent: dense). */
  row_stride?: string;
}
/** A runtime scalar; without `default` (e.g. window_left, softcap) the caller must pass it. */
export interface ManifestParam { name: string; type: 'f32' | 'u32' | 'i32'; default?: string }
export interface ManifestBinding { binding: number; name: string; kind: 'storage' | 'uniform'; access?: 'read' | 'read_write' }
export interface ManifestUniformField { name: string; offset: number; type: 'f32' | 'u32' | 'i32'; value: string }
/** A shader compiler's WGSL dialect: Tint (browsers, Dawn) or Naga (wgpu-native, Firefox). */
export type Dialect = 'tint' | 'naga';
export const DIALECTS: readonly Dialect[];
export interface ManifestProgram {
  name: string;
  /** The WGSL in Tint's dialect (the WGSL spec's, with every `enables` directive). */
  file: string;
  /** The file each dialect's compiler takes (`tint` is `file`); absent in older manifests. */
  dialect_files?: Record<Dialect, string>;
  entry_point: string;
  workgroup_size: [number, number, number];
  bindings: ManifestBinding[];
  uniforms: { size: number; fields: ManifestUniformField[] };
  workgroups: string;
  workgroup_storage_bytes: number;
  in_bounds?: boolean;
}
export interface ManifestVariant {
  name: string;
  family: string;
  dtype: 'f32' | 'f16';
  requires: { features: string[]; limits: Record<string, number> };
  enables: string[];
  tunables: Record<string, unknown>;
  tensors: ManifestTensor[];
  params: ManifestParam[];
  programs: ManifestProgram[];
}
export interface Manifest {
  format: 'attnc.manifest';
  version: 1;
  attnc_version: string;
  kernel: { name: string; hash: string; source: string };
  dims: string[];
  variants: ManifestVariant[];
}

/** A variant name, a filter on variant fields (e.g. `{family: 'subgroups', dtype: 'f32'}`) or a predicate. */
export type VariantSelector = string | Partial<Pick<ManifestVariant, 'name' | 'family' | 'dtype'>> | ((v: ManifestVariant) => boolean);

export class Formula {
  constructor(source: string);
  readonly source: string;
  /** Names (dims, params, grid_total, grid_stride_x) the formula reads. */
  readonly names: Set<string>;
  evaluate(env: Record<string, number>): number;
}
export function parseFormula(source: string): Formula;
export function evaluateFormula(source: string, env: Record<string, number>): number;

export function f32ToF16Bits(x: number): number;
export function f16BitsToF32(h: number): number;
export function f32ToF16(a: ArrayLike<number>): Uint16Array;
export function f16ToF32(a: ArrayLike<number>): Float32Array;

/**
 * Every way a manifest departs from docs/MANIFEST.md in what a runtime reads, as
 * `path: problem` lines such as `manifest.variants[2].programs[0].file: missing` (empty: valid).
 */
export function manifestProblems(manifest: unknown): string[];
/** Throw an AttncError listing manifestProblems(manifest), if any. */
export function checkManifest(manifest: unknown, where?: string): void;
/**
 * Check shapes against the manifest's dims: each a positive integer, no other names, and Hq a
 * multiple of Hkv where both are dims (attnc's Python rules). Throws an AttncError whose
 * message starts with the offending dim's name; returns the shapes.
 */
export function checkShapes(dims: string[], shapes: unknown): Shapes;

/**
 * Load manifest.json (URL/path, or an already parsed object) and check it (checkManifest).
 * `fetchText(url)` reads text files (default: fetch); or pass `{file: wgslText}`. Program
 * files resolve relative to the manifest.
 */
export function loadManifest(
  urlOrObject: string | Manifest,
  fetchText?: ((url: string) => Promise<string> | string) | Record<string, string>,
): Promise<Manifest>;

export function variantMismatches(variant: ManifestVariant, features: Iterable<string>, limits?: Record<string, number> | any): string[];
export function selectVariant(manifest: Manifest, opts?: { variant?: VariantSelector; features?: Iterable<string>; limits?: any }): ManifestVariant;
/** requestDevice() descriptor that enables every variant the adapter can run. */
export function deviceDescriptor(adapter: any, manifest: Manifest): { requiredFeatures: string[]; requiredLimits: Record<string, number> };
/** For manifests without `dialect_files`: 'tint' (browsers, Dawn) keeps `enable` lines; 'naga' drops `enable subgroups;`. */
export function adaptWgsl(code: string, dialect?: Dialect): string;
/** A program's file for a dialect (`dialect_files`, else `file`) and whether it needs adaptWgsl. */
export function programFile(program: ManifestProgram, dialect?: Dialect): { file: string; adapt: boolean };
/** The largest aligned group of consecutive invocations the device's subgroups keep together (one probe, cached; 0 without subgroups). */
export function subgroupLanesContiguous(device: any, dialect?: Dialect): Promise<number>;

export interface CreateOptions {
  variant?: VariantSelector;
  /** Features to select by (default: device.features). */
  adapterFeatures?: Iterable<string>;
  features?: Iterable<string>;
  /** Limits to select and fold by, over device.limits (e.g. a lower maxComputeWorkgroupsPerDimension). */
  limits?: Record<string, number>;
  /** What selection takes for subgroupLanesContiguous(device) (default: the probe's answer); subgroups variants need 4. */
  subgroupLanes?: number;
  /** The shader compiler's dialect (default 'tint': browsers, Dawn); 'naga' for wgpu-native. */
  dialect?: Dialect;
  fetchText?: (file: string) => Promise<string> | string;
  label?: string;
}

/**
 * count: the tensor's elements (what run() returns for an output); width: its last dim;
 * rowStride: elements from one row to the next in its buffer (> width for padded rows, e.g. an
 * f16 o with an odd last dim); bytes: the buffer's content; size: bytes rounded up to 4.
 */
export interface TensorPlan {
  name: string; role: string; dtype: Dtype; count: number; bytes: number; size: number; width: number; rowStride: number;
}
export interface DispatchPlan { program: ManifestProgram; n: number; x: number; y: number; uniform: ArrayBuffer | null }
export interface Plan { env: Record<string, number>; tensors: Record<string, TensorPlan>; dispatches: DispatchPlan[] }

export class Attention {
  readonly device: any;
  readonly manifest: Manifest;
  /** The variant chosen for this device. */
  readonly variant: ManifestVariant;
  readonly inputs: ManifestTensor[];
  readonly outputs: ManifestTensor[];
  /** Sizes, folded grids and uniform blocks for these shapes and params. */
  plan(shapes: Shapes, params?: Params): Plan;
  /** Record all programs into `encoder`; `buffers` has a GPUBuffer per tensor. Returns uniform buffers to destroy later. */
  encode(encoder: any, buffers: Record<string, any>, plan: Plan): any[];
  /**
   * Upload, dispatch, read back. Inputs: typed arrays (f16 as Uint16Array, or Float32Array converted)
   * or GPUBuffers. Outputs: dense typed arrays (padded rows stripped; an f16 o as Uint16Array half
   * bits), or with `{output: 'buffer'}` the GPUBuffers as the kernel wrote them (rows at plan.tensors[name].rowStride).
   */
  run(inputs: Record<string, TensorData | Float32Array | any>, shapes: Shapes, params?: Params, opts?: { output?: 'array' }): Promise<Record<string, TensorData>>;
  run(inputs: Record<string, TensorData | Float32Array | any>, shapes: Shapes, params: Params | undefined, opts: { output: 'buffer' }): Promise<Record<string, any>>;
}

export function createAttention(device: any, manifest: Manifest, opts?: CreateOptions): Promise<Attention>;

export interface KVCacheOptions {
  batch: number;
  kvHeads: number;
  /** Rows per sequence; f16 caches with an odd head dim round it up to even. */
  capacity: number;
  headDim: number;
  /** Default: headDim. */
  valueDim?: number;
  dtype?: 'f32' | 'f16';
  /** Keep K / V quantized (u32 words, docs/MANIFEST.md): appends take f32 rows, quantized on the device by the manifest's store kernel of that format. */
  kFormat?: 'q8_0' | 'q4_0' | 'int8' | null;
  vFormat?: 'q8_0' | 'q4_0' | 'int8' | null;
  /** A loaded manifest compiled with k_dtype / v_dtype of those formats (its "stores"); needed with kFormat / vFormat. */
  manifest?: Manifest;
  label?: string;
}

export interface AppendOptions {
  /** New rows n of the sources (needed for GPUBuffer sources). */
  rows?: number;
  /** B integers in [0, n]: batch row b appends its first counts[b] rows. Default: all n. */
  counts?: ArrayLike<number>;
  /** Element strides of GPUBuffer sources (default dense [B, Hkv, n, D]). */
  strides?: { k?: number[]; v?: number[] };
  /** Record into this GPUCommandEncoder (GPUBuffer sources only); the caller submits. */
  encoder?: any;
}

/** Keys [B, Hkv, capacity, D] and values [B, Hkv, capacity, Dv] on the GPU, grown in place. */
export class KVCache {
  /** Storage of K and V: a quantized format (u32 words) or null (the cache's dtype). */
  readonly formats: { k: 'q8_0' | 'q4_0' | 'int8' | null; v: 'q8_0' | 'q4_0' | 'int8' | null };
  readonly device: any;
  readonly dtype: 'f32' | 'f16';
  readonly batch: number;
  readonly kvHeads: number;
  readonly capacity: number;
  readonly headDim: number;
  readonly valueDim: number;
  /** GPUBuffers of the keys, the values and the i32 lengths (kv_lens). */
  readonly k: any;
  readonly v: any;
  readonly kvLens: any;
  /** Each row's number of valid keys (a copy). */
  readonly lengths: Int32Array;
  /** `{k, v, kv_lens}`: pass with q to Attention.run / encode. */
  inputs(): { k: any; v: any; kv_lens: any };
  /** Shapes of attention over the cache: `{B, Hkv, T: capacity, D, Dv, ...extra}`. */
  shapes(extra?: Shapes): Shapes;
  /** Write new rows behind each row's prefix (typed arrays, or GPUBuffers); throws past capacity. */
  append(kNew: TensorData | Float32Array | any, vNew: TensorData | Float32Array | any, opts?: AppendOptions): void;
  setLengths(lengths: ArrayLike<number>): void;
  reset(): void;
  /** Attention (a kernel compiled with kv_lens) of q [B, Hq, S, D] over each row's prefix. */
  attend(attn: Attention, q: TensorData | Float32Array | any, shapes: { Hq: number; S: number }, params?: Params,
    opts?: { output?: 'array' | 'buffer' }): Promise<Record<string, any>>;
  destroy(): void;
}

/** Compile the store kernels and allocate a KV cache on `device`. */
export function createKVCache(device: any, opts: KVCacheOptions): Promise<KVCache>;
/** The WGSL of the KV store kernel for a cache dtype (the same text as attnc's Python KVCache). */
export function kvStoreWgsl(dtype: 'f32' | 'f16'): string;
