#!/usr/bin/env bash
# Session 11, first device call: every seeds case under the bounds sanitizer on the H200 (the
# exact plans attention() runs there, unrolled, both compilers), then the plan sweep of
# s11_naga.txt on wgpu-native without Naga's checks, then what Tint's robustness costs on Dawn
# (the same heuristic plans with the device toggle disable_robustness, A/B/A in three processes).
# Usage (repo root, GPU machine): bash scripts/sweeps/s11_run1.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash scripts/sweeps/s11_run1.sh OUTDIR}
mkdir -p "$out"
source scripts/gpu_env.sh
export SWEEP_WARM_MS=${SWEEP_WARM_MS:-300}
for backend in wgpu dawn; do
  echo "s11: sanitizer, $backend" >&2
  ATTNC_SANITIZE=bounds timeout 150 python3 -m attnc.bench --suite seeds --device "$backend:vulkan" \
    --runs 1 --warmup 0 --ceilings off --json "$out/sanitize_$backend.json" 2>&1 | grep -v '^Warning' | tail -14
done
SWEEP_BACKENDS=wgpu LINE_TIMEOUT=90 bash scripts/gpu_variant_sweep.sh scripts/sweeps/s11_naga.txt "$out/naga"
cases=vit_s4096_h64,vision_h72_s5776,phi35_prefill_s501_h96,dec_gqa8_kv7680
for toggles in "" "+disable_robustness" ""; do
  echo "s11: dawn toggles '$toggles'" >&2
  ATTNC_DAWN_TOGGLES=$toggles timeout 90 python3 scripts/gpu_plan_sweep.py dawn:vulkan "$cases" - \
    --json "$out/robust_${toggles:-default}.jsonl" 2>&1 | grep -v '^Warning' | cut -c1-200
done
