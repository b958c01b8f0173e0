#!/usr/bin/env bash
# The run-to-run variance probe on the GPU machine: nvidia-smi logs clocks, power, utilization
# and throttle reasons every 100 ms (also while attnc is idle between processes, which shows
# whether anything else uses the GPU), and tools/gpu/variance_probe.py runs as several
# separate processes per backend and dtype. Writes OUTDIR/probe.jsonl, OUTDIR/smi.csv,
# OUTDIR/smi_q.txt. Usage (repo root): bash tools/gpu/variance_probe.sh OUTDIR
# Knobs: PROBE_ROUNDS, PROBE_CONFIGS (DEVICE/DTYPE[/DAWN_TOGGLES] each), PROBE_CASES (comma list;
# default the probe's own), PROBE_TIMEOUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/variance_probe.sh OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh
nvidia-smi -q > "$out/smi_q.txt" 2>&1
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$out/smi_apps.txt" 2>&1
nvidia-smi --query-gpu=timestamp,pstate,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu,utilization.memory,clocks_throttle_reasons.active,memory.used \
  --format=csv -lms 100 > "$out/smi.csv" 2>&1 &
smi=$!
sleep 3  # idle: what does the GPU do without us?
for round in ${PROBE_ROUNDS:-1 2 3 4}; do
  for cfg in ${PROBE_CONFIGS:-wgpu:vulkan/f32 wgpu:vulkan/f16 dawn:vulkan/f32}; do
    IFS=/ read -r dev dtype toggles <<< "$cfg"  # DEVICE/DTYPE[/DAWN_TOGGLES, e.g. +disable_workgroup_init]
    ATTNC_DAWN_TOGGLES="$toggles" timeout "${PROBE_TIMEOUT:-90}" python3 tools/gpu/variance_probe.py \
      --device "$dev" --dtype "$dtype" ${PROBE_CASES:+--cases "$PROBE_CASES"} --out "$out/probe.jsonl" --tag "$round${toggles:+/$toggles}" 2>&1 \
      | grep -v '^Warning' | tail -2
    sleep 1
  done
done
sleep 2
kill "$smi" 2>/dev/null
