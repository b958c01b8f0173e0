#!/usr/bin/env bash
# A shorter GPU run than gpu_tune_sweep.sh: tune and benchmark only the cases named in CASES
# (default: every seeds case), both backends, into OUTDIR. Usage: bash tools/gpu/gpu_quick.sh OUTDIR
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/gpu_quick.sh OUTDIR}
mkdir -p "$out/cache"
export ATTNC_CACHE_DIR="$out/cache"
source tools/gpu/gpu_env.sh
cases=()
for c in ${CASES:-}; do cases+=(--case "$c"); done
for backend in ${SWEEP_BACKENDS:-dawn wgpu}; do
  timeout "${TUNE_TIMEOUT:-150}" python3 -m attnc tune --suite seeds "${cases[@]}" --device "$backend:vulkan" \
    --max "${TUNE_MAX:-30}" --runs 5 --json "$out/tune_$backend.jsonl" 2>&1 | grep -v '^\s*\[' | tail -12
  timeout "${BENCH_TIMEOUT:-150}" python3 -m attnc.bench --suite seeds "${cases[@]}" --device "$backend:vulkan" \
    --compare "${COMPARE:-ort}" --runs 20 --ceilings "${CEILINGS:-large}" --json "$out/$backend.json" 2>&1 | tail -14
done
