#!/usr/bin/env bash
# Session 11, second device call: the two plans the heuristic changed after the first call
# (vision_h72 through Naga: p in chunks with the prefetch registers; minilm: 16 copies of the
# P.V key loop) under the bounds sanitizer, then the whole bench on both backends.
# Usage (repo root, GPU machine): bash scripts/sweeps/s11_run2.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash scripts/sweeps/s11_run2.sh OUTDIR}
mkdir -p "$out"
source scripts/gpu_env.sh
ATTNC_SANITIZE=bounds timeout 90 python3 -m attnc.bench --suite seeds --case vision_h72_s5776 \
  --case minilm_s128_h32 --device wgpu:vulkan --runs 1 --warmup 0 --ceilings off \
  --json "$out/sanitize_wgpu.json" 2>&1 | grep -v '^Warning' | tail -4
SWEEP_BACKENDS="dawn wgpu" SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-250} bash scripts/gpu_sweep.sh "$out"
