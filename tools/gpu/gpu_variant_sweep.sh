#!/usr/bin/env bash
# Time plan variants side by side on the GPU machine, for every backend, from a list kept in the
# repo: each non-comment line of LISTFILE is `CASE[,CASE...] VARIANT [VARIANT...]` as
# tools/gpu/gpu_plan_sweep.py takes them. Writes OUTDIR/variants_<backend>.jsonl.
# Usage (repo root): bash tools/gpu/gpu_variant_sweep.sh LISTFILE OUTDIR
# Knobs: SWEEP_BACKENDS (default "dawn wgpu"), LINE_TIMEOUT (seconds per line, default 120).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
list=${1:?usage: bash tools/gpu/gpu_variant_sweep.sh LISTFILE OUTDIR}
out=${2:?usage: bash tools/gpu/gpu_variant_sweep.sh LISTFILE OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh
for backend in ${SWEEP_BACKENDS:-dawn wgpu}; do
  grep -v '^\s*\(#\|$\)' "$list" | while read -r cases variants; do
    # shellcheck disable=SC2086  # the variants are separate words
    timeout "${LINE_TIMEOUT:-120}" python3 tools/gpu/gpu_plan_sweep.py "$backend:vulkan" "$cases" $variants \
      --json "$out/variants_$backend.jsonl" 2>&1 | grep -v '^Warning' | cut -c1-400
  done
done
