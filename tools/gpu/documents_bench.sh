#!/usr/bin/env bash
# Document masks over the block map against dense attention, on the offline NVIDIA machine:
# for each backend (wgpu-native, Dawn) and each number of processes, runs
#   attnc bench --documents 8 --shape 1,16,16,4096,4096,64,64 --repeat-processes 3
# (8 documents of 512 tokens in a 4096-token sequence, Hq = 16, D = 64: the dense run and the
# masked one in the same process; each masked row carries `speedup_vs_attnc`) and writes
# OUTDIR/documents_<backend>.{json,log} plus OUTDIR/env.txt.
# Set-up as tools/gpu/gpu_sweep.sh (.gl/ and .whl/ beside the checkout).
#
# Usage (repo root):  bash tools/gpu/documents_bench.sh OUTDIR [extra attnc bench args...]
# Knobs: SWEEP_BACKENDS (default "wgpu dawn"), SWEEP_TIMEOUT (seconds per backend, default 300).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: bash tools/gpu/documents_bench.sh OUTDIR [extra attnc bench args...]}
shift
mkdir -p "$out"

source tools/gpu/gpu_env.sh

write_env_txt "$out/env.txt"

status=0
for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
  echo "documents_bench: $backend" >&2
  timeout "${SWEEP_TIMEOUT:-300}" python3 -m attnc.bench --documents 8 --shape 1,16,16,4096,4096,64,64 \
    --device "$backend:vulkan" --runs 10 --ceilings off --repeat-processes 3 \
    --json "$out/documents_$backend.json" "$@" 2>&1 | tee "$out/documents_$backend.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
