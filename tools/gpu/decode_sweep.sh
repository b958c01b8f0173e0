#!/usr/bin/env bash
# Decode work in one call on the offline NVIDIA machine, per backend (SWEEP_BACKENDS):
#   host    tools/host_overhead.py (host time per call, >= 1000 calls)  -> OUTDIR/host_<backend>.json
#   paged   tools/gpu/paged_probe.py --dtype f16 (paged / contiguous)   -> OUTDIR/paged_<backend>.json
#   kv      tools/gpu/gpu_plan_sweep.py --dtype f16 over KV_CASES with the variants of
#           KV_VARIANTS (f16 K/V and quantized ones side by side)    -> OUTDIR/kv_<backend>.jsonl
# Every step's output goes to OUTDIR/decode_<backend>.log too. Set-up as gpu_sweep.sh.
#
# Usage (repo root):  bash tools/gpu/decode_sweep.sh OUTDIR
# Knobs: SWEEP_BACKENDS (default "wgpu dawn"), STEPS (default "host paged kv"), STEP_TIMEOUT
# (seconds per step and backend, default 150), KV_CASES, KV_VARIANTS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: bash tools/gpu/decode_sweep.sh OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh

write_env_txt "$out/env.txt"

cases=${KV_CASES:-kv_dec1_h128_t32768,kv_dec1_gqa8_t32768,kv_dec4_h128_t16384}
variants=${KV_VARIANTS:-- KL=4 NSPLIT=128 KV=q8_0 KV=q8_0,KL=4 KV=q8_0,KL=8 KV=q4_0 KV=q4_0,KL=4 KV=q4_0,KL=8 KV=q4_0,NSPLIT=128 KV=int8 KV=int8,KL=4}
status=0
for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
  log="$out/decode_$backend.log"
  for step in ${STEPS:-host paged kv}; do
    echo "decode_sweep: $backend $step" | tee -a "$log" >&2
    case $step in
      host) cmd=(python3 tools/host_overhead.py --device "$backend:vulkan" --calls 1000
                 --json "$out/host_$backend.json") ;;
      paged) cmd=(python3 tools/gpu/paged_probe.py "$backend:vulkan" --dtype f16 --json "$out/paged_$backend.json") ;;
      # shellcheck disable=SC2086
      kv) cmd=(python3 tools/gpu/gpu_plan_sweep.py "$backend:vulkan" "$cases" $variants --dtype f16
               --json "$out/kv_$backend.jsonl") ;;
      *) echo "decode_sweep: unknown step $step" | tee -a "$log" >&2; status=1; continue ;;
    esac
    timeout "${STEP_TIMEOUT:-150}" "${cmd[@]}" 2>&1 | grep -v "artificially reduced" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
      echo "decode_sweep: $backend $step exited with $rc" | tee -a "$log" >&2
      status=1
    fi
  done
done
exit $status
