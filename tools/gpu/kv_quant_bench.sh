#!/usr/bin/env bash
# Decode over quantized KV caches against f16 KV, on the offline NVIDIA machine: for each
# backend (wgpu-native, Dawn) runs
#   attnc bench --suite kvquant --dtype f16 --kv q8_0,q4_0,int8
# (S = 1 and 4, T = 16384 and 32768, the dec_h128 and dec_gqa8 head configurations; f16 q, k, v
# for attnc's own row, then the same q with K and V quantized to each format, in one process),
# and writes OUTDIR/kv_<backend>.{json,log} plus OUTDIR/env.txt. Each quantized row carries
# `speedup_vs_attnc` (the f16-KV row's time over its own), `relerr` (against the float64
# reference on the dequantized K/V: the contract), `relerr_unquantized`, `kv_bytes`, and
# the append of one decode step (a K and a V row per KV head, by the DSL pair store kernel, and
# the length advance): `append_ms` (what it adds to a step recorded as KVCache records it, its
# pass then attention's), `append_one_pass_ms` (its dispatches in attention's pass),
# `append_alone_ms` (its pass alone) and `append_fraction` (append_ms over the attention timed
# beside it).
# Set-up as tools/gpu/gpu_sweep.sh (.gl/ and .whl/ beside the checkout).
#
# Usage (repo root):  bash tools/gpu/kv_quant_bench.sh OUTDIR [extra attnc bench args...]
# Knobs: SWEEP_BACKENDS (default "wgpu dawn"), SWEEP_TIMEOUT (seconds per backend, default 400),
# KV_SUITE (default kvquant; kvquant_ci is the small version for a CPU adapter).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out=${1:?usage: bash tools/gpu/kv_quant_bench.sh OUTDIR [extra attnc bench args...]}
shift
mkdir -p "$out"
site=${SWEEP_SITE:-/tmp/site}

source tools/gpu/gpu_env.sh

write_env_txt "$out/env.txt"

status=0
for backend in ${SWEEP_BACKENDS:-wgpu dawn}; do
  echo "kv_quant_bench: $backend" >&2
  timeout "${SWEEP_TIMEOUT:-400}" python3 -m attnc.bench --suite "${KV_SUITE:-kvquant}" --dtype f16 \
    --kv q8_0,q4_0,int8 --device "$backend:vulkan" --json "$out/kv_$backend.json" "$@" 2>&1 \
    | tee "$out/kv_$backend.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "kv_quant_bench: $backend exited with $rc" | tee -a "$out/kv_$backend.log" >&2
    status=1
  fi
done
exit $status
