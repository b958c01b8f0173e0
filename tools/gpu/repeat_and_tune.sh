#!/usr/bin/env bash
# On the GPU machine: the seeds suite in separate processes per (backend, dtype) with the
# busy-GPU timing (attnc bench --repeat-processes), then `attnc tune` on f16 for the cases named
# in TUNE_CASES (on each of TUNE_DEVICES, TUNE_REPEATS times, for each dtype of TUNE_DTYPES,
# default f16). With TUNED_ROUNDS=N the tuned cases are then benchmarked with the tuning cache
# (each dtype of TUNE_DTYPES, --rounds N, TUNED_PROCESSES processes, default 2), so that tuned
# f16 and tuned f32 compare on the same footing; the heuristic plans of those cases are benchmarked
# the same way first (heuristic_DTYPE.json). A REPEAT_CONFIGS entry is
# DEVICE/DTYPE[/PROCESSES[/BASELINES]]: the process count (default $PROCESSES, else 3) and
# baselines timed in the same processes (e.g. ort).
# Usage (repo root): bash tools/gpu/repeat_and_tune.sh OUTDIR
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/repeat_and_tune.sh OUTDIR}
mkdir -p "$out/cache"
source tools/gpu/gpu_env.sh
export ATTNC_CACHE_DIR="$out/cache"
for cfg in ${REPEAT_CONFIGS:-wgpu:vulkan/f32 wgpu:vulkan/f16 dawn:vulkan/f32 dawn:vulkan/f16}; do
  IFS=/ read -r dev dt procs baselines <<< "$cfg"
  compare=(); tag=""
  if [ -n "${baselines:-}" ]; then compare=(--compare "$baselines"); tag="_${baselines//,/_}"; fi
  timeout "${REPEAT_TIMEOUT:-150}" python3 -m attnc.bench --suite seeds --device "$dev" --dtype "$dt" --runs 10 \
    --ceilings off --repeat-processes "${procs:-${PROCESSES:-3}}" "${compare[@]}" \
    --json "$out/repeat_${dev%%:*}_$dt$tag.json" 2>&1 \
    | grep -v '^Warning' | sed -n '/^medians of/,$p'
done
cases=()
for c in ${TUNE_CASES:-}; do cases+=(--case "$c"); done
# bench_cases CACHE DEVICE DTYPE JSON: the tuned cases with the plans of the tuning cache CACHE
# (an empty one: the heuristic's), --rounds TUNED_ROUNDS in TUNED_PROCESSES processes
bench_cases() {
  ATTNC_CACHE_DIR="$1" timeout "${TUNED_TIMEOUT:-150}" python3 -m attnc.bench --suite seeds "${cases[@]}" \
    --device "$2" --dtype "$3" --runs 10 --ceilings off --rounds "$TUNED_ROUNDS" \
    --repeat-processes "${TUNED_PROCESSES:-2}" --json "$4" 2>&1 | grep -v '^Warning' | sed -n '/^medians of/,$p'
}
if [ ${#cases[@]} -gt 0 ] && [ -n "${TUNED_ROUNDS:-}" ]; then
  # the heuristic plans of the same cases, benchmarked as the tuned ones are below (an empty cache)
  first_device=${TUNE_DEVICES:-wgpu:vulkan}; first_device=${first_device%% *}
  for tdt in ${TUNE_DTYPES:-f16}; do
    bench_cases "$out/cache_heuristic" "$first_device" "$tdt" "$out/heuristic_$tdt.json"
  done
fi
if [ ${#cases[@]} -gt 0 ]; then
  # TUNE_REPEATS separate tuning processes per device, each with an empty tuning cache of its
  # own: whether repeated runs choose the same winners
  for tdev in ${TUNE_DEVICES:-wgpu:vulkan}; do
    for rep in $(seq 1 "${TUNE_REPEATS:-1}"); do
      suffix=${tdev%%:*}; [ "${TUNE_REPEATS:-1}" -gt 1 ] && suffix="${suffix}_$rep"
      for tdt in ${TUNE_DTYPES:-f16}; do
        ATTNC_CACHE_DIR="$out/cache_tune_$suffix" timeout "${TUNE_TIMEOUT:-200}" python3 -m attnc tune --suite seeds \
          "${cases[@]}" --device "$tdev" --dtype "$tdt" --max "${TUNE_MAX:-16}" --runs 5 \
          --json "$out/tune_${tdt}_$suffix.jsonl" 2>&1 | grep -v '^\s*\[' | grep -v '^Warning' | tail -20
      done
      if [ -n "${TUNED_ROUNDS:-}" ]; then
        for tdt in ${TUNE_DTYPES:-f16}; do
          bench_cases "$out/cache_tune_$suffix" "$tdev" "$tdt" "$out/tuned_${tdt}_$suffix.json"
        done
      fi
    done
  done
fi
