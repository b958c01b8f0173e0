#!/usr/bin/env bash
# On the GPU machine: `attnc bench` in separate processes while nvidia-smi logs clocks, power,
# utilization and the active clock-event (throttle) reasons every 50 ms; the throttle counters
# before and after. Which reason, if any, was active when a measurement found the clocks down?
# Usage (repo root): bash tools/gpu/throttle_probe.sh OUTDIR [attnc bench args...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/throttle_probe.sh OUTDIR [attnc bench args...]}
shift
mkdir -p "$out/cache"
source tools/gpu/gpu_env.sh
export ATTNC_CACHE_DIR="$out/cache"
nvidia-smi -q -d PERFORMANCE,POWER,CLOCK > "$out/smi_before.txt" 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,enforced.power.limit,temperature.gpu,utilization.gpu,clocks_event_reasons.active,clocks_event_reasons.hw_slowdown,clocks_event_reasons.hw_power_brake_slowdown,clocks_event_reasons.sw_power_cap,clocks_event_reasons.sw_thermal_slowdown,clocks_event_reasons.sync_boost \
  --format=csv -lms 50 > "$out/smi.csv" 2>&1 &
smi=$!
python3 -m attnc.bench "$@" --json "$out/bench.json" 2>&1 | grep -v '^Warning' | tee "$out/bench.log" | grep -E "speed after|DISAGREE|^medians|spread" || true
sleep 1
kill "$smi" 2>/dev/null
nvidia-smi -q -d PERFORMANCE,POWER,CLOCK > "$out/smi_after.txt" 2>&1
diff "$out/smi_before.txt" "$out/smi_after.txt" | grep -E "us$|Counters" || true
