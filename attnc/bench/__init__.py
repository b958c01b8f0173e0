"""`attnc bench`: GPU-timed attention benchmarks against baselines and measured ceilings.

Modules: `cases` (shapes, FLOP/byte counts, reference), `timing` (timestamp queries),
`ceilings` (FMA and copy microbenchmarks), `naive` (three-pass WGSL baseline), `impls`
(the runners), `baselines` (ONNX Runtime WebGPU, tinygrad) and `cli`. Nothing is imported
eagerly: GPU and baseline packages load only when used.
"""
