#!/usr/bin/env bash
# On the GPU machine: the seeds suite in 3 separate processes per (backend, dtype) with the
# busy-GPU timing (attnc bench --repeat-processes 3; attnc only), then `attnc tune` on f16 for
# the cases named in TUNE_CASES. Usage (repo root): bash tools/gpu/repeat_and_tune.sh OUTDIR
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/repeat_and_tune.sh OUTDIR}
mkdir -p "$out/cache"
source tools/gpu/gpu_env.sh
export ATTNC_CACHE_DIR="$out/cache"
for cfg in ${REPEAT_CONFIGS:-wgpu:vulkan/f32 wgpu:vulkan/f16 dawn:vulkan/f32 dawn:vulkan/f16}; do
  dev=${cfg%/*}; dt=${cfg#*/}
  timeout "${REPEAT_TIMEOUT:-150}" python3 -m attnc.bench --suite seeds --device "$dev" --dtype "$dt" --runs 10 \
    --ceilings off --repeat-processes "${PROCESSES:-3}" --json "$out/repeat_${dev%%:*}_$dt.json" 2>&1 \
    | grep -v '^Warning' | sed -n '/^medians of/,$p'
done
cases=()
for c in ${TUNE_CASES:-}; do cases+=(--case "$c"); done
if [ ${#cases[@]} -gt 0 ]; then
  timeout "${TUNE_TIMEOUT:-200}" python3 -m attnc tune --suite seeds "${cases[@]}" --device wgpu:vulkan --dtype f16 \
    --max "${TUNE_MAX:-16}" --runs 5 --json "$out/tune_f16_wgpu.jsonl" 2>&1 | grep -v '^\s*\[' | grep -v '^Warning' | tail -20
fi
