#!/usr/bin/env bash
# One device call on the offline NVIDIA machine: autotune attnc on every `seeds` case for
# both backends (wgpu-native and Dawn), then run the benchmark sweep (attnc with the tuned
# choices, ONNX Runtime WebGPU, tinygrad, the naive 3-pass kernel) into OUTDIR.
#   OUTDIR/tune_<backend>.jsonl  every candidate timed, per case
#   OUTDIR/cache/tune.json       the tuned choices (ATTNC_CACHE_DIR)
#   OUTDIR/<backend>.json/.png   the benchmark results (attnc bench)
# Usage: bash tools/gpu/gpu_tune_sweep.sh OUTDIR   (PHASES="tune bench" by default)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/gpu_tune_sweep.sh OUTDIR}
mkdir -p "$out/cache"
export ATTNC_CACHE_DIR="${ATTNC_CACHE_DIR:-$out/cache}"
for phase in ${PHASES:-tune bench}; do
  case $phase in
    tune)
      source tools/gpu/gpu_env.sh
      for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
        timeout "${TUNE_TIMEOUT:-150}" python3 -m attnc tune --suite "${SWEEP_SUITE:-seeds}" --device "$backend:vulkan" \
          --max "${TUNE_MAX:-24}" --runs 5 --json "$out/tune_$backend.jsonl" 2>&1 | grep -v '^\s*\[' | tail -20
      done
      ;;
    bench)
      bash tools/gpu/gpu_sweep.sh "$out" --runs "${BENCH_RUNS:-20}"
      ;;
  esac
done
