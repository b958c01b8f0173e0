#!/usr/bin/env bash
# Session 10: what Naga's runtime checks cost on wgpu-native (ATTNC_NAGA_CHECKS: the bounds
# checks and the loop bounding that wgpu-native inserts by default, or none). Each setting runs
# the same variants in its own process, one after the other (not interleaved).
# Usage (repo root, GPU machine): bash scripts/sweeps/s10_naga.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash scripts/sweeps/s10_naga.sh OUTDIR}
mkdir -p "$out"
source scripts/gpu_env.sh
export SWEEP_WARM_MS=${SWEEP_WARM_MS:-300}
for checks in "bounds,loops" bounds none "bounds,loops"; do
  for line in "vision_h72_s5776 - PC=32,VK=16,PF=0,DK=16 PC=32,VK=16,PF=1,DK=16" \
              "vit_s4096_h64,phi35_prefill_s501_h96,dec_gqa8_kv7680,dec4_gqa8_kv7680 -"; do
    # shellcheck disable=SC2086  # the variants are separate words
    ATTNC_NAGA_CHECKS=$checks timeout 150 python3 scripts/gpu_plan_sweep.py wgpu:vulkan $line \
      --json "$out/naga_${checks/,/_}.jsonl" 2>&1 | grep -v '^Warning' | cut -c1-200
  done
done
