#!/usr/bin/env bash
# f16 against f32 and ONNX Runtime's f16 on the GPU machine, each (backend, dtype) in separate
# processes (attnc bench --repeat-processes): f16 with ONNX Runtime in the same processes, f32
# attnc only (the ratio f16/f32 is read across the two JSON files, per case, process medians).
# Then paged against contiguous decode (tools/gpu/paged_probe.py, PAGED_DTYPES), and the extra
# sweeps named in EXTRA that exist (scripts in tools/gpu/ taking OUTDIR/<name> as their argument).
# Usage (repo root):  bash tools/gpu/f16_sweep.sh OUTDIR
# Knobs: CONFIGS ("device/dtype/processes/compare ..."), STEP_TIMEOUT (seconds per config, default 150),
# EXTRA (default "kv_quant_bench flex_bench"; empty: none), PAGED_DTYPES (default "f16 f32"; empty: none),
# RUNS (default 10), ROUNDS (default 1: `attnc bench --rounds`, each process measuring the suite that many
# times over, cases interleaved, each result its fastest round).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bash tools/gpu/f16_sweep.sh OUTDIR}
mkdir -p "$out"
source tools/gpu/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  python3 --version
  python3 -m pip list --path "${SWEEP_SITE:-/tmp/site}" 2>/dev/null | grep -i -E "wgpu|dawn|onnx|numpy|lark" || true
  git log --oneline -1 2>/dev/null || true
} > "$out/env.txt" 2>&1
for cfg in ${CONFIGS:-wgpu:vulkan/f16/3/ort dawn:vulkan/f16/2/ort wgpu:vulkan/f32/3/- dawn:vulkan/f32/2/-}; do
  IFS=/ read -r dev dt n cmp <<< "$cfg"
  name="${dev%%:*}_$dt"
  args=(--suite seeds --device "$dev" --dtype "$dt" --runs "${RUNS:-10}" --rounds "${ROUNDS:-1}" --ceilings off
        --repeat-processes "$n" --json "$out/$name.json")
  [ "$cmp" != "-" ] && args+=(--compare "$cmp")
  echo "== $name ($n processes${cmp:+, compare $cmp})"
  timeout "${STEP_TIMEOUT:-150}" python3 -m attnc.bench "${args[@]}" > "$out/$name.log" 2>&1
  echo "rc=$?" >> "$out/$name.log"
  grep -v '^Warning' "$out/$name.log" | sed -n '/^medians of/,$p' | head -40
done
for dt in ${PAGED_DTYPES-f16 f32}; do
  echo "== paged decode ($dt)"
  timeout "${STEP_TIMEOUT:-150}" python3 tools/gpu/paged_probe.py wgpu:vulkan --dtype "$dt" --json "$out/paged_$dt.json" \
    2>&1 | grep -v '^Warning' | tee "$out/paged_$dt.log"
done
for x in ${EXTRA-kv_quant_bench flex_bench}; do
  if [ -f "tools/gpu/$x.sh" ]; then
    echo "== $x"
    timeout "${STEP_TIMEOUT:-150}" bash "tools/gpu/$x.sh" "$out/$x" > "$out/$x.log" 2>&1
    echo "rc=$?" >> "$out/$x.log"
    tail -30 "$out/$x.log"
  fi
done
