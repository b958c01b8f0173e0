#!/usr/bin/env bash
# Where decode time goes, per backend (SWEEP_BACKENDS), in one call on the NVIDIA machine:
#   probe   tools/gpu/gpu_decode_probe.py --dtype f16 over CASES x PROBE_VARIANTS (each pass
#           alone, the op, a read-only kernel over the same bytes)      -> OUTDIR/probe_<backend>.jsonl
#   sweep   tools/gpu/gpu_plan_sweep.py --dtype f16 over CASES x SWEEP_VARIANTS (ablations,
#           split counts, lane-group plans)                              -> OUTDIR/sweep_<backend>.jsonl
# nvidia-smi's clocks, power state and draw are logged before and after every step
# (OUTDIR/clocks.csv), so a slow process can be told from a slow GPU state.
# Usage (repo root):  bash tools/gpu/decode_floor.sh OUTDIR
# Knobs: SWEEP_BACKENDS (default "wgpu dawn"), STEPS (default "probe sweep"), CASES,
# PROBE_VARIANTS, SWEEP_VARIANTS, STEP_TIMEOUT (seconds per step and backend, default 150).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: bash tools/gpu/decode_floor.sh OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh
write_env_txt "$out/env.txt"

cases=${CASES:-kv_dec1_h128_t16384,kv_dec1_h128_t32768}
probe_variants=${PROBE_VARIANTS:--}
sweep_variants=${SWEEP_VARIANTS:--}
clocks() {  # one CSV line of the GPU's state, tagged with the step
  echo "$1,$(nvidia-smi --query-gpu=clocks.sm,clocks.mem,pstate,power.draw,temperature.gpu --format=csv,noheader 2>&1 | head -1)" \
    >> "$out/clocks.csv"
}
echo "step,sm_mhz,mem_mhz,pstate,power,temp" > "$out/clocks.csv"
status=0
for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
  log="$out/decode_floor_$backend.log"
  for step in ${STEPS:-probe sweep}; do
    echo "decode_floor: $backend $step" | tee -a "$log" >&2
    case $step in
      # shellcheck disable=SC2086
      probe) cmd=(python3 tools/gpu/gpu_decode_probe.py "$backend:vulkan" "$cases" $probe_variants --dtype f16) ;;
      # shellcheck disable=SC2086
      sweep) cmd=(python3 tools/gpu/gpu_plan_sweep.py "$backend:vulkan" "$cases" $sweep_variants --dtype f16) ;;
      *) echo "decode_floor: unknown step $step" | tee -a "$log" >&2; status=1; continue ;;
    esac
    clocks "$backend-$step-before"
    timeout "${STEP_TIMEOUT:-150}" "${cmd[@]}" 2>&1 | grep -v "artificially reduced" | tee -a "$log" \
      | grep '^{' >> "$out/${step}_$backend.jsonl"
    rc=${PIPESTATUS[0]}
    clocks "$backend-$step-after"
    if [ "$rc" -ne 0 ]; then
      echo "decode_floor: $backend $step exited with $rc" | tee -a "$log" >&2
      status=1
    fi
  done
done
exit $status
