#!/usr/bin/env bash
# One gpu_plan_sweep.py command over CASES and VARIANTS (an A/B in one process: interleaved
# rounds), run PROCESSES times per backend, the backends alternating, so that an A/B is seen to
# reproduce across processes. Each process writes OUTDIR/ab_<backend>_<i>.jsonl; everything
# goes to OUTDIR/ab.log too. Set-up as gpu_sweep.sh.
#
# Usage (repo root):  CASES=a,b VARIANTS="- ABL=altcombine" bash tools/gpu/ab_processes.sh OUTDIR
# Knobs: SWEEP_BACKENDS (default "wgpu dawn"), PROCESSES (default 2), DTYPE (default f16),
# STEP_TIMEOUT (seconds per process, default 150); ALT_COMBINE (a file, for ABL=altcombine).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: CASES=... VARIANTS=... bash tools/gpu/ab_processes.sh OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh

write_env_txt "$out/env.txt"
{ echo "CASES=${CASES:?set CASES}"; echo "VARIANTS=${VARIANTS:?set VARIANTS}"; echo "DTYPE=${DTYPE:-f16}"
  echo "ALT_COMBINE=${ALT_COMBINE:-}"; } >> "$out/env.txt"
status=0
for i in $(seq 1 "${PROCESSES:-2}"); do
  for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
    echo "ab_processes: $backend process $i" | tee -a "$out/ab.log" >&2
    # shellcheck disable=SC2086
    timeout "${STEP_TIMEOUT:-150}" python3 tools/gpu/gpu_plan_sweep.py "$backend:vulkan" "$CASES" $VARIANTS \
      --dtype "${DTYPE:-f16}" --json "$out/ab_${backend}_$i.jsonl" 2>&1 | grep -v "artificially reduced" | tee -a "$out/ab.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
      echo "ab_processes: $backend process $i exited with $rc" | tee -a "$out/ab.log" >&2
      status=1
    fi
  done
done
exit $status
