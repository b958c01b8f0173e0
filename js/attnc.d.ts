// Types for attnc.js: the loader for `attnc compile` output (docs/MANIFEST.md, version 1).
// WebGPU objects are typed loosely (`any`) so that this file needs no @webgpu/types.

export const MANIFEST_FORMAT: 'attnc.manifest';
export const MANIFEST_VERSION: 1;
export const DEFAULT_LIMITS: Readonly<Record<string, number>>;

export class AttncError extends Error {}

export type Dtype = 'f32' | 'f16' | 'i32' | 'u32';
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
export interface ManifestProgram {
  name: string;
  file: string;
  entry_point: string;
  workgroup_size: [number, number, number];
  bindings: ManifestBinding[];
  uniforms: { size: number; fields: ManifestUniformField[] };
  workgroups: string;
  workgroup_storage_bytes: number;
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
 * Load manifest.json (URL/path, or an already parsed object). `fetchText(url)` reads text files
 * (default: fetch); or pass `{file: wgslText}`. Program files resolve relative to the manifest.
 */
export function loadManifest(
  urlOrObject: string | Manifest,
  fetchText?: ((url: string) => Promise<string> | string) | Record<string, string>,
): Promise<Manifest>;

export function variantMismatches(variant: ManifestVariant, features: Iterable<string>, limits?: Record<string, number> | any): string[];
export function selectVariant(manifest: Manifest, opts?: { variant?: VariantSelector; features?: Iterable<string>; limits?: any }): ManifestVariant;
/** requestDevice() descriptor that enables every variant the adapter can run. */
export function deviceDescriptor(adapter: any, manifest: Manifest): { requiredFeatures: string[]; requiredLimits: Record<string, number> };
/** 'tint' (browsers, Dawn) keeps `enable` lines; 'naga' drops `enable subgroups;`. */
export function adaptWgsl(code: string, dialect?: 'tint' | 'naga'): string;

export interface CreateOptions {
  variant?: VariantSelector;
  /** Features to select by (default: device.features). */
  adapterFeatures?: Iterable<string>;
  features?: Iterable<string>;
  /** Limits to select and fold by, over device.limits (e.g. a lower maxComputeWorkgroupsPerDimension). */
  limits?: Record<string, number>;
  dialect?: 'tint' | 'naga';
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
