#!/usr/bin/env bash
# A/B a lowering change on the GPU machine: the variants of LISTFILE (as gpu_variant_sweep.sh
# takes them) timed with this tree's attnc and with OLDDIR's (e.g. made by
# `mkdir .ab_old && git archive HEAD attnc | tar -x -C .ab_old` before the change; .ab_old/ is
# git-ignored, and carried to the GPU machine by naming it in the run call), alternating
# new and old line by line, for every backend. Writes OUTDIR/{new,old}_<backend>.jsonl.
# Usage (repo root): bash tools/gpu/gpu_ab_sweep.sh LISTFILE OLDDIR OUTDIR
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
list=${1:?usage: bash tools/gpu/gpu_ab_sweep.sh LISTFILE OLDDIR OUTDIR}
old=$(cd "${2:?usage: bash tools/gpu/gpu_ab_sweep.sh LISTFILE OLDDIR OUTDIR}" && pwd)
out=${3:?usage: bash tools/gpu/gpu_ab_sweep.sh LISTFILE OLDDIR OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh
site=${SWEEP_SITE:-/tmp/site}
for backend in ${SWEEP_BACKENDS:-dawn wgpu}; do
  grep -v '^\s*\(#\|$\)' "$list" | while read -r cases variants; do
    for tree in new old; do
      path=$PYTHONPATH
      [ "$tree" = old ] && path="$old:$site"
      # shellcheck disable=SC2086  # the variants are separate words
      PYTHONPATH=$path timeout "${LINE_TIMEOUT:-120}" python3 tools/gpu/gpu_plan_sweep.py "$backend:vulkan" "$cases" \
        $variants --json "$out/${tree}_$backend.jsonl" 2>&1 | grep -v '^Warning' | sed "s/^/$tree /" | cut -c1-400
    done
  done
done
